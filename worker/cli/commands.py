"""The ``apsis-export`` command: enqueue and inspect exports, run each role, run the demo."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from worker.config import Settings, load_settings
from worker.deliverable.storage import Storage
from worker.errors import (
    BatchFileError,
    ConfigError,
    ExportError,
    InputError,
    JobNotFound,
    StorageError,
)
from worker.flow import batches, delivery, feeder, pipeline
from worker.flow.batch_file import read_batch_file
from worker.flow.runtime import Runtime, build_runtime, redis_client
from worker.model import batch_store, ids
from worker.model.control_chars import for_terminal
from worker.model.jobs import FINAL, ExportOptions, Job, State, new_job_id
from worker.ops import redis_access
from worker.queue.inflight import celery_queue
from worker.telemetry.logs import configure_logging

#: Seconds between two looks at a job while waiting for it.
WAIT_POLL = 0.5


def _job_json(rt: Runtime, job: Job) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "state": job.state.value,
        "reference": job.reference,
        "batch_id": job.batch_id,
        "attempt": job.attempt,
        "retries": job.retries,
        "manifest": job.manifest,
        "profiles": job.profiles,
        "bytes": job.source_bytes,
        "error": job.error,
        "package": job.extra.get(delivery.PACKAGE_FIELD) or None,
        "line": feeder.place_of(rt, job),
        "history": rt.jobs.history(job.job_id),
    }


def _add_content_options(p: argparse.ArgumentParser) -> None:
    """What an export includes: the same flags for one export and for a batch."""
    p.add_argument("--history", action="store_true", help="include attribute history")
    p.add_argument("--definitions", action="store_true", help="include type definitions")
    p.add_argument("--no-merged", action="store_true", help="leave out merged profiles")


def _content_options(args: argparse.Namespace) -> dict[str, bool]:
    """The flags of ``_add_content_options`` as the export tasks' keyword arguments."""
    return {
        "include_attribute_history": args.history,
        "include_type_definitions": args.definitions,
        "include_merged_profiles": not args.no_merged,
    }


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    export_key = ids.validate_export_key(args.export_key)
    job_id = ids.validate_new_job_id(args.job_id) if args.job_id else new_job_id()
    # The job's purpose digest is keyed by the secret the workers use.
    settings.require("CALLBACK_SECRET")
    if args.link and not args.wait:
        raise InputError(
            "--link prints the link once the job is done: add --wait, "
            "or run 'apsis-export link JOB_ID' later"
        )
    rt = build_runtime(settings)
    rt.redis.ping()
    link_seconds = delivery.check_link_request(rt, args.link) if args.link else None
    # The record first, here: a job id in use for another export is refused now (exit 2),
    # before anything is queued; the same request twice is still one job.
    pipeline.submit(
        rt,
        export_key,
        options=ExportOptions(**_content_options(args)),
        job_id=job_id,
        reference=args.reference,
        urgent=args.urgent,
    )
    if link_seconds:
        delivery.ask_for_link(rt, job_id, link_seconds)
    # In the account's dispatch line: a feeder sends it at a reserved slot.
    pipeline.place_in_line(rt, job_id)
    if not args.wait:
        if args.json:
            print(json.dumps({"job_id": job_id, "state": "submitted", "manifest": None}))
        else:
            print(job_id)
        return 0
    job = _wait(rt, job_id, quiet=args.json, timeout=args.timeout)
    package = job.extra.get(delivery.PACKAGE_FIELD)
    link = job.extra.get(delivery.LINK_FIELD) if args.link else None
    if args.json:
        found = {"job_id": job_id, "state": job.state.value, "manifest": job.manifest}
        found.update({"package": package} if package else {})
        found.update({"package_link": link} if link else {})
        print(json.dumps(found))
    else:
        print(f"{job_id} {job.state.value} {for_terminal(job.manifest or job.error or '')}")
        if link:
            print(link)
    return 0 if job.state == State.DONE else 1


