"""The exporter's exceptions: one root, one branch per area.

ExportError
├── ConfigError            bad or missing configuration (exit code 2)
├── InputError             bad input from a user or a caller (exit code 2)
│   ├── InvalidExportKey
│   ├── BatchFileError
│   ├── JobIdConflict      a reused job or batch id asks for something else
│   └── BatchEnded         a retry of an item of a batch that has ended
├── JobNotFound            no job (or batch) with that id (exit code 3)
├── ApsisError             anything APSIS One answered or failed to answer
│   ├── RetryableApsisError   408, 429, 5xx, connection errors; may carry retry_after
│   └── PermanentApsisError   400, 404, 410, ...: retrying the same call cannot help
│       └── ApsisAuthError    401/403 that survived one token refresh
├── DownloadError          the export file could not be fetched
│   ├── DownloadRefused       the URL is not on the APSIS origin (a security event)
│   └── DownloadTooLarge      over DOWNLOAD_MAX_BYTES
├── CorruptExport          the file is not the JSON APSIS documents (truncated, garbled)
└── StorageError           object storage failed or is unreachable
"""

from __future__ import annotations


class ExportError(Exception):
    """Root of every error this product raises on purpose."""

    #: Process exit code when this error ends a CLI command.
    exit_code: int = 1


class ConfigError(ExportError):
    """A configuration value is missing or invalid; the message names the variable."""

    exit_code = 2


class InputError(ExportError):
    """Input from a user or a calling service is invalid."""

    exit_code = 2


class InvalidExportKey(InputError):
    """An export key is empty, too long or contains control characters."""


class BatchFileError(InputError):
    """A batch file cannot be read or has invalid lines."""


class JobIdConflict(InputError):
    """A job or batch id that exists already was created for a different request (another
    export key, options, account or batch): refused, never answered with that one's export."""


class BatchEnded(InputError):
    """A batch item cannot start again: its batch has ended (summary, manifest and the
    caller's chain are out) or was cancelled. A finished batch is never reopened."""

    def __init__(self, job_id: str, batch_state: str) -> None:
        how = "was cancelled" if batch_state.startswith("cancelled") else "has ended"
        if batch_state == "deleted":
            how = "was deleted"
        super().__init__(
            f"job {job_id} is an item of batch {job_id.rpartition('.')[0]}, which {how}; "
            "a finished batch is not reopened: export the key again as a new job or batch"
        )
        self.batch_state = batch_state


class JobNotFound(ExportError):
    """No job or batch has that id (or it was deleted by retention)."""

    exit_code = 3


class ApsisError(ExportError):
    """APSIS One answered with an error or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableApsisError(ApsisError):
    """Worth retrying later: 408, 429, 5xx, timeouts, connection errors."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        #: Seconds APSIS asked us to wait (``Retry-After``), when it said so.
        self.retry_after = retry_after


class RateLimited(RetryableApsisError):
    """The pool-wide limiter has no slot soon enough; nothing was sent. Not a failure."""


class PermanentApsisError(ApsisError):
    """Retrying the same call cannot succeed (400, 404, 410, 413, ...)."""


class ApsisAuthError(PermanentApsisError):
    """APSIS refused our credentials even after one token refresh."""


class DownloadError(ExportError):
    """The export file could not be downloaded."""


class DownloadRefused(DownloadError):
    """The download URL is not on the configured APSIS origin; the token was not sent."""


class DownloadTooLarge(DownloadError):
    """The export file is larger than DOWNLOAD_MAX_BYTES."""


class CorruptExport(ExportError):
    """The downloaded file is not the JSON APSIS documents (truncated or garbled)."""


class StorageError(ExportError):
    """Object storage failed or could not be reached."""
