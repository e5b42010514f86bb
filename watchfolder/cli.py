"""The command line: a thin shell over the package.

Every command reads the config given by ``--config`` (or ``$WATCHFOLDER_CONFIG``),
calls one package function and turns package errors into a message and exit
status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from . import config as configmod
from .errors import AcquisitionError, JobNotFound, StoreUnavailable, WatchfolderError
from .job import FINISHED_STATES, Job, JobState, Target, printable
from .units import INT64_MAX, format_size, whole_number

EPILOG = "Config: --config PATH or $WATCHFOLDER_CONFIG. Docs: README.md."
# What error messages may name: the job database of the loaded config.
_STATE: dict[str, str] = {}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args) or 0
        sys.stdout.flush()
        return code
    except WatchfolderError as exc:
        print(f"watchfolder: error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # disk full, corrupt or unreadable database: one line, not a traceback
        from .store.sqlite import explain_database_error

        print(f"watchfolder: error: {explain_database_error(exc, _STATE.get('db', 'store.path'))}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`jobs list | head`): nothing more to say, and no traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    except OSError as exc:  # e.g. the data directory full or not writable at start
        from .errors import describe_os_error

        where = exc.filename or _STATE.get("data_dir", "the data directory")
        print(f"watchfolder: error: {describe_os_error(exc, where, 'use')[1]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _sub_parser(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """A parser class whose every (sub)command accepts the common options too."""

    class SubParser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("parents", [common])
            super().__init__(*args, **kwargs)

    return SubParser


def _whole_arg(low: int, high: int = INT64_MAX, what: str = "a whole number"):
    """An argparse ``type`` reading an ASCII whole number in ``[low, high]`` (a usage error otherwise)."""

    def parse(text: str) -> int:
        number = whole_number(text, low, high)
        if number is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} from {low} to {high}")
        return number

    return parse


# Every number the CLI reads goes through one of these: a bad one is a usage error naming it,
# never a traceback from the store (SQLite and PostgreSQL integers are 64-bit).
ID = _whole_arg(1, what="an id")
COUNT = _whole_arg(1, 10_000, what="a count")
EVENT_ID = _whole_arg(0, what="an event id")
WORKERS = _whole_arg(1, 1024, what="a number of workers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watchfolder",
        description="Get microscope acquisitions from drop folders and HTTP clients into OMERO or an archive.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"watchfolder {__version__}")
    parser.add_argument("-c", "--config", help="config file (default: $WATCHFOLDER_CONFIG)")
    # Also accepted after the command (`watchfolder run --config x.yaml`); SUPPRESS keeps a
    # --config given before the command when none is given after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help="config file (default: $WATCHFOLDER_CONFIG)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_sub_parser(common))

    p = sub.add_parser("run", help="run everything: watchers, workers, HTTP server, mail", epilog=EPILOG)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("work", help="run workers only", epilog=EPILOG)
    p.add_argument("--burst", action="store_true", help="drain the queue, then exit")
    p.add_argument("--count", type=WORKERS, help="number of workers (default: workers.count)")
    p.add_argument("--name", help="this process's name in the status view; workers are NAME:w1… (default: host:pid)")
    p.set_defaults(func=cmd_work)

    p = sub.add_parser("watch", help="run the folder watchers only", epilog=EPILOG)
    p.add_argument("--name", help="this watcher's identity for the folder leases and the status view "
                                  "(default: host:pid)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("serve", help="run the HTTP API and dashboard only", epilog=EPILOG)
    p.add_argument("--listen", help="HOST:PORT to bind (default: server.listen)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("submit", help="queue a local acquisition (folder or file)", epilog=EPILOG)
    p.add_argument("path", help="acquisition folder (with or without watchfolder.json) or data file")
    p.add_argument("--owner", help="OMERO user name of the owner (default: from the manifest or sidecar)")
    p.add_argument("--group", help="OMERO group")
    p.add_argument("--email", help="where to mail the outcome")
    p.add_argument("--project", help="target project name (with --dataset)")
    p.add_argument("--dataset", help="target dataset name")
    p.add_argument("--dataset-id", type=ID, help="target dataset id")
    p.add_argument("--screen", help="target screen name")
    p.add_argument("--screen-id", type=ID, help="target screen id")
    p.add_argument("--name", help="image name")
    p.add_argument("--description", help="image description")
    p.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE",
                   help="key-value annotation (repeatable)")
    p.add_argument("--wait", "--follow", action="store_true", dest="wait",
                   help="follow the job with a progress bar until it ends (exit 1 unless it succeeds)")
    p.add_argument("--json", action="store_true",
                   help="print the job as JSON (with --wait: only the finished job; the progress bar goes to stderr)")
    p.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, show, retry and cancel jobs", epilog=EPILOG)
    jsub = jobs.add_subparsers(title="jobs commands", metavar="ACTION")
    p = jsub.add_parser("list", help="list jobs, newest first")
    p.add_argument("--state", action="append", choices=[str(s) for s in JobState], help="filter (repeatable)")
    p.add_argument("--owner")
    p.add_argument("--source", help="exact source, or a prefix ending with * (e.g. 'watch:*')")
    p.add_argument("--limit", type=COUNT, default=20)
    p.add_argument("--cursor", help="next page (printed after a full page)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_list)
    p = jsub.add_parser("show", help="show one job")
    p.add_argument("id", type=ID)
    p.add_argument("--follow", "-f", action="store_true",
                   help="draw live progress until the job ends (waits for a job about to appear)")
    p.add_argument("--json", action="store_true",
                   help="print the job as JSON (with --follow: only the finished job; the progress bar goes to stderr)")
    p.set_defaults(func=cmd_jobs_show)
    p = jsub.add_parser("log", help="print a job's log")
    p.add_argument("id", type=ID)
    p.add_argument("--json", action="store_true", help='print {"id": ID, "lines": [...]}')
    p.set_defaults(func=cmd_jobs_log)
    p = jsub.add_parser("retry", help="queue a failed or cancelled job again")
    p.add_argument("id", type=ID)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_retry)
    p = jsub.add_parser("cancel", help="cancel a queued, waiting or running job")
    p.add_argument("id", type=ID)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_cancel)
    jobs.set_defaults(func=lambda a: (jobs.print_help(), 2)[1])

    p = sub.add_parser("status", help="queue, workers, watchers, importer, outbox, disk", epilog=EPILOG)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check-config", help="validate the config and print it, secrets redacted", epilog=EPILOG)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("pending", help="acquisitions the watchers see and have not queued, with why",
                       epilog=EPILOG)
    p.add_argument("--watch", help="only this watch folder (its name)")
    p.add_argument("--owner", help="only this owner")
    p.add_argument("--limit", type=COUNT, default=500)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pending)

    p = sub.add_parser("explain", help="what the service thinks of a path under a watch folder, and why",
                       epilog=EPILOG)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)

    store = sub.add_parser("store", help="schema migrations; copy a SQLite store into PostgreSQL", epilog=EPILOG)
    ssub = store.add_subparsers(title="store commands", metavar="STORE_COMMAND")
    p = ssub.add_parser(
        "migrate",
        help="bring the configured store's schema up to date; with --to, copy it into PostgreSQL",
        description="Without --to: apply pending schema migrations to the configured store and print its "
        "version. With --to postgresql://USER@HOST/DB: copy the configured SQLite store (jobs, history, "
        "outbox…) into that database, keeping ids; running it again copies only what is new. Stop the "
        "services first, then set store.url to the new URL.",
        epilog=EPILOG,
    )
    p.add_argument("--to", metavar="URL", help="the PostgreSQL database to copy into (no password in it)")
    p.add_argument("--password-env", metavar="VAR",
                   help="environment variable holding the database password (else PGPASSWORD or ~/.pgpass)")
    p.add_argument("--json", action="store_true", help="print the store, its schema version and what was copied as JSON")
    p.set_defaults(func=cmd_store_migrate)
    store.set_defaults(func=lambda a: (store.print_help(), 2)[1])

    mail = sub.add_parser("mail", help="inspect and resend outbox mails", epilog=EPILOG)
    msub = mail.add_subparsers(title="mail commands", metavar="ACTION")
    p = msub.add_parser("list", help="list outbox mails, newest first")
    p.add_argument("--state", choices=["pending", "sending", "sent", "failed", "dismissed", "digested"],
                   help="digested: an admin mail that went out inside digest mail N, not on its own")
    p.add_argument("--limit", type=COUNT, default=20)
    p.add_argument("--cursor", type=ID, help="next page (printed after a full page)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mail_list)
    p = msub.add_parser("resend", help="queue a failed, dismissed, digested or sent mail again")
    p.add_argument("id", type=ID)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mail_resend)
    mail.set_defaults(func=lambda a: (mail.print_help(), 2)[1])

    events = sub.add_parser("events", help="events out: list them, see and re-enable sinks", epilog=EPILOG)
    esub = events.add_subparsers(dest="events_command", metavar="SUBCOMMAND")
    p = esub.add_parser("list", help="print events (CloudEvents JSON lines) after an id, oldest first")
    p.add_argument("--after", type=EVENT_ID, default=0, help="only events with a larger id (default 0)")
    p.add_argument("--limit", type=COUNT, default=50, help="at most this many (default 50)")
    p.add_argument("--json", action="store_true",
                   help='one JSON document instead of lines: {"events": [...], "next_after": N, "has_more": bool}')
    p.set_defaults(func=cmd_events_list)
    p = esub.add_parser("sinks", help="each webhook / MQTT sink: position, failures, disabled")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_events_sinks)
    p = esub.add_parser("enable", help="re-enable a disabled sink; it resumes where it stopped")
    p.add_argument("name", help="the sink, e.g. webhook:lims or mqtt (see `events sinks`)")
    p.add_argument("--json", action="store_true", help="print the sink enabled as JSON")
    p.set_defaults(func=cmd_events_enable)
    events.set_defaults(func=lambda a: (events.print_help(), 2)[1])

    token = sub.add_parser("token", help="create API tokens", epilog=EPILOG)
    tsub = token.add_subparsers(title="token commands", metavar="ACTION")
    p = tsub.add_parser("new", help="print a new token and the config lines to paste under server.tokens")
    p.add_argument("--name", required=True)
    p.add_argument("--role", required=True, choices=["submit", "read", "admin"])
    p.add_argument("--owner", action="append", default=[], help="limit to this owner (repeatable)")
    p.add_argument("--root", action="append", default=[], help="limit paths to this folder (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token_new)
    token.set_defaults(func=lambda a: (token.print_help(), 2)[1])
    return parser


# -- helpers -------------------------------------------------------------------


def load_config(args, overrides: dict[str, str] | None = None) -> configmod.Config:
    """Load the config; ``overrides`` are extra WATCHFOLDER__… settings from command-line flags."""
    environ = {**os.environ, **(overrides or {})}
    config = configmod.load(args.config, environ=environ)
    _STATE["db"] = str(config.store.path)
    _STATE["data_dir"] = str(config.data_dir)
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])
    from .store.outage import OutageNoise

    OutageNoise.install()  # a store outage is said once, by the store (store/outage.py)
    return config


class _OneLineFormatter(logging.Formatter):
    """Each service log record on one line: control characters in the message escaped (:func:`printable`).

    Paths and names reach the service log (the journal) from many places; a newline in a
    folder name must not start a line that reads like another record. A traceback
    appended to a record keeps its own lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return printable(super().formatMessage(record))


