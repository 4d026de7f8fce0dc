"""A whole local deployment in one object: Redis, the sandbox, the webhook and workers.

Used by the demo, the integration tests and the benchmarks, so all three run the real
processes the same way: the webhook under gunicorn, workers as ``celery -A worker worker``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
import requests
from celery import Celery

from worker.cli.embedded import EmbeddedRedis, free_port
from worker.queue.inflight import celery_queue

#: Seconds to wait for a started process to answer.
START_TIMEOUT = 30.0


def wait_http(url: str, timeout: float = START_TIMEOUT) -> None:
    """Poll ``url`` until it answers 2xx."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.05)


class LocalStack:
    """Start everything on 127.0.0.1; ``stop()`` (or leaving the ``with``) ends all of it."""

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        storage_url: str | None = None,
        sandbox_config: Any = None,
        workers: int = 1,
        concurrency: int = 2,
        webhook_workers: int = 1,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        redis_appendonly: bool = False,
        sandbox_process: bool = False,
    ) -> None:
        # redis_url="" forces a redis-server of our own (one the tests may restart).
        self._redis = EmbeddedRedis(url=redis_url, appendonly=redis_appendonly)
        self._storage_url = storage_url
        self._sandbox_config = sandbox_config
        #: Run the sandbox as a process of its own (as APSIS is), so its clock is not paused
        #: by this process's work; then ``self.sandbox`` (its in-process state) is None.
        self._sandbox_process = sandbox_process
        self.sandbox_proc: subprocess.Popen[bytes] | None = None
        self._workers = workers
        self._concurrency = concurrency
        self._webhook_workers = webhook_workers
        self._extra_env = env or {}
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="apsis-stack-"))
        self.sandbox: Any = None
        self.webhook: subprocess.Popen[bytes] | None = None
        self.worker_processes: list[subprocess.Popen[bytes]] = []
        #: Each worker's /metrics port (WORKER_METRICS_PORT), in worker_processes' order.
        self.worker_metrics_ports: list[int] = []
        self.env: dict[str, str] = {}
        self.apsis_url = ""
        self.webhook_url = ""
        self.redis_url = ""
        self._producer: Celery | None = None
        #: The Celery task id of each job submitted through submit() (for diagnostics).
        self.task_ids: dict[str, str] = {}

    @property
    def redis_kind(self) -> str:
        """given (REDIS_URL), redis-server, or fakeredis."""
        return self._redis.kind

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> LocalStack:
        try:
            self.redis_url = self._redis.start()
            if self._sandbox_process:
                self.apsis_url = f"http://127.0.0.1:{free_port()}"
            else:
                server_mod = importlib.import_module("sandbox.server")
                self.sandbox = server_mod.SandboxServer(config=self._sandbox_config)
                self.apsis_url = self.sandbox.start()
            port = free_port()
            self.webhook_url = f"http://127.0.0.1:{port}"
            self.env = {
                **os.environ,
                "REDIS_URL": self.redis_url,
                "APSIS_BASE_URL": self.apsis_url,
                "APSIS_CLIENT_ID": "sandbox",
                "APSIS_CLIENT_SECRET": "sandbox",
                "APSIS_ACCOUNT": "sandbox",
                "CALLBACK_BASE_URL": self.webhook_url,
                # A fresh random secret per run: nothing ships a default secret.
                "CALLBACK_SECRET": secrets.token_urlsafe(48),
                "STORAGE_URL": self._storage_url
                or os.environ.get("STORAGE_URL", "file://./exports"),
                "PYTHONUNBUFFERED": "1",
                **self._extra_env,
            }
            if self._sandbox_process:
                port_arg = self.apsis_url.rsplit(":", 1)[1]
                self.sandbox_proc = self._spawn(
                    "sandbox", [sys.executable, "-m", "worker.cli", "sandbox", "--port", port_arg]
                )
                wait_http(f"{self.apsis_url}/_sandbox/journal")
                if self._sandbox_config is not None:
                    requests.patch(
                        f"{self.apsis_url}/_sandbox/config", json=self._sandbox_config, timeout=5
                    ).raise_for_status()
            self.webhook = self._spawn(
                "webhook",
                [
                    sys.executable,
                    "-m",
                    "worker.cli",
                    "webhook",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    str(self._webhook_workers),
                ],
            )
            for _ in range(self._workers):
                self.add_worker()
            wait_http(f"{self.webhook_url}/healthz")
            return self
        except BaseException:
            self.stop()
            raise

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        return subprocess.Popen(
            cmd, env={**self.env, **(env or {})}, stdout=log, stderr=log, start_new_session=True
        )

    def add_worker(self, *, concurrency: int | None = None) -> subprocess.Popen[bytes]:
        n = len(self.worker_processes) + 1
        # The production command: checks Redis and storage, then runs celery quietly.
        cmd = [sys.executable, "-m", "worker.cli", "worker"]
        cmd += ["--concurrency", str(concurrency or self._concurrency)]
        cmd += ["--hostname", f"w{n}-{os.getpid()}@%h"]
        # Workers share this host: each serves its metrics on a port of its own.
        port = int(self._extra_env.get("WORKER_METRICS_PORT") or free_port())
        process = self._spawn(f"worker-{n}", cmd, {"WORKER_METRICS_PORT": str(port)})
        self.worker_processes.append(process)
        self.worker_metrics_ports.append(port)
        return process

    def kill_worker(self, process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Kill a worker's whole process group (main process and pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(timeout=30)

    def restart_redis(self, *, down_for: float = 0.0, hard: bool = False) -> None:
        """Stop our redis-server (SIGTERM, or SIGKILL if ``hard``), wait ``down_for`` s, and
        start it again on the same port; with AOF on, it comes back with its data."""
        self._redis.kill(graceful=not hard)
        time.sleep(down_for)
        self._redis.start_again()

    def stop(self) -> None:
        processes = [
            p for p in [self.webhook, *self.worker_processes, self.sandbox_proc] if p is not None
        ]
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.worker_processes = []
        self.worker_metrics_ports = []
        self.webhook = None
        self.sandbox_proc = None
        if self.sandbox is not None:
            self.sandbox.stop()
            self.sandbox = None
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        self._redis.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- use ----------------------------------------------------------------------------

    @property
    def producer(self) -> Celery:
        """A Celery app as another service would have: only a broker URL (through the
        Sentinel group, with kombu's own Sentinel transport, when REDIS_SENTINELS is set)."""
        if self._producer is None:
            sentinels = self.env.get("REDIS_SENTINELS")
            if sentinels:
                broker = ";".join(f"sentinel://{s.strip()}/0" for s in sentinels.split(","))
                self._producer = Celery("caller", broker=broker)
                self._producer.conf.broker_transport_options = {
                    "master_name": self.env["REDIS_SENTINEL_MASTER"]
                }
            else:
                self._producer = Celery("caller", broker=self.redis_url)
            self._producer.conf.task_serializer = "json"
        return self._producer

    def submit(self, export_key: str, **kwargs: Any) -> str:
        """Enqueue ``apsis.export_profile`` the way another service would; returns the job id."""
        job_id = kwargs.pop("job_id", None) or secrets.token_hex(16)
        self.task_ids[job_id] = self.producer.send_task(
            "apsis.export_profile",
            args=[export_key],
            kwargs={**kwargs, "job_id": job_id},
            queue="apsis",
        ).id
        return job_id

    def sandbox_put(self, path: str, body: Any) -> None:
        requests.put(f"{self.apsis_url}{path}", json=body, timeout=5).raise_for_status()

    def journal(self) -> list[dict[str, Any]]:
        answer = requests.get(f"{self.apsis_url}/_sandbox/journal", timeout=10)
        answer.raise_for_status()
        entries: list[dict[str, Any]] = answer.json()
        return entries


def retrying(call: Any, *, attempts: int = 40, pause: float = 0.25) -> Any:
    """Call ``call()`` again on Redis connection errors (for harnesses that restart Redis)."""
    for n in range(attempts):
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if n == attempts - 1:
                raise
            time.sleep(pause)
    return None


def queued_task_ids(client: redis.Redis) -> list[str]:
    """Celery task ids of the messages waiting on our queue, in queue order."""
    raws: list[bytes] = client.lrange(celery_queue(), 0, -1)  # type: ignore[assignment]
    return [json.loads(raw)["headers"].get("id") for raw in raws]


def unacked_task_ids(client: redis.Redis) -> dict[str, str]:
    """Celery task ids of the messages taken but not yet acknowledged, by delivery tag."""
    raws: dict[bytes, bytes] = client.hgetall("unacked")  # type: ignore[assignment]
    return {tag.decode(): json.loads(raw)[0]["headers"].get("id") for tag, raw in raws.items()}
