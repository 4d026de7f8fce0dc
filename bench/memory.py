"""Peak RSS of a worker exporting 1 MB, 100 MB and 1 GB files from the sandbox.

    python -m bench.memory [--sizes 1,100,1000] [--timeout 900] [--package on|off|both]

One LocalStack per size (one worker, concurrency 1, file storage in a temp dir), so each
figure is a fresh process: the pool child's VmHWM (peak RSS) after the export is stored,
with history, definitions and two merged profiles requested. ``--package both`` measures
each size without the data-subject package (PACKAGE_ENABLED=0) and with it, side by side.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from worker.cli.stack import LocalStack
from worker.flow.runtime import redis_client
from worker.model.jobs import FINAL, JobStore, State

MB = 1_000_000


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(c) for c in children]
    return found


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def measure(size_mb: int, timeout: float, *, package: bool = True) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="apsis-bench-mem-") as tmp:
        stack = LocalStack(
            storage_url=f"file://{tmp}/exports",
            workers=1,
            concurrency=1,
            log_dir=Path(tmp),
            env={"RETENTION_DAYS": "0", "PACKAGE_ENABLED": "1" if package else "0"},
        )
        with stack:
            key = f"bench.memory.{size_mb}@example.com"
            stack.sandbox_put(
                "/_sandbox/faults",
                {"keys": {key: {"file_size": size_mb * MB, "merged_count": 2}}},
            )
            jobs = JobStore(redis_client(stack.redis_url))
            started = time.monotonic()
            job_id = stack.submit(
                key,
                include_attribute_history=True,
                include_type_definitions=True,
                include_merged_profiles=True,
            )
            while True:
                job = jobs.find(job_id)
                if job is not None and job.state in FINAL:
                    break
                if time.monotonic() - started > timeout:
                    raise SystemExit(f"{size_mb} MB: not done after {timeout:.0f} s")
                time.sleep(0.2)
            elapsed = time.monotonic() - started
            if job.state != State.DONE:
                raise SystemExit(f"{size_mb} MB: job failed: {job.error}")
            main = stack.worker_processes[0].pid
            # The celery main process runs the pool child (prefork) that did the export.
            celery = [p for p in [main, *_children(main)] if _children(p)] or [main]
            pool = [c for p in celery for c in _children(p)]
            child_kib = max((_hwm_kib(p) for p in pool), default=0)
            manifest = json.loads(Path(job.manifest.removeprefix("file://")).read_bytes())  # type: ignore[union-attr]
            events = sum(p["counts"]["events"] for p in manifest["profiles"])
            return {
                "size_mb": size_mb,
                "bytes": float(job.source_bytes or 0),
                "child_peak_mib": child_kib / 1024,
                "main_peak_mib": _hwm_kib(main) / 1024,
                "seconds": elapsed,
                "events": float(events),
                "package": float(package),
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,100,1000", help="file sizes in MB, comma list")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per export")
    parser.add_argument(
        "--package", choices=("on", "off", "both"), default="on", help="PACKAGE_ENABLED"
    )
    args = parser.parse_args()
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.package]
    rows = [
        measure(int(s), args.timeout, package=mode) for s in args.sizes.split(",") for mode in modes
    ]
    print(
        f"{'file':>9} {'package':>8} {'events':>11} {'pool child peak RSS':>20} "
        f"{'worker main':>12} {'time':>8}"
    )
    for r in rows:
        print(
            f"{r['bytes'] / MB:>6.0f} MB {'on' if r['package'] else 'off':>8} "
            f"{r['events']:>11,.0f} {r['child_peak_mib']:>16.1f} MiB "
            f"{r['main_peak_mib']:>8.1f} MiB {r['seconds']:>6.1f} s"
        )
    if args.package == "both":
        for off, on in zip(rows[::2], rows[1::2], strict=True):
            print(
                f"{off['bytes'] / MB:.0f} MB: peak RSS with the package "
                f"{on['child_peak_mib'] / off['child_peak_mib'] - 1:+.1%} "
                f"({off['child_peak_mib']:.1f} -> {on['child_peak_mib']:.1f} MiB), "
                f"time {on['seconds'] / off['seconds'] - 1:+.0%}"
            )
        rows = rows[1::2]
    low, high = rows[0], rows[-1]
    print(
        f"peak RSS of the exporting process: {low['child_peak_mib']:.1f} MiB at "
        f"{low['bytes'] / MB:.0f} MB, {high['child_peak_mib']:.1f} MiB at "
        f"{high['bytes'] / MB:.0f} MB (+{high['child_peak_mib'] - low['child_peak_mib']:.1f} MiB "
        f"for {high['bytes'] / low['bytes']:,.0f}x the data)"
    )


if __name__ == "__main__":
    main()
