"""worker/queue/broker.py extends kombu's Redis transport through private parts: when a kombu
release changes their shape, this says which, before a worker loses a message over it."""

from __future__ import annotations

import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual

#: The kombu and Celery minors the transport was tested on (the fault suite, the broker tests).
TESTED_MINORS = {"kombu": "5.7", "celery": "5.7"}

#: What our Channel and ClaimingQoS call or override, with the parameters they pass.
CHANNEL_METHODS = {
    "_brpop_start": ["self", "timeout"],
    "_brpop_read": ["self", "options"],
    "basic_ack": ["self", "delivery_tag", "multiple"],
    "basic_reject": ["self", "delivery_tag", "requeue"],
    "conn_or_acquire": ["self", "client"],
}
#: Attributes our channel reads on kombu's (set in its __init__ or as class attributes).
CHANNEL_ATTRIBUTES = ["_queue_cycle", "active_queues", "brpop_timeout", "global_keyprefix"]
QOS_METHODS = {
    "append": ["self", "message", "delivery_tag"],
    "ack": ["self", "delivery_tag"],
}
QOS_PROPERTIES = ["unacked_key", "unacked_index_key"]

REPO = Path(__file__).resolve().parents[3]


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_kombu_and_celery_are_the_minors_the_transport_was_tested_on() -> None:
    found = {name: version(name) for name in TESTED_MINORS}
    for name, installed in found.items():
        assert installed.startswith(TESTED_MINORS[name] + "."), (
            f"{name} {installed} is installed; worker/queue/broker.py was tested on "
            f"{TESTED_MINORS[name]}.x: run the broker tests and the fault suite on it, then "
            "update TESTED_MINORS and the pins in pyproject.toml"
        )


def test_pyproject_pins_kombu_and_celery_to_those_minors() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, minor in TESTED_MINORS.items():
        major, low = minor.split(".")
        wanted = f">={minor},<{major}.{int(low) + 1}"
        pinned = [d for d in dependencies if re.match(rf"{name}(\[[^]]*\])?[<>=]", d)]
        assert pinned and all(d.endswith(wanted) for d in pinned), (
            f"pyproject.toml must pin {name}{wanted} (the minor worker/queue/broker.py was "
            f"tested on); found {pinned}"
        )


def test_the_kombu_internals_the_transport_extends_keep_their_shape() -> None:
    changed: list[str] = []
    channel: Any = kombu_redis.Channel
    for name, params in CHANNEL_METHODS.items():
        method = getattr(channel, name, None)
        if method is None:
            changed.append(f"kombu.transport.redis.Channel.{name} is gone")
        elif _parameters(method) != params:
            changed.append(f"Channel.{name}{_parameters(method)} (was {params})")
    init = inspect.getsource(channel.__init__) + inspect.getsource(channel)
    for attribute in CHANNEL_ATTRIBUTES:
        if attribute not in init:
            changed.append(f"Channel.{attribute} is no longer set by kombu")
    for name in ("parse_response", "connection"):
        if name not in inspect.getsource(channel._brpop_read):
            changed.append(f"Channel._brpop_read no longer uses client.{name}")
    if "_in_poll" not in inspect.getsource(channel):
        changed.append("Channel._in_poll is gone")
    if getattr(channel, "QoS", None) is not kombu_redis.QoS:
        changed.append("Channel.QoS is no longer kombu.transport.redis.QoS")
    for name, params in QOS_METHODS.items():
        for qos in (kombu_redis.QoS, kombu_virtual.QoS):
            method = getattr(qos, name, None)
            if method is None or _parameters(method) != params:
                changed.append(f"{qos.__module__}.QoS.{name} changed")
    for name in QOS_PROPERTIES:
        if name not in vars(kombu_redis.QoS) or not hasattr(channel, name):
            changed.append(f"kombu.transport.redis.QoS.{name} (the channel's key) is gone")
    if getattr(kombu_redis.Transport, "Channel", None) is not channel:
        changed.append("kombu.transport.redis.Transport.Channel is no longer its Channel")
    if "_deliver" not in dir(kombu_virtual.Transport):
        changed.append("kombu.transport.virtual.Transport._deliver is gone")
    assert not changed, (
        f"kombu {version('kombu')} changed what worker/queue/broker.py extends: "
        + "; ".join(changed)
    )
