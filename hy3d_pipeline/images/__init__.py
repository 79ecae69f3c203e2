"""Input images: recognising, refusing and normalising what lands in the bucket."""
