"""What every benchmark shares: the stack it runs on, the figures it reads, the table it prints."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

from sandbox.config import SandboxConfig
from worker.cli.stack import LocalStack

#: Rates told to the pool so its own limiter never paces a benchmark (per second; per minute
#: for downloads): the benchmarks measure the machinery, not APSIS's quota (bench/quota does).
UNPACED_ENV = {
    "APSIS_EXPORT_RATE": "100000",
    "APSIS_DOWNLOAD_RATE": "6000000",
    "APSIS_TOKEN_RATE": "6000",
}
#: The bench task module the worker loads beside tasks.export (bench/tasks.py).
BENCH_TASKS_ENV = {"CELERY_EXTRA_INCLUDE": "bench.tasks"}
#: The webhook's production default (``apsis-export webhook``): 2 workers of 4 threads.
WEBHOOK_WORKERS = 2
WEBHOOK_THREADS = 4

Row = dict[str, Any]


def sandbox_config(**changes: Any) -> SandboxConfig:
    """The sandbox with no delays and no rate limits, unless a benchmark says otherwise."""
    config: dict[str, Any] = {
        "verify_delay": 0.0,
        "ready_delay": 0.0,
        "limits": {"token": None, "export": None, "download": None, "other": None},
    }
    config.update(changes)
    return SandboxConfig(**config)


@contextlib.contextmanager
def bench_stack(
    *,
    workers: int = 1,
    concurrency: int = 2,
    env: dict[str, str] | None = None,
    sandbox: SandboxConfig | None = None,
) -> Iterator[LocalStack]:
    """A running LocalStack on its own redis-server (never the machine's), its files and logs
    in temporary directories removed afterwards."""
    with (
        tempfile.TemporaryDirectory(prefix="apsis-bench-store-") as storage,
        tempfile.TemporaryDirectory(prefix="apsis-bench-logs-") as logs,
        LocalStack(
            redis_url="",
            storage_url=f"file://{storage}",
            sandbox_config=sandbox or sandbox_config(),
            workers=workers,
            concurrency=concurrency,
            webhook_workers=WEBHOOK_WORKERS,
            env={**UNPACED_ENV, **(env or {})},
            log_dir=Path(logs),
        ) as stack,
    ):
        yield stack


def redis_of(stack: LocalStack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url)


def wait_until(
    check: Callable[[], bool], *, timeout: float, what: str, every: float = 0.1
) -> float:
    """Poll ``check`` until true; returns the seconds it took, RuntimeError after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - start


def counts(client: redis.Redis) -> dict[str, int]:
    raw: Any = client.hgetall("apsis:jobs:counts")
    return {k.decode(): int(v) for k, v in raw.items()}


def used_memory(client: redis.Redis) -> int:
    """Redis's allocator figure, in bytes (INFO memory used_memory)."""
    info: Any = client.info("memory")
    return int(info["used_memory"])


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank on the sorted values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of seconds, in milliseconds."""
    return {
        "n": len(values),
        "p50_ms": round(1000 * percentile(values, 50), 2),
        "p95_ms": round(1000 * percentile(values, 95), 2),
        "p99_ms": round(1000 * percentile(values, 99), 2),
        "max_ms": round(1000 * max(values), 2) if values else float("nan"),
        "mean_ms": round(1000 * statistics.fmean(values), 2) if values else float("nan"),
    }


# -- CPU of whole process groups, from /proc ------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its closing one.
    return raw[raw.rindex(")") + 2 :].split()


def group_cpu_seconds(groups: Iterable[int]) -> float:
    """utime+stime (+ those of reaped children) of every live process in the process groups.

    A reaped child's time is in its parent's cutime/cstime, a live one's only in its own,
    so the sum counts each process once.
    """
    wanted = set(groups)
    total_ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # After the comm field: state, ppid, pgrp, ...; utime is field 14 overall (index 11).
        if fields is None or int(fields[2]) not in wanted:
            continue
        total_ticks += sum(int(v) for v in fields[11:15])
    return total_ticks / _CLOCK_TICKS


def pid_cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    return 0.0 if fields is None else sum(int(v) for v in fields[11:15]) / _CLOCK_TICKS


def stack_groups(stack: LocalStack) -> list[int]:
    """The process groups of the webhook and every worker (each started in its own session)."""
    processes = [stack.webhook, *stack.worker_processes]
    return [p.pid for p in processes if p is not None]


def redis_server_pid(stack: LocalStack) -> int | None:
    process = getattr(getattr(stack, "_redis", None), "_process", None)
    return None if process is None else int(process.pid)


# -- output ---------------------------------------------------------------------------------


def format_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """A fixed-width text table of ``rows`` (one dict each)."""
    if not rows:
        return "(no rows)"
    names = list(columns or dict.fromkeys(name for row in rows for name in row))
    cells = [[_cell(row.get(name, "")) for name in names] for row in rows]
    widths = [max(len(name), *(len(c[i]) for c in cells)) for i, name in enumerate(names)]
    lines = ["  ".join(name.rjust(w) for name, w in zip(names, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    names = list(columns or dict.fromkeys(name for row in rows for name in row))
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(_cell(row.get(n, "")) for n in names) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def emit(name: str, rows: list[Row], summary: str, **figures: Any) -> dict[str, Any]:
    """Print the table and the one-line summary; return the figures for bench/all.py."""
    print(format_table(rows))
    print(summary)
    return {"name": name, "rows": rows, "summary": summary, **figures}
