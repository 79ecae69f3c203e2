"""Scrub credentials and request signatures out of text before it becomes an error message, a log line or metadata.

Libraries put the URL they were fetching into their exceptions (urllib3's MaxRetryError, for one), and a
presigned URL is a working credential until it expires: whoever reads the message could replay it. So every
message built from a foreign exception, and every URL we sign or are handed, goes through `redact` first.
"""

from __future__ import annotations

from hy3d_pipeline.s3.urls import SIGNED_QUERY_REDACTED as REDACTED, scrub_signed_queries
from hy3d_pipeline.settings import secret_values


def redact(text: str, *secrets: str | None) -> str:
    """`text` without signed query strings and without any literal of the current AWS credentials (or of the
    extra `secrets` given)."""
    text = scrub_signed_queries(str(text))
    for value in (*secret_values(), *secrets):
        # very short values would blank out ordinary words; real keys are 16+ characters
        if value and len(value) >= 8:
            text = text.replace(value, "<redacted>")
    return text
