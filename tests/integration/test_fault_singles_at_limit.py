"""Single exports through faults at APSIS's documented limits (x APSIS_TEST_SCALE).

The main fault suite (test_fault_injection.py) runs far above APSIS's limits. Here every
export is a single (``apsis.export_profile``), the pool paces at and the sandbox enforces the
documented rates (1 export request/s, 60 downloads/min, 10 token requests/min) x SCALE, and
the figures count what the safety net had to do:

1. every callback and APSIS fault but lost callbacks and big files, and every issued token
   expired once: each job ends as its fault requires, no 429 comes from our own pacing, and
   the watchdog rescues nothing (no sweep acts);
2. "ready" callbacks dropped once: exactly one rescue (a re-request) per such key;
3. worker process groups SIGKILLed mid-fetch of a big file: each killed worker's job is
   fetched again within 60 s (the default WATCHDOG_INTERVAL), and stored once.

The figures are printed (-s) and written to test-output/fault-figures-singles.txt.

    .venv/bin/pytest tests/integration/test_fault_singles_at_limit.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from e2e_support import (
    OUTPUT,
    SCALE,
    StackFactory,
    log_events,
    rescue_counts,
    stack_at_limits,
    wait_final,
    watchdog_rescues,
)
from fault_support import (
    BIG_FILE_BYTES,
    KINDS,
    FaultKind,
    OnceFaults,
    expire_issued_tokens,
    fault_config,
    fetching_worker,
    leased_jobs,
    stored_problems,
)

from worker.cli.stack import LocalStack
from worker.deliverable.storage import Storage
from worker.model.jobs import Job, JobStore, State
from worker.model.lease import LEASE_SECONDS

pytestmark = [pytest.mark.integration, pytest.mark.faults]

FIGURES = OUTPUT / "fault-figures-singles.txt"

#: Fault kinds of the no-kill test: all but lost "ready" callbacks and big files.
SINGLE_KINDS = tuple(
    k for k in KINDS if not k.name.startswith("drop_ready") and k.name != "big_file"
)
KEYS_PER_KIND = 2
NONE_KEYS = 4
#: Seconds the pool waits for a "ready" callback before the watchdog re-requests. In the
#: no-loss test a generous bound (APSIS calls back within a second), so a lost callback
#: would be rescued, and counted, within the run.
CALLBACK_TIMEOUT_NO_LOSS = 30
#: The dropped-callback test: short, so the rescue comes within seconds.
CALLBACK_TIMEOUT_LOST = 5
#: A job idle this long, in no line, without a lease and no retry scheduled, is re-dispatched.
STUCK_AFTER = 60
#: The production default sweep interval: the kill test measures the documented bound with it.
DEFAULT_WATCHDOG_INTERVAL = 30
#: What README promises after a SIGKILL: the killed worker's fetch is back within a minute.
RESUME_BOUND = 60.0
KILLS = 2
BIG_KEYS = 8


def _timeout(base: float, per_scale: float) -> int:
    return int(base + per_scale / SCALE)


def _record(section: str, text: str) -> None:
    """Print ``text`` and keep it as ``section`` of FIGURES (the other sections stay)."""
    print("\n" + text)
    sections: dict[str, str] = {}
    if FIGURES.exists():
        for chunk in FIGURES.read_text().split("\n## "):
            title, _, body = chunk.removeprefix("## ").partition("\n")
            if title.strip():
                sections[title.strip()] = body.rstrip("\n")
    sections[section] = text.rstrip("\n")
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text("".join(f"## {title}\n{body}\n\n" for title, body in sections.items()))


def _submit(stack: LocalStack, keys: list[str], prefix: str) -> dict[str, str]:
    """Each key as a single export (``apsis.export_profile``), as another service sends it."""
    job_of: dict[str, str] = {}
    for n, key in enumerate(keys):
        job_of[key] = stack.submit(key, job_id=f"{prefix}{n:03d}")
    return job_of


def _injected(keys: dict[str, FaultKind], kind: str, status: int) -> Counter[str]:
    """Per key, how many ``status`` answers the sandbox was told to give to ``kind`` requests."""
    counts: Counter[str] = Counter()
    for key, fault in keys.items():
        for error in fault.spec.get(f"{kind}_errors", []):
            code = error["status"] if isinstance(error, dict) else error
            counts[key] += code == status
    return +counts


def _observed(journal: list[dict[str, Any]], kind: str, status: int) -> Counter[str]:
    return Counter(
        str(e["export_key"]) for e in journal if e["kind"] == kind and e["status"] == status
    )


def _pacing_429s(
    keys: dict[str, FaultKind], journal: list[dict[str, Any]]
) -> dict[str, Counter[str]]:
    """429s APSIS answered beyond the injected ones, per request kind and key: our pacing's."""
    found = {
        kind: _observed(journal, kind, 429) - _injected(keys, kind, 429)
        for kind in ("export", "download")
    }
    found["token"] = _observed(journal, "token", 429)
    return found


