"""S3 access: URL parsing, the configured bucket resource, and errors that say what to do."""
