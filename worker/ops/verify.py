"""Check a job's (or a batch's) stored objects against its manifest, and the manifest
against the digest in the job record: every object re-read from storage, hashed streamed."""

from __future__ import annotations

import hashlib
import json
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.deliverable import manifest
from worker.deliverable.package import CHECKSUMS
from worker.errors import StorageError
from worker.flow.runtime import Runtime
from worker.model import batch_store
from worker.model.jobs import State


@dataclass
class Verification:
    """What was checked and every problem found, one line each."""

    objects: int = 0
    jobs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(rt: Runtime, job_or_batch_id: str) -> Verification:
    """Verify a batch (every job of it and its summary) or a single job."""

    result = Verification()
    if rt.batches.exists(job_or_batch_id):
        verify_batch(rt, job_or_batch_id, result)
    else:
        verify_job(rt, job_or_batch_id, result)
    return result


def _digest(rt: Runtime, key: str) -> tuple[str, int]:
    sha = hashlib.sha256()
    size = 0
    for chunk in rt.storage.iter_bytes(key):
        sha.update(chunk)
        size += len(chunk)
    return sha.hexdigest(), size


def check_object(
    rt: Runtime, key: str, sha256: str | None, size: int | None, out: Verification
) -> None:
    """Re-read ``key`` and compare it with the digest (and size) the manifest recorded."""
    out.objects += 1
    try:
        if not rt.storage.exists(key):
            out.problems.append(f"{key}: missing")
            return
        actual, actual_size = _digest(rt, key)
    except StorageError as exc:
        out.problems.append(f"{key}: unreadable: {exc}")
        return
    if sha256 is None:
        out.problems.append(f"{key}: the manifest records no sha256")
    elif actual != sha256:
        out.problems.append(
            f"{key}: sha256 mismatch (manifest {sha256[:16]}…, stored {actual[:16]}…)"
        )
    elif size is not None and actual_size != size:
        out.problems.append(f"{key}: size mismatch (manifest {size}, stored {actual_size})")


def listed_objects(body: dict[str, Any]) -> list[tuple[str, str | None, int | None]]:
    """(object, sha256, bytes) of every object a job manifest lists."""
    entries: list[dict[str, Any]] = []
    if isinstance(body.get("source"), dict):
        entries.append(body["source"])
    entries += [p for p in body.get("profiles") or [] if isinstance(p, dict)]
    entries += [r for r in (body.get("reports") or {}).values() if isinstance(r, dict)]
    if isinstance(body.get("package"), dict):
        entries.append(body["package"])
    return [(str(e.get("object")), e.get("sha256"), e.get("bytes")) for e in entries]


def verify_job(rt: Runtime, job_id: str, out: Verification) -> None:
    out.jobs += 1
    job = rt.jobs.find(job_id)
    key = manifest.manifest_object(job_id)
    if job is None:
        from worker.flow.retention import deletion_object

        if rt.storage.exists(deletion_object(job_id)):
            out.problems.append(f"job {job_id}: deleted (see {deletion_object(job_id)})")
        else:
            out.problems.append(f"job {job_id}: no job record")
        return
    if not job.is_final:
        out.problems.append(f"job {job_id}: still {job.state.value}, nothing to verify yet")
        return
    out.objects += 1
    try:
        body_bytes = rt.storage.get_bytes(key) if rt.storage.exists(key) else None
    except StorageError as exc:
        out.problems.append(f"{key}: unreadable: {exc}")
        return
    if body_bytes is None:
        out.problems.append(f"{key}: missing")
        return
    if job.state == State.FAILED:
        return  # a failure manifest lists no objects and its digest is not recorded
    digest = hashlib.sha256(body_bytes).hexdigest()
    if not job.manifest_sha256:
        out.problems.append(f"{key}: the job record holds no manifest digest")
    elif digest != job.manifest_sha256:
        out.problems.append(
            f"{key}: sha256 mismatch (job record {job.manifest_sha256[:16]}…, "
            f"stored {digest[:16]}…)"
        )
        return  # a manifest that is not the one written cannot vouch for anything
    try:
        body = json.loads(body_bytes)
    except ValueError:
        out.problems.append(f"{key}: not valid JSON")
        return
    listed = listed_objects(body)
    package = body.get("package") if isinstance(body.get("package"), dict) else None
    for obj, sha256, size in listed:
        if package is not None and obj == package.get("object"):
            check_package(rt, obj, sha256, size, out)
        else:
            check_object(rt, obj, sha256, size, out)
    known = {obj for obj, _, _ in listed} | {key}
    for stored in rt.storage.list(manifest.job_prefix(job_id)):
        if stored not in known:
            out.problems.append(f"{stored}: stored but not listed in the manifest")


