"""webhook/openapi.yaml is a valid OpenAPI 3.0 document that describes every route served."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate

from webhook.app import create_app
from worker.config import load_settings

SPEC_PATH = Path(__file__).resolve().parents[3] / "webhook" / "openapi.yaml"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    return loaded


def _app_routes() -> set[tuple[str, str]]:
    settings = load_settings(
        REDIS_URL="redis://127.0.0.1:1/0", CALLBACK_SECRET=secrets.token_urlsafe(48)
    )
    app = create_app(settings)
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            routes.add((method.lower(), path))
    return routes


def test_spec_is_valid_openapi_3_0(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.0")
    validate(spec)


def test_spec_names_every_route_the_app_serves(spec: dict[str, Any]) -> None:
    documented = {
        (method, path)
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert documented == _app_routes()


def test_spec_documents_every_status_the_callback_answers(spec: dict[str, Any]) -> None:
    responses = spec["paths"]["/callbacks/{token}"]["post"]["responses"]
    expected = {"200", "202", "400", "403", "404", "405", "410", "413", "415", "422", "429", "503"}
    assert expected <= set(responses)


def test_spec_limits_match_the_code(spec: dict[str, Any]) -> None:
    from webhook.callbacks import MAX_MESSAGE_CHARS

    callback = spec["components"]["schemas"]["Callback"]["properties"]
    assert callback["message"]["maxLength"] == MAX_MESSAGE_CHARS
    assert (callback["code"]["minimum"], callback["code"]["maximum"]) == (100, 599)


def test_spec_message_pattern_refuses_what_the_webhook_refuses(spec: dict[str, Any]) -> None:
    """Every character of the Basic Multilingual Plane: the pattern allows it exactly when
    the webhook does (no control character)."""
    from worker.model.control_chars import has_control

    message = spec["components"]["schemas"]["Callback"]["properties"]["message"]
    pattern = re.compile(message["pattern"])
    wrong = [
        hex(cp)
        for cp in range(0x10000)
        if not 0xD800 <= cp < 0xE000  # surrogates: refused as invalid Unicode, not by pattern
        and (pattern.fullmatch(chr(cp)) is None) != has_control(chr(cp))
    ]
    assert wrong == []
