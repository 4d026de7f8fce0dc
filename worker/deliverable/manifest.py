"""The job manifest: what was exported, from which file, with digests; written last."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from worker.deliverable.export_file import SplitResult
from worker.model.jobs import Job

#: Version of the manifest's shape; bumped when a field changes meaning.
MANIFEST_VERSION = 1


def product_version() -> str:
    try:
        return version("apsis-export")
    except PackageNotFoundError:
        return "unknown"


def job_prefix(job_id: str) -> str:
    """Every object of a job lives under this prefix: derived from the id, never from PII."""
    return f"jobs/{job_id}"


def export_object(job_id: str) -> str:
    return f"{job_prefix(job_id)}/export.json"


def profile_object(job_id: str, index: int) -> str:
    return f"{job_prefix(job_id)}/profiles/{index}.json"


def manifest_object(job_id: str) -> str:
    return f"{job_prefix(job_id)}/manifest.json"


def report_html_object(job_id: str) -> str:
    return f"{job_prefix(job_id)}/report.html"


def report_json_object(job_id: str) -> str:
    return f"{job_prefix(job_id)}/report.json"


def package_object(job_id: str) -> str:
    """The data-subject package (zip) of a done job: what a DPO hands over."""
    return f"{job_prefix(job_id)}/package.zip"


def _job_head(job: Job) -> dict[str, Any]:
    """The fields a job's manifest opens with, whether the job is done or failed."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "product_version": product_version(),
        "job_id": job.job_id,
        "reference": job.reference,
        "batch_id": job.batch_id,
        "account": job.account,
    }


def build_manifest(
    job: Job,
    *,
    history: list[dict[str, Any]],
    source_sha256: str,
    source_bytes: int,
    split: SplitResult,
    finished_at: float,
    reports: dict[str, dict[str, Any]] | None = None,
    links: dict[str, dict[str, Any]] | None = None,
    package: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a finished job: every export key found, each with its object.

    ``reports`` lists the report objects (object, sha256, bytes) by kind; ``links`` adds
    fields to a merged profile's entry (``batch_item``, ``linked_job``) by export key;
    ``package`` is the data-subject package (object, sha256, bytes, files), if built.
    """
    merged_found = [p for p in split.profiles if p.role == "merged"]
    warnings = manifest_warnings(job, split)
    links = links or {}
    return {
        **_job_head(job),
        "state": "done",
        "requested_export_key": job.export_key,
        "options": job.options.to_json(),
        "attempt": job.attempt,
        "created_at": job.created_at,
        "finished_at": finished_at,
        "history": history,
        "source": {
            "object": export_object(job.job_id),
            "sha256": source_sha256,
            "bytes": source_bytes,
        },
        "profiles": [
            {
                "export_key": p.export_key,
                "role": p.role,
                "object": profile_object(job.job_id, p.index),
                "sha256": p.sha256,
                "bytes": p.bytes,
                "counts": {
                    "sections": p.counts.sections,
                    "attributes": p.counts.attributes,
                    "history_entries": p.counts.history,
                    "events": p.counts.events,
                },
                "sections": {
                    name: {
                        "attributes": c.attributes,
                        "history_entries": c.history,
                        "events": c.events,
                    }
                    for name, c in p.sections.items()
                },
                **links.get(p.export_key, {}),
            }
            for p in split.profiles
        ],
        "reports": reports or {},
        **({"package": package} if package else {}),
        "merged_keys_found": [p.export_key for p in merged_found],
        "type_definitions_joined": split.has_definitions,
        "warnings": warnings,
    }


def manifest_warnings(job: Job, split: SplitResult) -> list[str]:
    """What a reader of the export must know about its completeness."""
    warnings: list[str] = []
    if not split.requested_found:
        warnings.append("the requested export key is not in the file APSIS returned")
    if any(p.role == "merged" for p in split.profiles) and not job.options.include_merged_profiles:
        warnings.append(
            "the file names merged profiles but the export was requested without "
            "include_merged_profiles: the answer may be incomplete"
        )
    return warnings


def build_failure_manifest(
    job: Job, *, history: list[dict[str, Any]], reason: str, failed_at: float
) -> dict[str, Any]:
    """What a failed job leaves in storage: why, after which attempts, and its history."""
    return {
        **_job_head(job),
        "state": "failed",
        "reason": reason,
        "requested_export_key": job.export_key,
        "options": job.options.to_json(),
        "attempt": job.attempt,
        "retries": job.retries,
        "created_at": job.created_at,
        "failed_at": failed_at,
        "history": history,
        "profiles": [],
    }


def encode(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, ensure_ascii=False).encode()
