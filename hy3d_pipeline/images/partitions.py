"""The `images` dynamic partitions (one per source image), the chain's asset keys, and the tags naming a run's
range of partitions: the names the sensor, the assets, the report and `demo` share.

A partition key is the object key relative to S3_IMAGES_PREFIX, unchanged wherever Dagster accepts it. Dagster
refuses a few substrings ("..." is its range separator, and control characters); such keys, and keys that begin
with our escape marker, are escaped reversibly: marker + percent-encoding with every "." encoded too.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from dagster import AssetKey, DynamicPartitionsDefinition

IMAGES_PARTITIONS_NAME = "images"
images_partitions = DynamicPartitionsDefinition(name=IMAGES_PARTITIONS_NAME)
SOURCE, LOCAL, MODELS = AssetKey("source_images"), AssetKey("local_images"), AssetKey("models_3d")
PIPELINE_ASSETS = [SOURCE, LOCAL, MODELS]
# Dagster's own tags on a run over a range of partitions (what a batch run is)
RANGE_START_TAG, RANGE_END_TAG = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"

ESCAPE_MARKER = "%!"
_REFUSED = ("...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0")


def needs_escape(relative_key: str) -> bool:
    return relative_key.startswith(ESCAPE_MARKER) or any(s in relative_key for s in _REFUSED) or any(
        ord(c) < 32 or ord(c) == 127 for c in relative_key
    )


def partition_key_for(relative_key: str) -> str:
    if not needs_escape(relative_key):
        return relative_key
    return ESCAPE_MARKER + quote(relative_key, safe="/ -_~").replace(".", "%2E")


def relative_key_for(partition_key: str) -> str:
    if partition_key.startswith(ESCAPE_MARKER):
        return unquote(partition_key[len(ESCAPE_MARKER):])
    return partition_key