def _rescue_line(log_dir: Path) -> str:
    counts = rescue_counts(log_dir)
    sweeps = len(watchdog_rescues(log_dir))
    detail = ", ".join(f"{name}={value}" for name, value in sorted(counts.items()) if value)
    return f"watchdog rescues: {sweeps} sweeps acted ({detail or 'nothing'})"


def _states(jobs: list[Job]) -> str:
    states = Counter(job.state.value for job in jobs)
    return ", ".join(f"{state}: {n}" for state, n in sorted(states.items()))


@pytest.mark.timeout(_timeout(240, 1200))
def test_singles_through_every_callback_and_apsis_fault_need_no_rescue(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    started = time.monotonic()
    stack = stack_at_limits(
        make_stack,
        scale=SCALE,
        sandbox_process=False,  # in this process: one-shot callback faults, expired tokens
        env={
            "APSIS_CALLBACK_TIMEOUT": str(CALLBACK_TIMEOUT_NO_LOSS),
            "WATCHDOG_STUCK_AFTER": str(STUCK_AFTER),
        },
    )
    kinds = [
        k for k in SINGLE_KINDS for _ in range(NONE_KEYS if k.name == "none" else KEYS_PER_KIND)
    ]
    random.Random(14).shuffle(kinds)
    keys = {f"single-{n:02d}@example.com": kind for n, kind in enumerate(kinds)}
    stack.sandbox_put("/_sandbox/faults", fault_config(keys))
    state = stack.sandbox.state
    once = OnceFaults(state, {key: k.once for key, k in keys.items() if k.once}).start()
    try:
        job_of = _submit(stack, list(keys), "single")
        # Every token issued so far expires once half of the exports were accepted.
        deadline = time.monotonic() + _timeout(30, 300)
        while (
            len(
                {
                    e["export_key"]
                    for e in state.journal.entries(kind="export")
                    if e["status"] == 202
                }
            )
            < len(keys) // 2
        ):
            assert time.monotonic() < deadline, "half of the exports were never accepted"
            time.sleep(0.05)
        expired = expire_issued_tokens(state)
        expired_at = time.time()
        # Requests: one per key, and the injected errors' and failure callbacks' repeats.
        final = wait_final(JobStore(redis_db), list(job_of.values()), timeout=_timeout(60, 600))
    finally:
        once.stop()
    wall = time.monotonic() - started

    jobs = {job.job_id: job for job in final}
    journal = state.journal.entries()
    downloads = Counter(
        str(e["export_key"]) for e in journal if e["kind"] == "download" and e["status"] == 200
    )
    wrong, second = [], []
    for key, kind in keys.items():
        job = jobs[job_of[key]]
        expected = State.FAILED if kind.permanent else State.DONE
        if job.state != expected or (job.state == State.FAILED and not (job.error or "").strip()):
            wrong.append(f"{key} ({kind.name}): {job.state.value}: {job.error!r}")
        if kind.strict_one_download and downloads[key] != 1:
            second.append(f"{key} ({kind.name}): {downloads[key]} downloads")
    pacing = _pacing_429s(keys, journal)
    auth_refused = [e for e in journal if e["status"] in (401, 403) and e["ts"] >= expired_at]
    storage = Storage(stack.env["STORAGE_URL"])
    served = requests.get(f"{stack.apsis_url}/_sandbox/exports", timeout=30).json()
    sha_of: dict[str, set[str]] = {}
    for definition in served:
        sha_of.setdefault(definition["export_key"], set()).add(definition["sha256"])
    badly_stored = [
        f"{key}: {problem}"
        for key, job_id in job_of.items()
        if jobs[job_id].state == State.DONE
        for problem in stored_problems(storage, job_id, sha_of.get(key, set()))
    ]
    rescues = watchdog_rescues(stack.log_dir)

    def count(kind: str, low: int, high: int) -> int:
        return sum(1 for e in journal if e["kind"] == kind and low <= (e["status"] or 0) <= high)

    _record(
        "singles through every callback/APSIS fault, no kill",
        "\n".join(
            [
                f"scale: {SCALE}x the documented limits ({SCALE} export requests/s, "
                f"{60 * SCALE} downloads/min, {10 * SCALE} token requests/min); "
                f"2 workers x concurrency 2",
                f"jobs: {len(keys)} singles ({_states(final)})",
                "keys per fault kind: "
                + ", ".join(f"{k}: {n}" for k, n in Counter(k.name for k in kinds).items()),
                f"export 429s: {sum(_observed(journal, 'export', 429).values())} "
                f"(injected {sum(_injected(keys, 'export', 429).values())}, "
                f"from our pacing {sum(pacing['export'].values())})",
                f"download 429s: {sum(_observed(journal, 'download', 429).values())} "
                f"(injected {sum(_injected(keys, 'download', 429).values())}, "
                f"from our pacing {sum(pacing['download'].values())})",
                f"token 429s: {sum(pacing['token'].values())}",
                f"export 5xx: {count('export', 500, 599)}, download 5xx: "
                f"{count('download', 500, 599)}",
                f"tokens expired: {expired}; 401/403 answered after: {len(auth_refused)}; "
                f"token requests: {count('token', 0, 999)}",
                f"export requests: {count('export', 0, 999)}, downloads (200): "
                f"{sum(downloads.values())}",
                f"retries (sum of job.retries): {sum(job.retries for job in final)}; "
                f"re-requests (sum of attempts - 1): {sum(job.attempt - 1 for job in final)}",
                _rescue_line(stack.log_dir),
                f"wall time: {wall:.1f} s",
            ]
        ),
    )
    assert not wrong, wrong
    assert not second, second
    assert not badly_stored, badly_stored
    assert {kind: dict(found) for kind, found in pacing.items() if found} == {}
    assert set(once.cleared) == {key for key, k in keys.items() if k.once}
    assert expired > 0 and auth_refused, "the token expiry never reached a request"
    assert rescues == [], [r.get("reason") for r in rescues]


@pytest.mark.timeout(_timeout(180, 300))
def test_each_lost_ready_callback_takes_exactly_one_rescue(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    started = time.monotonic()
    stack = stack_at_limits(
        make_stack,
        scale=SCALE,
        sandbox_process=False,
        env={
            "APSIS_CALLBACK_TIMEOUT": str(CALLBACK_TIMEOUT_LOST),
            "WATCHDOG_STUCK_AFTER": str(STUCK_AFTER),
        },
    )
    drop = next(k for k in KINDS if k.name == "drop_ready_once")
    none = next(k for k in KINDS if k.name == "none")
    keys = {f"lost-{n}@example.com": drop for n in range(4)}
    keys |= {f"kept-{n}@example.com": none for n in range(2)}
    stack.sandbox_put("/_sandbox/faults", fault_config(keys))
    once = OnceFaults(
        stack.sandbox.state, {key: k.once for key, k in keys.items() if k.once}
    ).start()
    try:
        job_of = _submit(stack, list(keys), "lost")
        final = wait_final(JobStore(redis_db), list(job_of.values()), timeout=_timeout(60, 60))
    finally:
        once.stop()
    wall = time.monotonic() - started
    jobs = {job.job_id: job for job in final}
    attempts = {key: jobs[job_of[key]].attempt for key in keys}
    counts = rescue_counts(stack.log_dir)
    pacing = _pacing_429s(keys, stack.sandbox.state.journal.entries())
    lost = [key for key, kind in keys.items() if kind is drop]
    _record(
        "dropped ready callbacks",
        "\n".join(
            [
                f"scale: {SCALE}x; APSIS_CALLBACK_TIMEOUT={CALLBACK_TIMEOUT_LOST} s, "
                "WATCHDOG_INTERVAL=2 s",
                f"jobs: {len(keys)} singles ({_states(final)}); ready dropped once: {len(lost)}",
                "attempts per job: "
                + ", ".join(f"{key.split('@')[0]}: {n}" for key, n in attempts.items()),
                _rescue_line(stack.log_dir),
                f"429s from our pacing: {sum(sum(c.values()) for c in pacing.values())}",
                f"wall time: {wall:.1f} s",
            ]
        ),
    )
    assert {job.state for job in final} == {State.DONE}
    assert +counts == Counter({"rerequested": len(lost)})  # one rescue per lost callback
    assert attempts == {key: 2 if key in lost else 1 for key in keys}
    assert {kind: dict(found) for kind, found in pacing.items() if found} == {}


def _lease_owner(client: redis.Redis, job_id: str) -> bytes | None:
    owner: Any = client.get(f"apsis:lease:{job_id}")
    return bytes(owner) if owner is not None else None


@pytest.mark.timeout(_timeout(240, 300))
def test_a_fetch_whose_worker_was_killed_resumes_within_a_minute_at_the_limit(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    started = time.monotonic()
    stack = stack_at_limits(
        make_stack,
        scale=SCALE,
        env={
            "WATCHDOG_INTERVAL": str(DEFAULT_WATCHDOG_INTERVAL),
            "WATCHDOG_STUCK_AFTER": str(STUCK_AFTER),
        },
    )
    keys = [f"big-{n}@example.com" for n in range(BIG_KEYS)]
    stack.sandbox_put(
        "/_sandbox/faults", {"keys": {k: {"file_size": BIG_FILE_BYTES} for k in keys}}
    )
    job_of = _submit(stack, keys, "big")
    key_of = {job_id: key for key, job_id in job_of.items()}
    jobs = JobStore(redis_db)

    # Each kill: a worker whose pool is fetching a job no kill hit yet; its whole process
    # group, then a replacement. What the kill interrupted: the jobs that worker was fetching.
    kills: list[dict[str, Any]] = []
    hit: set[str] = set()
    for _ in range(KILLS):
        deadline = time.monotonic() + _timeout(30, 300)
        while True:
            assert time.monotonic() < deadline, "no fetch to interrupt"
            held = {j: fetching_worker(redis_db, j) for j in leased_jobs(redis_db) & set(key_of)}
            live = {p.pid: p for p in stack.worker_processes if p.poll() is None}
            targets = {j: pid for j, pid in held.items() if j not in hit and pid in live}
            if targets:
                break
            time.sleep(0.01)
        pid = next(iter(targets.values()))
        victims = {j for j, p in held.items() if p == pid}
        owners = {j: _lease_owner(redis_db, j) for j in victims}
        stack.kill_worker(live[pid])
        killed_at = time.time()
        states = {j: jobs.get(j).state for j in victims}
        stack.add_worker()
        hit |= victims
        kills.append({"pid": pid, "at": killed_at, "owners": owners, "states": states})

    # Resumed: the job's lease is held again, by another owner than the killed fetch
    # (polled every 0.1 s), or the job is done (a copy began, and ended, between two polls).
    resumed: dict[str, float] = {}
    resumed_fetch_started: dict[str, float] = {}
    deadline = time.monotonic() + _timeout(120, 120)
    pending = {j: kill for kill in kills for j in kill["owners"]}
    while pending and time.monotonic() < deadline:
        for job_id, kill in list(pending.items()):
            owner = _lease_owner(redis_db, job_id)
            job = jobs.get(job_id)
            if (owner is not None and owner != kill["owners"][job_id]) or job.state == State.DONE:
                resumed[job_id] = time.time() - kill["at"]
                resumed_fetch_started[job_id] = (
                    float(job.extra.get("fetch_started_at") or 0) - kill["at"]
                )
                del pending[job_id]
        time.sleep(0.1)
    final = wait_final(jobs, list(job_of.values()), timeout=_timeout(60, 300))
    done_after = {j: jobs.get(j).updated_at - kill["at"] for kill in kills for j in kill["owners"]}
    wall = time.monotonic() - started

    journal = stack.journal()
    # A download a kill cut short: the sandbox journals it, short, when the connection drops.
    cut = Counter(
        str(e["export_key"])
        for e in journal
        if e["kind"] == "download" and e["status"] == 200 and e.get("bytes", 0) < BIG_FILE_BYTES
    )
    phase = {j: "mid-download" if cut[key_of[j]] else "after its download" for j in done_after}
    storage = Storage(stack.env["STORAGE_URL"])
    served = requests.get(f"{stack.apsis_url}/_sandbox/exports", timeout=60).json()
    sha_of: dict[str, set[str]] = {}
    for definition in served:
        sha_of.setdefault(definition["export_key"], set()).add(definition["sha256"])
    badly_stored = [
        f"{key}: {problem}"
        for key, job_id in job_of.items()
        for problem in stored_problems(storage, job_id, sha_of.get(key, set()))
    ]
    ended_twice = [
        job.job_id
        for job in final
        if len([h for h in jobs.history(job.job_id) if h["state"] in ("done", "failed")]) != 1
    ]
    orphaned = log_events(stack.log_dir, "fetch_orphaned")
    lines = [
        f"scale: {SCALE}x the documented limits; {BIG_KEYS} singles of {BIG_FILE_BYTES} bytes; "
        f"2 workers x concurrency 2; WATCHDOG_INTERVAL={DEFAULT_WATCHDOG_INTERVAL} s "
        f"(the default), lease {LEASE_SECONDS} s",
        f"jobs: {len(final)} ({_states(final)})",
        "resumed = the job's lease held again by a new fetch (polled every 0.1 s); "
        "fetch began = that fetch's fetch_started_at",
    ]
    for n, kill in enumerate(kills, 1):
        lines.append(f"SIGKILL {n}: worker group {kill['pid']}, fetching {len(kill['owners'])}")
        for job_id in kill["owners"]:
            lines.append(
                f"  {job_id} ({kill['states'][job_id].value}, {phase[job_id]}): "
                + (
                    f"resumed after {resumed[job_id]:.1f} s "
                    f"(fetch began {resumed_fetch_started[job_id]:.1f} s), "
                    if job_id in resumed
                    else "never resumed, "
                )
                + f"done after {done_after[job_id]:.1f} s"
            )
    lines += [
        f"downloads cut by a kill (sandbox journal): {sum(cut.values())}",
        f"fetches resumed by the watchdog (fetch_orphaned): {len(orphaned)}",
        _rescue_line(stack.log_dir),
        f"wall time: {wall:.1f} s",
    ]
    _record("SIGKILL mid-fetch at the documented rate", "\n".join(lines))

    assert len(kills) == KILLS
    assert {job.state for job in final} == {State.DONE}
    assert not badly_stored, badly_stored
    assert not ended_twice, ended_twice
    assert all(s == State.READY for kill in kills for s in kill["states"].values())  # mid-fetch
    assert not pending, f"never resumed: {sorted(pending)}"
    assert max(resumed.values()) <= RESUME_BOUND, resumed
