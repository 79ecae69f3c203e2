"""Scrub credentials and request signatures out of text before it becomes an error message, a log line or metadata.

Libraries put the URL they were fetching into their exceptions (urllib3's MaxRetryError, for one), and a
presigned URL is a working credential until it expires: whoever reads the message could replay it. So every
message built from a foreign exception, and every URL we sign or are handed, goes through `redact` first.

The HTTP libraries also log on their own: urllib3 writes every request line, query string included, at DEBUG
(and retried URLs at WARNING), botocore its signing steps. Those records are not ours to build, so
`scrub_library_logs` puts a filter on the libraries' loggers that rewrites each record before any handler sees
it, and `secrets_in_flight` adds the literal values of a signature being sent to what that filter removes.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

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


# --- the HTTP libraries' own log records ----------------------------------------------------------------------

# A logger's filter sees only the records made at that very logger, not those its children propagate, so the
# filter goes on every logger of these libraries; the ones known to log URLs or signatures are created up front,
# so they carry it even when the library is imported later.
_LIBRARIES = ("urllib3", "botocore", "boto3", "s3transfer")
_KNOWN_LOGGERS = ("urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry", "urllib3.response",
                  "urllib3.connection", "botocore.httpsession", "botocore.endpoint", "botocore.auth",
                  "botocore.awsrequest", "botocore.parsers", "botocore.hooks", "botocore.retryhandler")
# signing details outside a URL: botocore.auth's canonical request lists the query as `name=value&...` lines,
# and it logs the signature itself as "Signature:\n<hex>"
_SIGNED_PAIR = re.compile(r"(?i)\b(x-amz-signature|x-amz-credential|x-amz-security-token|awsaccesskeyid|signature)"
                          r"=[^&\s'\"<>]+")
_SIGNATURE_LINE = re.compile(r"\bSignature:\n\S+")
_in_flight: dict[str, int] = {}  # value -> fetches sending it
_in_flight_values: tuple[str, ...] = ()  # replaced whole under the lock: the filter reads it without one
_in_flight_lock = threading.Lock()


def scrub_log_text(text: str) -> str:
    """`redact`, plus signed `name=value` pairs and signature lines anywhere, plus the values in flight."""
    text = redact(text, *_in_flight_values)
    text = _SIGNED_PAIR.sub(lambda m: f"{m.group(1)}=<redacted>", text)
    return _SIGNATURE_LINE.sub("Signature:\n<redacted>", text)


class _ScrubRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the handler's to report, as usual
            return True
        clean = scrub_log_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            clean = scrub_log_text(record.exc_text)
            if clean != record.exc_text:
                # handlers print exc_text when it is set; the exception object itself would print the original
                record.exc_text, record.exc_info = clean, None
        return True


_FILTER = _ScrubRecords()


def scrub_library_logs() -> None:
    """Put the scrubbing filter on every logger of urllib3, botocore, boto3 and s3transfer (idempotent, cheap:
    call it before sending a signed request)."""
    for name in _KNOWN_LOGGERS:
        logging.getLogger(name)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.partition(".")[0] in _LIBRARIES:
            logger.addFilter(_FILTER)  # a no-op when already there


@contextmanager
def secrets_in_flight(*values: str) -> Iterator[None]:
    """While the block runs, the literal `values` (a presigned URL's signature, credential, token) are scrubbed
    from the HTTP libraries' log records too, wherever they appear in them."""
    global _in_flight_values
    values = tuple(v for v in values if v and len(v) >= 8)
    scrub_library_logs()
    with _in_flight_lock:
        for value in values:
            _in_flight[value] = _in_flight.get(value, 0) + 1
        _in_flight_values = tuple(_in_flight)
    try:
        yield
    finally:
        with _in_flight_lock:
            for value in values:
                left = _in_flight.pop(value, 1) - 1
                if left:
                    _in_flight[value] = left
            _in_flight_values = tuple(_in_flight)
