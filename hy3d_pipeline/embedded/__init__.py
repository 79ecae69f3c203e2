"""The embedded default: a loopback SeaweedFS S3 server and sample images, so a laptop needs no cloud account."""
