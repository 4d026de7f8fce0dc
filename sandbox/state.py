"""Everything one sandbox instance remembers: accounts, tokens, exports, faults, journal."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from sandbox import jwt
from sandbox.callbacks import CallbackScheduler, SendCallback, http_sender
from sandbox.config import SandboxConfig
from sandbox.faults import FaultConfig, Faults
from sandbox.files import digest_export, generate_export
from sandbox.journal import Journal
from sandbox.limits import RateLimiter


@dataclass
class Definition:
    """An accepted export: what its download URL serves."""

    definition_id: str
    account: str
    export_key: str
    history: bool
    definitions: bool
    merged: bool
    size: int
    seed: int
    merged_count: int
    #: time.monotonic() after which the file is downloadable; None = export failed.
    ready_at: float | None
    created_at: float = field(default_factory=time.time)
    _digest: tuple[str, int] | None = None

    def chunks(self) -> Iterator[bytes]:
        return generate_export(
            self.export_key,
            seed=self.seed,
            size=self.size,
            history=self.history,
            definitions=self.definitions,
            merged=self.merged,
            merged_count=self.merged_count,
        )

    def digest(self) -> tuple[str, int]:
        """(sha256, bytes) of the unfaulted file, generated once and streamed through hashlib."""
        if self._digest is None:
            self._digest = digest_export(self.chunks())
        return self._digest

    def to_json(self) -> dict[str, Any]:
        sha256, size = self.digest()
        return {
            "definition_id": self.definition_id,
            "account": self.account,
            "export_key": self.export_key,
            "options": {
                "include_attribute_history": self.history,
                "include_type_definitions": self.definitions,
                "include_merged_profiles": self.merged,
            },
            "merged_count": self.merged_count,
            "seed": self.seed,
            "ready": self.ready_at is not None and time.monotonic() >= self.ready_at,
            "failed": self.ready_at is None,
            "sha256": sha256,
            "bytes": size,
        }


class SandboxState:
    """The state behind one app, exposed as app.extensions["sandbox"] for in-process control."""

    def __init__(
        self, config: SandboxConfig | None = None, *, send_callback: SendCallback | None = None
    ) -> None:
        # A private copy: PATCH /_sandbox/config must not leak into the caller's object.
        self.config = replace(config) if config is not None else SandboxConfig()
        self._initial = replace(self.config)
        #: Per-instance signing key: tokens from another sandbox (or a restart) are invalid.
        self.signing_key = secrets.token_bytes(32)
        self.journal = Journal()
        self.faults = Faults()
        self.limiter = RateLimiter(self.config.effective_limits())
        self.scheduler = CallbackScheduler(
            self.journal,
            send_callback or http_sender(self.config.callback_timeout),
            retries=self.config.callback_retries,
            backoff=self.config.callback_backoff,
        )
        #: Wall clock used for JWT iat/exp; tests may swap it to travel in time.
        self.clock: Callable[[], float] = time.time
        self._lock = threading.Lock()
        self._definitions: dict[str, Definition] = {}
        self._issued: set[str] = set()
        self._revoked: set[str] = set()

    # Accounts and tokens

    def account_for(self, client_id: str) -> tuple[str, str] | None:
        """(client_secret, account) of a known client id."""
        for known_id, secret, account in self.config.accounts:
            if known_id == client_id:
                return secret, account
        return None

    def issue_token(self, client_id: str, account: str) -> tuple[str, int]:
        """A fresh JWT and its lifetime in seconds."""
        now = int(self.clock())
        lifetime = int(self.config.token_lifetime)
        jti = uuid.uuid4().hex
        claims = {
            "sub": client_id,
            "account": account,
            "iat": now,
            "exp": now + lifetime,
            "jti": jti,
        }
        with self._lock:
            self._issued.add(jti)
        return jwt.sign(claims, self.signing_key), lifetime

    def check_token(self, token: str) -> dict[str, Any]:
        """The token's claims; raises jwt.TokenError (TokenExpired when expired or revoked)."""
        claims = jwt.verify(token, self.signing_key, now=self.clock())
        with self._lock:
            if claims.get("jti") in self._revoked:
                raise jwt.TokenExpired("token expired by a fault")
        return claims

    def set_faults(self, faults: FaultConfig | dict[str, Any]) -> None:
        """Replace the fault configuration (a FaultConfig or its JSON form)."""
        config = faults if isinstance(faults, FaultConfig) else FaultConfig.from_json(faults)
        self.faults.set(config)
        if self.faults.any_expire_tokens():
            # expire_tokens: every token issued so far is treated as expired; new ones work.
            with self._lock:
                self._revoked |= self._issued

    # Exports

    def add_definition(self, definition: Definition) -> None:
        with self._lock:
            self._definitions[definition.definition_id] = definition

    def definition(self, definition_id: str) -> Definition | None:
        with self._lock:
            return self._definitions.get(definition_id)

    def definitions(self) -> list[Definition]:
        with self._lock:
            return list(self._definitions.values())

    def is_unknown_key(self, export_key: str) -> bool:
        return export_key.startswith("unknown") or export_key in self.config.unknown_keys

    # Runtime configuration

    def patch_config(self, changes: dict[str, Any]) -> None:
        """Apply validated runtime changes (delays, limits, token lifetime, sizes, retries)."""
        for name, value in changes.items():
            if name == "limits":
                for request_class, limit in value.items():
                    self.limiter.set_limit(request_class, limit)
                continue
            setattr(self.config, name, value)
        self.scheduler.retries = self.config.callback_retries
        self.scheduler.backoff = self.config.callback_backoff

    def reset(self) -> None:
        """Back to a fresh instance: faults, journal, exports, limits, config, pending callbacks."""
        self.scheduler.clear()
        self.faults.reset()
        self.journal.clear()
        self.config = replace(self._initial)
        self.limiter = RateLimiter(self.config.effective_limits())
        self.scheduler.retries = self.config.callback_retries
        self.scheduler.backoff = self.config.callback_backoff
        # Issued tokens stay valid: a reset isolates tests, it does not log clients out.
        with self._lock:
            self._definitions.clear()

    def close(self) -> None:
        """Stop the callback thread."""
        self.scheduler.stop()