def open_store(config):
    from .service import make_notifier, open_store

    return open_store(config, make_notifier(config))


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM/SIGINT. Installed before anything starts, so no signal is missed."""
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _run_service(args, parts, *, banner: bool = False, burst: bool = False,
                 overrides: dict[str, str] | None = None) -> int:
    from .service import Service

    config = load_config(args, overrides)
    stop = _stop_on_signals()
    service = Service(config, parts, burst=burst, name=getattr(args, "name", None), stop=stop)
    try:
        service.start()
    except StoreUnavailable:
        if stop.is_set():  # stopped (Ctrl-C, SIGTERM) while waiting for the store: nothing ran yet
            return 0
        raise
    if banner:
        print(_banner(config, service), flush=True)
    if burst:
        service.wait_workers()
        _say_held_jobs(service.store)
    else:
        while not stop.wait(0.5):
            pass
        print(f"stopping: finishing running jobs (grace {config.workers.shutdown_grace:g} s)…", flush=True)
    service.stop()
    if banner:
        print(f"watchfolder {__version__} stopped", flush=True)
    return 0



def _say_held_jobs(store) -> None:
    """After ``work --burst``: name the jobs still running on a worker that is no longer there (a
    ``kill -9``). They are not taken over here -- a worker on another host, or in another PID
    namespace under the same host name, may still run them -- but come back when their lease
    ends; say when, so an empty burst is not mistaken for "nothing left"."""
    try:
        running, _ = store.list_jobs(states=[JobState.RUNNING.value], limit=1000, files=False)
        live = {c.get("name") for c in store.components("worker")}
    except Exception:  # the store is busy or gone: the burst's own outcome is already said
        return
    for job in running:
        if job.worker in live:
            continue
        until = job.lease_expires_at
        print(f"job {job.id} is still running on worker {job.worker}, which is gone (no heartbeat); it goes "
              f"back to the queue when its lease ends{f' at {_when(until)}' if until else ''}: run "
              "'work --burst' again after that", file=sys.stderr, flush=True)

def executable() -> str:
    """How to run this very program again: the real path of the script, or ``python -m watchfolder``."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if argv0 and not argv0.endswith(("__main__.py", "-c")) and os.path.exists(argv0):
        return shlex.quote(os.path.realpath(argv0))
    return f"{shlex.quote(sys.executable)} -m watchfolder"


