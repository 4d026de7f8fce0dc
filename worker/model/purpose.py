"""What a job or a batch was created for, as a keyed digest kept on its record.

Job ids and batch ids are idempotency keys: the same id twice is one job. That holds only
for the same request, so each record keeps a digest of what it was created for (export key,
options, account, batch) and a reused id with a different digest is refused
(``JobIdConflict``), never answered with another person's export.

The digest is an HMAC-SHA256 keyed by CALLBACK_SECRET, so the value stored in Redis says
nothing about the export key. A digest made with CALLBACK_SECRET_PREVIOUS is accepted too,
so rotating the secret does not turn a repeated request into a conflict.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from typing import Any

#: The key used when no secret is configured (unit tests; the worker requires a secret).
UNKEYED = "unkeyed"


def secrets_of(current: str | None = None, previous: str | None = None) -> tuple[str, ...]:
    """The secrets to digest with, current first; at least one."""
    found = tuple(s for s in (current, previous) if s)
    return found or (UNKEYED,)


def _digest(secret: str, kind: str, body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    message = f"{kind}:{canonical}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def job_digests(
    secrets: Sequence[str],
    *,
    export_key: str,
    options: dict[str, bool],
    account: str,
    batch_id: str | None,
) -> tuple[str, ...]:
    """The job's purpose digest under each secret (the first is the one to store)."""
    body = {"export_key": export_key, "options": options, "account": account, "batch": batch_id}
    return tuple(_digest(secret, "job", body) for secret in secrets)


def batch_digests(
    secrets: Sequence[str],
    *,
    export_keys: Iterable[str],
    options: dict[str, bool],
    account: str,
) -> tuple[str, ...]:
    """The batch's purpose digest (its keys in order, options, account) under each secret."""
    body = {"export_keys": list(export_keys), "options": options, "account": account}
    return tuple(_digest(secret, "batch", body) for secret in secrets)
