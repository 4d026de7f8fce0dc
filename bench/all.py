"""Run every benchmark (``make bench``), write bench/results.md with the machine, print it.

Benchmarks are modules of bench/ with a ``main()`` that prints its table and returns a dict
with ``rows`` (a list of dicts) and, ideally, ``summary`` (one line). bench/quota.py and
bench/memory.py are run too when present.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.report import markdown_table

BENCHMARKS = [
    "resume_latency",
    "webhook_throughput",
    "cost_per_export",
    "in_flight",
    "quota",
    "memory",
]
RESULTS = Path(__file__).with_name("results.md")


class _Tee(io.TextIOBase):
    """Writes to the terminal and keeps a copy (a benchmark's last line is its summary)."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self._out.write(text)
        self._out.flush()
        return self.copy.write(text)


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "make bench (python -m bench.all)",
    }


def run_one(name: str) -> dict[str, Any] | None:
    """Import and run bench.<name>; None if the module does not exist."""
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{name}":
            return None
        raise
    print(f"\n== bench.{name} ==", flush=True)
    tee = _Tee(sys.stdout)
    started = time.monotonic()
    argv = sys.argv
    sys.argv = [f"bench.{name}"]  # a benchmark's own argument parser sees no arguments
    try:
        with contextlib.redirect_stdout(tee):
            figures = module.main()
    except Exception:
        traceback.print_exc()
        return {"name": name, "rows": [], "summary": f"{name}: FAILED (see the log)"}
    finally:
        sys.argv = argv
    result = dict(figures) if isinstance(figures, dict) else {}
    printed = [line for line in tee.copy.getvalue().splitlines() if line.strip()]
    result.setdefault("summary", printed[-1] if printed else "")
    result.setdefault("rows", [])
    result["output"] = "\n".join(printed)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def render(results: list[dict[str, Any]], host: dict[str, str]) -> str:
    lines = ["# Benchmark results", ""]
    lines += ["| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in host.items()]
    lines += ["", "## Summary", ""]
    lines += [f"- {r['summary']}" for r in results]
    for r in results:
        lines += ["", f"## {r.get('name', '?')} ({r.get('seconds', '?')} s)", ""]
        rows = r["rows"] if isinstance(r["rows"], list) else []
        if rows and all(isinstance(row, dict) for row in rows):
            lines += [markdown_table(rows), "", r["summary"]]
        else:  # a benchmark returning no rows: what it printed
            lines += ["```", r.get("output") or r["summary"], "```"]
    return "\n".join(lines) + "\n"


def main(names: list[str] | None = None) -> int:
    host = machine()
    results: list[dict[str, Any]] = []
    for name in names or BENCHMARKS:
        try:
            result = run_one(name)
        except KeyboardInterrupt:
            # The benchmark's stack is stopped by its own `with`; keep what finished.
            results.append({"name": name, "rows": [], "summary": f"{name}: INTERRUPTED"})
            RESULTS.write_text(render(results, host))
            break
        if result is not None:
            result.setdefault("name", name)
            results.append(result)
            RESULTS.write_text(render(results, host))  # after each: a late failure keeps these
    text = render(results, host)
    RESULTS.write_text(text)
    print("\n" + text)
    return (
        1
        if any(("FAILED" in r["summary"] or "INTERRUPTED" in r["summary"]) for r in results)
        else 0
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or None))
