"""The APSIS One endpoints: token, single profile export and export download."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlsplit

from flask import Blueprint, Response, current_app, g, jsonify, request

from sandbox import jwt
from sandbox.callbacks import Callback
from sandbox.faults import FaultSpec, InjectedError
from sandbox.limits import retry_after_header
from sandbox.state import Definition, SandboxState

bp = Blueprint("apsis", __name__)

EXPORT_PATH = "/audience/profiles/export-single/<export_key>"
DOWNLOAD_PATH = "/audience/profiles/export-single/accounts/<account>/definitions/<definition_id>"

#: The API gateway's body for an explicit deny (documented shape, answered with 403).
GATEWAY_DENY = {"message": "User is not authorized to access this resource with an explicit deny"}

#: Bytes written over the middle of a corrupted download: NUL is invalid anywhere in JSON.
GARBAGE = b"\x00#GARBAGE#\x00"
CORRUPT_BYTES = 16

_EXPORT_FLAGS = ("include_attribute_history", "include_type_definitions", "include_merged_profiles")


class Refused(Exception):
    """Ends a view early with a finished response (raised by the checks below)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


@bp.errorhandler(Refused)
def _refused(exc: Refused) -> Response:
    return exc.response


def state() -> SandboxState:
    found: SandboxState = current_app.extensions["sandbox"]
    return found


def problem(status: int, detail: str, *, headers: dict[str, str] | None = None) -> Response:
    """An RFC 7807 problem-details response, the shape APSIS documents for errors."""
    response = jsonify({"title": HTTPStatus(status).phrase, "status": status, "detail": detail})
    response.status_code = status
    response.content_type = "application/problem+json"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _empty(status: int) -> Response:
    return Response(b"", status=status)


def _injected(error: InjectedError, spec: FaultSpec) -> Response:
    if error.status < 400:
        return _empty(error.status)
    headers: dict[str, str] = {}
    if error.retry_after is not None and not spec.omit_retry_after:
        headers["Retry-After"] = str(error.retry_after)
    return problem(error.status, "injected by the sandbox fault configuration", headers=headers)


def _too_large() -> None:
    length = request.content_length
    if length is not None and length > state().config.max_body_bytes:
        raise Refused(problem(413, f"request body over {state().config.max_body_bytes} bytes"))


def _read_json() -> Any:
    limit = state().config.max_body_bytes
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise Refused(problem(413, f"request body over {limit} bytes"))
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise Refused(problem(400, "the body is not valid JSON")) from exc


def _authenticate(export_key: str | None) -> dict[str, Any]:
    """The bearer token's claims, or Refused with 401 (or 403 under auth_style "403")."""
    spec = state().faults.effective(export_key)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    detail = "missing bearer token"
    if scheme.lower() == "bearer" and token.strip():
        try:
            claims = state().check_token(token.strip())
        except jwt.TokenExpired:
            detail = "the access token has expired"
        except jwt.TokenError:
            detail = "the access token is invalid"
        else:
            g.entry["account"] = claims.get("account")
            return claims
    if spec.auth_style == "403":
        response = jsonify(GATEWAY_DENY)
        response.status_code = 403
        raise Refused(response)
    raise Refused(problem(401, detail, headers={"WWW-Authenticate": "Bearer"}))


def _rate_limit(account: str, request_class: str, spec: FaultSpec) -> None:
    wait = state().limiter.admit(account, request_class)
    if wait is None:
        return
    headers = {} if spec.omit_retry_after else {"Retry-After": retry_after_header(wait)}
    raise Refused(
        problem(429, f"rate limit for {request_class} requests exceeded", headers=headers)
    )


@bp.post("/oauth/token")
def token() -> Response:
    sandbox = state()
    spec = sandbox.faults.effective(None)
    _too_large()
    body = _read_json()
    if not isinstance(body, dict):
        return problem(400, "the body must be a JSON object")
    if body.get("grant_type") != "client_credentials":
        return problem(400, "grant_type must be client_credentials")
    client_id, client_secret = body.get("client_id"), body.get("client_secret")
    if not isinstance(client_id, str) or not isinstance(client_secret, str):
        return problem(400, "client_id and client_secret are required strings")
    if spec.token_redirect_to:
        response = _empty(307)  # "repeat this POST, body and all, over there"
        response.headers["Location"] = spec.token_redirect_to
        return response
    known = sandbox.account_for(client_id)
    if known is None:
        return problem(401, "unknown client credentials")
    secret, account = known
    g.entry["account"] = account
    # The limit is per account and counts refused secrets too: it guards the account.
    _rate_limit(account, "token", spec)
    injected = sandbox.faults.pop_error("token", None)
    if injected is not None:
        return _injected(injected, spec)
    if secret != client_secret:
        return problem(401, "unknown client credentials")
    access_token, lifetime = sandbox.issue_token(client_id, account)
    return jsonify({"access_token": access_token, "expires_in": lifetime, "token_type": "Bearer"})


def _valid_callback_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


@bp.post(EXPORT_PATH)
def export(export_key: str) -> Response:
    sandbox = state()
    g.entry["export_key"] = export_key
    _too_large()
    claims = _authenticate(export_key)
    account = str(claims["account"])
    spec = sandbox.faults.effective(export_key)
    _rate_limit(account, "export", spec)
    body = _read_json()
    if not isinstance(body, dict):
        return problem(400, "the body must be a JSON object")
    if not _valid_callback_url(body.get("callback_url")):
        return problem(400, "callback_url is required and must be an http(s) URL")
    for flag in _EXPORT_FLAGS:
        if not isinstance(body.get(flag, False), bool):
            return problem(400, f"{flag} must be a boolean")
    if sandbox.is_unknown_key(export_key):
        return problem(404, f"no profile with export key {export_key!r}")
    injected = sandbox.faults.pop_error("export", export_key)
    if injected is not None:
        return _injected(injected, spec)
    _accept(sandbox, spec, account, export_key, body)
    return _empty(202)