def _banner(config, service) -> str:
    lines = [f"watchfolder {__version__} running ({config.workers.count} worker(s), importer {config.importer.kind})"]
    for w in config.watch:
        lines.append(f"  drop acquisitions into: {w.path}   ({w.detection}, {w.mode})")
    if not config.watch:
        lines.append("  no watch folders configured; queue acquisitions with `watchfolder submit PATH`")
    if config.importer.kind == "archive":
        lines.append(f"  archive:               {config.importer.archive.root}")
    if config.notify.transport == "folder":
        lines.append(f"  mail (outbox folder):  {config.notify.outbox_dir}")
    elif config.notify.transport == "smtp":
        lines.append(f"  mail via SMTP:         {config.notify.smtp.host}:{config.notify.smtp.port}")
    lines.append(f"  job logs:              {config.logs_dir}")
    if service.server is not None and service.run_token:
        lines.append(f"  dashboard:             {service.server.url}/#token={service.run_token}")
        lines.append("                         (an admin token for this run only; configure server.tokens for more)")
    elif service.server is not None:
        lines.append(f"  dashboard and API:     {service.server.url}")
    cfg = f" --config {shlex.quote(str(Path(config.path).resolve()))}" if config.path else ""
    lines.append(f"  follow jobs with:      {executable()}{cfg} jobs list")
    lines.append(f"  why not in yet:        {executable()}{cfg} pending")
    lines.append("Stop with Ctrl-C (running jobs finish first).")
    return "\n".join(lines)


