"""What the model accepts as an export key, a job id and a batch id.

Job ids are idempotency keys: a caller's own (``--job-id``, ``job_id=``), a task's, or a
batch item's ``<batch id>.<n>``. A caller's id has no dot, so it can never take the form of
a batch item's id (and be answered with another person's export).
"""

from __future__ import annotations

import re

from worker.errors import InputError, InvalidExportKey
from worker.model import control_chars

#: Longest export key accepted, in characters (APSIS keys are e-mail-sized).
MAX_EXPORT_KEY_CHARS = 512
#: Job ids are hex uuid4s or a caller's id of this shape (no dots). ``\Z``, not ``$``: ``$``
#: also matches before a trailing newline.
JOB_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
#: Batch ids: 1-48 of A-Z, a-z, 0-9 and _ (so ``<batch id>.<n>`` stays a short job id).
BATCH_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_]{1,48}\Z")
#: A batch item's job id: ``<batch id>.<n>``.
BATCH_ITEM_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_]{1,48}\.(?:0|[1-9][0-9]{0,14})\Z")


def is_job_id(text: str) -> bool:
    """Any job id: a caller's (or a task's) id, or a batch item's ``<batch id>.<n>``."""
    return bool(JOB_ID_PATTERN.match(text) or BATCH_ITEM_ID_PATTERN.match(text))


def is_batch_item_id(text: str) -> bool:
    return bool(BATCH_ITEM_ID_PATTERN.match(text))


def validate_export_key(export_key: object) -> str:
    """The key as APSIS will get it, or InvalidExportKey with a reason (never the key)."""
    if not isinstance(export_key, str):
        raise InvalidExportKey("export key must be a string")
    if not export_key.strip():
        raise InvalidExportKey("export key is empty")
    if len(export_key) > MAX_EXPORT_KEY_CHARS:
        raise InvalidExportKey(f"export key is longer than {MAX_EXPORT_KEY_CHARS} characters")
    if control_chars.has_control(export_key):
        raise InvalidExportKey("export key contains control characters")
    return export_key


def validate_new_job_id(job_id: str) -> str:
    """A caller's id for a new job: never the form of a batch item's id (``<batch>.<n>``)."""
    if not JOB_ID_PATTERN.match(job_id):
        raise InvalidExportKey("job id must be 1-64 characters of A-Z, a-z, 0-9, _ and -")
    return job_id


def validate_job_id(job_id: str) -> str:
    """An id to look up: a caller's job id, a batch item's ``<batch>.<n>`` or a batch id."""
    if not is_job_id(job_id):
        raise InvalidExportKey(
            "job id must be 1-64 characters of A-Z, a-z, 0-9, _ and - (or <batch id>.<n>)"
        )
    return job_id


def validate_batch_id(batch_id: str) -> str:
    if not BATCH_ID_PATTERN.match(batch_id):
        raise InputError("batch id must be 1-48 characters of A-Z, a-z, 0-9 and _")
    return batch_id
