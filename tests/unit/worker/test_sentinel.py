"""Redis through a Sentinel group (worker/config.py, worker/flow/runtime.py, the broker's
settings in worker/queue/app.py, worker/model/sentinel.py) and writes confirmed by replicas
(worker/model/replicas.py). No sockets: failovers themselves are in
tests/integration/test_fault_failover.py."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import redis

from worker.config import load_settings
from worker.errors import ConfigError
from worker.flow.runtime import redis_client
from worker.model.replicas import NotReplicated, ReplicaAck
from worker.model.sentinel import PrimaryConnection, PrimarySSLConnection
from worker.queue.app import celery_config
from worker.queue.broker import SentinelChannel

SECRET = "s3cr3t-Pa55word"
SENTINELS = "10.0.0.1:26379,10.0.0.2:26379,sentinel-3.internal:26380"


def test_the_sentinel_settings_reach_every_client_and_the_broker() -> None:
    settings = load_settings(
        REDIS_URL=f"redis://apsis-export:{SECRET}@ignored/3",
        REDIS_SENTINELS=SENTINELS,
        REDIS_SENTINEL_MASTER="apsis",
        REDIS_SENTINEL_PASSWORD="sentinel-Pa55",
    )
    connection = settings.redis_connection()
    assert connection.sentinels == (
        ("10.0.0.1", 26379),
        ("10.0.0.2", 26379),
        ("sentinel-3.internal", 26380),
    )
    assert connection.where == (
        "redis://apsis via sentinels 10.0.0.1:26379,10.0.0.2:26379,sentinel-3.internal:26380/3"
    )
    assert SECRET not in repr(connection) and "sentinel-Pa55" not in repr(settings)

    config = celery_config(settings)
    assert config["broker_url"] == ";".join(
        f"sentinel://apsis-export:{SECRET}@{host}/3" for host in SENTINELS.split(",")
    )
    assert config["broker_transport"] == "worker.queue.broker:SentinelTransport"
    options = config["broker_transport_options"]
    assert options["master_name"] == "apsis"
    assert options["sentinel_kwargs"] == {"password": "sentinel-Pa55"}
    assert options["visibility_timeout"] == settings.CELERY_VISIBILITY_TIMEOUT
    # A publish rides out a failover (seconds) instead of kombu's 0.4 s.
    assert config["task_publish_retry_policy"]["max_retries"] >= 20

    client = redis_client(connection)
    pool: Any = client.connection_pool
    assert pool.service_name == "apsis" and pool.connection_class is PrimaryConnection
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["username"] == "apsis-export"
    sentinel_kwargs = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert sentinel_kwargs["password"] == "sentinel-Pa55"


def test_tls_applies_to_the_sentinels_and_the_primary(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = load_settings(
        REDIS_URL="rediss://u:p@ignored:6380/0",
        REDIS_TLS_CA_FILE=str(ca),
        REDIS_SENTINELS="s1:26379",
        REDIS_SENTINEL_MASTER="apsis",
    )
    connection = settings.redis_connection()
    tls = {"ssl_cert_reqs": "required", "ssl_ca_certs": str(ca)}
    assert connection.sentinel_kwargs() == {"ssl": True, **tls}
    config = celery_config(settings)
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    assert config["broker_transport_options"]["sentinel_kwargs"] == {"ssl": True, **tls}
    pool: Any = redis_client(connection).connection_pool
    assert pool.connection_class is PrimarySSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == str(ca)


def test_one_redis_server_is_as_before() -> None:
    settings = load_settings(REDIS_URL="redis://h:6379/0")
    config = celery_config(settings)
    assert config["broker_url"] == "redis://h:6379/0"
    assert config["broker_transport"] == "worker.queue.broker:Transport"
    assert "task_publish_retry_policy" not in config
    assert "master_name" not in config["broker_transport_options"]


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        ({"REDIS_SENTINELS": "s1:26379"}, "REDIS_SENTINELS is set without REDIS_SENTINEL_MASTER"),
        (
            {"REDIS_SENTINEL_MASTER": "apsis"},
            "REDIS_SENTINEL_MASTER is set without REDIS_SENTINELS",
        ),
        (
            {"REDIS_SENTINELS": "s1:26379,s2", "REDIS_SENTINEL_MASTER": "apsis"},
            "REDIS_SENTINELS is invalid: 's2' is not host:port",
        ),
        (
            {"REDIS_SENTINELS": "s1:99999", "REDIS_SENTINEL_MASTER": "apsis"},
            "REDIS_SENTINELS is invalid: 's1:99999' is not host:port",
        ),
        ({"REDIS_MIN_REPLICAS_ACK": "-1"}, "REDIS_MIN_REPLICAS_ACK is invalid:"),
        ({"REDIS_WAIT_TIMEOUT_MS": "0"}, "REDIS_WAIT_TIMEOUT_MS is invalid:"),
    ],
)
def test_sentinel_and_wait_settings_that_cannot_work_are_one_line(
    settings: dict[str, str], line: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(REDIS_URL=f"redis://u:{SECRET}@h/0", **settings)
    assert str(raised.value).startswith(line)
    assert SECRET not in str(raised.value) and "\n" not in str(raised.value)


def test_the_broker_channel_is_ours_on_connections_that_follow_the_primary() -> None:
    # Our BLMOVE take, claims and settling (worker.queue.broker.Channel), kombu's Sentinel
    # pool: not kombu's stock Sentinel channel, which takes messages with BRPOP.
    assert SentinelChannel._brpop_start.__qualname__ == "Channel._brpop_start"
    assert SentinelChannel.__module__ == "worker.queue.broker"
    assert SentinelChannel._get_pool.__qualname__ == "SentinelChannel._get_pool"
    assert SentinelChannel.connection_class is PrimaryConnection


class _Socket:
    def sendall(self, data: bytes) -> None:
        pass


class _Pool:
    """What a SentinelConnectionPool tells its connections: the primary moved."""

    is_master = True
    check_connection = False

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.asked = 0

    def get_master_address(self) -> tuple[str, int]:
        self.asked += 1
        return self.address


def test_a_connection_that_lost_its_socket_asks_the_sentinels_where_the_primary_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = _Pool(("10.0.0.9", 6380))
    connection = PrimaryConnection(connection_pool=pool, host="10.0.0.1", port=6379)
    reached: list[tuple[str, int]] = []

    def connect(self: PrimaryConnection, *args: Any, **kwargs: Any) -> None:
        reached.append((self.host, self.port))
        self._sock = _Socket()  # type: ignore[assignment]

    monkeypatch.setattr(redis.connection.AbstractConnection, "connect_check_health", connect)
    monkeypatch.setattr(redis.connection.AbstractConnection, "check_health", lambda self: None)
    connection.send_packed_command(b"*1\r\n$4\r\nPING\r\n")
    # Not the address it had before (the dead primary, or a replica by now).
    assert reached == [("10.0.0.9", 6380)] and pool.asked == 1


class _Pipe:
    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def wait(self, *args: Any) -> None:
        self.commands.append(("wait", args))


def test_a_write_too_few_replicas_confirmed_is_refused_as_redis_unavailable() -> None:
    ack = ReplicaAck(replicas=1, timeout_ms=250)
    pipe = _Pipe()
    ack.fold(pipe)
    assert pipe.commands == [("wait", (1, 250))]
    ack.check(1)
    with pytest.raises(NotReplicated) as raised:
        ack.check(0)
    # A ConnectionError: the webhook answers 503, a task goes back on the queue.
    assert isinstance(raised.value, redis.ConnectionError)
    assert str(raised.value) == "0 of 1 replicas confirmed the write within 250 ms"


def test_off_sends_no_wait() -> None:
    pipe = _Pipe()
    ReplicaAck().fold(pipe)
    ReplicaAck().check(0)
    assert pipe.commands == [] and not ReplicaAck()
