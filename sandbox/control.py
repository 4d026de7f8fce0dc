"""The sandbox's own control API under /_sandbox/ (no auth): journal, faults, config, exports.

Control requests are not journaled: the journal holds APSIS traffic only.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from sandbox.config import DEFAULT_LIMITS
from sandbox.faults import FaultConfigError
from sandbox.state import SandboxState

bp = Blueprint("sandbox_control", __name__, url_prefix="/_sandbox")

_NUMBERS = ("verify_delay", "ready_delay", "callback_backoff")
_INTS = ("token_lifetime", "file_size", "merged_count", "callback_retries")


def _state() -> SandboxState:
    found: SandboxState = current_app.extensions["sandbox"]
    return found


def _bad(detail: str) -> Response:
    response = jsonify({"title": "Bad Request", "status": 400, "detail": detail})
    response.status_code = 400
    return response


@bp.get("/health")
def health() -> Response:
    return jsonify({"ok": True})


@bp.get("/journal")
def journal() -> Response:
    since = request.args.get("since", type=int)
    kind = request.args.get("kind")
    return jsonify(_state().journal.entries(since=since, kind=kind))


@bp.delete("/journal")
def clear_journal() -> Response:
    _state().journal.clear()
    return Response(status=204)


@bp.get("/faults")
def faults() -> Response:
    return jsonify(_state().faults.snapshot())


@bp.put("/faults")
def put_faults() -> Response:
    try:
        _state().set_faults(request.get_json(force=True, silent=False))
    except (FaultConfigError, ValueError) as exc:
        return _bad(str(exc))
    return jsonify(_state().faults.snapshot())


@bp.delete("/faults")
def clear_faults() -> Response:
    _state().faults.reset()
    return Response(status=204)


def _config_json(sandbox: SandboxState) -> dict[str, Any]:
    config = asdict(sandbox.config)
    config["unknown_keys"] = sorted(sandbox.config.unknown_keys)
    config["limits"] = sandbox.limiter.limits()
    config.pop("accounts")  # secrets stay out of the control API
    return config


@bp.get("/config")
def config() -> Response:
    return jsonify(_config_json(_state()))


def _parse_changes(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    changes: dict[str, Any] = {}
    for name, value in body.items():
        if name in _NUMBERS and isinstance(value, int | float) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(f"{name} must not be negative")
            changes[name] = float(value)
        elif name in _INTS and isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(f"{name} must not be negative")
            changes[name] = value
        elif name == "unknown_keys" and isinstance(value, list):
            changes[name] = frozenset(str(key) for key in value)
        elif name == "limits" and isinstance(value, dict):
            limits: dict[str, tuple[int, float] | None] = {}
            for request_class, limit in value.items():
                if request_class not in DEFAULT_LIMITS:
                    raise ValueError(f"unknown rate-limit class {request_class!r}")
                if limit is None:
                    limits[request_class] = None
                elif (
                    isinstance(limit, list)
                    and len(limit) == 2
                    and isinstance(limit[0], int)
                    and isinstance(limit[1], int | float)
                    and limit[1] > 0
                ):
                    limits[request_class] = (limit[0], float(limit[1]))
                else:
                    raise ValueError(f"a limit is [requests, window_seconds] or null: {limit!r}")
            changes[name] = limits
        else:
            raise ValueError(f"cannot set {name} to {value!r}")
    return changes


@bp.patch("/config")
def patch_config() -> Response:
    sandbox = _state()
    try:
        sandbox.patch_config(_parse_changes(request.get_json(force=True, silent=False)))
    except ValueError as exc:
        return _bad(str(exc))
    return jsonify(_config_json(sandbox))


@bp.get("/exports")
def exports() -> Response:
    return jsonify([definition.to_json() for definition in _state().definitions()])


@bp.post("/reset")
def reset() -> Response:
    _state().reset()
    return Response(status=204)
