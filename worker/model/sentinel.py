"""Connections to the primary of a Redis Sentinel group that follow it through a failover.

redis-py's ``SentinelManagedConnection`` asks the sentinels where the primary is only in
``connect()``; but a connection that lost its socket mid-command reconnects inside
``send_packed_command``, which (redis-py 8.1) goes straight to the address it had. A client
retrying through a failover then knocks on the dead primary, and once that server is back as
a replica, gets READONLY on every try: in our failover suite a task rode out 19.5 s of
errors while the new primary had been taking writes for 16 s. These classes reconnect
through the sentinels there too.
"""

from __future__ import annotations

from typing import Any

from redis.connection import SSLConnection
from redis.sentinel import SentinelManagedConnection


class PrimaryConnection(SentinelManagedConnection):
    """A Sentinel-managed connection that finds the primary again on every reconnect."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect()  # type: ignore[no-untyped-call]  # through the sentinels
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class PrimarySSLConnection(PrimaryConnection, SSLConnection):
    """The same over TLS."""