def _wait(rt: Runtime, job_id: str, *, quiet: bool, timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        job = rt.jobs.find(job_id)
        state = job.state.value if job else "submitted"
        if state != last and not quiet:
            sys.stderr.write(f"  {time.strftime('%H:%M:%S')} {job_id} {state}\n")
            last = state
        if job is not None and job.state in FINAL:
            return job
        if time.monotonic() > deadline:
            raise ExportError(f"job {job_id} still {state} after {timeout:.0f} s")
        time.sleep(WAIT_POLL)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    rt = build_runtime(settings)
    job_id = ids.validate_job_id(args.job_id)
    if rt.batches.exists(job_id):
        return _batch_status(rt, job_id, as_json=args.json)
    job = rt.jobs.get(job_id)
    data = _job_json(rt, job)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"job       {job.job_id}")
    print(f"state     {job.state.value}")
    if job.reference:
        print(f"reference {for_terminal(job.reference)}")
    print(f"attempt   {job.attempt} (retries {job.retries})")
    if data["line"]:
        place = data["line"]
        eta = place["eta_seconds"]
        step = place["line"]  # "request" or "download"
        when = f"{step} in about {eta:.0f} s" if eta is not None else "account not configured"
        print(f"in line   {step} line, {place['lane']} lane, {place['ahead']} ahead, {when}")
    if job.manifest:
        print(f"manifest  {for_terminal(job.manifest)}")
        print(f"profiles  {job.profiles}  bytes {job.source_bytes}")
    if data["package"]:
        print(f"package   {for_terminal(data['package'])}  (apsis-export link {job.job_id})")
    if job.error:
        print(f"error     {for_terminal(job.error)}")
    print("history")
    for entry in data["history"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["at"]))
        print(f"  {when}  {for_terminal(entry['state']):<9}  {for_terminal(entry['note'])}")
    return 0


def _batch_json(batch: batch_store.Batch) -> dict[str, Any]:
    return {
        "batch_id": batch.batch_id,
        "state": batch.state,
        "reference": batch.reference,
        "account": batch.account,
        "total": batch.total,
        "done": batch.done,
        "failed": batch.failed,
        "in_flight": batch.in_flight,
        "waiting": batch.waiting,
        "manifest": batch.manifest,
    }


def _progress_line(batch: batch_store.Batch, now: float) -> str:
    """done/failed/in flight/waiting, a bar, the rate and the ETA."""
    width = 30
    filled = int(width * batch.ended / batch.total) if batch.total else width
    elapsed = max(now - batch.created_at, 1e-6)
    rate = batch.ended / elapsed
    remaining = batch.total - batch.ended
    eta = f"{remaining / rate:,.0f} s" if rate > 0 and remaining else "-"
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {batch.ended}/{batch.total}  "
        f"done {batch.done}  failed {batch.failed}  in flight {batch.in_flight}  "
        f"waiting {batch.waiting}  {rate:.2f}/s  ETA {eta}"
    )


def _batch_status(rt: Runtime, batch_id: str, *, as_json: bool) -> int:
    batch = rt.batches.get(batch_id)
    if as_json:
        print(json.dumps(_batch_json(batch), indent=2))
        return 0
    print(f"batch     {batch.batch_id}")
    print(f"state     {batch.state}")
    if batch.reference:
        print(f"reference {for_terminal(batch.reference)}")
    print(f"progress  {_progress_line(batch, batch.finished_at or time.time())}")
    if batch.manifest:
        print(f"manifest  {for_terminal(batch.manifest)}")
    return 0


