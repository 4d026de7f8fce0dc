"""Object storage for export results, through obstore: file://, s3://, gs://, az://, memory:///."""

from __future__ import annotations

import builtins
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit
from urllib.request import url2pathname

import obstore
from obstore.exceptions import BaseError
from obstore.store import AzureStore, GCSStore, LocalStore, MemoryStore, S3Store, from_url

from worker.config import KeyRing, parse_key_ring
from worker.deliverable.envelope import (
    EncryptionError,
    decrypt_stream,
    encrypt_stream,
    is_encrypted,
)
from worker.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from obstore.store import ClientConfig, ObjectStore, RetryConfig, S3Config

    from worker.config import Settings

#: Size of each part of a multipart upload, in bytes; also the threshold above which
#: ``put_file`` switches to multipart (S3's minimum part size is 5 MiB).
UPLOAD_PART_BYTES = 8 * 1024 * 1024
#: Parts uploaded at once; peak upload memory is about this times ``UPLOAD_PART_BYTES``.
UPLOAD_CONCURRENCY = 4
#: Minimum size of each chunk ``iter_bytes`` yields, in bytes.
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
#: Retries of a failed request (5xx, dropped connection) before giving up; obstore's
#: default (10 retries over up to 3 minutes) would stall a readiness probe.
MAX_RETRIES = 3
#: Seconds after the first attempt after which no retry starts.
RETRY_TIMEOUT_SECONDS = 30
#: Seconds allowed to open a connection to the store.
CONNECT_TIMEOUT_SECONDS = 5
#: Longest error detail kept in a StorageError message, in characters.
_MAX_DETAIL_CHARS = 300
#: With file:// storage, objects (personal data) and the folders holding them are this
#: user's alone, whatever the umask.
LOCAL_FILE_MODE = 0o600
LOCAL_DIR_MODE = 0o700

_T = TypeVar("_T")

log = logging.getLogger("apsis.storage")

#: The processes (their pids) that must never do storage I/O: a Celery worker's main process,
#: which forks pool children. obstore's runtime does not survive fork(): once the parent
#: has used it, every child forked afterwards (after an OOM kill, a crash, or
#: max_tasks_per_child) hangs for good on its first upload. A child has another pid, so
#: the ban is not inherited.
_NO_IO_PIDS: set[int] = set()


def forbid_io_in_this_process() -> None:
    """From now on, storage I/O in this process raises StorageError (and logs an error);
    it hands such work to the pool instead (see ``io_allowed_here``)."""
    _NO_IO_PIDS.add(os.getpid())


def allow_io_in_this_process() -> None:
    """Undo ``forbid_io_in_this_process`` (for tests)."""
    _NO_IO_PIDS.discard(os.getpid())


def io_allowed_here() -> bool:
    """False in a process that forks children which use storage (a Celery main process)."""
    return os.getpid() not in _NO_IO_PIDS


def _refuse_io_here(action: str) -> None:
    if not io_allowed_here():
        # A bug, not a storage fault: say so loudly, and never touch obstore in this process.
        log.error(
            "storage I/O refused in the pool's parent process",
            extra={"event": "storage_io_refused", "reason": action},
        )
        raise StorageError(f"{action}: refused: storage I/O in a process that forks the pool")


_RETRY: RetryConfig = {
    "max_retries": MAX_RETRIES,
    "retry_timeout": timedelta(seconds=RETRY_TIMEOUT_SECONDS),
}


