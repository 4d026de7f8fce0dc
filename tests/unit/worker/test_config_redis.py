"""REDIS_URL and the REDIS_TLS_* settings as one RedisConnection (worker/config.py), and the
one-line account of a Redis failure (worker/ops/redis_access.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import redis

from worker.config import load_settings
from worker.errors import ConfigError
from worker.ops.redis_access import explain

SECRET = "s3cr3t-Pa55word"


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    files = {}
    for name in ("ca", "cert", "key"):
        path = tmp_path / f"{name}.pem"
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        files[name] = str(path)
    return files


def test_the_tls_settings_reach_redis_py_and_the_broker(pem: dict[str, str]) -> None:
    settings = load_settings(
        REDIS_URL=f"rediss://apsis-export:{SECRET}@redis.internal:6380/2",
        REDIS_TLS_CA_FILE=pem["ca"],
        REDIS_TLS_CERT_FILE=pem["cert"],
        REDIS_TLS_KEY_FILE=pem["key"],
    )
    connection = settings.redis_connection()
    files = {"ssl_ca_certs": pem["ca"], "ssl_certfile": pem["cert"], "ssl_keyfile": pem["key"]}
    assert connection.redis_kwargs() == {"ssl_cert_reqs": "required", **files}
    assert connection.broker_ssl() == {"ssl_cert_reqs": ssl.CERT_REQUIRED, **files}
    assert connection.where == "rediss://redis.internal:6380/2"
    assert SECRET not in repr(connection) and SECRET not in repr(settings)


def test_the_ca_in_the_url_query_wins_and_leaves_the_url(pem: dict[str, str]) -> None:
    url = f"rediss://u:{SECRET}@h:6380/0?ssl_cert_reqs=required&ssl_ca_certs={pem['ca']}"
    connection = load_settings(REDIS_URL=url, REDIS_TLS_CA_FILE=pem["cert"]).redis_connection()
    assert connection.url == f"rediss://u:{SECRET}@h:6380/0"
    assert connection.redis_kwargs()["ssl_ca_certs"] == pem["ca"]


def test_a_rediss_url_alone_checks_the_certificate_everywhere() -> None:
    connection = load_settings(REDIS_URL="rediss://h:6380/0").redis_connection()
    # kombu alone would not check it for the broker.
    assert connection.broker_ssl() == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert connection.redis_kwargs() == {"ssl_cert_reqs": "required"}


def test_checking_is_off_only_by_name() -> None:
    connection = load_settings(
        REDIS_URL="rediss://h:6380/0", REDIS_TLS_CERT_REQS="none"
    ).redis_connection()
    assert connection.broker_ssl() == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert connection.redis_kwargs() == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}


def test_a_plain_url_gets_no_tls() -> None:
    connection = load_settings(REDIS_URL="redis://h:6379/0").redis_connection()
    assert connection.broker_ssl() is None and connection.redis_kwargs() == {}


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        (
            {"REDIS_URL": f"redis://u:{SECRET}@h/0", "REDIS_TLS_CA_FILE": "{ca}"},
            "REDIS_TLS_CA_FILE is set, but REDIS_URL is not a rediss:// URL",
        ),
        (
            {"REDIS_URL": f"rediss://u:{SECRET}@h/0", "REDIS_TLS_CA_FILE": "/nonexistent/ca.pem"},
            "REDIS_TLS_CA_FILE is invalid: no readable file at /nonexistent/ca.pem",
        ),
        (
            {"REDIS_URL": f"rediss://u:{SECRET}@h/0?ssl_cert_reqs=maybe"},
            "ssl_cert_reqs in REDIS_URL is invalid: must be required, optional or none",
        ),
        (
            {"REDIS_URL": f"rediss://u:{SECRET}@h/0", "REDIS_TLS_KEY_FILE": "{key}"},
            "REDIS_TLS_KEY_FILE is set without REDIS_TLS_CERT_FILE",
        ),
    ],
)
def test_tls_settings_that_cannot_work_are_one_line(
    settings: dict[str, str], line: str, pem: dict[str, str]
) -> None:
    given = {name: value.format(**pem) for name, value in settings.items()}
    with pytest.raises(ConfigError) as raised:
        load_settings(**given)
    assert str(raised.value) == line
    assert SECRET not in str(raised.value)


def _with_context(error: redis.RedisError, cause: BaseException) -> redis.RedisError:
    """``error`` raised while handling ``cause``, as redis-py raises a failed connect."""
    error.__context__ = cause
    return error


def test_failures_are_said_as_what_they_are() -> None:
    where = "rediss://h:6380/0"
    unverified = ssl.SSLCertVerificationError(1, "certificate verify failed")
    unverified.verify_message = "self-signed certificate in certificate chain"
    tls = explain(_with_context(redis.ConnectionError("Error 1 connecting"), unverified), where)
    assert tls.config and tls.line.startswith(f"TLS with Redis at {where} failed: certificate")
    assert "REDIS_TLS_CA_FILE" in tls.line
    auth = explain(redis.AuthenticationError("invalid username-password pair"), where)
    assert auth.config and "refused the credentials" in auth.line
    down = explain(redis.ConnectionError("Connection refused"), where)
    assert not down.config and down.line == f"cannot reach Redis at {where} (ConnectionError)"
