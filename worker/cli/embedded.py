"""An embedded Redis for the demo and the tests: REDIS_URL, else redis-server, else fakeredis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from types import TracebackType

import redis

#: Seconds to wait for a started redis-server to answer PING.
START_TIMEOUT = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """A Redis for one run, in the fallback order of the architecture brief.

    1. ``REDIS_URL`` when set: used as it is, never started or stopped here.
    2. ``redis-server`` when on PATH: started on a free loopback port without persistence,
       in a temporary directory, and stopped by :meth:`stop`.
    3. fakeredis's TCP server in a thread of this process (Nagle off: with it on, each
       small reply waits for the peer's delayed ACK and Celery runs ~15x slower).
    """

    def __init__(self, *, url: str | None = None, appendonly: bool = False) -> None:
        self._given_url = url if url is not None else os.environ.get("REDIS_URL") or None
        self._appendonly = appendonly
        self._process: subprocess.Popen[bytes] | None = None
        self._fake_server: object | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.url = ""
        self.kind = ""

    def start(self) -> str:
        if self._given_url:
            self.url, self.kind = self._given_url, "given"
        elif shutil.which("redis-server"):
            self.url, self.kind = self._start_server(), "redis-server"
        else:
            self.url, self.kind = self._start_fake(), "fakeredis"
        self._wait_ready()
        return self.url

    @property
    def port(self) -> int | None:
        return None if not self.url else int(self.url.rsplit(":", 1)[1].split("/")[0])

    def _start_server(self, port: int | None = None) -> str:
        port = port or free_port()
        self._workdir = self._workdir or tempfile.TemporaryDirectory(prefix="apsis-redis-")
        args = [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "yes" if self._appendonly else "no",
            "--dir", self._workdir.name,
            "--logfile", os.path.join(self._workdir.name, "redis.log"),
        ]  # fmt: skip
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return f"redis://127.0.0.1:{port}/0"

    def _start_fake(self) -> str:
        from fakeredis import TcpFakeServer
        from fakeredis._clients._tcp_server import TCPFakeRequestHandler

        TCPFakeRequestHandler.disable_nagle_algorithm = True
        port = free_port()
        server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="fakeredis", daemon=True).start()
        self._fake_server = server
        return f"redis://127.0.0.1:{port}/0"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self._process is not None and self._process.poll() is not None:
                        raise RuntimeError("redis-server exited at start-up") from None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def restart(self) -> None:
        """Stop and start the same redis-server on the same port (data kept if AOF is on)."""
        if self._process is None:
            raise RuntimeError("only a started redis-server can be restarted")
        port = self.port
        self._process.terminate()
        self._process.wait(timeout=START_TIMEOUT)
        self._start_server(port)
        self._wait_ready()

    def kill(self, *, graceful: bool = False) -> None:
        """Stop the started redis-server (for restart tests): SIGKILL, or SIGTERM if graceful."""
        if self._process is not None:
            if graceful:
                self._process.terminate()
            else:
                self._process.kill()
            self._process.wait(timeout=START_TIMEOUT)

    def start_again(self) -> None:
        """Start the killed redis-server on the same port."""
        self._start_server(self.port)
        self._wait_ready()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._fake_server is not None:
            server = self._fake_server
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._fake_server = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