# -- commands --------------------------------------------------------------------


def cmd_run(args) -> int:
    return _run_service(args, None, banner=True)


def cmd_work(args) -> int:
    from .service import Parts

    overrides = {}
    if args.count is not None:
        if args.count < 1:
            raise WatchfolderError(f"--count must be a positive integer, got {args.count}")
        overrides["WATCHFOLDER__WORKERS__COUNT"] = str(args.count)
    return _run_service(args, Parts(workers=True, watch=False, server=False, mail=True), burst=args.burst,
                        overrides=overrides)


def cmd_watch(args) -> int:
    from .service import Parts

    return _run_service(args, Parts(workers=False, watch=True, server=False, mail=True), banner=True)


def cmd_serve(args) -> int:
    from .service import Parts

    overrides = {"WATCHFOLDER__SERVER__ENABLED": "true"}
    if args.listen:
        overrides["WATCHFOLDER__SERVER__LISTEN"] = args.listen
    return _run_service(args, Parts(workers=False, watch=False, server=True, mail=False), banner=True,
                        overrides=overrides)


def _target_from_args(args) -> Target | None:
    given = {
        "project": args.project,
        "dataset": args.dataset,
        "dataset_id": args.dataset_id,
        "screen": args.screen,
        "screen_id": args.screen_id,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    try:
        return Target.from_dict(given, where="--" + "/--".join(k.replace("_", "-") for k in given))
    except AcquisitionError as exc:
        raise AcquisitionError(
            f"{exc} (use --dataset, --project with --dataset, --dataset-id, --screen or --screen-id)"
        ) from None


def cmd_submit(args) -> int:
    from .watch.acquisition import from_path

    config = load_config(args)
    annotations = {}
    for item in args.annotation:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AcquisitionError(f"--annotation {item!r}: write KEY=VALUE, e.g. --annotation objective=63x")
        annotations[key] = value
    user = _user()
    spec = from_path(
        Path(args.path),
        source=f"cli:{user}",
        owner=args.owner,
        group=args.group,
        email=args.email,
        target=_target_from_args(args),
        name=args.name,
        description=args.description,
        annotations=annotations or None,
    )
    store = open_store(config)
    job, created = store.enqueue(spec, note=f"submitted by {user} from the command line")
    if created:
        for warning in spec.extra.get("warnings", ()):
            store.log(job.id, f"warning: {warning}")
            print(printable(f"warning: {warning}"), file=sys.stderr)
    if args.wait:
        # With --json, stdout is one document, the job as it ended (as `jobs show --follow --json`):
        # what was queued and the progress bar go to stderr.
        _say_submitted(job, created, spec, sys.stderr if args.json else sys.stdout)
        job = _follow(store, job.id, sys.stderr if args.json else None)
        if args.json:
            print(json.dumps(job.to_dict(), indent=2))
        return 0 if job.state == JobState.SUCCEEDED else 1
    if args.json:
        print(json.dumps(job.to_dict(), indent=2))
    else:
        _say_submitted(job, created, spec, sys.stdout)
    return 0


def _say_submitted(job: Job, created: bool, spec, out) -> None:
    word = "queued" if created else "already known"
    print(printable(f"job {job.id} {word}: {len(spec.files)} file(s) of {spec.owner} → {spec.target.label} "
                    f"[{job.state}]"), file=out, flush=True)


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


_size = format_size


def cmd_jobs_list(args) -> int:
    config = load_config(args)
    store = open_store(config)
    jobs, cursor = store.list_jobs(
        states=args.state, owner=args.owner, source=args.source, limit=args.limit, cursor=args.cursor
    )
    if args.json:
        print(json.dumps({"jobs": [j.to_dict(history=False) for j in jobs], "next_cursor": cursor}, indent=2))
        return 0
    if not jobs:
        print("no jobs")
        return 0
    print(f"{'ID':>6}  {'STATE':<10} {'OWNER':<12} {'CREATED':<19}  {'SOURCE':<22} TARGET")
    for job in jobs:
        print(printable(
            f"{job.id:>6}  {str(job.state):<10} {printable(job.owner)[:12]:<12} {_when(job.created_at):<19}  "
            f"{printable(job.source)[:22]:<22} {job.spec.target.label}"
        ))
    if cursor:
        print(_more(args, config, "jobs list", [("--state", args.state), ("--owner", args.owner),
                                                 ("--source", args.source), ("--limit", args.limit)], cursor))
    return 0


def _more(args, config, command: str, options: list[tuple[str, Any]], cursor) -> str:
    """The next-page hint: ``more: watchfolder [--config PATH] COMMAND OPTIONS --cursor C``, repeating
    the filters and the config given (a list repeats its option), each value shell-quoted, so the
    line pasted into a shell shows the next page of the same listing. The default ``--limit`` is
    left out."""
    words = ["watchfolder"]
    if getattr(args, "config", None) and config.path:
        words += ["--config", shlex.quote(str(Path(config.path).resolve()))]
    words.append(command)
    for option, value in options:
        if value is None or (option == "--limit" and value == 20):
            continue
        for one in value if isinstance(value, list) else [value]:
            words += [option, shlex.quote(str(one))]
    return "more: " + " ".join([*words, "--cursor", shlex.quote(str(cursor))])


def _describe(job: Job) -> str:
    lines = [
        f"job {job.id}  {job.state}",
        f"  owner:    {job.owner}" + (f" (group {job.spec.group})" if job.spec.group else ""),
        f"  email:    {job.spec.email or '-'}",
        f"  target:   {job.spec.target.label}",
        f"  source:   {job.source}",
        f"  folder:   {job.spec.root} ({len(job.spec.files)} file(s), {_size(job.spec.total_bytes())})",
        f"  attempts: {job.attempts}/{job.max_attempts}",
        f"  created:  {_when(job.created_at)}   started: {_when(job.started_at)}   finished: {_when(job.finished_at)}",
    ]
    if job.state == JobState.RETRY_WAIT:
        lines.append(f"  next attempt: {_when(job.next_attempt_at)}")
    if job.error:
        lines.append(f"  error ({job.error.kind}{', configuration' if job.error.config_error else ''}): "
                     f"{job.error.message}")
    if job.result:
        lines.append("  result:   " + json.dumps(job.result)[:2000])
    if job.history:
        lines.append("  history:")
        for h in job.history:
            lines.append(f"    {_when(h.at)}  {str(h.state):<10} {h.message}")
    lines.append(f"  log:      {job.log_path}")
    return "\n".join(printable(line) for line in lines)


def _bar(job: Job, width: int = 30) -> str:
    p = job.progress
    fraction = p.fraction
    filled = int(round(fraction * width))
    figures = f"{_size(p.bytes_done)} / {_size(p.bytes_total)}" if p.bytes_total else ""
    files = f"{p.files_done}/{p.files_total} files" if p.files_total else ""
    return (f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}%  {figures}  {files}  "
            f"{p.phase or str(job.state)}")


