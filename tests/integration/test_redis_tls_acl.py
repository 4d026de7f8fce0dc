"""The product on a Redis run as production should run it: TLS only (a private CA), the
README's ACL user, the default user off.

The pipeline end to end (worker, webhook, broker, callbacks) and the broker tests run here
again, as they are, with ``redis_url`` the ACL user's rediss:// URL (its CA in the query) and
``redis_db`` a test admin that may flush. The rest: the CA and a client certificate from
the settings, the broker checking the certificate, and the one-line start-up errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis
import requests
from e2e_support import REPO, StackFactory
from kombu.exceptions import OperationalError
from redis_tls import ACL_USER, TlsAclRedis, acl_args, make_certificates, readme_acl_line
from test_broker import (
    test_a_message_a_lost_connection_left_in_flight_goes_back_on_the_queue as test_tls_broker_recovers_a_message_left_in_flight,  # noqa: E501
)
from test_broker import (
    test_a_message_sent_with_a_priority_is_moved_where_workers_take_it as test_tls_broker_moves_a_priority_message,  # noqa: E501
)
from test_broker import (
    test_a_taken_message_stays_in_flight_until_it_is_recorded_as_unacknowledged as test_tls_broker_takes_a_message_into_flight,  # noqa: E501
)
from test_pipeline_e2e import (
    test_merged_profiles_each_get_their_document as test_tls_merged_profiles_each_get_their_document,  # noqa: E501
)
from test_pipeline_e2e import (
    test_single_export_is_stored_byte_for_byte_with_its_manifest as test_tls_single_export_end_to_end,  # noqa: E501
)

from worker.config import load_settings
from worker.flow.runtime import redis_client
from worker.ops import redis_access
from worker.queue.app import celery_config

pytestmark = pytest.mark.integration

__all__ = [
    "test_tls_broker_moves_a_priority_message",
    "test_tls_broker_recovers_a_message_left_in_flight",
    "test_tls_broker_takes_a_message_into_flight",
    "test_tls_merged_profiles_each_get_their_document",
    "test_tls_single_export_end_to_end",
]

TRANSPORT = "worker.queue.broker:Transport"
#: Settings a worker refuses to start without (their values only need to look real).
WORKER_ENV = {
    "APSIS_CLIENT_ID": "tls-test-client",
    "APSIS_CLIENT_SECRET": "tls-test-secret-Qm3v9Zt",
    "CALLBACK_BASE_URL": "http://127.0.0.1:9",
    "CALLBACK_SECRET": "Zq8-rT2vLm9xWp4sKd7hYb3nGc6fJe1uAo5iQz0l",
}


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory):
    return make_certificates(tmp_path_factory.mktemp("redis-tls"))


@pytest.fixture(scope="module")
def tls_redis(certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsAclRedis]:
    """TLS with client certificates optional (the CA in the URL is enough)."""
    # The broker tests run on a queue of their own: added as the README says for one.
    server = TlsAclRedis(
        tmp_path_factory.mktemp("redis"),
        certificates,
        auth_clients="optional",
        extra=["~broker-test*"],
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_url(tls_redis: TlsAclRedis) -> str:
    """The ACL user's URL, CA in the query: what the product and the tests' kombu use."""
    return tls_redis.url()


@pytest.fixture
def redis_db(tls_redis: TlsAclRedis) -> Iterator[redis.Redis]:
    """A test admin (the ACL user may not flush), flushing before and after."""
    client = redis.Redis.from_url(tls_redis.admin_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "APSIS_"))}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        check=False,
        env={**clean, **WORKER_ENV, "STORAGE_URL": "memory:///", **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], *secrets: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for secret in secrets:
        assert secret not in result.stderr
    return lines[0]


def test_the_webhook_is_ready_on_tls_as_the_acl_user(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    stack = make_stack(workers=0)
    ready = requests.get(f"{stack.webhook_url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["redis"] == "ok"


def test_the_ca_and_a_client_certificate_come_from_the_settings(
    certificates, tmp_path: Path
) -> None:
    # A Redis that demands a client certificate; the URL carries no TLS option at all.
    server = TlsAclRedis(tmp_path, certificates, auth_clients="yes")
    try:
        settings = load_settings(
            REDIS_URL=server.url(query=False),
            REDIS_TLS_CA_FILE=str(certificates.ca.cert),
            REDIS_TLS_CERT_FILE=str(certificates.client.cert),
            REDIS_TLS_KEY_FILE=str(certificates.client.key),
        )
        client = redis_client(settings.redis_connection())
        assert client.ping()
        # The README's line grants all the product checks for.
        assert redis_access.refused_access(client, "apsis") == []
        # The broker, with the options the Celery app is given.
        config = celery_config(settings)
        with kombu.Connection(
            config["broker_url"], transport=TRANSPORT, ssl=config["broker_use_ssl"]
        ) as conn:
            queue = kombu.Queue("apsis", routing_key="apsis")
            with conn.Producer() as producer:
                producer.publish({"n": 1}, routing_key="apsis", declare=[queue])
            got: list[object] = []
            with conn.Consumer(queue, callbacks=[lambda body, message: got.append(body)]):
                conn.drain_events(timeout=5)
            assert got == [{"n": 1}]
        client.close()
    finally:
        server.stop()


def test_the_broker_checks_the_certificate_of_a_rediss_url_without_options(
    tls_redis: TlsAclRedis,
) -> None:
    # kombu alone falls back to not checking it ("defaulting to insecure SSL behaviour").
    settings = load_settings(REDIS_URL=tls_redis.url(query=False))
    config = celery_config(settings)
    assert config["broker_use_ssl"]["ssl_cert_reqs"] != 0  # ssl.CERT_NONE
    with (
        kombu.Connection(
            config["broker_url"], transport=TRANSPORT, ssl=config["broker_use_ssl"]
        ) as conn,
        pytest.raises(OperationalError, match="certificate verify failed"),
    ):
        channel: Any = conn.default_channel
        channel.client.ping()


def test_an_untrusted_certificate_is_one_line_naming_the_ca_setting(
    tls_redis: TlsAclRedis, certificates
) -> None:
    result = _cli(
        "worker",
        env={
            "REDIS_URL": tls_redis.url(query=False),
            "REDIS_TLS_CA_FILE": str(certificates.other_ca.cert),
        },
    )
    line = _one_line_error(result, tls_redis.password)
    assert line.startswith("apsis-export: TLS with Redis at rediss://127.0.0.1:")
    assert "certificate verify failed" in line and "REDIS_TLS_CA_FILE" in line


def test_a_wrong_password_is_one_line_about_the_credentials(tls_redis: TlsAclRedis) -> None:
    result = _cli("worker", env={"REDIS_URL": tls_redis.url(password="not-the-password")})
    line = _one_line_error(result, "not-the-password")
    assert "refused the credentials" in line


def test_a_user_with_less_than_the_readme_line_is_refused_naming_what_it_lacks(
    tls_redis: TlsAclRedis,
) -> None:
    # The README's line without BLMOVE and without kombu's unacked keys.
    args = [a for a in acl_args(readme_acl_line(), "x") if a not in ("+blmove", "~unacked*")]
    url = tls_redis.add_user("apsis-less", [a for a in args if not a.startswith(">")])
    for role in ("worker", "webhook"):
        line = _one_line_error(_cli(role, env={"REDIS_URL": url}))
        assert line.startswith("apsis-export: the Redis user lacks what the product needs:")
        assert "blmove apsis" in line and "hset unacked" in line, line
        assert "ACL SETUSER" in line


def test_the_server_settings_the_product_needs_are_checked(
    tls_redis: TlsAclRedis, redis_db: redis.Redis
) -> None:
    client = redis_client(tls_redis.url())
    # The test server keeps no AOF: warned; its policy is noeviction: not.
    assert [w for w in redis_access.settings_warnings(client) if "AOF" in w]
    assert not [w for w in redis_access.settings_warnings(client) if "maxmemory" in w]
    redis_db.config_set("maxmemory-policy", "allkeys-lru")
    try:
        (warning,) = [w for w in redis_access.settings_warnings(client) if "maxmemory" in w]
        assert "allkeys-lru" in warning and "noeviction" in warning
    finally:
        redis_db.config_set("maxmemory-policy", "noeviction")
        client.close()


def test_the_acl_user_is_the_readme_one_and_the_default_user_is_off(
    tls_redis: TlsAclRedis, redis_db: redis.Redis
) -> None:
    default: Any = redis_db.acl_getuser("default")
    product: Any = redis_db.acl_getuser(ACL_USER)
    assert "off" in default["flags"] and "on" in product["flags"]
    anonymous = redis_client(tls_redis.url(user="", password=""))
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()
