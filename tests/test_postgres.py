"""The PostgreSQL store's own behaviour: SKIP LOCKED claims, LISTEN/NOTIFY wake-ups,
schema migrations, the copy from SQLite, and a server that goes away and comes back.

Everything every store must do is in ``tests/store_contract.py`` (run against
PostgreSQL by ``tests/test_store_contract.py``). A real throwaway server runs
these (``pg_server`` in conftest); they skip with the reason where none can.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest

from watchfolder.errors import PermanentImportError, StoreError, StoreUnavailable, TransientImportError
from watchfolder.job import JobState, RetryPolicy
from watchfolder.store import SQLiteStore
from watchfolder.store.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")

from watchfolder.store.migrate import copy_sqlite_to_postgres  # noqa: E402
from watchfolder.store.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresStore, redact_url  # noqa: E402

T0 = 1_800_000_000.0
OPTIONS = {"lease_seconds": 30, "retry": RetryPolicy(3, (10.0, 60.0))}


@pytest.fixture
def pg(pg_url, tmp_path):
    stores = []

    def make(**kw):
        s = PostgresStore(pg_url, **{"logs_dir": tmp_path / "logs", **OPTIONS, **kw})
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()


def test_a_claim_skips_a_job_another_transaction_holds_instead_of_waiting(pg, pg_url, make_spec):
    store = pg()
    first, _ = store.enqueue(make_spec(), now=T0)
    second, _ = store.enqueue(make_spec(), now=T0)
    with psycopg.connect(pg_url) as other:  # another host's claim, still in its transaction
        other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
        claimed = store.claim("w", now=T0)
        assert claimed.id == second.id
        assert store.claim("w", now=T0) is None  # the locked one is skipped, not waited for
    assert store.claim("w", now=T0).id == first.id


def _listening(store):
    from helpers import wait_until

    store.wait_for_work(store.work_generation(), 0.01)  # starts the LISTEN connection
    wait_until(lambda: store.describe()["listening"], 10, message="LISTEN connection up")


def test_an_idle_worker_is_woken_by_another_hosts_enqueue(pg, make_spec):
    # Two store handles stand for two hosts: only PostgreSQL's NOTIFY connects them.
    waiting, enqueuing = pg(), pg()
    _listening(waiting)
    seen = waiting.work_generation()
    woke = []
    thread = threading.Thread(target=lambda: woke.append(waiting.wait_for_work(seen, 120.0)))
    thread.start()
    enqueuing.enqueue(make_spec())
    thread.join(10)
    assert woke == [True], "the NOTIFY of the other host's enqueue did not wake the waiting worker"


def test_requeues_notify_too(pg, make_spec):
    store, other = pg(), pg()
    job, _ = store.enqueue(make_spec(), now=T0)
    store.claim("w", now=T0)
    store.fail(job.id, "w", TransientImportError("down"), now=T0)
    _listening(other)
    seen = other.work_generation()
    store.maintain(now=T0 + 100)  # retry time reached: queued again
    assert other.wait_for_work(seen, 10), "no wake-up on the other host for the requeued job"


def test_a_fresh_database_is_created_at_the_latest_schema_and_an_old_one_migrated(pg_url, tmp_path, caplog):
    with psycopg.connect(pg_url, autocommit=True) as conn:  # a database written by schema 1
        conn.execute(MIGRATIONS[0][2])
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    with caplog.at_level(logging.INFO, logger="watchfolder.store.postgres"):
        store = PostgresStore(pg_url, logs_dir=tmp_path / "logs")
    assert store.describe()["schema"] == SCHEMA_VERSION == 6
    steps = [r for r in caplog.records if "schema 1 -> 2: watch folder leases" in r.getMessage()]
    assert [r.levelname for r in steps] == ["INFO"], "a schema step is news, not a warning"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert store.hold_folder("drop", "a", ttl=10)
    store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="newer watchfolder .*schema 99.*upgrade watchfolder on this host"):
        PostgresStore(pg_url, logs_dir=tmp_path / "logs")


def test_schema_5_backfills_the_deduplication_keys_of_earlier_jobs(pg, pg_url, make_spec):
    from watchfolder.job import FileEntry, content_key, known_digests

    first = pg()
    imported = make_spec()
    bare = dataclasses.replace(imported, files=tuple(FileEntry(f.path, f.size) for f in imported.files))
    job, _ = first.enqueue(bare, now=T0)
    first.claim("w", now=T0)
    first.succeed(job.id, "w", {"files": [f.to_dict() for f in imported.files]}, now=T0 + 1)  # no key recorded
    queued, _ = first.enqueue(make_spec(files={"q.tif": b"q"}), now=T0)
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as schema 3 left them
        conn.execute("UPDATE jobs SET shape_key = NULL, content_key = NULL")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    store = pg()
    assert store.imported_as(content_key(imported, known_digests(imported))).id == job.id
    assert [j.id for j in store.alike(store.get(queued.id).spec, states=["queued"])] == [queued.id]


def test_schema_6_computes_again_the_keys_of_one_file_acquisitions(pg, pg_url, make_spec):
    from watchfolder.job import content_key

    first = pg()
    spec = make_spec(files={"cells.czi": b"czi " * 10}, extra={"unit": "file"})
    job, _ = first.enqueue(spec, now=T0)
    first.claim("w", now=T0)
    first.succeed(job.id, "w", {}, now=T0 + 1)
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as schema 5 left them
        conn.execute("UPDATE jobs SET shape_key = 'old', content_key = 'old'")
        conn.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    store = pg()
    renamed = dataclasses.replace(spec, files=(dataclasses.replace(spec.files[0], path="cells_renamed.czi"),))
    assert store.imported_as(content_key(renamed, {"cells_renamed.czi": spec.files[0].sha256})).id == job.id
    assert [j.id for j in store.alike(renamed, states=["succeeded"])] == [job.id]


def test_sqlite_store_is_copied_into_postgresql_idempotently(pg, tmp_path, make_spec):
    src = SQLiteStore(tmp_path / "old" / "watchfolder.db", **OPTIONS)

    def mail(job):
        from store_contract import mail_for

        return mail_for(job)

    done, _ = src.enqueue(make_spec(source="watch:drop"), now=T0)
    src.claim("w", now=T0)
    src.succeed(done.id, "w", {"files": 2}, now=T0 + 1, mails=mail)
    failed, _ = src.enqueue(make_spec(), now=T0 + 2)
    src.claim("w", now=T0 + 2)
    src.fail(failed.id, "w", PermanentImportError("unknown user", config_error=True), now=T0 + 3, mails=mail)
    src.dismiss(failed.id, now=T0 + 4)
    queued = [src.enqueue(make_spec(), now=T0 + 5 + i)[0] for i in range(3)]
    keyed, _ = src.enqueue(make_spec(session_key="sess"), now=T0 + 9)
    src.outbox_claim(now=T0 + 10)
    before = {j.id: src.get(j.id) for j in src.list_jobs(limit=100)[0]}
    mails_before = src.outbox_list()
    src.close()

    target = pg(logs_dir=tmp_path / "old" / "logs")
    report = copy_sqlite_to_postgres(tmp_path / "old" / "watchfolder.db", target)
    assert report["jobs"] == {"read": 6, "copied": 6}
    assert report["outbox"]["copied"] == 2 and report["job_history"]["copied"] > 6
    for job_id, job in before.items():
        assert target.get(job_id) == job
    assert target.outbox_list() == mails_before
    # Again: nothing new, nothing changed.
    again = copy_sqlite_to_postgres(tmp_path / "old" / "watchfolder.db", target)
    assert all(counts["copied"] == 0 for counts in again.values())
    assert target.counts() == {"queued": 4, "running": 0, "retry_wait": 0, "succeeded": 1, "failed": 1,
                               "cancelled": 0}
    # The queued jobs keep their order, and new ids follow the copied ones.
    order = [target.claim("w", now=T0 + 20).id for _ in range(4)]
    assert order == [j.id for j in queued] + [keyed.id]
    new, _ = target.enqueue(make_spec(), now=T0 + 30)
    assert new.id == max(before) + 1
    assert target.list_jobs(dismissed=True)[0][0].id == failed.id


def test_migrate_refuses_a_database_where_other_jobs_hold_the_ids(pg, tmp_path, make_spec):
    # The copy keeps ids and leaves rows already there: into a used database it reported
    # "0 copied (13 already there)" and lost the SQLite jobs (found by trying it).
    src = SQLiteStore(tmp_path / "old" / "watchfolder.db", **OPTIONS)
    mine = [src.enqueue(make_spec(), now=T0 + i)[0] for i in range(2)]
    src.close()
    target = pg(logs_dir=tmp_path / "logs")
    other, _ = target.enqueue(make_spec(), now=T0)
    assert other.id == mine[0].id
    with pytest.raises(StoreError, match=f"other jobs under 1 of the ids .* job {other.id}.* nothing was copied"):
        copy_sqlite_to_postgres(tmp_path / "old" / "watchfolder.db", target)
    assert target.counts()["queued"] == 1 and target.get(other.id).idempotency_key == other.idempotency_key


def test_copy_refuses_what_is_not_a_store(pg, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        copy_sqlite_to_postgres(tmp_path / "missing.db", pg())
    import sqlite3

    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(StoreError, match="no jobs table"):
        copy_sqlite_to_postgres(tmp_path / "other.db", pg())


def test_url_password_is_never_shown():
    assert redact_url("postgresql://wf:hunter2@db:5432/wf") == "postgresql://wf:***@db:5432/wf"
    assert redact_url("postgresql://wf@db/wf") == "postgresql://wf@db/wf"


def test_server_down_raises_store_unavailable_and_the_store_recovers_after_a_restart(own_server, tmp_path,
                                                                                     make_spec):
    from helpers import wait_until

    from watchfolder.status import health

    url = own_server.create_database()
    store = PostgresStore(url, logs_dir=tmp_path / "logs", connect_timeout=2, **OPTIONS)
    try:
        job, _ = store.enqueue(make_spec())
        own_server.restart()  # every connection in the pool is cut off
        # A connection cut off by the restart fails one call (StoreUnavailable, which callers
        # retry); then the pool has replaced them all.
        wait_until(lambda: _try(store.get, job.id), 10, interval=0.05, message="the store back after a restart")
        assert store.get(job.id).state == JobState.QUEUED

        own_server.stop("fast")
        with pytest.raises(StoreUnavailable, match=r"PostgreSQL at postgresql://postgres@127\.0\.0\.1:\d+/t_\w+ is unreachable"):
            store.claim("w")
        config = type("C", (), {"workers": type("W", (), {"heartbeat_seconds": 5.0})})()
        ok, data = health(config, store)
        assert not ok and "the database does not answer: PostgreSQL at" in data["checks"]["store"]["detail"]

        own_server.start()
        claimed = wait_until(lambda: _try(store.claim, "w"), 20, interval=0.2, message="the store back")
        assert claimed.id == job.id
        assert store.ping() and "error" not in store.describe()
    finally:
        store.close()


def _try(fn, *args):
    try:
        return fn(*args)
    except StoreUnavailable:
        return None


def test_enqueue_answer_equals_the_stored_job(pg, make_spec):
    store = pg()
    job, _ = store.enqueue(make_spec(annotations={"objective": "63x"}), now=T0)
    assert dataclasses.replace(store.get(job.id), history=[]) == job


def test_store_migrate_command_copies_into_postgresql_and_can_run_again(pg_url, tmp_path, make_spec, capsys,
                                                                        clean_env, monkeypatch):
    from watchfolder import cli

    cfg = tmp_path / "watchfolder.yaml"
    cfg.write_text("data_dir: data\nimporter: {kind: archive}\nnotify: {transport: none}\n"
                   "server: {enabled: false}\n", encoding="utf-8")
    assert cli.main(["--config", str(cfg), "store", "migrate"]) == 0
    assert f"schema {SQLITE_SCHEMA} (up to date)" in capsys.readouterr().out
    src = SQLiteStore(tmp_path / "data" / "watchfolder.db")
    job, _ = src.enqueue(make_spec())
    src.close()

    monkeypatch.setenv("WF_TEST_DB_PASSWORD", "not-needed-with-trust")
    argv = ["--config", str(cfg), "store", "migrate", "--to", pg_url, "--password-env", "WF_TEST_DB_PASSWORD"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "jobs                  1 read,        1 copied (0 already there)" in out
    assert "Set store.url: " + pg_url in out
    assert cli.main(argv) == 0
    assert "jobs                  1 read,        0 copied (1 already there)" in capsys.readouterr().out

    target = PostgresStore(pg_url, logs_dir=tmp_path / "data" / "logs")
    assert target.claim("w").id == job.id
    target.close()

    assert cli.main(["--config", str(cfg), "store", "migrate", "--to", "postgresql://u:pw@db/x"]) == 1
    assert "--to carries a password" in capsys.readouterr().err
    assert cli.main(["--config", str(cfg), "store", "migrate", "--to", "mysql://db/x"]) == 1
    assert "--to must be a postgresql://" in capsys.readouterr().err


class ExchangeCounter:
    """A TCP proxy in front of the server that counts network exchanges: how many times the
    server answered after the client had sent something (the client waited once for each).

    Pipelined statements sent together, and answered together, count once.
    """

    def __init__(self, port: int):
        import socket

        self.port = port
        self.exchanges = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url_port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.exchanges = 0

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            last = {"from": None}
            for src, dst, side in ((client, server, "client"), (server, client, "server")):
                threading.Thread(target=self._pipe, args=(src, dst, side, last), daemon=True).start()

    def _pipe(self, src, dst, side: str, last: dict) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    s.close()
                return
            with self._lock:
                if side == "server" and last["from"] == "client":
                    self.exchanges += 1
                last["from"] = side
            dst.sendall(data)

    def close(self) -> None:
        self._listener.close()


def _one_mail(job):
    from watchfolder.store.base import Mail

    return [Mail("job_succeeded", ("jdoe@example.org",), _message(job))]


def _message(job):
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"] = "watchfolder@example.org"
    msg["Subject"] = f"job {job.id} {job.state}"
    msg.set_content("done")
    return msg


def test_a_job_cycle_costs_one_network_exchange_per_result_read(pg_server, pg_url, tmp_path, make_spec,
                                                                 monkeypatch):
    """Claim: one exchange. Succeed with its mail: two (the finish returns the job the mail is
    composed from; the mail, the COMMIT and the Sync go together). Without mail, and a progress
    write: one. psycopg's own BEGIN in pipeline mode was synced apart (an exchange more per
    transaction): transactions open with an explicit BEGIN instead."""
    from watchfolder.store import postgres

    monkeypatch.setattr(postgres, "IDLE_CHECK_SECONDS", 3600.0)  # no check of an idle connection in the count
    proxy = ExchangeCounter(pg_server.port)
    url = pg_url.replace(f":{pg_server.port}/", f":{proxy.url_port}/")
    store = PostgresStore(url, logs_dir=tmp_path / "logs", composer=_one_mail, **OPTIONS)
    try:
        first, _ = store.enqueue(make_spec(), now=T0)
        second, _ = store.enqueue(make_spec(), now=T0)
        costs = {}
        for name, call in [
            ("claim", lambda: store.claim("w", now=T0)),
            ("progress", lambda: store.report_progress(first.id, "w", now=T0 + 1)),
            ("succeed with mail", lambda: store.succeed(first.id, "w", {"files": []}, now=T0 + 2)),
            ("claim again", lambda: store.claim("w", now=T0 + 3)),
            ("succeed without mail", lambda: store.succeed(second.id, "w", {"files": []}, now=T0 + 4)),
        ]:
            store.composer = _one_mail if name != "succeed without mail" else None
            proxy.reset()
            call()
            costs[name] = proxy.exchanges
        assert costs == {"claim": 1, "progress": 1, "succeed with mail": 2, "claim again": 1,
                         "succeed without mail": 1}
        assert store.get(first.id).state == JobState.SUCCEEDED
        assert [m.job_id for m in store.outbox_list()] == [first.id]
    finally:
        store.close()
        proxy.close()


def test_one_thread_in_turn_uses_one_connection_and_never_waits_for_the_pool(pg, make_spec):
    """A connection goes back to the pool in the caller's thread: with a reset callback the pool
    hands it to a worker thread, and the next call waited for that thread (and the pool grew)."""
    store = pg()
    job, _ = store.enqueue(make_spec(), now=T0)
    store.get(job.id)
    size = store.pool.pop_stats()["pool_size"]
    for _ in range(100):
        store.get(job.id)
        store.counts()
    stats = store.pool.get_stats()
    assert stats.get("requests_queued", 0) == 0
    assert stats["pool_size"] == size


def test_a_transaction_that_raises_midway_leaves_nothing_and_the_connection_clean(pg, make_spec):
    """Transactions open with an explicit BEGIN on autocommit connections: an exception from
    Python or from the server between BEGIN and COMMIT rolls everything back."""
    store = pg()
    job, _ = store.enqueue(make_spec(), now=T0)
    with pytest.raises(RuntimeError):
        with store._tx() as conn:
            conn.execute("UPDATE jobs SET owner = 'someone else' WHERE id = %s", (job.id,))
            conn.execute("SELECT 1").fetchone()
            raise RuntimeError("stop here")
    with pytest.raises(psycopg.errors.UniqueViolation):
        with store._tx() as conn:
            conn.execute("UPDATE jobs SET owner = 'someone else' WHERE id = %s", (job.id,))
            conn.execute("INSERT INTO meta VALUES ('schema_version', 'x')")
            conn.execute("SELECT 1").fetchone()
    assert store.get(job.id).owner == "jdoe"
    for conn in list(store.pool._pool):
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert store.claim("w", now=T0).id == job.id


def test_mails_are_composed_without_holding_the_events_lock(pg, pg_url, make_spec):
    """Every claim and finish of every host takes the events lock: a finish that held it
    while composing its mails (milliseconds of Python) held them all. The event is written
    last, just before the COMMIT, for succeed, fail and cancel alike."""
    from watchfolder.store.postgres import EVENTS_LOCK

    free: list[tuple[str, bool]] = []

    def composer(job):
        with psycopg.connect(pg_url) as other:  # another host, inside its own transaction
            free.append((str(job.state), other.execute("SELECT pg_try_advisory_xact_lock(%s)",
                                                        (EVENTS_LOCK,)).fetchone()[0]))
        return _one_mail(job)

    store = pg(composer=composer)
    ok, _ = store.enqueue(make_spec(), now=T0)
    bad, _ = store.enqueue(make_spec(), now=T0)
    waiting, _ = store.enqueue(make_spec(), now=T0)
    store.claim("w", now=T0)
    store.claim("w", now=T0)
    store.succeed(ok.id, "w", {"files": []}, now=T0 + 1)
    store.fail(bad.id, "w", PermanentImportError("broken"), now=T0 + 1)
    store.cancel(waiting.id, now=T0 + 1)
    assert free == [("succeeded", True), ("failed", True), ("cancelled", True)]
    events = [e for e in store.events_after(0, limit=100) if e["job_id"] in (ok.id, bad.id, waiting.id)]
    assert [e["type"].rsplit(".", 1)[1] for e in events][-3:] == ["succeeded", "failed", "cancelled"]
    assert [e["data"]["state"] for e in events][-3:] == ["succeeded", "failed", "cancelled"]
    assert len(store.outbox_list()) == 3