def _accept(
    sandbox: SandboxState, spec: FaultSpec, account: str, export_key: str, body: dict[str, Any]
) -> None:
    config = sandbox.config
    verify_delay = spec.verify_delay if spec.verify_delay is not None else config.verify_delay
    ready_delay = spec.ready_delay if spec.ready_delay is not None else config.ready_delay
    if spec.reorder:
        verify_delay, ready_delay = (
            max(verify_delay, ready_delay) + 0.01,
            min(verify_delay, ready_delay),
        )
    definition_id = str(uuid.uuid4())
    failed = spec.failure_code is not None
    definition = Definition(
        definition_id=definition_id,
        account=account,
        export_key=export_key,
        history=bool(body.get("include_attribute_history", False)),
        definitions=bool(body.get("include_type_definitions", False)),
        merged=bool(body.get("include_merged_profiles", False)),
        size=spec.file_size if spec.file_size is not None else config.file_size,
        seed=config.seed,
        merged_count=spec.merged_count if spec.merged_count is not None else config.merged_count,
        ready_at=None if failed else time.monotonic() + ready_delay,
    )
    sandbox.add_definition(definition)
    base = spec.download_host.rstrip("/") + "/" if spec.download_host else request.host_url
    download_url = (
        f"{base}audience/profiles/export-single/accounts/{quote(account, safe='')}"
        f"/definitions/{definition_id}?metadata=true"
    )
    ready_body: dict[str, Any] = {"code": 200, "message": download_url}
    if failed:
        ready_body = {
            "code": spec.failure_code,
            "message": f"Export failed: simulated failure for {export_key}",
        }
    callback_url = str(body["callback_url"])
    copies = 1 + (spec.duplicate or 0)
    plan = [
        (not spec.drop_verify, {"code": 100, "message": "Callback verified"}, verify_delay),
        (not spec.drop_ready, ready_body, ready_delay),
    ]
    for wanted, callback_body, delay in plan:
        for _ in range(copies if wanted else 0):
            sandbox.scheduler.schedule(
                Callback(
                    url=callback_url,
                    body=callback_body,
                    account=account,
                    export_key=export_key,
                    definition_id=definition_id,
                ),
                delay,
            )


@bp.get(DOWNLOAD_PATH)
def download(account: str, definition_id: str) -> Response:
    sandbox = state()
    definition = sandbox.definition(definition_id)
    export_key = definition.export_key if definition is not None else None
    g.entry["export_key"] = export_key
    g.entry["definition_id"] = definition_id
    claims = _authenticate(export_key)
    spec = sandbox.faults.effective(export_key)
    token_account = str(claims["account"])
    if token_account != account:
        return problem(403, "the token's account may not read this account's exports")
    _rate_limit(token_account, "download", spec)
    if definition is None or definition.account != account:
        return problem(404, "no such export definition")
    injected = sandbox.faults.pop_error("download", definition.export_key)
    if injected is not None:
        return _injected(injected, spec)
    if spec.redirect_to:
        response = _empty(302)
        response.headers["Location"] = spec.redirect_to
        return response
    if definition.ready_at is None:
        return problem(503, "export processing failed")
    if time.monotonic() < definition.ready_at:
        return _empty(202)
    return _stream(sandbox, definition, spec)


def _stream(sandbox: SandboxState, definition: Definition, spec: FaultSpec) -> Response:
    truncate_at: int | None = None
    corrupt_at: int | None = None
    if (spec.truncate_at is not None or spec.corrupt) and sandbox.faults.claim_download_fault(
        definition.export_key, spec.fault_times
    ):
        truncate_at = spec.truncate_at
        if spec.corrupt:
            length = definition.digest()[1]
            if truncate_at is not None:
                length = min(length, truncate_at)
            corrupt_at = max(length // 2 - CORRUPT_BYTES // 2, 0)
    entry: dict[str, Any] = g.entry
    g.entry_deferred = True
    sha = hashlib.sha256()
    tally = {"bytes": 0}

    def body() -> Iterator[bytes]:
        for chunk in _faulted(definition.chunks(), truncate_at, corrupt_at):
            sha.update(chunk)
            tally["bytes"] += len(chunk)
            yield chunk

    def finish() -> None:
        # Runs when the server closes the body, also after a client disconnect.
        entry.update(status=200, bytes=tally["bytes"], sha256=sha.hexdigest())
        sandbox.journal.record(entry)

    response = Response(body(), status=200, content_type="application/json")
    response.call_on_close(finish)
    return response


def _faulted(
    chunks: Iterator[bytes], truncate_at: int | None, corrupt_at: int | None
) -> Iterator[bytes]:
    offset = 0
    for generated in chunks:
        chunk = generated
        if truncate_at is not None and offset + len(chunk) >= truncate_at:
            chunk = chunk[: truncate_at - offset]
        if corrupt_at is not None and offset < corrupt_at + CORRUPT_BYTES:
            start = max(corrupt_at - offset, 0)
            end = min(corrupt_at + CORRUPT_BYTES - offset, len(chunk))
            if start < end:
                garbage = (GARBAGE * CORRUPT_BYTES)[: end - start]
                chunk = chunk[:start] + garbage + chunk[end:]
        offset += len(chunk)
        if chunk:
            yield chunk
        if truncate_at is not None and offset >= truncate_at:
            return


@bp.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
@bp.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def other(path: str) -> Response:
    claims = _authenticate(None)
    _rate_limit(str(claims["account"]), "other", state().faults.effective(None))
    return problem(404, f"no endpoint /{path}")
