"""A Redis Sentinel group of real processes for the failover tests: a primary and a replica
(AOF on), three sentinels (``redis-server --sentinel``), all on free loopback ports.

``fail_over()`` SIGKILLs the current primary, measures how long no primary took writes (a
write through the sentinels every 20 ms, as the product's clients do it), then starts the
killed server again as a replica of the new primary, so a second failover has somewhere to
go. ``stop()`` ends every process it started.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.sentinel import Sentinel

from worker.cli.embedded import free_port

MASTER = "apsis"
#: Sentinel timings: a primary silent for DOWN_AFTER_MS is down; QUORUM sentinels agree.
#: Sentinels ping every second: at 1000 ms a newly promoted primary was taken for down
#: before its first ping came back (and a replica not yet in sync was promoted in its
#: place); 2000 ms leaves one ping of slack.
DOWN_AFTER_MS = 2000
FAILOVER_TIMEOUT_MS = 5000
QUORUM = 2
#: Seconds a failover (or a replica's first sync) may take before the harness gives up.
SETTLE_TIMEOUT = 30.0


@dataclass
class Failover:
    """One SIGKILL of the primary: which port died, which took over, and the figures."""

    killed_port: int
    new_port: int
    #: Seconds from the SIGKILL to the first write a client through the sentinels got in.
    no_primary_seconds: float
    #: Replication offset the replica had not yet acknowledged when the primary died (bytes).
    lag_bytes: int


@dataclass
class SentinelGroup:
    root: Path
    sentinels: int = 3
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    sentinel_processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    failovers: list[Failover] = field(default_factory=list)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> SentinelGroup:
        try:
            primary, replica = free_port(), free_port()
            self._start_server(primary)
            self._start_server(replica, replica_of=primary)
            self._wait_synced(replica)
            for n in range(self.sentinels):
                self._start_sentinel(n, primary)
            self._wait_sentinels_know(primary, replicas=1)
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in [*self.processes.values(), *self.sentinel_processes]:
            if process.poll() is None:
                process.terminate()
        for process in [*self.processes.values(), *self.sentinel_processes]:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        self.sentinel_processes.clear()

    def _start_server(self, port: int, *, replica_of: int | None = None) -> None:
        workdir = self.root / f"redis-{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "yes",
            # A restarted server resyncs at once, not after the default 5 s.
            "--repl-diskless-sync-delay", "0",
            "--dir", str(workdir),
            "--logfile", str(workdir / "redis.log"),
        ]  # fmt: skip
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.processes[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ping(port)

    def _start_sentinel(self, n: int, primary: int) -> None:
        port = free_port()
        workdir = self.root / f"sentinel-{n}"
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"logfile {workdir / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary} {QUORUM}\n"
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        self.sentinel_processes.append(
            subprocess.Popen(
                ["redis-server", str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.sentinel_ports.append(port)
        self._wait_ping(port)

    # -- what the product is given --------------------------------------------------------

    @property
    def sentinels_setting(self) -> str:
        """REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def env(self) -> dict[str, str]:
        return {"REDIS_SENTINELS": self.sentinels_setting, "REDIS_SENTINEL_MASTER": MASTER}

    def primary_port(self) -> int:
        """The primary the sentinels name now."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis(port=port, socket_timeout=1)
                host_port: Any = client.sentinel_get_master_addr_by_name(MASTER)
                client.close()
                if host_port:
                    return int(host_port[1])
        raise RuntimeError("no sentinel answered")

    def client(self) -> redis.Redis:
        """A client of the primary through the sentinels (follows a failover)."""
        group = Sentinel(
            [("127.0.0.1", port) for port in self.sentinel_ports],
            socket_timeout=1,
            socket_connect_timeout=1,
        )
        return group.master_for(MASTER, socket_timeout=2, socket_connect_timeout=1)

    def admin(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)

    # -- faults -----------------------------------------------------------------------------

    def stop_replica(self) -> int:
        """SIGTERM the replica (the primary keeps running, alone); returns its port."""
        primary = self.primary_port()
        port = next(port for port in self.processes if port != primary)
        self.processes[port].terminate()
        self.processes[port].wait(timeout=10)
        return port

    def start_replica(self, port: int) -> None:
        """Start a stopped server again as the primary's replica, and wait until in sync."""
        self._start_server(port, replica_of=self.primary_port())
        self._wait_synced(port)

    def fail_over(self) -> Failover:
        """SIGKILL the primary; wait for a new one to take writes; restart the killed server
        as its replica and wait until it is in sync and known to the sentinels."""
        old = self.primary_port()
        replica = next(port for port in self.processes if port != old)
        lag = self._lag_bytes(old, replica)
        killed_at = time.monotonic()
        self.processes[old].send_signal(signal.SIGKILL)
        self.processes[old].wait(timeout=10)
        new, took = self._first_write_after(killed_at, old)
        self._start_server(old, replica_of=new)
        self._wait_synced(old)
        self._wait_sentinels_know(new, replicas=1)
        failover = Failover(old, new, took, lag)
        self.failovers.append(failover)
        return failover

    def _lag_bytes(self, primary: int, replica: int) -> int:
        with contextlib.suppress(redis.RedisError):
            offset = int(self.admin(primary).info("replication")["master_repl_offset"])
            acked = int(self.admin(replica).info("replication")["slave_repl_offset"])
            return max(offset - acked, 0)
        return -1

    def _first_write_after(self, killed_at: float, old: int) -> tuple[int, float]:
        deadline = killed_at + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, RuntimeError):
                port = self.primary_port()
                if port != old:
                    self.admin(port).set("failover-probe", "1")
                    return port, time.monotonic() - killed_at
            time.sleep(0.02)
        raise RuntimeError(f"no new primary within {SETTLE_TIMEOUT:.0f} s")

    def _wait_ping(self, port: int) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            try:
                self.admin(port).ping()
                return
            except redis.BusyLoadingError:
                pass
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def _wait_synced(self, replica: int) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                info = self.admin(replica).info("replication")
                if info.get("master_link_status") == "up":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"replica on {replica} did not sync within {SETTLE_TIMEOUT:.0f} s")

    def _wait_sentinels_know(self, primary: int, *, replicas: int) -> None:
        """Every sentinel names ``primary`` and sees ``replicas`` healthy replicas of it."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            ready = 0
            for port in self.sentinel_ports:
                with contextlib.suppress(redis.RedisError):
                    client = self.admin(port)
                    addr: Any = client.sentinel_get_master_addr_by_name(MASTER)
                    healthy = [
                        r
                        for r in client.sentinel_slaves(MASTER)
                        if not ({"s_down", "o_down", "disconnected"} & set(r["flags"].split(",")))
                        and r.get("master-link-status") == "ok"
                    ]
                    if addr and int(addr[1]) == primary and len(healthy) >= replicas:
                        ready += 1
            if ready == len(self.sentinel_ports):
                return
            time.sleep(0.1)
        raise RuntimeError("the sentinels did not agree on the primary and its replica in time")