def _follow(store, job_id: int, out=None) -> Job:
    """Draw a live progress bar until the job ends; a job about to appear is waited for."""
    out = out or sys.stdout  # looked up now: sys.stdout may be redirected after import
    tty = out.isatty()
    last = ""
    told = False
    while True:
        try:
            job = store.get(job_id)
        except JobNotFound:
            if not told:
                print(f"waiting for job {job_id} to appear (Ctrl-C to stop)…", file=sys.stderr, flush=True)
                told = True
            time.sleep(0.3)  # polling the store for display, not synchronisation
            continue
        line = f"job {job.id} {str(job.state):<10} " + _bar(job)
        if line != last:
            out.write(("\r" + line.ljust(len(last))) if tty else line + "\n")
            out.flush()
            last = line
        if job.state in FINISHED_STATES:
            if tty:
                out.write("\n")
            if job.error:
                out.write(printable(f"error: {job.error.message}") + "\n")
            return job
        time.sleep(0.3)  # polling the store for display, not synchronisation


def cmd_jobs_show(args) -> int:
    config = load_config(args)
    store = open_store(config)
    job = _follow(store, args.id, sys.stderr if args.json else None) if args.follow else store.get(args.id)
    if args.json:
        print(json.dumps(job.to_dict(), indent=2))
    elif not args.follow:
        print(_describe(job))
        if job.state == JobState.RUNNING:
            print("  progress: " + _bar(job))
    return 0


