"""Typed configuration read from the environment (pydantic-settings), with one-line errors."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from worker.errors import ConfigError

#: Minimum length of a callback secret, in bytes (HMAC-SHA256 keys shorter than the
#: digest weaken it).
MIN_SECRET_BYTES = 32
#: Minimum length of STATUS_TOKEN, in characters (a bearer token anyone can try).
MIN_STATUS_TOKEN_CHARS = 32
#: Fewest distinct characters in a callback secret or STATUS_TOKEN: "xxx…", "000…" or
#: "abab…" are long enough but not secret. A random token_urlsafe(32) has about 30.
MIN_DISTINCT_CHARS = 10
#: Marks of a value copied from deploy/, the README or an example instead of a real secret,
#: found anywhere in the value once lower-cased and stripped of everything but a-z and 0-9.
#: Each is at least 7 letters, so a random secret contains one by chance with odds < 1e-8.
PLACEHOLDER_MARKS = ("replaceme", "changeme", "placeholder", "example", "yoursecret")
#: The broker's visibility timeout must be at least this many times DOWNLOAD_TIMEOUT: a fetch
#: task downloads for up to DOWNLOAD_TIMEOUT, then splits and uploads the same bytes (half
#: as long again), and Redis redelivers an unacknowledged task once it is older than the
#: visibility timeout, to a second worker while the first is still running it.
VISIBILITY_OVER_DOWNLOAD = 1.5
#: Whole values (compared the same way) that are placeholders, not credentials.
PLACEHOLDER_VALUES = frozenset({"todo", "tbd", "none", "null", "changeit"})
#: How to make a good secret, for the error message.
GENERATE_HINT = 'generate one: python -c "import secrets; print(secrets.token_urlsafe(48))"'


def placeholder_reason(value: str) -> str | None:
    """Why ``value`` looks like a placeholder rather than a real credential; None if not.

    The reason never quotes the value.
    """
    text = value.strip()
    folded = re.sub(r"[^a-z0-9]", "", text.lower())
    if any(mark in folded for mark in PLACEHOLDER_MARKS) or folded in PLACEHOLDER_VALUES:
        return "is a placeholder from an example, not a real value"
    one_character = len(set(folded or text)) <= 1  # "xxxx", "xxxx-xxxx", "****", "0000"
    if one_character or text.startswith(("<", "${", "{{")) or "..." in text or "…" in text:
        return "is a placeholder (one repeated character, <...> or ${...}), not a real value"
    return None


def _real_credential(value: str | None) -> str | None:
    """An APSIS client id or secret: unset or empty is for require() to judge; a placeholder
    is refused at start-up."""
    if value:
        reason = placeholder_reason(value)
        if reason:
            raise ValueError(f"{reason}; set the credentials APSIS issued")
    return value


def _strong_secret(value: str, *, min_length: int, unit: str) -> str:
    reason = placeholder_reason(value)
    if reason:
        raise ValueError(f"{reason}; {GENERATE_HINT}")
    size = len(value.encode()) if unit == "bytes" else len(value)
    if size < min_length:
        raise ValueError(f"must be at least {min_length} {unit} long; {GENERATE_HINT}")
    if len(set(value)) < MIN_DISTINCT_CHARS:
        raise ValueError(
            f"must have at least {MIN_DISTINCT_CHARS} distinct characters; {GENERATE_HINT}"
        )
    return value


#: Client-side encryption master keys (STORAGE_ENCRYPTION_KEY): 32 bytes each, told apart
#: by an 8-byte public fingerprint stored in each object's header.
MASTER_KEY_BYTES = 32
KEY_ID_BYTES = 8


@dataclass(frozen=True)
class KeyRing:
    """The current master key (encrypts) and older ones (still decrypt), by key id."""

    current: bytes
    keys: dict[bytes, bytes]

    @property
    def current_id(self) -> bytes:
        return key_id(self.current)


def key_id(key: bytes) -> bytes:
    """A public fingerprint of a master key, stored in each header to pick the key."""
    return hashlib.sha256(b"apsis-export key id" + key).digest()[:KEY_ID_BYTES]


def parse_key_ring(text: str) -> KeyRing:
    """``CURRENT[,PREVIOUS...]``, each base64 of 32 bytes; ValueError never echoes a key."""
    keys: list[bytes] = []
    for n, part in enumerate(p.strip() for p in text.split(",")):
        try:
            key = base64.b64decode(part, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"key #{n + 1} is not valid base64") from None
        if len(key) != MASTER_KEY_BYTES:
            raise ValueError(
                f"key #{n + 1} must be {MASTER_KEY_BYTES} bytes (base64 of 32 random bytes)"
            )
        keys.append(key)
    return KeyRing(current=keys[0], keys={key_id(k): k for k in keys})


#: How the certificate of a rediss:// server is checked (REDIS_TLS_CERT_REQS, or
#: ssl_cert_reqs in REDIS_URL): "required" unless the user names another value.
TLS_CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}
#: The TLS options a rediss:// URL's query may carry, as redis-py and kombu name them.
URL_TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class RedisTls:
    """TLS to Redis: how the server's certificate is checked, the CA bundle that signed it
    (None: the system's), and an optional client certificate and key (PEM files)."""

    cert_reqs: str = "required"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class RedisConnection:
    """How every client reaches Redis (redis-py, the Celery broker): the one place a way of
    connecting (one server, a Sentinel group) is decided. ``url`` carries no TLS query
    options: they are in ``tls`` (merged from REDIS_URL's query and the REDIS_TLS_*
    settings)."""

    #: Never in the repr: it may carry the ACL user's password.
    url: str = field(repr=False)
    tls: RedisTls | None = None
    #: A Sentinel group (REDIS_SENTINELS): the primary is whichever server the sentinels
    #: name for ``master``; the URL then gives only the scheme (TLS or not), the ACL user,
    #: password and database. Empty: the URL's host is Redis itself.
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    #: The sentinels' own password (REDIS_SENTINEL_PASSWORD), if they ask for one.
    sentinel_password: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """scheme://host:port/db, without credentials or query: safe to print."""
        parts = urlsplit(self.url)
        if self.sentinels:
            group = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"{parts.scheme}://{self.master} via sentinels {group}{parts.path}"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"

    def sentinel_kwargs(self) -> dict[str, Any]:
        """How redis-py and kombu reach the sentinels themselves: with the same TLS as Redis
        (a TLS deployment runs its sentinels on TLS too) and their own password, if any."""
        kwargs: dict[str, Any] = {}
        if self.tls is not None:
            kwargs = {"ssl": True, **self.redis_kwargs()}
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs

    def broker_url(self) -> str:
        """Celery's ``broker_url``: the URL itself, or one ``sentinel://`` URL per sentinel
        (kombu's form), each with the ACL user, password and database for the primary."""
        if not self.sentinels:
            return self.url
        parts = urlsplit(self.url)
        auth = parts.netloc.rpartition("@")[0]
        auth = f"{auth}@" if auth else ""
        return ";".join(
            f"sentinel://{auth}{host}:{port}{parts.path}" for host, port in self.sentinels
        )

    def broker_transport_options(self) -> dict[str, Any]:
        """kombu's options for a Sentinel group (none without one)."""
        if not self.sentinels:
            return {}
        return {"master_name": self.master, "sentinel_kwargs": self.sentinel_kwargs()}

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``redis.Redis.from_url(self.url, ...)`` for the TLS options."""
        if self.tls is None:
            return {}
        kwargs: dict[str, Any] = {"ssl_cert_reqs": self.tls.cert_reqs}
        if self.tls.cert_reqs == "none":
            kwargs["ssl_check_hostname"] = False
        kwargs.update(self._files())
        return kwargs

    def broker_ssl(self) -> dict[str, Any] | None:
        """Celery's ``broker_use_ssl`` (kombu hands it to redis-py). Always set for rediss://,
        so kombu never falls back to its default of not checking the certificate."""
        if self.tls is None:
            return None
        return {"ssl_cert_reqs": TLS_CERT_REQS[self.tls.cert_reqs], **self._files()}

    def _files(self) -> dict[str, str]:
        assert self.tls is not None
        files = {
            "ssl_ca_certs": self.tls.ca_file,
            "ssl_certfile": self.tls.cert_file,
            "ssl_keyfile": self.tls.key_file,
        }
        return {name: path for name, path in files.items() if path}


def _readable_file(path: str, name: str) -> str:
    """``path`` expanded; ValueError naming ``name`` when it is not a readable file."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full) or not os.access(full, os.R_OK):
        raise ValueError(f"{name} is invalid: no readable file at {full}")
    return full


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """REDIS_SENTINELS (``host:port,host:port,...``); ValueError naming what is wrong."""
    found: list[tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        host, _, port = item.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"REDIS_SENTINELS is invalid: {item!r} is not host:port")
        found.append((host, int(port)))
    return tuple(found)


def redis_connection(
    url: str,
    *,
    cert_reqs: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    sentinels: str | None = None,
    master: str | None = None,
    sentinel_password: str | None = None,
) -> RedisConnection:
    """REDIS_URL plus the REDIS_TLS_* and REDIS_SENTINEL* settings as one RedisConnection;
    ValueError (never quoting the URL, which may hold a password) on a TLS option or a
    Sentinel setting that cannot work.

    A TLS option in the URL's query wins over its setting.
    """
    group = parse_sentinels(sentinels) if sentinels else ()
    if group and not master:
        raise ValueError("REDIS_SENTINELS is set without REDIS_SENTINEL_MASTER")
    if master and not group:
        raise ValueError("REDIS_SENTINEL_MASTER is set without REDIS_SENTINELS")
    if group and urlsplit(url).scheme == "unix":
        raise ValueError("REDIS_SENTINELS needs a redis:// or rediss:// REDIS_URL")
    found = _redis_connection(
        url, cert_reqs=cert_reqs, ca_file=ca_file, cert_file=cert_file, key_file=key_file
    )
    if not group:
        return found
    return RedisConnection(found.url, found.tls, group, master, sentinel_password or None)


def _redis_connection(
    url: str,
    *,
    cert_reqs: str | None,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
) -> RedisConnection:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    from_url = {name: value for name, value in query if name in URL_TLS_OPTIONS}
    rest = [(name, value) for name, value in query if name not in URL_TLS_OPTIONS]
    bare = urlunsplit(parts._replace(query=urlencode(rest)))
    given = {
        "REDIS_TLS_CERT_REQS": cert_reqs,
        "REDIS_TLS_CA_FILE": ca_file,
        "REDIS_TLS_CERT_FILE": cert_file,
        "REDIS_TLS_KEY_FILE": key_file,
    }
    if parts.scheme != "rediss":
        tls_given = [name for name, value in given.items() if value] + list(from_url)
        if tls_given:
            raise ValueError(f"{tls_given[0]} is set, but REDIS_URL is not a rediss:// URL")
        return RedisConnection(bare)
    # kombu's spelling (CERT_REQUIRED) too.
    reqs = (from_url.get("ssl_cert_reqs") or cert_reqs or "required").lower()
    reqs = reqs.removeprefix("cert_")
    if reqs not in TLS_CERT_REQS:
        named = (
            "ssl_cert_reqs in REDIS_URL" if from_url.get("ssl_cert_reqs") else "REDIS_TLS_CERT_REQS"
        )
        raise ValueError(f"{named} is invalid: must be required, optional or none")
    files: dict[str, str | None] = {}
    for option, setting, value in (
        ("ssl_ca_certs", "REDIS_TLS_CA_FILE", ca_file),
        ("ssl_certfile", "REDIS_TLS_CERT_FILE", cert_file),
        ("ssl_keyfile", "REDIS_TLS_KEY_FILE", key_file),
    ):
        path = from_url.get(option) or value
        named = f"{option} in REDIS_URL" if from_url.get(option) else setting
        files[option] = _readable_file(path, named) if path else None
    if files["ssl_keyfile"] and not files["ssl_certfile"]:
        raise ValueError("REDIS_TLS_KEY_FILE is set without REDIS_TLS_CERT_FILE")
    tls = RedisTls(
        cert_reqs=reqs,
        ca_file=files["ssl_ca_certs"],
        cert_file=files["ssl_certfile"],
        key_file=files["ssl_keyfile"],
    )
    return RedisConnection(bare, tls)


class AccountSettings(BaseModel):
    """One more APSIS account (another region or brand), from APSIS_ACCOUNTS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = "https://api.apsis.one"
    client_id: str
    client_secret: str = Field(repr=False)
    export_rate: float = Field(1.0, gt=0)
    download_rate: float = Field(60.0, gt=0)
    token_rate: float = Field(10.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be an http(s) URL with a host")
        return value.rstrip("/")

    @field_validator("client_id", "client_secret")
    @classmethod
    def _credential(cls, value: str) -> str:
        _real_credential(value)
        return value


class Settings(BaseSettings):
    """Every setting, named as its environment variable. Units are in the names or docs."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=True, frozen=True)

    # APSIS One
    APSIS_BASE_URL: str = "https://api.apsis.one"
    APSIS_CLIENT_ID: str | None = None
    APSIS_CLIENT_SECRET: str | None = Field(None, repr=False)
    #: Name of the APSIS account: keys the shared token cache and the rate-limit buckets.
    APSIS_ACCOUNT: str = "default"
    #: Export requests per second allowed for the account (documented: 1).
    APSIS_EXPORT_RATE: float = Field(1.0, gt=0)
    #: Downloads per minute allowed for the account (documented: 60).
    APSIS_DOWNLOAD_RATE: float = Field(60.0, gt=0)
    #: Token requests per minute allowed for the account (documented: 10).
    APSIS_TOKEN_RATE: float = Field(10.0, gt=0)
    #: Fraction of every APSIS rate the pool leaves unused, against arrival jitter (0-0.5).
    APSIS_RATE_MARGIN: float = Field(0.045, ge=0, le=0.5)
    #: More accounts as JSON: {"apac": {"base_url": "https://api-apac.apsis.one",
    #: "client_id": "...", "client_secret": "...", "export_rate": 1, ...}, ...}.
    APSIS_ACCOUNTS: dict[str, AccountSettings] = Field(default_factory=dict)
    #: Seconds to wait for APSIS's "ready" callback before re-requesting the export.
    APSIS_CALLBACK_TIMEOUT: int = Field(6 * 3600, gt=0)
    #: Seconds from a job's creation after which it fails if not done (GDPR allows a month).
    EXPORT_DEADLINE: int = Field(7 * 24 * 3600, gt=0)

    # Redis: the Celery broker, the job store, the inbox stream and the shared limits.
    #: Never in the settings' repr: it may carry the ACL user's password.
    REDIS_URL: str = Field("redis://127.0.0.1:6379/0", repr=False)
    #: TLS to a rediss:// Redis (see redis_connection): the CA bundle that signed the
    #: server's certificate (unset: the system's), a client certificate and its key, and
    #: how the certificate is checked ("required"; "optional" or "none" only by name).
    REDIS_TLS_CA_FILE: str | None = None
    REDIS_TLS_CERT_FILE: str | None = None
    REDIS_TLS_KEY_FILE: str | None = None
    REDIS_TLS_CERT_REQS: str | None = None
    #: A Redis Sentinel group instead of one server: ``host:port,host:port,...`` and the
    #: name the sentinels monitor the primary under. REDIS_URL then gives the scheme (TLS
    #: or not), the ACL user, password and database; its host is not used.
    REDIS_SENTINELS: str | None = None
    REDIS_SENTINEL_MASTER: str | None = None
    #: The sentinels' own password (``requirepass`` in sentinel.conf), if they ask for one.
    REDIS_SENTINEL_PASSWORD: str | None = Field(None, repr=False)
    #: Replicas that must hold a write someone relies on (the inbox entry before the
    #: webhook's 2xx, a job's creation before its task ends, each state transition) before
    #: we go on (Redis's WAIT); 0 (default) turns it off: set it when Redis has replicas
    #: that a failover may promote. Not confirmed within REDIS_WAIT_TIMEOUT_MS (ms), the
    #: webhook answers 503 and a task goes back on the queue, as when Redis is down.
    REDIS_MIN_REPLICAS_ACK: int = Field(0, ge=0, le=16)
    REDIS_WAIT_TIMEOUT_MS: int = Field(1000, gt=0, le=60_000)

    # The callback webhook
    #: Public base URL of the webhook, as APSIS must reach it (e.g. https://hooks.example.com).
    CALLBACK_BASE_URL: str | None = None
    #: Key of the HMAC on callback tokens; at least 32 bytes, 10 distinct characters, and no
    #: placeholder. Never in the settings' repr (nor any other secret below).
    CALLBACK_SECRET: str | None = Field(None, repr=False)
    #: The secret before a rotation; tokens it signed stay valid until they expire.
    CALLBACK_SECRET_PREVIOUS: str | None = Field(None, repr=False)
    #: Seconds a callback token stays valid (callbacks may arrive hours late).
    CALLBACK_TOKEN_TTL: int = Field(7 * 24 * 3600, gt=0)
    #: Largest callback body accepted, in bytes.
    CALLBACK_MAX_BYTES: int = Field(16 * 1024, gt=0)

    # Downloads
    #: Largest export file downloaded, in bytes (default 20 GiB).
    DOWNLOAD_MAX_BYTES: int = Field(20 * 1024**3, gt=0)
    #: Seconds one download may take in all (default 2 hours).
    DOWNLOAD_TIMEOUT: float = Field(2 * 3600.0, gt=0)

    # Storage
    #: Where results go: file:///path, s3://bucket/prefix, gs://..., az://..., memory:///
    STORAGE_URL: str = "file://./exports"

    #: Client-side envelope encryption of every stored object: base64 of 32 random bytes,
    #: or a key ring "CURRENT,PREVIOUS" (new objects use the first; reads try each by id).
    STORAGE_ENCRYPTION_KEY: str | None = Field(None, repr=False)
    #: S3 server-side encryption: "AES256" (SSE-S3) or "aws:kms" (SSE-KMS).
    STORAGE_SSE: str | None = None
    #: KMS key id or ARN for STORAGE_SSE=aws:kms (unset: the bucket's default KMS key).
    STORAGE_SSE_KMS_KEY_ID: str | None = None
    #: Days after a job (or batch) ended before its objects and records are deleted by the
    #: sweep, leaving a deletion record; 0 keeps them forever. Default 30: GDPR's storage
    #: limitation, and a month covers handing the export over (Art. 12(3)).
    RETENTION_DAYS: float = Field(30.0, ge=0)
    #: Build jobs/<job_id>/package.zip for every done job: the report as index.html, the
    #: profile documents, CSV files and checksums.sha256 (what a DPO hands over).
    PACKAGE_ENABLED: bool = True
    #: Longest expiry of a package link (``apsis-export link``, ``deliver``), in seconds
    #: (default 7 days; S3 presigned URLs cannot outlive 7 days anyway).
    LINK_MAX_EXPIRY: int = Field(7 * 24 * 3600, gt=0, le=7 * 24 * 3600)

    # Celery
    #: Seconds before the Redis broker redelivers an unacknowledged task, running or not;
    #: at least 1.5 x DOWNLOAD_TIMEOUT (default 3 hours), so no fetch outlives it.
    CELERY_VISIBILITY_TIMEOUT: int = Field(3 * 3600, gt=0)
    #: Seconds the inbox leaves an entry with a consumer before another reclaims it.
    INBOX_RECLAIM_AFTER: float = Field(60.0, gt=0)

    # The watchdog (a periodic sweep inside the worker pool)
    #: Seconds between two sweeps of the pool (one sweeper at a time, through a Redis lock).
    WATCHDOG_INTERVAL: float = Field(30.0, gt=0)
    #: Seconds a queued or ready job may sit unchanged before the sweep dispatches it again.
    WATCHDOG_STUCK_AFTER: float = Field(300.0, gt=0)
    #: Times a batch's finalize that failed (a storage error, say) is retried, with an
    #: exponential backoff (2 s doubling, at most 300 s); after that the sweep dispatches it
    #: again every WATCHDOG_STUCK_AFTER until it succeeds.
    BATCH_FINALIZE_RETRIES: int = Field(8, ge=0)
    #: Seconds a fetch may go without progress (a byte downloaded or uploaded, a step
    #: finished) before its lease is no longer renewed, so the job is dispatched again.
    STEP_STALL_AFTER: float = Field(300.0, gt=0)

    # Logging
    LOG_LEVEL: str = "INFO"

    # Operating: metrics and the status page
    #: Port of each worker node's /metrics (served from its main process); 0 turns it off.
    WORKER_METRICS_PORT: int = Field(9808, ge=0, le=65535)
    #: Bearer token of the webhook's /status page; unset (or empty) turns the page off (404).
    #: When set: at least 32 characters, 10 distinct ones, and no placeholder.
    STATUS_TOKEN: str | None = Field(None, repr=False)

    @field_validator("APSIS_BASE_URL", "CALLBACK_BASE_URL")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host")
        return value.rstrip("/")

    @field_validator("CELERY_VISIBILITY_TIMEOUT")
    @classmethod
    def _outlives_a_fetch(cls, value: int, info: ValidationInfo) -> int:
        download = info.data.get("DOWNLOAD_TIMEOUT")
        if download is not None and value < VISIBILITY_OVER_DOWNLOAD * download:
            raise ValueError(
                f"must be at least {VISIBILITY_OVER_DOWNLOAD} x DOWNLOAD_TIMEOUT"
                f" ({VISIBILITY_OVER_DOWNLOAD * download:g} s): Redis would hand a fetch still"
                " running to a second worker"
            )
        return value

    @field_validator("REDIS_URL")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _redis_tls(self) -> Settings:
        # Checked here, with the other settings read, so a bad combination stops the start.
        self.redis_connection()
        return self

    def redis_connection(self) -> RedisConnection:
        """How every client reaches Redis: REDIS_URL with the REDIS_TLS_* settings, through
        a Sentinel group when REDIS_SENTINELS is set."""
        return redis_connection(
            self.REDIS_URL,
            cert_reqs=self.REDIS_TLS_CERT_REQS or None,
            ca_file=self.REDIS_TLS_CA_FILE or None,
            cert_file=self.REDIS_TLS_CERT_FILE or None,
            key_file=self.REDIS_TLS_KEY_FILE or None,
            sentinels=self.REDIS_SENTINELS or None,
            master=self.REDIS_SENTINEL_MASTER or None,
            sentinel_password=self.REDIS_SENTINEL_PASSWORD or None,
        )

    @field_validator("STORAGE_URL")
    @classmethod
    def _storage_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("file", "s3", "gs", "az", "memory"):
            raise ValueError("must start with file://, s3://, gs://, az:// or memory://")
        if scheme == "file":
            path = value.removeprefix("file://")
            return "file://" + str(Path(path).expanduser().resolve())
        return value

    @field_validator("CALLBACK_SECRET", "CALLBACK_SECRET_PREVIOUS")
    @classmethod
    def _secret_length(cls, value: str | None) -> str | None:
        if value is not None:
            _strong_secret(value, min_length=MIN_SECRET_BYTES, unit="bytes")
        return value

    @field_validator("STATUS_TOKEN")
    @classmethod
    def _status_token(cls, value: str | None) -> str | None:
        if value:  # unset or empty: the page is off
            _strong_secret(value, min_length=MIN_STATUS_TOKEN_CHARS, unit="characters")
        return value

    @field_validator("APSIS_CLIENT_ID", "APSIS_CLIENT_SECRET")
    @classmethod
    def _apsis_credential(cls, value: str | None) -> str | None:
        return _real_credential(value)

    @field_validator("STORAGE_SSE")
    @classmethod
    def _sse(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if value not in ("AES256", "aws:kms"):
            raise ValueError('must be "AES256" or "aws:kms"')
        return value

    @field_validator("STORAGE_ENCRYPTION_KEY")
    @classmethod
    def _encryption_key(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parse_key_ring(value)  # ValueError without echoing the key
        return value

    @field_validator("LOG_LEVEL")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level

    def account(self, name: str | None) -> AccountSettings:
        """The named account's settings (the APSIS_* variables for APSIS_ACCOUNT)."""
        name = name or self.APSIS_ACCOUNT
        if name == self.APSIS_ACCOUNT:
            self.require("APSIS_CLIENT_ID", "APSIS_CLIENT_SECRET")
            return AccountSettings(
                base_url=self.APSIS_BASE_URL,
                client_id=self.APSIS_CLIENT_ID or "",
                client_secret=self.APSIS_CLIENT_SECRET or "",
                export_rate=self.APSIS_EXPORT_RATE,
                download_rate=self.APSIS_DOWNLOAD_RATE,
                token_rate=self.APSIS_TOKEN_RATE,
            )
        if name not in self.APSIS_ACCOUNTS:
            raise ConfigError(f"APSIS account {name!r} is not configured (APSIS_ACCOUNTS)")
        return self.APSIS_ACCOUNTS[name]

    def account_names(self) -> list[str]:
        return [self.APSIS_ACCOUNT, *sorted(set(self.APSIS_ACCOUNTS) - {self.APSIS_ACCOUNT})]

    def require(self, *names: str) -> Settings:
        """Raise ConfigError naming the first of ``names`` that is unset; return self."""
        for name in names:
            if getattr(self, name) in (None, ""):
                raise ConfigError(f"{name} is not set")
        return self


def load_settings(*, require: Iterable[str] = (), **overrides: object) -> Settings:
    """Read the settings from the environment; any problem is one ConfigError line."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except SettingsError as exc:
        match = re.search(r'field "([A-Z_]+)"', str(exc))
        name = match.group(1) if match else "configuration"
        raise ConfigError(f"{name} is invalid: not valid JSON") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        # A check across settings (no loc) names its settings itself.
        raise ConfigError(f"{name} is invalid: {message}" if name else message) from None
    return settings.require(*require)
