"""The sandbox's settings: accounts, delays, limits and file sizes, with their units."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Rate-limit classes and their documented defaults: (requests, window in seconds).
#: Source: the APSIS One docs (token 10/min, exports 1/s, downloads 60/min, others 100/s).
DEFAULT_LIMITS: dict[str, tuple[int, float] | None] = {
    "token": (10, 60.0),
    "export": (1, 1.0),
    "download": (60, 60.0),
    "other": (100, 1.0),
}

#: The one account a fresh sandbox knows: (client_id, client_secret, account).
DEFAULT_ACCOUNT: tuple[str, str, str] = ("sandbox", "sandbox", "sandbox")

#: Largest accepted request body, in bytes (APSIS answers 413 over 100 kB).
MAX_BODY_BYTES = 100_000


@dataclass(kw_only=True)
class SandboxConfig:
    """Everything a sandbox instance can be told at start; most of it is patchable later."""

    #: Known API clients as (client_id, client_secret, account name).
    accounts: list[tuple[str, str, str]] = field(default_factory=lambda: [DEFAULT_ACCOUNT])
    #: Lifetime of an issued token, in seconds (APSIS: 24 h).
    token_lifetime: int = 86_400
    #: Seconds from the 202 to the "Callback verified" (code 100) callback.
    verify_delay: float = 0.05
    #: Seconds from the 202 to the "ready" (code 200) callback.
    ready_delay: float = 0.2
    #: Per-class overrides of DEFAULT_LIMITS: class -> (requests, window seconds), None = off.
    limits: dict[str, tuple[int, float] | None] | None = None
    #: Size of a generated export file, in bytes (exact when above the minimal document).
    file_size: int = 4096
    #: Merged profiles added when include_merged_profiles is set.
    merged_count: int = 2
    #: Seed of the export-file generator; same seed, key and options give the same bytes.
    seed: int = 0
    #: Export keys answered 404 (besides every key starting with "unknown").
    unknown_keys: frozenset[str] = frozenset()
    #: Extra attempts for a callback that met a connection error or a 5xx.
    callback_retries: int = 3
    #: Seconds before a callback's first retry; the n-th retry waits n times this.
    callback_backoff: float = 0.5
    #: Callback HTTP timeouts in seconds: (connect, read).
    callback_timeout: tuple[float, float] = (2.0, 5.0)
    #: Largest accepted request body, in bytes.
    max_body_bytes: int = MAX_BODY_BYTES

    def effective_limits(self) -> dict[str, tuple[int, float] | None]:
        """DEFAULT_LIMITS with this config's overrides applied."""
        merged = dict(DEFAULT_LIMITS)
        merged.update(self.limits or {})
        return merged
