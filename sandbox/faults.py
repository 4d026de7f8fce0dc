"""Misbehaviour on demand: a default FaultSpec plus per-export-key overrides, consumed safely."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any

#: Retry-After, in seconds, sent with an injected 429 or 503 that does not name one.
DEFAULT_RETRY_AFTER = 1

AUTH_STYLES = ("401", "403")


class FaultConfigError(ValueError):
    """A fault configuration that cannot be applied (wrong field name or type)."""


@dataclass(frozen=True)
class InjectedError:
    """One response to answer instead of the normal one."""

    status: int
    #: Seconds for the Retry-After header; None sends none.
    retry_after: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> InjectedError:
        if isinstance(raw, int) and not isinstance(raw, bool):
            default = DEFAULT_RETRY_AFTER if raw in (429, 503) else None
            return cls(status=raw, retry_after=default)
        if isinstance(raw, dict) and isinstance(raw.get("status"), int):
            status: int = raw["status"]
            default = DEFAULT_RETRY_AFTER if status in (429, 503) else None
            retry_after = raw.get("retry_after", default)
            if retry_after is not None and not isinstance(retry_after, int):
                raise FaultConfigError("retry_after must be an integer or null")
            return cls(status=status, retry_after=retry_after)
        raise FaultConfigError(f"an injected error is a status or {{status, retry_after}}: {raw!r}")


@dataclass
class FaultSpec:
    """How to misbehave; None means "not set here" (fall back to the default spec, then normal)."""

    verify_delay: float | None = None
    ready_delay: float | None = None
    drop_verify: bool | None = None
    drop_ready: bool | None = None
    #: Extra copies of each callback.
    duplicate: int | None = None
    #: Send the ready (200) callback before the verify (100) one.
    reorder: bool | None = None
    #: Send {"code": failure_code, "message": "Export failed: ..."} instead of the 200.
    failure_code: int | None = None
    #: Answered, one per request and in order, instead of the normal response.
    export_errors: list[InjectedError] | None = None
    download_errors: list[InjectedError] | None = None
    token_errors: list[InjectedError] | None = None
    #: Answer 401/403 to every token issued before this spec was set.
    expire_tokens: bool | None = None
    #: How to refuse a bad token: "401" (problem details) or "403" (API-gateway deny).
    auth_style: str | None = None
    #: Stop the download after this many bytes.
    truncate_at: int | None = None
    #: Overwrite a run of bytes in the middle of the download with garbage (same length).
    corrupt: bool | None = None
    #: Downloads that get truncate_at/corrupt, counted per export key; None = every one.
    fault_times: int | None = None
    #: Base URL put in the ready callback's download URL instead of the sandbox's own.
    download_host: str | None = None
    #: The download endpoint answers 302 to this URL.
    redirect_to: str | None = None
    #: The token endpoint answers 307 to this URL (a client that follows re-posts its
    #: client_id and client_secret there). Read from the default spec: a token has no key.
    token_redirect_to: str | None = None
    #: Export file size in bytes.
    file_size: int | None = None
    merged_count: int | None = None
    #: Injected and real 429s carry no Retry-After header.
    omit_retry_after: bool | None = None

    @classmethod
    def from_json(cls, raw: Any) -> FaultSpec:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise FaultConfigError("a fault spec is a JSON object")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name not in known:
                raise FaultConfigError(f"unknown fault field {name!r}")
            values[name] = _parse_field(name, value)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, list):
                value = [{"status": e.status, "retry_after": e.retry_after} for e in value]
            out[f.name] = value
        return out


_BOOLS = {"drop_verify", "drop_ready", "reorder", "expire_tokens", "corrupt", "omit_retry_after"}
_INTS = {"duplicate", "failure_code", "truncate_at", "fault_times", "file_size", "merged_count"}
_FLOATS = {"verify_delay", "ready_delay"}
_STRS = {"download_host", "redirect_to", "token_redirect_to", "auth_style"}
_ERROR_LISTS = {"export_errors", "download_errors", "token_errors"}


def _parse_field(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _BOOLS and isinstance(value, bool):
        return value
    if name in _INTS and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if name in _FLOATS and isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise FaultConfigError(f"{name} must not be negative")
        return float(value)
    if name in _STRS and isinstance(value, str):
        if name == "auth_style" and value not in AUTH_STYLES:
            raise FaultConfigError(f"auth_style must be one of {AUTH_STYLES}")
        return value
    if name in _ERROR_LISTS and isinstance(value, list):
        return [InjectedError.parse(item) for item in value]
    raise FaultConfigError(f"bad value for {name}: {value!r}")


@dataclass
class FaultConfig:
    """The whole fault configuration: a default spec and per-export-key overrides."""

    default: FaultSpec = field(default_factory=FaultSpec)
    keys: dict[str, FaultSpec] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any) -> FaultConfig:
        if not isinstance(raw, dict):
            raise FaultConfigError('faults are {"default": {...}, "keys": {"<key>": {...}}}')
        unknown = set(raw) - {"default", "keys"}
        if unknown:
            raise FaultConfigError(f"unknown fault sections: {sorted(unknown)}")
        keys = raw.get("keys") or {}
        if not isinstance(keys, dict):
            raise FaultConfigError("keys must map export keys to fault specs")
        return cls(
            default=FaultSpec.from_json(raw.get("default")),
            keys={str(k): FaultSpec.from_json(v) for k, v in keys.items()},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "default": self.default.to_json(),
            "keys": {key: spec.to_json() for key, spec in self.keys.items()},
        }


class Faults:
    """Thread-safe holder of the current FaultConfig and of what its one-shot faults used."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._config = FaultConfig()
        self._download_faults_used: dict[str, int] = {}

    def set(self, config: FaultConfig) -> None:
        with self._lock:
            self._config = config
            self._download_faults_used = {}

    def reset(self) -> None:
        self.set(FaultConfig())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._config.to_json()

    def effective(self, export_key: str | None) -> FaultSpec:
        """The default spec overlaid, field by field, with the key's own spec."""
        with self._lock:
            default = self._config.default
            override = self._config.keys.get(export_key) if export_key is not None else None
            if override is None:
                return FaultSpec(**{f.name: getattr(default, f.name) for f in fields(default)})
            return FaultSpec(
                **{
                    f.name: (
                        getattr(override, f.name)
                        if getattr(override, f.name) is not None
                        else getattr(default, f.name)
                    )
                    for f in fields(default)
                }
            )

    def any_expire_tokens(self) -> bool:
        with self._lock:
            specs = [self._config.default, *self._config.keys.values()]
            return any(spec.expire_tokens for spec in specs)

    def pop_error(self, kind: str, export_key: str | None) -> InjectedError | None:
        """Consume the next injected error of `kind` (export, download, token) for the key."""
        attribute = f"{kind}_errors"
        with self._lock:
            override = self._config.keys.get(export_key) if export_key is not None else None
            for spec in (override, self._config.default):
                queue: list[InjectedError] | None = getattr(spec, attribute, None)
                if queue is not None:
                    return queue.pop(0) if queue else None
            return None

    def claim_download_fault(self, export_key: str, fault_times: int | None) -> bool:
        """Whether this download still gets truncate_at/corrupt (counted per export key)."""
        with self._lock:
            used = self._download_faults_used.get(export_key, 0)
            if fault_times is not None and used >= fault_times:
                return False
            self._download_faults_used[export_key] = used + 1
            return True
