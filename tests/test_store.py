"""The SQLite store's own behaviour: its queue table, schema versions, synchronous modes, query plans.

Everything every store must do is in ``tests/store_contract.py`` (run by
``tests/test_store_contract.py``)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import pytest

from watchfolder.errors import StoreError, TransientImportError
from watchfolder.job import JobState, RetryPolicy
from watchfolder.store import SQLiteStore
from watchfolder.store.sqlite import SCHEMA_VERSION

T0 = 1_800_000_000.0


def test_backoff_policy_repeats_its_last_interval():
    policy = RetryPolicy(max_attempts=6, backoff=(5, 30, 300))
    assert [policy.delay(n) for n in range(1, 7)] == [5, 30, 300, 300, 300, 300]


def test_a_job_has_a_ready_queue_message_exactly_while_queued(store, make_spec):
    def ready_messages():
        return store._conn().execute("SELECT count(*) FROM dispatch WHERE status = 0").fetchone()[0]

    job, _ = store.enqueue(make_spec(), now=T0)
    assert ready_messages() == 1
    store.claim("w", now=T0)  # the message is consumed in the claim's own transaction
    assert ready_messages() == 0
    store.fail(job.id, "w", TransientImportError("down"), now=T0)
    assert ready_messages() == 0
    store.maintain(now=T0 + 100)
    assert ready_messages() == 1 and store.get(job.id).state == JobState.QUEUED
    store.claim("w", now=T0 + 100)
    store.maintain(now=T0 + 1000)  # lease expired
    assert ready_messages() == 1
    store.cancel(job.id)
    assert ready_messages() == 0


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.db"
    SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer watchfolder"):
        SQLiteStore(path)


def test_flush_and_followups_work_in_both_synchronous_modes(tmp_path, make_spec):
    for mode in ("normal", "full"):
        store = SQLiteStore(tmp_path / f"{mode}.db", synchronous=mode)
        job, _ = store.enqueue(make_spec(source="watch:drop"))
        store.claim("w")
        store.succeed(job.id, "w", {})
        store.flush()
        assert [j.id for j in store.followups("watch:*")] == [job.id]
        assert store.followups("watch:") == [] and store.followups("watch:drop2") == []
        assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == {"normal": 1, "full": 2}[mode]
        store.close()


def test_finding_the_next_job_is_an_index_seek_not_a_sort(store):
    # litequeue's own indexes would sort every ready message on each claim (O(n^2) for a backlog).
    plan = store._conn().execute(
        "EXPLAIN QUERY PLAN SELECT * FROM dispatch WHERE status = 0 ORDER BY message_id LIMIT 1"
    ).fetchall()
    details = " ".join(row[3] for row in plan)
    assert "dispatch_ready" in details and "TEMP B-TREE" not in details


def test_erased_session_key_is_gone_from_the_database_file(store, make_spec):
    job, _ = store.enqueue(make_spec(session_key="secret-session"))
    store.claim("w")
    store.succeed(job.id, "w", {})
    raw = sqlite3.connect(store.path).execute("SELECT session_key, spec FROM jobs").fetchone()
    assert raw[0] is None and "secret-session" not in raw[1]


def test_the_file_list_stays_out_of_the_row_that_progress_rewrites(store):
    # SQLite rewrites a whole row on UPDATE: a plate's 20,000 files in the jobs row made
    # every progress write and lease renewal copy megabytes (issue 13).
    from store_contract import plate_spec

    job, _ = store.enqueue(plate_spec(20_000), now=T0)
    store.claim("w", now=T0)
    store.report_progress(job.id, "w", now=T0 + 1)
    size = store._conn().execute("SELECT length(spec) + length(progress) FROM jobs WHERE id = ?", (job.id,))
    assert size.fetchone()[0] < 2048
    assert store._conn().execute("SELECT count(*) FROM job_files WHERE job_id = ?", (job.id,)).fetchone()[0] == 20_000


def test_rows_of_schema_1_with_files_in_the_spec_are_still_read(tmp_path, make_spec):
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    spec = make_spec()
    job, _ = store.enqueue(spec, now=T0)
    conn = store._conn()
    # As schema 1 wrote it: the files inside the spec JSON, no job_files rows.
    conn.execute("UPDATE jobs SET spec = ? WHERE id = ?", (json.dumps(spec.to_dict()), job.id))
    conn.execute("DELETE FROM job_files")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    store.close()
    reopened = SQLiteStore(path)
    assert reopened.get(job.id).spec.files == spec.files
    version = reopened._conn().execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    assert version == str(SCHEMA_VERSION)  # a schema 1 program now refuses this file instead of losing file lists
    reopened.close()


def test_a_schema_3_file_gains_the_outbox_digest_id(tmp_path, make_spec):
    """Schema 4: an admin mail folded into a digest names it (issue 15 outside test, finding 6)."""
    from email.message import EmailMessage

    from watchfolder.store.base import Mail
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "wf@example.org", "admin@example.org", "job failed"
    store.outbox_add([Mail("admin_failure", ("admin@example.org",), message)], now=T0)
    conn = store._conn()
    conn.execute("ALTER TABLE outbox DROP COLUMN digest_id")
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    store.close()
    reopened = SQLiteStore(path)
    (old,) = reopened.outbox_list()
    assert old.state == "pending" and old.digest_id is None
    (claimed,) = reopened.outbox_claim(now=T0)
    digest = Mail("admin_digest", ("admin@example.org",), message)
    digest_id = reopened.outbox_digest(digest, [claimed.id], now=T0)
    mails = {m.id: m for m in reopened.outbox_list()}
    assert (mails[old.id].state, mails[old.id].digest_id, mails[old.id].sent_at) == ("digested", digest_id, None)
    assert mails[digest_id].state == "pending" and mails[digest_id].kind == "admin_digest"
    assert reopened.outbox_resend(old.id).state == "pending"  # not lost: it can still go out on its own
    reopened.close()


def test_schema_5_backfills_the_deduplication_keys_of_earlier_jobs(tmp_path, make_spec):
    # A store written before the keys existed: a success (checksums in its result only, as the
    # archive importer records them), a schema-1 row (files inside the spec) and a queued job.
    from watchfolder.job import FileEntry, content_key, known_digests

    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    imported = make_spec()
    bare = dataclasses.replace(imported, files=tuple(FileEntry(f.path, f.size) for f in imported.files))
    job, _ = store.enqueue(bare, now=T0)
    store.claim("w", now=T0)
    store.succeed(job.id, "w", {"files": [f.to_dict() for f in imported.files]}, now=T0 + 1)
    old_style = make_spec(files={"a.tif": b"a" * 10})
    old, _ = store.enqueue(old_style, now=T0)
    store.claim("w", now=T0)
    store.succeed(old.id, "w", {}, now=T0 + 1)
    queued, _ = store.enqueue(make_spec(files={"q.tif": b"q"}), now=T0)
    conn = store._conn()
    conn.execute("UPDATE jobs SET spec = ? WHERE id = ?", (json.dumps(old_style.to_dict()), old.id))
    conn.execute("DELETE FROM job_files WHERE job_id = ?", (old.id,))
    for statement in ("DROP INDEX jobs_shape", "DROP INDEX jobs_content", "ALTER TABLE jobs DROP COLUMN shape_key",
                      "ALTER TABLE jobs DROP COLUMN content_key",
                      "UPDATE meta SET value = '4' WHERE key = 'schema_version'"):
        conn.execute(statement)
    store.close()
    reopened = SQLiteStore(path)
    assert reopened.imported_as(content_key(imported, known_digests(imported))).id == job.id
    assert [j.id for j in reopened.alike(old_style, states=["succeeded"])] == [old.id]
    assert reopened.imported_as(content_key(old_style, known_digests(old_style))).id == old.id
    assert [j.id for j in reopened.alike(reopened.get(queued.id).spec, states=["queued"])] == [queued.id]
    reopened.close()


def test_schema_6_computes_again_the_keys_of_one_file_acquisitions(tmp_path, make_spec):
    # Keys recorded by schema 5 held a sidecar pair's data file name: a renamed pair was not
    # found. Opened by schema 6, the stored success is found under a name-free key.
    from watchfolder.job import content_key, known_digests

    path = tmp_path / "five.db"
    store = SQLiteStore(path)
    spec = make_spec(files={"cells.czi": b"czi " * 10}, extra={"unit": "file"})
    job, _ = store.enqueue(spec, now=T0)
    store.claim("w", now=T0)
    store.succeed(job.id, "w", {}, now=T0 + 1)
    conn = store._conn()
    conn.execute("UPDATE jobs SET shape_key = 'old', content_key = 'old' WHERE id = ?", (job.id,))
    conn.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    store.close()
    reopened = SQLiteStore(path)
    renamed = dataclasses.replace(spec, files=(dataclasses.replace(spec.files[0], path="cells_renamed.czi"),))
    assert reopened.imported_as(content_key(renamed, {"cells_renamed.czi": spec.files[0].sha256})).id == job.id
    assert content_key(renamed, {"cells_renamed.czi": spec.files[0].sha256}) == content_key(spec, known_digests(spec))
    assert [j.id for j in reopened.alike(renamed, states=["succeeded"])] == [job.id]
    reopened.close()


def _mail(job):
    from email.message import EmailMessage

    from watchfolder.store import Mail

    msg = EmailMessage()
    msg["From"] = "watchfolder@example.org"
    msg["To"] = "jdoe@example.org"
    msg["Subject"] = f"job {job.id} {job.state} cancel={job.cancel_requested} history={len(job.history)}"
    msg.set_content("body")
    return [Mail("job_succeeded", ("jdoe@example.org",), msg)]


def test_success_mail_is_composed_outside_the_write_lock(tmp_path, make_spec):
    # A composer that needs the write lock itself: it fails ("database is locked", no
    # waiting) whenever it is called inside the finishing transaction.
    path = tmp_path / "jobs.db"
    probe = sqlite3.connect(path, timeout=0, isolation_level=None)
    calls = []

    def composer(job):
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        calls.append(job)
        return _mail(job)

    store = SQLiteStore(path, composer=composer)
    job, _ = store.enqueue(make_spec(), now=T0)
    store.claim("w", now=T0)
    done = store.succeed(job.id, "w", {"ok": True}, now=T0 + 1)
    assert done.state == JobState.SUCCEEDED and len(calls) == 1
    assert calls[0] == done  # the mail describes the job exactly as committed
    [mail] = store.outbox_list()
    assert mail.subject == f"job {job.id} succeeded cancel=False history={len(done.history)}"
    assert mail.raw == _mail(done)[0].as_bytes()
    store.close()
    probe.close()


def test_job_changed_while_its_mail_was_composed_gets_a_mail_of_what_was_committed(store, make_spec):
    calls = []

    def composer(job):
        calls.append(job)
        if len(calls) == 1:
            store.cancel(job.id)  # the job changes after the mail was composed outside the lock
        return _mail(job)

    store.composer = composer
    job, _ = store.enqueue(make_spec(), now=T0)
    store.claim("w", now=T0)
    done = store.succeed(job.id, "w", {"ok": True}, now=T0 + 1)
    assert len(calls) == 2 and calls[1] == done and done.cancel_requested
    [mail] = store.outbox_list()
    assert mail.subject == f"job {job.id} succeeded cancel=True history={len(done.history)}"


def test_a_store_of_schema_1_is_migrated_at_start_with_a_log_line_per_step(tmp_path, caplog):
    path = tmp_path / "old.db"
    SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE folder_leases")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with caplog.at_level("INFO", logger="watchfolder.store.sqlite"):
        store = SQLiteStore(path)
    assert "schema 1 -> 2: a job's listed files in job_files" in caplog.text
    assert "schema 2 -> 3: watch folder leases" in caplog.text
    assert {r.levelname for r in caplog.records if " -> " in r.getMessage()} == {"INFO"}  # news, not a warning
    assert store.hold_folder("drop", "a", ttl=10) and store.describe()["schema"] == SCHEMA_VERSION
    store.close()


def test_a_database_emptied_under_many_threads_is_said_once(tmp_path, make_spec, caplog):
    # The health tick, the workers and the watcher all check the file: the first to find it
    # emptied says so (one CRITICAL line per process), the others get the same reason.
    import os
    import threading

    db = tmp_path / "jobs.db"
    store = SQLiteStore(db)
    store.enqueue(make_spec())
    os.truncate(db, 0)
    barrier = threading.Barrier(8)
    reasons = []

    def check():
        barrier.wait()
        reasons.append(store.check_file())

    threads = [threading.Thread(target=check) for _ in range(8)]
    with caplog.at_level("CRITICAL", logger="watchfolder.store.sqlite"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    critical = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert len(critical) == 1, [r.getMessage() for r in critical]
    assert len(set(reasons)) == 1 and "is empty (0 bytes)" in reasons[0]


@pytest.mark.parametrize("suffix", ["-shm", "-wal"])
def test_a_wal_index_or_wal_deleted_under_a_running_store_is_said_once_and_refused(tmp_path, make_spec, caplog,
                                                                                    suffix):
    # a11 (second outside test) F0: `rm watchfolder.db-shm` under a running service, then
    # `submit`: the new process made a new -shm, its jobs were never seen by the service (which
    # later handed out the same ids) -- submit said "queued", health stayed ok. The health
    # tick now finds the file it has open gone or replaced and refuses to go on.
    import os

    from watchfolder.errors import StoreError

    db = tmp_path / "jobs.db"
    store = SQLiteStore(db)
    store.enqueue(make_spec())
    assert store.check_file() is None
    other = SQLiteStore(db)  # another process's store opening and closing: no false alarm
    other.counts()
    other.close()
    assert store.check_file() is None
    os.unlink(f"{db}{suffix}")
    with caplog.at_level("CRITICAL", logger="watchfolder.store.sqlite"):
        reason = store.check_file()
        store.check_file()
    assert reason is not None and f"lost its {suffix} file" in reason and "start them again" in reason, reason
    assert len([r for r in caplog.records if r.levelname == "CRITICAL"]) == 1
    with pytest.raises(StoreError):
        store.enqueue(make_spec())
    assert store.ping() is False or store.broken
