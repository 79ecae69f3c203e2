"""S3 specifics: URL parsing (urls.py), boto errors that say what to do (errors.py), fast listing (listing.py),
and redaction of credentials and signatures (redact.py). The S3 store itself is storage/s3.py."""