def cmd_batch(args: argparse.Namespace, settings: Settings) -> int:
    parsed = read_batch_file(Path(args.file))
    if parsed.bad_lines and not args.skip_invalid:
        raise BatchFileError(
            f"{args.file}: {len(parsed.bad_lines)} invalid line(s), nothing submitted "
            f"(--skip-invalid to leave them out): {parsed.describe_bad_lines()}"
        )
    if parsed.bad_lines:
        sys.stderr.write(f"skipped {len(parsed.bad_lines)}: {parsed.describe_bad_lines()}\n")
    if parsed.duplicates:
        sys.stderr.write(f"collapsed {parsed.duplicates} duplicate export key(s)\n")
    if not parsed.items:
        raise BatchFileError(f"{args.file}: no export keys")
    batch_id = args.batch_id or new_job_id()
    ids.validate_batch_id(batch_id)
    settings.require("CALLBACK_SECRET")  # keys the batch's purpose digest, as in the workers
    rt = build_runtime(settings)
    rt.redis.ping()
    settings.account(args.account)
    # Recorded here, not by a task: a batch id in use for another batch is refused now
    # (exit 2). The workers' feeders pick a running batch up from Redis.
    batches.create(
        rt,
        batch_id,
        parsed.items,
        options=ExportOptions(**_content_options(args)),
        reference=args.reference,
        account=args.account,
        max_in_flight=args.max_in_flight,
    )
    accepted = {
        "batch_id": batch_id,
        "state": rt.batches.get(batch_id).state,
        "accepted": len(parsed.items),
        "skipped": len(parsed.bad_lines),
        "duplicates": parsed.duplicates,
    }
    if not args.wait:
        print(json.dumps(accepted) if args.json else batch_id)
        return 0
    sys.stderr.write(f"batch {batch_id}: {len(parsed.items)} export keys\n")
    deadline = time.monotonic() + args.timeout
    tty = sys.stderr.isatty()
    last = 0.0
    while True:
        batch = rt.batches.get(batch_id) if rt.batches.exists(batch_id) else None
        now = time.time()
        if batch is not None and not args.json and (tty or now - last >= 5 or batch.is_final):
            line = _progress_line(batch, now)
            sys.stderr.write(("\r" + line) if tty else (line + "\n"))
            sys.stderr.flush()
            last = now
        if batch is not None and batch.is_final:
            if tty and not args.json:
                sys.stderr.write("\n")
            if args.json:
                print(json.dumps({**accepted, **_batch_json(batch)}))
            else:
                print(
                    f"{batch_id} {batch.state} done {batch.done} failed {batch.failed} "
                    f"{for_terminal(batch.manifest)}"
                )
            return 0 if batch.failed == 0 and batch.state == "done" else 1
        if time.monotonic() > deadline:
            raise ExportError(f"batch {batch_id} not finished after {args.timeout:.0f} s")
        time.sleep(WAIT_POLL)


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from worker.queue.app import send_task

    rt = build_runtime(settings)
    batch_id = ids.validate_job_id(args.batch_id)
    if not batches.cancel(rt, batch_id):
        raise InputError(f"batch {batch_id} is {rt.batches.get(batch_id).state}; not running")
    batch = rt.batches.get(batch_id)
    if batch.complete:
        send_task(batch_store.FINALIZE_TASK, [batch_id])
    print(
        f"{batch_id} cancelled: {batch.in_flight} in flight will finish, "
        f"{batch.total - batch.submitted} not sent"
    )
    return 0


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    from worker.queue.app import send_task

    rt = build_runtime(settings)
    job_id = ids.validate_job_id(args.job_id)
    job = rt.jobs.get(job_id)
    if not pipeline.restart(rt, job, send_task):
        raise InputError(f"job {job_id} is {job.state.value}; only failed jobs can be retried")
    print(f"{job_id} queued again (attempt {job.attempt + 1})")
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.verify import verify

    rt = build_runtime(settings)
    target = ids.validate_job_id(args.job_id)
    if not rt.batches.exists(target) and not rt.jobs.exists(target):
        from worker.flow.retention import deletion_object

        if not rt.storage.exists(deletion_object(target)):
            raise JobNotFound(f"no job or batch {target}")
    result = verify(rt, target)
    for problem in result.problems:
        print(for_terminal(problem))
    verdict = "OK" if result.ok else f"{len(result.problems)} problem(s)"
    print(f"{target}: {verdict}: {result.jobs} job(s), {result.objects} object(s) checked")
    return 0 if result.ok else 1


def cmd_link(args: argparse.Namespace, settings: Settings) -> int:
    rt = build_runtime(settings)
    job_id = ids.validate_job_id(args.job_id)
    longest = settings.LINK_MAX_EXPIRY
    seconds = delivery.parse_expiry(args.expires or longest, longest=longest)
    if rt.batches.exists(job_id):
        raise InputError(
            f"{job_id} is a batch: link each of its jobs (its summary.csv lists their packages)"
        )
    link = delivery.package_link(rt, job_id, expires_in=seconds)
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(link.expires_at))
    if args.json:
        print(json.dumps({"job_id": job_id, "url": link.url, "expires_at": link.expires_at}))
    else:
        print(link.url)
        sys.stderr.write(
            f"valid until {until}; whoever has this link can download the package: "
            "send it to the data subject only, and the way you would send the data itself\n"
        )
    return 0


