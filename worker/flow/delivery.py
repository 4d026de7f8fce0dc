"""Handing a done job's package over: building it with the job, and expiring links to it.

A link is a presigned GET URL of ``jobs/<job_id>/package.zip`` (S3, GCS, Azure), valid for
at most LINK_MAX_EXPIRY. With client-side encryption on, the stored package is ciphertext
nobody without STORAGE_ENCRYPTION_KEY can open: the link then points at a decrypted copy,
``deliveries/<job_id>/<random>/package.zip``, kept only until the link expires (the sweep
deletes it, and retention with the job). Links are bearer credentials: never logged, never
in events; in a job's result only when the caller asked (``deliver``).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from worker.deliverable import manifest
from worker.deliverable.export_file import SplitResult
from worker.deliverable.package import store_package
from worker.errors import ConfigError, InputError
from worker.flow.runtime import Runtime
from worker.model.jobs import Job, State

log = logging.getLogger("apsis.delivery")

#: Decrypted delivery copies by expiry (Unix seconds): the sweep deletes those past it.
DELIVERIES_KEY = "apsis:deliveries"
#: Copies deleted per sweep at most; the next sweep takes the rest.
DELIVERY_SWEEP_BATCH = 500
#: Job record fields: the caller's ``deliver`` (seconds), the link made for it, its expiry.
DELIVER_FIELD = "deliver"
PACKAGE_FIELD = "package"
LINK_FIELD = "package_link"
LINK_EXPIRES_FIELD = "package_link_expires_at"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_EXPIRY = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")


@dataclass(frozen=True)
class Link:
    """A presigned GET URL of a package, when it expires, and the object it opens."""

    url: str
    expires_at: float
    object: str


@dataclass(frozen=True)
class Delivered:
    """What building the package adds to the manifest and to the DONE transition."""

    manifest_entry: dict[str, Any] | None
    job_fields: dict[str, Any]


def delivery_prefix(job_id: str) -> str:
    return f"deliveries/{job_id}"


def parse_expiry(text: str | int, *, longest: int) -> int:
    """``7d``, ``12h``, ``30m``, ``3600s`` or seconds, as seconds; InputError past
    ``longest`` (LINK_MAX_EXPIRY) or below one minute."""
    match = _EXPIRY.match(str(text))
    if match is None:
        raise InputError(f"expiry {str(text)[:20]!r} is not a duration like 7d, 12h or 30m")
    seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds < 60:
        raise InputError("a link must be valid for at least a minute")
    if seconds > longest:
        raise InputError(
            f"a link may be valid for at most {_human(longest)} (LINK_MAX_EXPIRY); "
            f"asked for {_human(seconds)}"
        )
    return seconds


def _human(seconds: int) -> str:
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def check_link_request(rt: Runtime, deliver: str | int) -> int:
    """The seconds a requested link (``deliver``) is valid; InputError, before anything is
    queued, if the expiry is invalid or this store cannot sign links."""
    seconds = parse_expiry(deliver, longest=rt.settings.LINK_MAX_EXPIRY)
    if not rt.settings.PACKAGE_ENABLED:
        raise InputError("a link needs the package, and PACKAGE_ENABLED is off")
    if not rt.storage.can_sign:
        raise InputError(
            "this store cannot sign links (STORAGE_URL is not s3://, gs:// or az://); "
            "export without a link and hand the package over yourself"
        )
    return seconds


def ask_for_link(rt: Runtime, job_id: str, seconds: int) -> None:
    """Record that the job's result must carry a link valid for ``seconds`` (checked by
    ``check_link_request``); made when its package is stored."""
    rt.jobs.update(job_id, {DELIVER_FIELD: seconds})


def deliver_package(
    rt: Runtime, job: Job, split: SplitResult, tmp: Path, progress: Callable[[], None]
) -> Delivered:
    """Build and store the job's package (unless PACKAGE_ENABLED is off) and, if the
    caller asked for one, its link. StorageError propagates (the fetch retries)."""
    if not rt.settings.PACKAGE_ENABLED:
        return Delivered(None, {})
    entry = store_package(
        rt.storage,
        job,
        split,
        tmp,
        warnings=manifest.manifest_warnings(job, split),
        progress=progress,
    )
    fields: dict[str, Any] = {PACKAGE_FIELD: entry["object"], "package_sha256": entry["sha256"]}
    deliver = job.extra.get(DELIVER_FIELD)
    if deliver:
        try:
            link = link_object(rt, job.job_id, entry["object"], expires_in=int(deliver))
        except ConfigError as exc:
            # The store stopped being able to sign since the job was accepted: done anyway.
            log.warning("no package link", extra={"job_id": job.job_id, "reason": str(exc)})
        else:
            fields[LINK_FIELD] = link.url
            fields[LINK_EXPIRES_FIELD] = round(link.expires_at, 3)
    return Delivered(entry, fields)


def package_link(rt: Runtime, job_id: str, *, expires_in: int) -> Link:
    """A link to a done job's package (``apsis-export link``). JobNotFound for no job;
    InputError when it has no package; ConfigError where the store cannot sign."""
    job = rt.jobs.get(job_id)
    package = job.extra.get(PACKAGE_FIELD)
    if job.state != State.DONE:
        raise InputError(f"job {job_id} is {job.state.value}; only a done job has a package")
    if not package:
        raise InputError(
            f"job {job_id} has no package (built before packages existed, or with "
            "PACKAGE_ENABLED off)"
        )
    if not rt.storage.exists(package):
        raise InputError(f"job {job_id}'s package is no longer in storage (see retention)")
    return link_object(rt, job_id, package, expires_in=expires_in)


def link_object(rt: Runtime, job_id: str, package: str, *, expires_in: int) -> Link:
    """Sign ``package`` for ``expires_in`` seconds; from a decrypted copy that lives as long
    as the link when the store is encrypted (a person has no key for the ciphertext)."""
    if not rt.storage.can_sign:
        scheme = rt.storage.url.partition(":")[0]
        raise ConfigError(
            f"a {scheme}:// store cannot sign links (STORAGE_URL): copy the package and "
            f"hand it over another way (an encrypted e-mail, your DSR portal): "
            f"{rt.storage.location(package)}"
        )
    now = time.time()
    expires_at = now + expires_in
    target = package
    if rt.storage.encrypted:
        target = f"{delivery_prefix(job_id)}/{secrets.token_hex(16)}/package.zip"
        # In the index first: a copy whose upload dies half-way is still swept.
        rt.redis.zadd(DELIVERIES_KEY, {target: expires_at})
        rt.storage.put_plaintext_copy(package, target, content_type="application/zip")
    url = rt.storage.sign_get(target, timedelta(seconds=expires_in))
    log.info(
        "package link made",
        extra={
            "job_id": job_id,
            "event": "package_link",
            "expires_in": expires_in,
            "state": "copy" if target != package else "direct",
        },
    )
    return Link(url=url, expires_at=expires_at, object=target)


def sweep_deliveries(rt: Runtime, *, now: float | None = None) -> list[str]:
    """Delete the decrypted copies whose links have expired; return their object names."""
    now = time.time() if now is None else now
    raw: list[bytes] = rt.redis.zrangebyscore(  # type: ignore[assignment]
        DELIVERIES_KEY, "-inf", now, start=0, num=DELIVERY_SWEEP_BATCH
    )
    gone = [item.decode() for item in raw]
    for key in gone:
        rt.storage.delete(key)
        rt.redis.zrem(DELIVERIES_KEY, key)
    if gone:
        log.info("expired delivery copies deleted", extra={"event": "deliveries_swept"})
    return gone


def deliveries_due(rt: Runtime, *, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    return bool(rt.redis.zrangebyscore(DELIVERIES_KEY, "-inf", now, start=0, num=1))


def delete_job_deliveries(rt: Runtime, job_id: str) -> list[str]:
    """Delete every delivery copy of a job (retention); return their object names."""
    keys = rt.storage.delete_prefix(delivery_prefix(job_id))
    if keys:
        rt.redis.zrem(DELIVERIES_KEY, *keys)
    return keys