def cmd_jobs_log(args) -> int:
    config = load_config(args)
    text = open_store(config).read_log(args.id)
    if args.json:
        print(json.dumps({"id": args.id, "lines": text.splitlines()}, indent=2, ensure_ascii=False))
        return 0
    sys.stdout.write(text)
    return 0


def cmd_jobs_retry(args) -> int:
    config = load_config(args)
    job = open_store(config).retry(args.id, by=f"cli:{_user()}")
    print(json.dumps(job.to_dict(), indent=2) if args.json else f"job {job.id} queued again")
    return 0


def cmd_jobs_cancel(args) -> int:
    config = load_config(args)
    job = open_store(config).cancel(args.id, by=f"cli:{_user()}")
    if args.json:
        print(json.dumps(job.to_dict(), indent=2))
        return 0
    print(f"job {job.id}: {'cancel requested (running)' if job.state == JobState.RUNNING else job.state}")
    return 0


def cmd_status(args) -> int:
    from .importers import create_importer
    from .status import collect_status

    config = load_config(args)
    store = open_store(config)
    status = collect_status(config, store, create_importer(config))
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        shown = _human(json.loads(json.dumps(status, default=str)))
        print(yaml.safe_dump(shown, sort_keys=False, allow_unicode=True))
    return 0 if status.get("healthy", True) else 1


_SIZE_KEYS = frozenset({"total", "used", "free", "bytes", "bytes_done", "bytes_total"})
_TIME_KEYS = frozenset({"since"})


