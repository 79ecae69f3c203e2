"""Input images and the sensor that finds them: partitions, the tick planner, the record of what was requested,
and recognising, refusing and normalising what lands in the bucket (validation, foreground)."""