def _check_storage_in_a_child(settings: Settings) -> None:
    """storage.check() in a forked child, so this process never starts obstore's runtime.

    obstore runs a Rust async runtime whose threads do not survive fork(): touching storage
    here, before Celery forks its pool, would leave every pool process hanging on its first
    upload.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        code = 0
        try:
            Storage.from_settings(settings).check()
        except ExportError as exc:
            os.write(write_end, str(exc).encode()[:2000])
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise StorageError(message or "storage check failed")


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    settings.require(
        "APSIS_CLIENT_ID", "APSIS_CLIENT_SECRET", "CALLBACK_BASE_URL", "CALLBACK_SECRET"
    )
    # Fail in one line before Celery starts: otherwise an unreachable Redis is a reconnect
    # loop in the logs and unreachable storage surfaces only at the first finished export.
    rt = build_runtime(settings)
    _check_redis(rt.redis)
    _check_storage_in_a_child(settings)
    from worker.queue.app import app

    # Our JSON lines from the first line on (Celery's start-up warnings included); no banner.
    configure_logging(settings.LOG_LEVEL)
    argv = ["--quiet", "worker", f"--loglevel={settings.LOG_LEVEL}"]
    argv += [f"--concurrency={args.concurrency}", "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    app.worker_main(argv)
    return 0


def _check_redis(client: redis.Redis) -> None:
    """Before a role starts: Redis answers, the ACL user may do all the product does (else
    ConfigError naming each refusal), and a warning line per risky server setting."""
    client.ping()
    refused = redis_access.refused_access(client, celery_queue())
    if refused:
        raise ConfigError(
            "the Redis user lacks what the product needs: "
            + ", ".join(refused)
            + "; grant it the README's ACL SETUSER line"
        )
    for warning in redis_access.settings_warnings(client):
        sys.stderr.write(f"apsis-export: warning: {warning}\n")


def cmd_webhook(args: argparse.Namespace, settings: Settings) -> int:
    # The same one-line start-up errors as a worker's (TLS, credentials, ACL).
    _check_redis(redis_client(settings.require("CALLBACK_SECRET").redis_connection()))
    serve = importlib.import_module("webhook.serve")
    serve.serve(settings, host=args.host, port=args.port, workers=args.workers)
    return 0


def cmd_sandbox(args: argparse.Namespace, settings: Settings) -> int:
    server = importlib.import_module("sandbox.server")
    server.serve(args.host, args.port, None)
    return 0


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    from worker.ops.health import check_node

    health = check_node(build_runtime(settings), node=args.node)
    print(for_terminal(health.line))
    return 0 if health.ok else 1


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    demo = importlib.import_module("worker.cli.demo")
    result: int = demo.run(keep=args.keep)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apsis-export", description="GDPR profile exports from APSIS One."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export one data subject's profile")
    p.add_argument("export_key", help="the profile's key in com.apsis1.keyspaces.export")
    _add_content_options(p)
    p.add_argument("--reference", help="your own id for this request (e.g. a ticket number)")
    p.add_argument("--job-id", help="idempotency key: the same request twice is one job (no dots)")
    p.add_argument("--wait", action="store_true", help="wait until the job ends")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--urgent", action="store_true", help="ahead of every other waiting request")
    p.add_argument(
        "--link", metavar="EXPIRY", help="with --wait: print a link to the package (e.g. 7d)"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("batch", help="export every key in a file (one a line, or CSV)")
    p.add_argument("file", help="one export key a line, or a CSV with an export_key column")
    _add_content_options(p)
    p.add_argument("--reference", help="your own id for the batch")
    p.add_argument("--batch-id", help="idempotency key: the same file twice is one batch")
    p.add_argument("--account", help="APSIS account (default: APSIS_ACCOUNT)")
    p.add_argument("--max-in-flight", type=int, default=batches.DEFAULT_MAX_IN_FLIGHT)
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid lines")
    p.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    p.add_argument("--timeout", type=float, default=7 * 86400.0, help="seconds --wait waits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("cancel", help="stop a batch's new requests")
    p.add_argument("batch_id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("status", help="show a job's or a batch's state and result")
    p.add_argument("job_id", help="a job id or a batch id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("retry", help="start a failed job again (a new attempt)")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("verify", help="re-read a job's or batch's objects and check digests")
    p.add_argument("job_id", help="a job id or a batch id")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("link", help="print an expiring link to a done job's package")
    p.add_argument("job_id")
    p.add_argument(
        "--expires", help="how long it works: 30m, 12h, 7d (default: LINK_MAX_EXPIRY, 7d)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_link)

    p = sub.add_parser("worker", help="run a Celery worker (tasks and the callback inbox)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--hostname", help="Celery node name (default: celery@<host>)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("webhook", help="serve the callback webhook with gunicorn")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_webhook)

    p = sub.add_parser("sandbox", help="serve the APSIS One simulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("health", help="probe this worker node: Redis, storage, inbox consumer")
    p.add_argument("--node", help="host name whose inbox consumer must be alive (default: this)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("demo", help="run a real export end to end on embedded defaults")
    p.add_argument("--keep", action="store_true", help="leave the demo's logs in place")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings: Settings | None = None
    try:
        settings = load_settings()
        code: int = args.func(args, settings)
        return code
    except ExportError as exc:
        sys.stderr.write(f"apsis-export: {for_terminal(exc)}\n")
        return exc.exit_code if not isinstance(exc, JobNotFound) else JobNotFound.exit_code
    except redis.RedisError as exc:
        where = settings.redis_connection().where if settings else "REDIS_URL"
        failure = redis_access.explain(exc, where)
        sys.stderr.write(f"apsis-export: {for_terminal(failure.line)}\n")
        return 2 if failure.config else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