def _human(value: object, key: str = "") -> object:
    """The status view for people (``--json`` keeps the raw numbers): times as local ISO
    times, ages and durations in words, sizes in IEC units, fractions as percentages."""
    if isinstance(value, dict):
        return {k: _human(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_human(v, key) for v in value]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    from .units import format_duration, format_size

    if key.endswith(("_at", "_since")) or key in _TIME_KEYS:
        return _when(value)
    if key.endswith(("_age", "_seconds", "_for")) or key in ("retry_every", "paused_for"):
        return format_duration(value)
    if key in _SIZE_KEYS:
        return format_size(value)
    if key.endswith("_fraction"):
        return f"{100 * value:.1f} %"
    return value


def cmd_store_migrate(args) -> int:
    config = load_config(args)
    store = open_store(config)  # applies pending schema migrations, with a log line per step
    described = store.describe()
    # --json: one document at the end, {"store": …, "schema": N, "up_to_date": true, "copied": null or {…}}.
    answer: dict[str, Any] = {"store": described, "schema": described.get("schema"), "up_to_date": True,
                              "copied": None}
    if not args.json:
        print(f"store {described.get('location')}: schema {described.get('schema')} (up to date)")
    if not args.to:
        store.close()
        if args.json:
            print(json.dumps(answer, indent=2, default=str))
        return 0
    if config.store.backend != "sqlite":
        raise WatchfolderError(
            f"store migrate --to copies a SQLite store, but this config's store is {config.store.display_url}"
        )
    if not args.to.startswith(("postgresql://", "postgres://")):
        raise WatchfolderError(f"--to must be a postgresql://USER@HOST/DATABASE URL, got {args.to!r}")
    from urllib.parse import urlsplit

    if urlsplit(args.to).password is not None:
        raise WatchfolderError("--to carries a password; pass it with --password-env VAR, PGPASSWORD or ~/.pgpass")
    password = None
    if args.password_env:
        if args.password_env not in os.environ:
            raise WatchfolderError(f"--password-env: environment variable {args.password_env!r} is not set")
        password = os.environ[args.password_env]
    from .store.migrate import copy_sqlite_to_postgres
    from .store.postgres import PostgresStore

    store.close()
    target = PostgresStore(args.to, password=password, logs_dir=config.logs_dir, log_outages=False)
    try:
        report = copy_sqlite_to_postgres(config.store.path, target)
    finally:
        target.close()
    if args.json:
        answer["copied"] = {"into": target.location, "tables": report}
        print(json.dumps(answer, indent=2, default=str))
        return 0
    for table, counts in report.items():
        print(f"  {table:<14} {counts['read']:>8} read, {counts['copied']:>8} copied "
              f"({counts['read'] - counts['copied']} already there)")
    print(f"copied into {target.location}. Set store.url: {target.location} (password in store.password) "
          "on every host, then start the services.")
    return 0


def cmd_check_config(args) -> int:
    config = configmod.load(args.config)
    if args.json:
        print(json.dumps(configmod.to_dict(config), indent=2, default=str))
        return 0
    store_line = _check_store_connection(config) if config.store.backend == "postgresql" else None
    for line in configmod.missing_watch_paths(config):
        print(f"watchfolder: warning: {line}", file=sys.stderr)
    print(f"# {config.path}: valid")
    if store_line:
        print(store_line)
    if config.importer.kind == "omero":
        # Which fileset grouping the OMERO child will use (Bio-Formats, or the suffix rules and why).
        from .importers import create_importer

        health = create_importer(config).health()
        print(f"# importer.omero: filesets by {health.get('filesets') or health.get('error') or 'unknown'}")
        if (health.get("bioformats") or {}).get("state") == "broken":
            # Every job would fail: not a valid setup, whatever the file's syntax.
            print(yaml.safe_dump(configmod.to_dict(config), sort_keys=False, allow_unicode=True))
            print(f"watchfolder: error: importer.omero: {health['bioformats'].get('reason')}; every OMERO job "
                  "would fail", file=sys.stderr)
            return 1
    print(yaml.safe_dump(configmod.to_dict(config), sort_keys=False, allow_unicode=True))
    return 0


def _check_store_connection(config) -> str | None:
    """Connect once to the PostgreSQL store; the line that says what is there (nothing is changed).

    A refused connection (no such database or role, wrong password) is a configuration
    error, raised as :class:`StoreRefused`; an unreachable server is only noted on
    stderr: the services wait for it.
    """
    from .errors import StoreUnavailable
    from .store.postgres import SCHEMA_VERSION, probe, redact_url

    password = config.store.password.reveal() if config.store.password is not None else None
    try:
        found = probe(config.store.url, password=password)
    except StoreUnavailable as exc:
        print(f"watchfolder: warning: {exc} (now; the services wait for it)", file=sys.stderr)
        return None
    schema = found["schema"]
    if schema is None:
        state = f"empty (the schema, {SCHEMA_VERSION}, is created at first start)"
    elif schema < SCHEMA_VERSION:
        state = f"schema {schema} (migrated to {SCHEMA_VERSION} at next start)"
    elif schema > SCHEMA_VERSION:
        state = f"schema {schema}, newer than this watchfolder ({SCHEMA_VERSION}): upgrade it on this host"
    else:
        state = f"schema {schema} (up to date)"
    return f"# store.url {redact_url(config.store.url)}: connected (PostgreSQL {found['server']}), {state}"


def _ago(seconds: float) -> str:
    from .units import format_duration

    return format_duration(seconds)


def cmd_pending(args) -> int:
    from .watch.explain import pending_view

    config = load_config(args)
    known = [w.name for w in config.watch]
    if args.watch is not None and args.watch not in known:
        print(f"watchfolder: error: unknown watch folder {args.watch!r}; known: {', '.join(known) or 'none configured'}",
              file=sys.stderr)
        return 2
    if args.owner is not None and not args.owner.strip():
        print("watchfolder: error: --owner is empty; give a user name, or leave --owner out for every owner",
              file=sys.stderr)
        return 2
    store = open_store(config)
    entries = pending_view(store.pending_list(watch=args.watch, owner=args.owner, limit=args.limit))
    if args.json:
        print(json.dumps({"pending": entries}, indent=2))
        return 0
    if not entries:
        filters = [f"watch folder {args.watch!r}" if args.watch else "", f"owner {args.owner!r}" if args.owner else ""]
        shown = " and ".join(f for f in filters if f)
        if shown:
            others = len(store.pending_list(limit=1_000_000))
            print(f"nothing pending for {shown}" + (f" ({others} pending for other watch folders or owners; "
                                                    "`watchfolder pending` lists them all)" if others else ""))
        else:
            print("nothing pending: every acquisition the watchers know of is queued or done")
        return 0
    for e in entries:
        owner = f"  (owner {printable(e['owner'])})" if e["owner"] else ""
        print(f"{printable(e['watch'])}: {printable(e['path'])}{owner}  seen {_ago(e['waiting_for'])} ago")
        print(f"    {printable(e['reason'])}")
    return 0


def cmd_explain(args) -> int:
    from .watch.explain import explain

    config = load_config(args)
    store = open_store(config)
    answers = [explain(config, store, path) for path in args.paths]
    if args.json:
        print(json.dumps({"paths": [a.to_dict() for a in answers]}, indent=2))
        return 0
    for a in answers:
        # Names may hold newlines: escaped, so one answer stays on its own lines.
        where = f" [watch folder {printable(a.watch)}]" if a.watch else ""
        print(f"{printable(a.path)}{where}")
        print(f"    {printable(a.reason)}")
        for detail in a.details:
            print(f"    {printable(detail)}")
    return 0


def cmd_mail_list(args) -> int:
    config = load_config(args)
    store = open_store(config)
    # One more than the page tells whether there is a next page (as `jobs list`).
    mails = store.outbox_list(state=args.state, limit=args.limit + 1, before=args.cursor)
    cursor = mails[args.limit - 1].id if len(mails) > args.limit else None
    mails = mails[:args.limit]
    if args.json:
        print(json.dumps({"mails": [m.to_dict() for m in mails], "next_cursor": cursor}, indent=2))
        return 0
    if not mails:
        print("no mails")
    for m in mails:
        error = f"  ({m.last_error})" if m.last_error else ""
        if m.state == "digested":
            error += f"  (in digest {m.digest_id}, not sent on its own)"
        print(printable(f"{m.id:>6}  {m.state:<8} {_when(m.created_at)}  job {m.job_id or '-':>5}  {m.kind:<18} "
                        f"{', '.join(m.recipients)}  {m.subject}{error}"))
    if cursor:
        print(_more(args, config, "mail list", [("--state", args.state), ("--limit", args.limit)], cursor))
    return 0


def cmd_mail_resend(args) -> int:
    config = load_config(args)
    mail = open_store(config).outbox_resend(args.id)
    if args.json:
        print(json.dumps(mail.to_dict(), indent=2))
        return 0
    print(f"mail {mail.id} queued again for {', '.join(mail.recipients)}")
    return 0


def cmd_events_list(args) -> int:
    from .events.cloudevents import envelope

    config = load_config(args)
    store = open_store(config)
    newest = store.last_event_id()
    if args.after > newest:
        print(f"watchfolder: error: --after {args.after} is past the newest event id of this store ({newest}); "
              "was the store replaced or restored? start again from --after 0", file=sys.stderr)
        return 1
    if args.json:
        # One document, shaped like GET /api/v1/events: one more event than the page tells has_more.
        events = store.events_after(args.after, limit=args.limit + 1)
        page = events[:args.limit]
        print(json.dumps({"events": [envelope(e, config.events.source) for e in page],
                          "next_after": page[-1]["id"] if page else args.after,
                          "has_more": len(events) > args.limit}, indent=2, ensure_ascii=False))
        return 0
    for event in store.events_after(args.after, limit=args.limit):
        print(json.dumps(envelope(event, config.events.source), ensure_ascii=False))
    return 0


def cmd_events_sinks(args) -> int:
    from .status import sink_view

    config = load_config(args)
    store = open_store(config)
    now = time.time()
    views = [sink_view(s, now=now) for s in store.sinks()]
    if args.json:
        print(json.dumps({"last_id": store.last_event_id(), "sinks": views}, indent=2))
        return 0
    if not views:
        print("no sinks have run yet (configure events.webhooks or events.mqtt)")
    for v in views:
        error = f"  ({v['last_error']})" if v["last_error"] else ""
        print(f"{v['name']:<24} {v['state']:<9} at event {v['last_id']:>8}  delivered {v['delivered']}{error}")
    return 0


def cmd_events_enable(args) -> int:
    config = load_config(args)
    store = open_store(config)
    if args.name not in {s["name"] for s in store.sinks()}:
        print(f"no event sink {args.name!r}; see `watchfolder events sinks`", file=sys.stderr)
        return 1
    store.sink_reset(args.name)
    if args.json:
        print(json.dumps({"sink": args.name, "enabled": True}, indent=2))
        return 0
    print(f"{args.name} enabled; it resumes after the last event it delivered")
    return 0


def cmd_token_new(args) -> int:
    from .web.auth import new_token

    token, snippet = new_token(args.name, args.role, args.owner, args.root)
    if args.json:
        print(json.dumps({"token": token, "config": snippet}, indent=2))
        return 0
    print(f"token (shown once; give it to the client): {token}")
    print("add this under server.tokens in the config file:")
    print(snippet)
    return 0


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