class Storage:
    """One bucket (or folder) plus an optional key prefix; keys are relative to it.

    With ``encryption`` (a key ring) every object is stored envelope-encrypted and read back
    decrypted: callers only ever see plaintext. ``sse``/``sse_kms_key_id`` ask S3 to encrypt
    at rest on its side too (ignored by other backends).
    """

    def __init__(
        self,
        url: str,
        *,
        encryption: KeyRing | None = None,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
    ) -> None:
        self.url = url
        self._ring = encryption
        self._local_root: Path | None = None
        new_root = urlsplit(url).scheme == "file" and not _local_path(url).exists()
        # Opening a store does no I/O through obstore's runtime: allowed in any process.
        self._store: ObjectStore = _guard(
            f"cannot open storage {_safe_url(url)}",
            lambda: _open(url, sse=sse, sse_kms_key_id=sse_kms_key_id),
            io=False,
        )
        if isinstance(self._store, LocalStore) and self._store.prefix is not None:
            root = self._local_root = Path(self._store.prefix)
            if new_root:
                _guard(
                    f"cannot open storage {_safe_url(url)}",
                    lambda: root.chmod(LOCAL_DIR_MODE),
                    io=False,
                )
        # Local files carry no attributes: obstore refuses a Content-Type there.
        self._attributes = not isinstance(self._store, LocalStore)

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        """STORAGE_URL with STORAGE_ENCRYPTION_KEY, STORAGE_SSE and STORAGE_SSE_KMS_KEY_ID."""
        key = settings.STORAGE_ENCRYPTION_KEY
        return cls(
            settings.STORAGE_URL,
            encryption=parse_key_ring(key) if key else None,
            sse=settings.STORAGE_SSE,
            sse_kms_key_id=settings.STORAGE_SSE_KMS_KEY_ID,
        )

    @property
    def encrypted(self) -> bool:
        return self._ring is not None

    @property
    def usable_here(self) -> bool:
        """Whether this process may do storage I/O (not a Celery main process: see
        ``forbid_io_in_this_process``); where not, callers dispatch a task instead."""
        return io_allowed_here()

    def put_file(
        self,
        key: str,
        source: Path,
        *,
        content_type: str = "application/json",
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Upload ``source`` as ``key``; big files go multipart with bounded memory.

        ``progress(n)`` is called each time the upload takes ``n`` more bytes of the file."""

        def put() -> None:
            self._private_folders(key)
            with source.open("rb") as f:
                ring = self._ring
                body: Any = f
                if progress is not None or ring is not None:
                    # Read a part at a time (memory stays flat), reporting what was taken.
                    body = _reporting(iter(lambda: f.read(UPLOAD_PART_BYTES), b""), progress)
                if ring is not None:
                    # Encrypted on the fly.
                    body = encrypt_stream(ring, body)
                obstore.put(
                    self._store,
                    key,
                    body,
                    attributes=self._content_type(content_type),
                    chunk_size=UPLOAD_PART_BYTES,
                    max_concurrency=UPLOAD_CONCURRENCY,
                )
            self._private_file(key)

        _guard(f"cannot store {self.location(key)}", put)

    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/json") -> None:
        """Store ``data`` as ``key`` (atomically: readers see the old object or the new one)."""

        def put() -> None:
            self._private_folders(key)
            obstore.put(
                self._store, key, self._seal(data), attributes=self._content_type(content_type)
            )
            self._private_file(key)

        _guard(f"cannot store {self.location(key)}", put)

    @property
    def can_sign(self) -> bool:
        """Whether this store can make presigned links (S3, GCS, Azure; not file:// or
        memory://)."""
        return isinstance(self._store, S3Store | GCSStore | AzureStore)

    def sign_get(self, key: str, expires_in: timedelta) -> str:
        """A presigned GET URL of ``key``, valid for ``expires_in``: a bearer credential,
        never logged. ConfigError where the store cannot sign."""
        store = self._store
        if not isinstance(store, S3Store | GCSStore | AzureStore):
            scheme = urlsplit(self.url).scheme
            raise ConfigError(
                f"a {scheme}:// store cannot sign links (STORAGE_URL); hand the file over "
                f"another way: {self.location(key)}"
            )
        return _guard(
            f"cannot sign a link to {self.location(key)}",
            lambda: obstore.sign(store, "GET", key, expires_in),
        )

    def put_plaintext_copy(self, source: str, key: str, *, content_type: str) -> None:
        """Store object ``source`` decrypted, as ``key``, NOT envelope-encrypted (S3's own
        encryption still applies): only for a copy a presigned link hands to a person, who
        has no key. Through a temporary file (obstore cannot read one object while it
        uploads another from the same iterator: it hangs), so memory stays flat."""
        with tempfile.TemporaryDirectory(prefix="apsis-copy-") as tmp:
            plain = Path(tmp) / "object"
            with plain.open("wb") as out:
                for chunk in self.iter_bytes(source):
                    out.write(chunk)

            def put() -> None:
                with plain.open("rb") as f:
                    obstore.put(
                        self._store,
                        key,
                        f,
                        attributes=self._content_type(content_type),
                        chunk_size=UPLOAD_PART_BYTES,
                        max_concurrency=UPLOAD_CONCURRENCY,
                    )

            _guard(f"cannot store {self.location(key)}", put)

    def _private_folders(self, key: str) -> None:
        """file://: make (or restrict) the folders down to ``key`` LOCAL_DIR_MODE, before
        LocalStore writes its staging file there (it creates folders with the umask's mode)."""
        if self._local_root is None:
            return
        parts = Path(key).parent.parts
        if any(part in ("", ".", "..") or part.startswith("/") for part in parts):
            return  # not a key LocalStore accepts: it refuses it itself
        folder = self._local_root
        for part in parts:
            folder = folder / part
            try:
                folder.mkdir(mode=LOCAL_DIR_MODE)
            except FileExistsError:
                if folder.stat().st_mode & 0o777 != LOCAL_DIR_MODE:
                    folder.chmod(LOCAL_DIR_MODE)

    def _private_file(self, key: str) -> None:
        """file://: the object just written (renamed into place with the umask's mode) is
        made LOCAL_FILE_MODE; its folder already kept others out meanwhile."""
        if self._local_root is not None:
            os.chmod(self._local_root / key, LOCAL_FILE_MODE)

    def _seal(self, data: bytes) -> bytes:
        return data if self._ring is None else b"".join(encrypt_stream(self._ring, [data]))

    def get_bytes(self, key: str) -> bytes:
        """Return the whole object ``key``; raise StorageError when it does not exist."""
        return b"".join(self.iter_bytes(key))

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """Yield the object ``key`` in chunks of at least ``DOWNLOAD_CHUNK_BYTES``."""
        where = f"cannot read {self.location(key)}"
        raw = self._iter_stored(key, where)
        if self._ring is not None:
            try:
                yield from decrypt_stream(self._ring, raw)
            except EncryptionError as exc:
                raise StorageError(f"{where}: {exc}") from None
            return
        first = next(raw, None)
        if first is not None and is_encrypted(first[:8]):
            raise StorageError(
                f"{where}: the object is encrypted; STORAGE_ENCRYPTION_KEY is not set"
            )
        if first is not None:
            yield first
        yield from raw

    def _iter_stored(self, key: str, where: str) -> Iterator[bytes]:
        """The object's bytes as stored (ciphertext when encrypted)."""
        result = _guard(where, lambda: obstore.get(self._store, key))
        stream = iter(result.stream(min_chunk_size=DOWNLOAD_CHUNK_BYTES))
        while True:
            chunk = _guard(where, lambda: next(stream, None))
            if chunk is None:
                return
            yield bytes(chunk)

    def get_stored_bytes(self, key: str) -> bytes:
        """The object exactly as stored (ciphertext when encrypted): for tests and audits."""
        return b"".join(self._iter_stored(key, f"cannot read {self.location(key)}"))

    def exists(self, key: str) -> bool:
        """Whether the object ``key`` exists."""

        def head() -> bool:
            try:
                obstore.head(self._store, key)
            except FileNotFoundError:
                return False
            return True

        return _guard(f"cannot check {self.location(key)}", head)

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (whole path segments: ``jobs/a`` does not match ``jobs/ab``)."""
        return _guard(
            f"cannot list {self.location(prefix)}",
            lambda: sorted(
                meta["path"]
                for batch in obstore.list(self._store, prefix.rstrip("/") or None)
                for meta in batch
            ),
        )

    def delete(self, key: str) -> None:
        """Delete the object ``key`` (no error if it does not exist)."""
        _guard(f"cannot delete {self.location(key)}", lambda: obstore.delete(self._store, key))

    def delete_prefix(self, prefix: str) -> builtins.list[str]:
        """Delete every object under ``prefix`` and return their keys."""
        if not prefix.strip("/"):
            # A blank prefix would empty the whole store: never what a caller means.
            raise StorageError("refusing to delete with an empty prefix")
        keys = self.list(prefix)
        if keys:
            _guard(
                f"cannot delete under {self.location(prefix)}",
                lambda: obstore.delete(self._store, keys),
            )
        return keys

    def location(self, key: str) -> str:
        """Where ``key`` lives, as a URL a person can follow (``file:///…`` or ``s3://…``)."""
        if self._local_root is not None:
            return (self._local_root / key).as_uri()
        base = self.url if self.url.endswith("/") else self.url + "/"
        return base + key.lstrip("/")

    def check(self) -> None:
        """Readiness probe: raise StorageError when the store cannot be listed."""

        def probe() -> None:
            # One page of one listing is enough to prove reachability and credentials.
            next(iter(obstore.list(self._store, chunk_size=1)), None)

        _guard(f"storage {_safe_url(self.url)} is unreachable", probe)

    def _content_type(self, content_type: str) -> dict[str, str] | None:
        return {"Content-Type": content_type} if self._attributes else None


def _reporting(chunks: Iterator[bytes], progress: Callable[[int], None] | None) -> Iterator[bytes]:
    for chunk in chunks:
        if progress is not None:
            progress(len(chunk))
        yield chunk


def _open(url: str, *, sse: str | None = None, sse_kms_key_id: str | None = None) -> ObjectStore:
    scheme = urlsplit(url).scheme
    if scheme == "file":
        # LocalStore writes each object to "<key>#<n>" and renames it into place, so a
        # reader never sees a half-written object (checked against obstore 0.12).
        store: ObjectStore = LocalStore.from_url(url, mkdir=True)
        return store
    if scheme == "memory":
        return MemoryStore()
    if scheme in ("s3", "s3a"):
        config = _s3_config()
        if sse:
            config["server_side_encryption"] = sse
            if sse_kms_key_id:
                config["sse_kms_key_id"] = sse_kms_key_id
        return from_url(
            url, config=config, client_options=_s3_client_options(), retry_config=_RETRY
        )
    if scheme in ("gs", "az", "azure", "abfs", "abfss", "adl"):
        # Credentials and options come from the GOOGLE_* / AZURE_* variables.
        return from_url(
            url,
            client_options={"connect_timeout": timedelta(seconds=CONNECT_TIMEOUT_SECONDS)},
            retry_config=_RETRY,
        )
    raise StorageError(f"unsupported storage URL scheme {scheme!r}")


def _s3_config() -> S3Config:
    """S3 settings from the usual AWS_* variables (obstore reads the credentials itself)."""
    config: S3Config = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        config["endpoint"] = endpoint
        # Custom endpoints (moto, MinIO, Ceph) address buckets by path, not by host name.
        config["virtual_hosted_style_request"] = False
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        config["region"] = region
    return config


def _s3_client_options() -> ClientConfig:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    # Plain http only when the operator configured an http endpoint (moto on loopback).
    return {
        "allow_http": urlsplit(endpoint).scheme == "http",
        "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT_SECONDS),
    }


def _local_path(url: str) -> Path:
    """The folder a file:// URL names."""
    return Path(url2pathname(urlsplit(url).path))


def _safe_url(url: str) -> str:
    """The URL without query or credentials, safe to put in a message."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


def _guard(action: str, call: Callable[[], _T], *, io: bool = True) -> _T:
    """Run ``call``; turn any obstore or OS error into a one-line StorageError.

    ``io``: ``call`` uses obstore's runtime, so it is refused where that is forbidden."""
    if io:
        _refuse_io_here(action)
    try:
        return call()
    except StorageError:
        raise
    except (BaseError, OSError, ValueError, NotImplementedError) as exc:
        # obstore messages carry a multi-line debug dump: keep the first line only.
        lines = str(exc).strip().splitlines()
        detail = lines[0][:_MAX_DETAIL_CHARS] if lines else ""
        raise StorageError(f"{action}: {type(exc).__name__}: {detail}") from exc