def check_package(
    rt: Runtime, key: str, sha256: str | None, size: int | None, out: Verification
) -> None:
    """The package's digest and size against the manifest, then inside it: a readable zip
    whose every file matches checksums.sha256, which lists them all. Streamed to a
    temporary file (a zip is read from its end), so memory stays flat."""
    out.objects += 1
    with tempfile.TemporaryDirectory(prefix="apsis-verify-") as tmp:
        path = Path(tmp) / "package.zip"
        digest = hashlib.sha256()
        try:
            if not rt.storage.exists(key):
                out.problems.append(f"{key}: missing")
                return
            with path.open("wb") as f:
                for chunk in rt.storage.iter_bytes(key):
                    digest.update(chunk)
                    f.write(chunk)
        except StorageError as exc:
            out.problems.append(f"{key}: unreadable: {exc}")
            return
        actual, actual_size = digest.hexdigest(), path.stat().st_size
        if actual != sha256:
            out.problems.append(
                f"{key}: sha256 mismatch (manifest {str(sha256)[:16]}…, stored {actual[:16]}…)"
            )
            return
        if size is not None and actual_size != size:
            out.problems.append(f"{key}: size mismatch (manifest {size}, stored {actual_size})")
        out.problems.extend(f"{key}: {problem}" for problem in _zip_problems(path))


def _zip_problems(path: Path) -> list[str]:
    """What is wrong inside a package zip: unreadable, or files and checksums.sha256 apart."""
    problems: list[str] = []
    try:
        with zipfile.ZipFile(path) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
            if CHECKSUMS not in names:
                return [f"no {CHECKSUMS} inside"]
            listed: dict[str, str] = {}
            for line in zf.read(CHECKSUMS).decode("utf-8", "replace").splitlines():
                digest, _, name = line.partition("  ")
                listed[name] = digest
            for name in names:
                if name == CHECKSUMS:
                    continue
                if name not in listed:
                    problems.append(f"{name}: inside but not in {CHECKSUMS}")
                    continue
                sha = hashlib.sha256()
                with zf.open(name) as member:
                    while chunk := member.read(1024 * 1024):
                        sha.update(chunk)
                if sha.hexdigest() != listed[name]:
                    problems.append(f"{name}: sha256 does not match {CHECKSUMS}")
            problems += [f"{n}: in {CHECKSUMS} but not inside" for n in listed if n not in names]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        problems.append(f"not a readable zip ({type(exc).__name__})")
    return problems


def verify_batch(rt: Runtime, batch_id: str, out: Verification) -> None:
    from worker.flow import batches

    batch = rt.batches.get(batch_id)
    if not batch.is_final:
        out.problems.append(f"batch {batch_id}: still {batch.state}, nothing to verify yet")
        return
    key = batches.manifest_object(batch_id)
    out.objects += 1
    if not rt.storage.exists(key):
        out.problems.append(f"{key}: missing")
    else:
        body_bytes = rt.storage.get_bytes(key)
        recorded = rt.redis.hget(batch_store.batch_key(batch_id), "manifest_sha256")
        digest = hashlib.sha256(body_bytes).hexdigest()
        if recorded and recorded.decode() != digest:  # type: ignore[union-attr]
            out.problems.append(f"{key}: sha256 mismatch with the batch record")
        summary = json.loads(body_bytes).get("summary") or {}
        check_object(rt, str(summary.get("object")), summary.get("sha256"), None, out)
    for index in range(batch.submitted):
        job_id = batch_store.job_id_for(batch_id, index)
        if rt.batches.refusal(batch_id, index) is not None:
            continue  # no job of its own: the record under its id is not this batch's
        if rt.jobs.exists(job_id):
            verify_job(rt, job_id, out)
        elif not rt.batches.is_linked(batch_id, index):
            out.problems.append(f"job {job_id}: no job record")
