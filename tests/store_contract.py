"""The storage contract's tests: written against :class:`watchfolder.store.base.JobStore` only.

``tests/test_store_contract.py`` runs every test here against each store
implementation (the ``store`` and ``make_store`` fixtures it defines); a new
backend must pass them unchanged. Tests of one backend's internals live
beside it (``tests/test_store.py`` for SQLite).

Fixtures: ``store`` (a fresh store: lease 30 s, 3 attempts, backoff 10 s then
60 s), ``make_store()`` (another handle on the same database, as a second
process or thread would open it), ``make_spec`` (a real acquisition folder).
"""

from __future__ import annotations

import dataclasses
import threading
from email.message import EmailMessage

import pytest

from watchfolder.errors import (
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    PermanentImportError,
    StoreError,
    TransientImportError,
)
from watchfolder.job import JobState, Progress, reason_group
from watchfolder.store import Mail

T0 = 1_800_000_000.0


def mail_for(job) -> list[Mail]:
    msg = EmailMessage()
    msg["From"] = "watchfolder@example.org"
    msg["To"] = job.spec.email
    msg["Subject"] = f"job {job.id} {job.state}"
    msg.set_content("body")
    return [Mail(f"job_{job.state}", (job.spec.email,), msg)]


def states(job) -> list[str]:
    return [str(h.state) for h in job.history]


def test_enqueue_claim_succeed_records_history_and_result(store, make_spec):
    job, created = store.enqueue(make_spec(), now=T0)
    assert created and job.state == JobState.QUEUED and job.attempts == 0
    assert job.progress.bytes_total == 1200 and job.progress.files_total == 2

    running = store.claim("w1", now=T0 + 1)
    assert running.id == job.id and running.state == JobState.RUNNING
    assert running.attempts == 1 and running.worker == "w1"
    assert running.lease_expires_at == T0 + 1 + store.lease_seconds
    assert store.claim("w2", now=T0 + 1) is None

    done = store.succeed(job.id, "w1", {"files": 2}, now=T0 + 5, mails=mail_for)
    assert done.state == JobState.SUCCEEDED and done.result == {"files": 2}
    full = store.get(job.id)
    assert states(full) == ["queued", "running", "succeeded"]
    assert [h.at for h in full.history] == [T0, T0 + 1, T0 + 5]
    assert full.started_at == T0 + 1 and full.finished_at == T0 + 5
    assert [m.subject for m in store.outbox_list()] == [f"job {job.id} succeeded"]


def test_enqueue_is_idempotent(store, make_spec):
    spec = make_spec()
    first, created = store.enqueue(spec, now=T0)
    again, created_again = store.enqueue(spec, now=T0 + 10)
    assert created and not created_again and again.id == first.id
    assert store.counts()["queued"] == 1
    # Even after it finished, the same acquisition is not queued twice.
    store.claim("w", now=T0)
    store.succeed(first.id, "w", {}, now=T0 + 1)
    third, created_third = store.enqueue(spec, now=T0 + 20)
    assert not created_third and third.state == JobState.SUCCEEDED
    # Another content is another job.
    changed = dataclasses.replace(spec, files=spec.files[:1])
    other, created_other = store.enqueue(changed, now=T0 + 30)
    assert created_other and other.id != first.id
    # An explicit key wins.
    keyed = dataclasses.replace(spec, idempotency_key="client-key-1")
    assert store.enqueue(keyed)[1] and not store.enqueue(dataclasses.replace(changed, idempotency_key="client-key-1"))[1]


def test_concurrent_enqueue_of_one_acquisition_makes_one_job(store, make_store, make_spec):
    spec = make_spec()
    barrier = threading.Barrier(8)
    results = []

    def enqueue():
        s = make_store()
        barrier.wait()
        results.append(s.enqueue(spec))
        s.close()

    threads = [threading.Thread(target=enqueue) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(created for _, created in results) == 1
    assert len({job.id for job, _ in results}) == 1


def test_transient_failure_waits_with_backoff_then_fails_after_max_attempts(store, make_spec):
    job, _ = store.enqueue(make_spec(), now=T0)
    # policy in the fixture: 3 attempts, backoff 10 s then 60 s
    store.claim("w", now=T0)
    waiting = store.fail(job.id, "w", TransientImportError("server unreachable"), now=T0 + 1)
    assert waiting.state == JobState.RETRY_WAIT and waiting.next_attempt_at == T0 + 11
    assert waiting.error.kind == "transient" and waiting.error.message == "server unreachable"

    assert store.maintain(now=T0 + 10.9)["due"] == 0
    assert store.claim("w", now=T0 + 10.9) is None
    assert store.maintain(now=T0 + 11)["due"] == 1
    second = store.claim("w", now=T0 + 11)
    assert second.attempts == 2
    waiting = store.fail(job.id, "w", TransientImportError("timeout"), now=T0 + 12)
    assert waiting.next_attempt_at == T0 + 12 + 60

    store.maintain(now=T0 + 72)
    third = store.claim("w", now=T0 + 72)
    assert third.attempts == 3
    final = store.fail(job.id, "w", TransientImportError("timeout again"), now=T0 + 73, mails=mail_for)
    assert final.state == JobState.FAILED
    # The kind keeps the cause (the server kept timing out); the state says it is over.
    assert final.error.kind == "transient" and "gave up after 3 attempts: timeout again" in final.error.message
    assert states(store.get(job.id)) == [
        "queued", "running", "retry_wait", "queued", "running", "retry_wait", "queued", "running", "failed",
    ]
    assert [m.kind for m in store.outbox_list()] == ["job_failed"]


def test_permanent_failure_fails_at_once(store, make_spec):
    job, _ = store.enqueue(make_spec())
    store.claim("w")
    failed = store.fail(job.id, "w", PermanentImportError("unsupported file", config_error=True))
    assert failed.state == JobState.FAILED and failed.attempts == 1
    assert failed.error.to_dict() == {"kind": "permanent", "message": "unsupported file", "config_error": True,
                                      "group": reason_group("unsupported file")}


def test_cancel_queued_and_waiting_jobs_at_once(store, make_spec):
    queued, _ = store.enqueue(make_spec())
    cancelled = store.cancel(queued.id, by="admin", mails=mail_for)
    assert cancelled.state == JobState.CANCELLED and "cancelled by admin" in cancelled.history[-1].message
    assert store.claim("w") is None  # its queue message is gone

    waiting, _ = store.enqueue(make_spec(), now=T0)
    store.claim("w", now=T0)
    store.fail(waiting.id, "w", TransientImportError("down"), now=T0)
    assert store.cancel(waiting.id, now=T0 + 1).state == JobState.CANCELLED
    store.maintain(now=T0 + 1000)
    assert store.claim("w", now=T0 + 1000) is None


def test_cancel_running_job_is_a_request_the_worker_honours(store, make_spec):
    job, _ = store.enqueue(make_spec())
    store.claim("w")
    assert store.report_progress(job.id, "w", Progress("copying", 10, 100)) is False
    assert store.cancel(job.id).state == JobState.RUNNING
    assert store.report_progress(job.id, "w", Progress("copying", 20, 100)) is True
    done = store.cancelled(job.id, "w")
    assert done.state == JobState.CANCELLED


def test_invalid_transitions_are_refused_with_the_state(store, make_spec):
    job, _ = store.enqueue(make_spec())
    with pytest.raises(InvalidTransition, match="is queued; only failed, cancelled or waiting"):
        store.retry(job.id)
    store.claim("w")
    with pytest.raises(InvalidTransition, match="is running"):
        store.retry(job.id)
    store.succeed(job.id, "w", {})
    with pytest.raises(InvalidTransition, match="already succeeded"):
        store.cancel(job.id)
    with pytest.raises(LeaseLost):
        store.succeed(job.id, "w", {})
    with pytest.raises(JobNotFound):
        store.get(12345)
    with pytest.raises(JobNotFound):
        store.cancel(12345)


def test_manual_retry_gives_a_fresh_attempt_budget(store, make_spec):
    job, _ = store.enqueue(make_spec())
    store.claim("w")
    store.fail(job.id, "w", PermanentImportError("unknown user"))
    again = store.retry(job.id, by="admin")
    assert again.state == JobState.QUEUED and again.attempts == 0 and again.error is None
    claimed = store.claim("w2")
    assert claimed.id == job.id and claimed.attempts == 1
    store.succeed(job.id, "w2", {})
    cancelled, _ = store.enqueue(make_spec())
    store.cancel(cancelled.id)
    assert store.retry(cancelled.id).state == JobState.QUEUED


def test_expired_lease_puts_the_job_back_and_the_old_worker_loses_it(store, make_spec):
    job, _ = store.enqueue(make_spec(), now=T0)
    store.claim("dead-worker", now=T0)
    store.report_progress(job.id, "dead-worker", Progress("copying", 1, 2), now=T0 + 20)  # renews to T0+50
    assert store.maintain(now=T0 + 49)["expired"] == 0
    assert store.maintain(now=T0 + 51)["expired"] == 1
    assert store.get(job.id).state == JobState.QUEUED
    taken = store.claim("new-worker", now=T0 + 52)
    assert taken.id == job.id and taken.attempts == 2
    with pytest.raises(LeaseLost):
        store.report_progress(job.id, "dead-worker", Progress(), now=T0 + 53)
    with pytest.raises(LeaseLost):
        store.succeed(job.id, "dead-worker", {}, now=T0 + 53)
    store.succeed(job.id, "new-worker", {}, now=T0 + 54)
    assert "expired" in store.get(job.id).history[2].message


def test_a_pending_cancel_lands_when_the_lease_of_a_stalled_worker_expires(store, make_spec):
    # Issue 11 outside test F5: a SIGSTOPped worker's job was queued again, claimed by
    # another worker (an attempt burnt) and only then cancelled.
    job, _ = store.enqueue(make_spec(), now=T0)
    store.claim("stalled", now=T0)
    assert store.cancel(job.id, by="cli:admin", now=T0 + 5).state == JobState.RUNNING
    assert store.maintain(now=T0 + store.lease_seconds + 1)["expired"] == 1
    done = store.get(job.id)
    assert done.state == JobState.CANCELLED and done.attempts == 1 and done.finished_at is not None
    assert states(done)[-2:] == ["running", "cancelled"]
    assert "lease of stalled expired" in done.history[-1].message
    assert "cancel request" in done.history[-1].message
    assert store.claim("other", now=T0 + store.lease_seconds + 2) is None
    with pytest.raises(LeaseLost):
        store.report_progress(job.id, "stalled", Progress(), now=T0 + store.lease_seconds + 3)
    # A job without a cancel request is still queued again, as before.
    other, _ = store.enqueue(make_spec(), now=T0 + 100)
    store.claim("stalled", now=T0 + 100)
    store.maintain(now=T0 + 100 + store.lease_seconds + 1)
    assert store.get(other.id).state == JobState.QUEUED


def test_cancel_of_a_running_job_whose_worker_is_gone_is_at_once(store, make_spec):
    # Issue 11 case 5 (SQLite had it; PostgreSQL waited for the lease, a10/a11 follow-up).
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    job, _ = store.enqueue(make_spec(), now=T0)
    store.claim(f"{socket.gethostname()}:{int(dead.stdout)}:w1", now=T0)
    gone = store.cancel(job.id, by="cli:admin", now=T0 + 1)
    assert gone.state == JobState.CANCELLED and gone.attempts == 1
    assert "its worker" in gone.history[-1].message and "is gone" in gone.history[-1].message
    stalled, _ = store.enqueue(make_spec(), now=T0)
    store.claim("remote-host:123:w1", now=T0)
    assert store.cancel(stalled.id, now=T0 + store.lease_seconds + 1).state == JobState.CANCELLED
    alive, _ = store.enqueue(make_spec(), now=T0)
    store.claim(f"{socket.gethostname()}:{os.getpid()}:w1", now=T0)
    assert store.cancel(alive.id, now=T0 + 1).state == JobState.RUNNING  # it stops at its next checkpoint


def test_lease_expiring_on_the_last_attempt_fails_the_job(store, make_spec):
    job, _ = store.enqueue(make_spec(), now=T0)
    now = T0
    for _ in range(3):
        assert store.claim("w", now=now).id == job.id
        now += store.lease_seconds + 1
        store.maintain(now=now)
    final = store.get(job.id)
    assert final.state == JobState.FAILED and "gave up after 3 attempts" in final.error.message
    # Follow-up E: workers that died are not the files' fault; the owner's mail must not say
    # "importing the same files again would fail the same way".
    assert final.error.kind == "transient"


def test_release_returns_the_job_without_counting_the_attempt(store, make_spec):
    job, _ = store.enqueue(make_spec())
    store.claim("w")
    released = store.release(job.id, "w", reason="shutdown")
    assert released.state == JobState.QUEUED and released.attempts == 0
    assert store.claim("w2").id == job.id


def test_release_with_a_delay_waits_uncounted_until_then(store, make_spec):
    job, _ = store.enqueue(make_spec())
    store.claim("w", now=1000.0)
    released = store.release(job.id, "w", now=1000.0, reason="waiting for job 1", delay=5.0)
    assert released.state == JobState.RETRY_WAIT and released.attempts == 0 and released.error is None
    assert released.next_attempt_at == 1005.0
    assert "waiting for job 1" in released.history[-1].message
    store.maintain(now=1004.0)
    assert store.claim("w2", now=1004.0) is None
    store.maintain(now=1005.0)
    again = store.claim("w2", now=1005.0)
    assert again.id == job.id and again.attempts == 1


def test_mail_composer_failure_rolls_back_the_whole_transition(store, make_spec):
    job, _ = store.enqueue(make_spec())
    store.claim("w")

    def broken(job):
        raise RuntimeError("template bug")

    with pytest.raises(RuntimeError):
        store.succeed(job.id, "w", {"x": 1}, mails=broken)
    after = store.get(job.id)
    assert after.state == JobState.RUNNING and after.result is None
    assert store.outbox_list() == []
    store.succeed(job.id, "w", {"x": 1}, mails=mail_for)
    assert len(store.outbox_list()) == 1


def test_session_key_is_erased_when_the_job_ends_and_never_shown(store, make_spec):
    job, _ = store.enqueue(make_spec(session_key="secret-session"))
    assert store.get(job.id).spec.session_key == "secret-session"
    assert "secret-session" not in str(store.get(job.id).to_dict())
    store.claim("w")
    store.succeed(job.id, "w", {})
    assert store.get(job.id).spec.session_key is None


def test_reject_records_bad_input_as_a_failed_job_once(store, make_spec):
    spec = make_spec(source="watch:drop")
    job, created = store.reject(spec, "sidecar: invalid JSON at line 3, column 5", mails=mail_for)
    assert created and job.state == JobState.FAILED and job.attempts == 0
    assert job.error.message.startswith("sidecar: invalid JSON")
    assert not store.reject(spec, "again")[1]
    assert "rejected" in store.read_log(job.id)
    assert [j.id for j in store.followups("watch:drop")] == [job.id]
    store.followup_done(job.id, "kept; error report written")
    assert store.followups("watch:drop") == []


def test_list_jobs_without_files_leaves_only_the_file_lists_out(store, make_spec):
    # A watcher at start reads its folder's unfinished and finished jobs for their extra fields:
    # a page of HCS plates must not load every plate's 100,000 file rows.
    files = {f"Images/r01c{i:02d}.tiff": b"x" * (i + 1) for i in range(40)}
    plate, _ = store.enqueue(make_spec(files=files, extra={"watch": "drop", "acquisition": "plate1"}), now=T0)
    other, _ = store.enqueue(make_spec(), now=T0 + 1)
    full, _ = store.list_jobs()
    light, cursor = store.list_jobs(files=False)
    assert cursor is None and [j.id for j in light] == [j.id for j in full] == [other.id, plate.id]
    assert len(full[1].spec.files) == 40 and all(not j.spec.files for j in light)
    for a, b in zip(full, light, strict=True):
        assert dataclasses.replace(a.spec, files=()) == b.spec
        assert (a.state, a.idempotency_key, a.created_at, a.log_path) == (b.state, b.idempotency_key,
                                                                           b.created_at, b.log_path)
    assert light[1].spec.extra == {"watch": "drop", "acquisition": "plate1"}
    assert [len(j.spec.files) for j in store.list_jobs(states=["queued"])[0]] == [2, 40]

def test_list_jobs_filters_and_pages(store, make_spec):
    ids = []
    for i in range(7):
        job, _ = store.enqueue(
            make_spec(owner="alice" if i % 2 else "bob", source="watch:drop" if i < 4 else "api:portal"),
            now=T0 + i,
        )
        ids.append(job.id)
    page, cursor = store.list_jobs(limit=3)
    assert [j.id for j in page] == ids[::-1][:3] and cursor
    page2, cursor2 = store.list_jobs(limit=3, cursor=cursor)
    page3, cursor3 = store.list_jobs(limit=3, cursor=cursor2)
    assert [j.id for j in page + page2 + page3] == ids[::-1] and cursor3 is None
    assert {j.owner for j in store.list_jobs(owner="alice")[0]} == {"alice"}
    assert len(store.list_jobs(source="watch:*")[0]) == 4
    assert len(store.list_jobs(source="api:portal")[0]) == 3
    assert [j.id for j in store.list_jobs(since=T0 + 5)[0]] == ids[:4:-1]
    assert [j.id for j in store.list_jobs(until=T0 + 1)[0]] == [ids[0]]
    store.claim("w")
    assert [j.state for j in store.list_jobs(states=["running"])[0]] == [JobState.RUNNING]
    with pytest.raises(StoreError, match="invalid cursor"):
        store.list_jobs(cursor="abc")
    with pytest.raises(ValueError):
        store.list_jobs(states=["sleeping"])


def test_counts_oldest_and_components(store, make_spec):
    store.enqueue(make_spec(), now=T0)
    store.enqueue(make_spec(), now=T0 + 5)
    assert store.counts() == {
        "queued": 2, "running": 0, "retry_wait": 0, "succeeded": 0, "failed": 0, "cancelled": 0,
    }
    assert store.oldest_queued_at() == T0
    store.enqueue(make_spec(owner="alice"), now=T0 - 5)
    assert store.counts(owners=["jdoe"])["queued"] == 2 and store.counts(owners=["alice", "x"])["queued"] == 1
    assert store.counts(owners=[])["queued"] == 0
    assert (store.oldest_queued_at(owners=["jdoe"]), store.oldest_queued_at()) == (T0, T0 - 5)
    assert store.oldest_queued_at(owners=["nobody"]) is None
    store.set_component("worker", "w1", {"state": "idle"}, now=T0)
    store.set_component("worker", "w1", {"state": "busy"}, now=T0 + 1)
    (component,) = store.components("worker")
    assert component["status"] == {"state": "busy"} and component["updated_at"] == T0 + 1
    store.remove_component("worker", "w1")
    assert store.components() == []


def test_two_workers_in_threads_never_claim_the_same_job(make_store, make_spec):
    setup = make_store()
    specs = [make_spec(files={f"f{i}.tif": b"x"}) for i in range(150)]
    for spec in specs:
        setup.enqueue(spec)
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def work(name):
        s = make_store()
        barrier.wait()
        while (job := s.claim(name)) is not None:
            claimed[name].append(job.id)
            s.succeed(job.id, name, {})
        s.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = claimed["a"] + claimed["b"]
    assert len(every) == 150 and len(set(every)) == 150
    assert setup.counts()["succeeded"] == 150
    setup.close()


def test_outbox_claim_send_fail_and_resend(store, make_spec):
    job, _ = store.enqueue(make_spec(), now=T0)
    store.claim("w", now=T0)
    store.succeed(job.id, "w", {}, now=T0, mails=mail_for)
    (mail,) = store.outbox_claim(now=T0)
    assert mail.state == "sending" and mail.attempts == 1 and mail.recipients == ("jdoe@example.org",)
    assert store.outbox_claim(now=T0) == []
    retry = store.outbox_failed(mail.id, "421 try later", permanent=False, now=T0)
    assert retry.state == "pending" and retry.next_attempt_at > T0
    assert store.outbox_claim(now=T0) == []
    (again,) = store.outbox_claim(now=retry.next_attempt_at)
    store.outbox_failed(again.id, "550 no such user", permanent=True, now=T0 + 100)
    assert store.outbox_counts()["failed"] == 1
    assert store.outbox_resend(again.id).state == "pending"
    (third,) = store.outbox_claim(now=T0 + 200)
    store.outbox_sent(third.id, now=T0 + 201)
    assert store.outbox_counts() == {"pending": 0, "sending": 0, "sent": 1, "failed": 0}
    assert store.outbox_claim(now=T0 + 10_000) == []


def test_outbox_dismiss_takes_a_failed_mail_off_the_backlog_and_keeps_it(store, make_spec):
    job, _ = store.enqueue(make_spec(), now=T0)
    store.claim("w", now=T0)
    store.succeed(job.id, "w", {}, now=T0, mails=mail_for)
    (mail,) = store.outbox_claim(now=T0)
    assert store.outbox_dismiss(mail.id) is None  # sending, not failed: nothing to dismiss
    store.outbox_failed(mail.id, "550 no such user", permanent=True, now=T0 + 1)
    dismissed = store.outbox_dismiss(mail.id)
    assert dismissed.state == "dismissed" and dismissed.last_error == "550 no such user"
    assert store.outbox_dismiss(mail.id) is None  # once
    assert store.outbox_dismiss(999_999) is None
    assert store.outbox_list(state="failed") == [] and store.outbox_counts()["failed"] == 0
    assert [m.raw for m in store.outbox_list(state="dismissed")] == [mail.raw]
    assert store.outbox_claim(now=T0 + 10_000) == []  # never sent by itself
    assert store.outbox_resend(mail.id).state == "pending"  # the admin can still send it


def test_data_survives_reopening_the_store(make_store, make_spec):
    first = make_store()
    job, _ = first.enqueue(make_spec())
    first.close()
    second = make_store()
    assert second.get(job.id).state == JobState.QUEUED
    assert second.claim("w").id == job.id
    second.close()


def test_dismiss_acknowledges_a_failure_and_retry_clears_it(store, make_spec):
    job, _ = store.enqueue(make_spec())
    with pytest.raises(InvalidTransition, match="only failed jobs"):
        store.dismiss(job.id)
    store.claim("w")
    store.fail(job.id, "w", PermanentImportError("unknown user"))
    dismissed = store.dismiss(job.id, by="admin", now=T0)
    assert dismissed.dismissed_at == T0 and "dismissed by admin" in dismissed.history[-1].message
    assert store.list_jobs(states=["failed"], dismissed=False)[0] == []
    assert [j.id for j in store.list_jobs(dismissed=True)[0]] == [job.id]
    assert store.retry(job.id).dismissed_at is None


def test_enqueue_many_commits_a_batch_and_keeps_idempotency(store, make_spec):
    a, b = make_spec(), make_spec()
    results = store.enqueue_many([(a, "first"), (b, ""), (a, "again")])
    assert [created for _, created in results] == [True, True, False]
    assert results[2][0].id == results[0][0].id
    assert store.get(results[0][0].id).history[0].message == "first"
    assert store.counts()["queued"] == 2
    assert {store.claim("w").id, store.claim("w").id} == {results[0][0].id, results[1][0].id}


def test_alike_finds_the_owners_jobs_of_that_shape_exactly_and_imported_as_by_content(store, make_spec):
    from watchfolder.job import Target, content_key, imported_content_key, known_digests

    two = {"a.tif": b"x" * 100, "b.tif": b"y" * 50}  # 2 files, 150 bytes
    ids = {}
    for name, files, fields in (
        ("match-1", two, {}),
        ("other-size", {"a.tif": b"x" * 100, "b.tif": b"y" * 51}, {}),
        ("other-names", {"a.tif": b"x" * 100, "c.tif": b"y" * 50}, {}),
        ("other-count", {"a.tif": b"x" * 150}, {}),
        ("other-owner", two, {"owner": "asmith"}),
        ("other-target", two, {"target": Target(dataset="elsewhere")}),
        ("other-group", two, {"group": "other-lab"}),
        ("match-2", two, {}),
        ("not-finished", two, {}),
    ):
        job, _ = store.enqueue(make_spec(files=files, name=name, **fields), now=T0)
        ids[name] = job.id
        if name != "not-finished":
            store.claim("w", now=T0)
            result = {"files": [f.to_dict() for f in job.spec.files]}
            store.succeed(job.id, "w", result, now=T0 + 1, content_key=imported_content_key(job.spec, result))
    probe = make_spec(files=two)
    found = store.alike(probe, states=["succeeded"])
    assert [j.id for j in found] == [ids["match-2"], ids["match-1"]]  # newest first
    assert found[0].spec.files == store.get(ids["match-2"]).spec.files
    assert [j.id for j in store.alike(probe, states=["succeeded"], limit=1)] == [ids["match-2"]]
    assert [j.id for j in store.alike(probe, states=["succeeded"], before=ids["match-2"])] == [ids["match-1"]]
    assert store.alike(make_spec(files={"c.tif": b"z" * 151}), states=["succeeded"]) == []
    assert [j.id for j in store.alike(probe, states=["queued", "running"])] == [ids["not-finished"]]
    # The content: the newest success of the same owner, target, group, paths, sizes and checksums.
    key = content_key(probe, known_digests(probe))
    assert key is not None and store.imported_as(key).id == ids["match-2"]
    assert store.imported_as(content_key(probe, {"a.tif": "0" * 64, "b.tif": "1" * 64})) is None


def test_an_earlier_success_is_found_by_its_content_after_250_unrelated_jobs(store, make_spec):
    from watchfolder.job import content_key, imported_content_key, known_digests

    original, _ = store.enqueue(make_spec(files={"x.tif": b"the original" * 10}), now=T0)
    store.claim("w", now=T0)
    result = {"files": [f.to_dict() for f in original.spec.files]}
    store.succeed(original.id, "w", result, now=T0, content_key=imported_content_key(original.spec, result))
    # 250 jobs of the same owner into the same target between the original and its copy,
    # 50 of them of the very same names and sizes (other bytes).
    for n in range(250):
        files = {"x.tif": b"%012d" % n * 10} if n % 5 == 0 else {f"other-{n}.tif": b"%d" % n}
        job, _ = store.enqueue(make_spec(files=files), now=T0 + 1)
        store.claim("w", now=T0 + 1)
        result = {"files": [f.to_dict() for f in job.spec.files]}
        store.succeed(job.id, "w", result, now=T0 + 2, content_key=imported_content_key(job.spec, result))
    copy = make_spec(files={"x.tif": b"the original" * 10})
    assert len(store.alike(copy, states=["succeeded"], limit=1000)) == 51
    assert store.imported_as(content_key(copy, known_digests(copy))).id == original.id
    # A duplicate records no content key: it imported nothing itself.
    dup, _ = store.enqueue(copy, now=T0 + 3)
    store.claim("w", now=T0 + 3)
    store.succeed(dup.id, "w", {"duplicate_of": original.id, "files": []}, now=T0 + 3,
                  content_key=imported_content_key(copy, {"duplicate_of": original.id, "files": []}))
    assert store.imported_as(content_key(copy, known_digests(copy))).id == original.id


def test_enqueue_answers_the_job_as_stored_and_duplicates_use_no_ids(store, make_spec):
    first, _ = store.enqueue(make_spec(), now=T0)
    stored = store.get(first.id)
    assert dataclasses.replace(stored, history=[]) == first
    store.enqueue(first.spec, now=T0 + 1)  # a duplicate
    second, _ = store.enqueue(make_spec(), now=T0 + 2)
    assert second.id == first.id + 1


def test_queued_work_wakes_a_waiting_worker(store, make_spec):
    # Every way of queueing a job wakes waiters of this process: enqueue, retry, and
    # the requeue of a due retry by maintain. A timeout with nothing queued says False.
    seen = store.work_generation()
    assert store.wait_for_work(seen, 0.01) is False

    def queued_from_another_thread(action):
        seen = store.work_generation()
        woke = []
        waiter = threading.Thread(target=lambda: woke.append(store.wait_for_work(seen, 30)))
        waiter.start()
        action()
        waiter.join(10)
        return woke == [True]

    job = None

    def enqueue():
        nonlocal job
        job, _ = store.enqueue(make_spec(), now=T0)

    assert queued_from_another_thread(enqueue)
    claimed = store.claim("w", now=T0)
    store.fail(claimed.id, "w", TransientImportError("share away"), now=T0)
    assert queued_from_another_thread(lambda: store.maintain(now=T0 + 3600))
    claimed = store.claim("w", now=T0 + 3600)
    store.fail(claimed.id, "w", PermanentImportError("bad file"), now=T0 + 3600)
    assert queued_from_another_thread(lambda: store.retry(job.id, now=T0 + 3601))


def _pending(path, *, watch="drop", kind="waiting", reason="waiting for 1 of 2 files (missing: b.tif)",
             first_seen=T0, last_change=T0, owner="jdoe", digest="ab12"):
    from watchfolder.store import PendingEntry

    return PendingEntry(watch=watch, path=path, kind=kind, reason=reason, first_seen=first_seen,
                        last_change=last_change, quiet_until=last_change + 30, owner=owner, digest=digest)


def test_pending_sync_lists_replaces_and_keeps_the_first_sighting(store, make_store):
    store.pending_sync("drop", [_pending("a"), _pending("b", owner=None, kind="writing", first_seen=T0 + 5)], now=T0 + 6)
    store.pending_sync("other", [_pending("a", watch="other", first_seen=T0 + 1)], now=T0 + 6)
    listed = store.pending_list()
    assert [(e.watch, e.path) for e in listed] == [("drop", "a"), ("other", "a"), ("drop", "b")]
    first = listed[0]
    assert (first.kind, first.reason, first.owner, first.digest) == (
        "waiting", "waiting for 1 of 2 files (missing: b.tif)", "jdoe", "ab12")
    assert (first.first_seen, first.last_change, first.quiet_until, first.updated_at) == (T0, T0, T0 + 30, T0 + 6)
    assert first.to_dict()["reason"] == first.reason and "digest" not in first.to_dict()

    # A restarted watcher reports "a" as first seen now: the store keeps the earlier sighting.
    # "b" is not reported any more (queued or gone): it leaves the list. Other folders are untouched.
    store.pending_sync("drop", [_pending("a", first_seen=T0 + 100, last_change=T0 + 90, reason="changed")],
                       now=T0 + 100)
    (a,) = store.pending_list(watch="drop")
    assert (a.first_seen, a.last_change, a.reason, a.updated_at) == (T0, T0 + 90, "changed", T0 + 100)
    assert [e.path for e in store.pending_list(watch="other")] == ["a"]

    # Filters, limit, and another handle on the same database (another process).
    assert [e.watch for e in store.pending_list(owner="jdoe")] == ["drop", "other"]
    assert store.pending_list(owner="nobody") == []
    assert len(store.pending_list(limit=1)) == 1
    assert [e.path for e in make_store().pending_list(watch="drop")] == ["a"]

    store.pending_sync("drop", [], now=T0 + 200)
    assert [e.watch for e in store.pending_list()] == ["other"]


def test_pending_survives_reopening_the_store(make_store):
    first = make_store()
    first.pending_sync("drop", [_pending("slide 3/ü")], now=T0)
    first.close()
    (entry,) = make_store().pending_list()
    assert (entry.path, entry.first_seen) == ("slide 3/ü", T0)


def plate_spec(n: int, **fields):
    """A spec listing ``n`` files (an HCS plate), with and without sizes and checksums."""
    from watchfolder.job import FileEntry, JobSpec, Target

    files = tuple(
        FileEntry(f"Images/r{i // 2400:02d}c{i // 100 % 24:02d}f{i % 100:02d}.tiff",
                  None if i % 7 == 0 else 1000 + i, None if i % 3 else f"{i:064x}")
        for i in range(n)
    )
    return JobSpec(owner="jdoe", root="/data/plate", files=files, target=Target(screen="Plate 1"),
                   source="cli:test", email="jdoe@example.org", **fields)


def test_a_plate_of_20000_files_round_trips_in_order(make_store):
    # Issue 13: one acquisition can list 100,000 files; every read gives them back in
    # order, unchanged, through every transition and after reopening.
    store = make_store()
    spec = plate_spec(20_000)
    job, _ = store.enqueue(spec, now=T0)
    assert job.spec.files == spec.files and job.progress.files_total == 20_000
    running = store.claim("w", now=T0)
    assert running.spec.files == spec.files
    for i in range(1, 50):
        store.report_progress(job.id, "w", Progress("copying", i, 0, i * 400, 20_000), now=T0 + i)
    assert store.get(job.id).spec.files == spec.files
    done = store.succeed(job.id, "w", {"bytes": 1}, now=T0 + 60, mails=mail_for)
    assert done.spec.files == spec.files and done.progress.files_done == 19_600
    assert store.find(spec.key()).spec.files == spec.files
    listed, _ = store.list_jobs()
    assert listed[0].spec.files == spec.files
    store.close()
    assert make_store().get(job.id).spec.files == spec.files


def test_enqueue_many_takes_10000_acquisitions_in_one_batch(store):
    # A share that comes back with a backlog: one call, one transaction.
    specs = [plate_spec(2, idempotency_key=f"acq-{i}") for i in range(10_000)]
    results = store.enqueue_many([(s, "") for s in specs], now=T0)
    assert all(created for _, created in results)
    assert len({job.id for job, _ in results}) == 10_000
    assert store.counts()["queued"] == 10_000
    assert store.get(results[-1][0].id).spec.files == specs[-1].files

def test_every_state_change_is_an_event_in_order_with_the_job_summary(store, make_spec):
    job, _ = store.enqueue(make_spec(group="lab", name="slide 3"), now=T0)
    store.claim("w", now=T0 + 1)
    store.fail(job.id, "w", TransientImportError("server down"), now=T0 + 2)
    store.maintain(now=T0 + 100)
    store.claim("w", now=T0 + 101)
    store.cancel(job.id, by="admin", now=T0 + 102)  # a request, not a change: no event
    store.cancelled(job.id, "w", now=T0 + 103)
    events = store.events_after(0)
    assert [e["type"].rsplit(".", 1)[1] for e in events] == [
        "queued", "running", "retry_wait", "queued", "running", "cancelled"
    ]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert all(e["subject"] == f"job/{job.id}" and e["job_id"] == job.id and e["owner"] == "jdoe" for e in events)
    waiting = events[2]["data"]
    assert waiting["state"] == "retry_wait" and waiting["attempts"] == 1
    assert waiting["error"] == {"kind": "transient", "message": "server down"}
    assert waiting["target"] == {"project": "Brain atlas", "dataset": "slide 3"}
    assert waiting["group"] == "lab" and waiting["name"] == "slide 3" and "files" not in waiting
    assert store.last_event_id() == events[-1]["id"]
    assert store.events_after(events[2]["id"], limit=2) == events[3:5]


def test_success_and_rejection_events_carry_result_and_reason(store, make_spec):
    job, _ = store.enqueue(make_spec(), now=T0)
    store.claim("w", now=T0)
    store.succeed(job.id, "w", {"image_ids": [1, 2], "files": [{"path": "a"}]}, now=T0 + 1)
    rejected, _ = store.reject(make_spec(owner="alice"), "sidecar: invalid JSON", now=T0 + 2)
    done = store.events_after(0, job_id=job.id)[-1]
    assert done["type"] == "org.watchfolder.job.succeeded"
    assert done["data"]["result"] == {"image_ids": [1, 2]}  # the file list stays out
    (failed,) = store.events_after(0, owners=["alice"])
    assert failed["job_id"] == rejected.id and failed["type"] == "org.watchfolder.job.failed"
    assert failed["data"]["error"]["message"] == "sidecar: invalid JSON"
    assert store.events_after(0, owners=[]) == []


def test_added_events_and_watcher_health_changes(store):
    first = store.add_event("org.watchfolder.job.progress", "job/7", {"percent": 50}, job_id=7, owner="jdoe", now=T0)
    store.set_component("watcher", "lsm", {"health": "ok", "path": "/drop"}, now=T0)
    store.set_component("watcher", "lsm", {"health": "ok", "path": "/drop"}, now=T0 + 1)  # no change
    store.set_component("watcher", "lsm", {"health": "unhealthy", "path": "/drop", "error": "gone"}, now=T0 + 2)
    events = store.events_after(0)
    assert events[0]["id"] == first and events[0]["data"] == {"percent": 50}
    health = [e for e in events if e["type"] == "org.watchfolder.watcher.health"]
    assert [(e["data"]["previous"], e["data"]["health"]) for e in health] == [(None, "ok"), ("ok", "unhealthy")]
    assert health[-1]["subject"] == "watcher/lsm" and health[-1]["data"]["problem"] == "gone"


def test_last_event_id_survives_pruning_every_event(store, make_spec):
    store.enqueue(make_spec(), now=T0)
    newest = store.last_event_id()
    assert newest > 0
    assert store.events_prune(T0 + 10) >= 1 and store.events_after(0) == []
    assert store.last_event_id() == newest  # a poller at `newest` is not ahead of this store
    store.enqueue(make_spec(owner="alice"), now=T0 + 20)
    assert store.events_after(newest)[0]["id"] > newest


def test_sinks_are_held_by_one_holder_and_remember_their_position(store, make_spec):
    store.enqueue(make_spec(), now=T0)
    start = store.last_event_id()
    sink = store.sink_claim("webhook:lims", "p1", hold=30, now=T0)
    assert sink["last_id"] == start and sink["disabled_at"] is None  # a new sink starts at the newest event
    assert store.sink_claim("webhook:lims", "p2", hold=30, now=T0 + 10) is None
    store.sink_update("webhook:lims", "p1", last_id=start + 5, delivered=5, now=T0 + 11)
    with pytest.raises(StoreError):
        store.sink_update("webhook:lims", "p2", last_id=0)
    with pytest.raises(StoreError):
        store.sink_update("webhook:lims", "p1", colour="red")
    taken = store.sink_claim("webhook:lims", "p2", hold=30, now=T0 + 31)  # p1's lease ran out
    assert taken["last_id"] == start + 5 and taken["delivered"] == 5 and taken["holder"] == "p2"
    store.sink_update("webhook:lims", "p2", failing_since=T0 + 40, last_error="503", disabled_at=T0 + 50)
    store.sink_reset("webhook:lims")
    (row,) = store.sinks()
    assert row["name"] == "webhook:lims" and row["disabled_at"] is None and row["last_error"] is None


def test_events_prune_keeps_what_a_sink_has_not_delivered(store, make_spec):
    for _ in range(3):
        store.enqueue(make_spec(), now=T0)
    ids = [e["id"] for e in store.events_after(0)]
    store.sink_claim("mqtt", "p", hold=30, now=T0)
    store.sink_update("mqtt", "p", last_id=ids[0])
    assert store.events_prune(T0 + 1, sinks=["mqtt"]) == 1
    assert [e["id"] for e in store.events_after(0)] == ids[1:]
    assert store.events_prune(T0 - 1) == 0
    assert store.events_prune(T0 + 1) == 2


def test_replace_spec_stores_a_retried_jobs_acquisition_as_read_again(store, make_spec):
    # A job rejected at detection holds no files; its retry re-reads the acquisition (issue 12 case 7).
    spec = make_spec()
    job, _ = store.enqueue(dataclasses.replace(spec, files=()))
    claimed = store.claim("w")
    again = store.replace_spec(claimed.id, "w", spec)
    assert [f.path for f in again.spec.files] == [f.path for f in spec.files]
    assert store.get(job.id).spec.files == spec.files
    assert again.idempotency_key == job.idempotency_key
    with pytest.raises(LeaseLost):
        store.replace_spec(job.id, "another-worker", spec)



def test_a_watch_folder_is_held_by_one_watcher_at_a_time(store, make_store):
    other = make_store()
    assert store.hold_folder("drop", "host-a", ttl=30, now=T0)
    assert not other.hold_folder("drop", "host-b", ttl=30, now=T0 + 1)
    assert store.hold_folder("drop", "host-a", ttl=30, now=T0 + 20)  # renewed to T0 + 50
    assert not other.hold_folder("drop", "host-b", ttl=30, now=T0 + 49)
    assert other.hold_folder("another-drop", "host-b", ttl=30, now=T0 + 49)
    (held, _) = other.folder_holders()
    assert held["folder"] == "another-drop" and held["holder"] == "host-b"
    # The holder died: once its lease ran out, the other takes over, and the old one has lost it.
    assert other.hold_folder("drop", "host-b", ttl=30, now=T0 + 51)
    assert not store.hold_folder("drop", "host-a", ttl=30, now=T0 + 52)
    drop = {h["folder"]: h for h in store.folder_holders()}["drop"]
    assert drop["holder"] == "host-b" and drop["acquired_at"] == T0 + 51 and drop["expires_at"] == T0 + 81
    # Releasing hands it over at once; only the holder can release.
    store.release_folder("drop", "host-a")
    assert not store.hold_folder("drop", "host-a", ttl=30, now=T0 + 53)
    other.release_folder("drop", "host-b")
    assert store.hold_folder("drop", "host-a", ttl=30, now=T0 + 54)


def test_the_store_describes_itself_for_the_status_view(store):
    described = store.describe()
    assert described["backend"] in ("sqlite", "postgresql") and described["location"]
    assert isinstance(described["schema"], int) and described["schema"] >= 3


def test_throughput_buckets_succeeded_jobs_and_bytes(store, make_spec):
    import dataclasses as dc

    for i, (finish, ok) in enumerate([(T0 + 10, True), (T0 + 20, True), (T0 + 3700, True), (T0 + 30, False)]):
        job, _ = store.enqueue(dc.replace(make_spec(), idempotency_key=f"tp{i}"), now=T0)
        store.claim("w", now=T0)
        store.report_progress(job.id, "w", Progress("copy", 100 * (i + 1), 1000, 0, 2), now=T0)
        if ok:
            store.succeed(job.id, "w", {}, now=finish)
        else:
            store.fail(job.id, "w", PermanentImportError("bad"), now=finish)
    buckets = store.throughput(since=T0, bucket=3600, now=T0 + 3 * 3600)
    assert [b["start"] for b in buckets] == [T0, T0 + 3600, T0 + 7200, T0 + 10800]
    assert [(b["jobs"], b["bytes"]) for b in buckets] == [(2, 300), (1, 300), (0, 0), (0, 0)]
    assert store.throughput(since=T0 + 4000, bucket=600, now=T0 + 4000)[0]["jobs"] == 0
    assert sum(b["jobs"] for b in store.throughput(since=T0, bucket=3600, now=T0 + 3 * 3600, owners=["jdoe"])) == 3
    assert sum(b["jobs"] for b in store.throughput(since=T0, bucket=3600, now=T0 + 3 * 3600, owners=["al"])) == 0


def test_throughput_counts_duplicates_apart_from_acquisitions_imported(store, make_spec):
    """Issue 15 outside test, finding 12: a duplicate ("already imported as job N") imported nothing."""
    import dataclasses as dc

    for i, result in enumerate([{"files": ["a.tif"]}, {"duplicate_of": 1, "files": [], "bytes": 0}, None]):
        job, _ = store.enqueue(dc.replace(make_spec(), idempotency_key=f"dup{i}"), now=T0)
        store.claim("w", now=T0)
        store.report_progress(job.id, "w", Progress("copy", 500, 500, 1, 1), now=T0)
        store.succeed(job.id, "w", result or {}, now=T0 + 10)
    (bucket,) = store.throughput(since=T0, bucket=3600, now=T0 + 60)
    assert (bucket["jobs"], bucket["duplicates"], bucket["bytes"]) == (2, 1, 1000)


def test_outbox_hold_gives_claimed_mails_back_without_counting_the_attempt(store, make_spec):
    job, _ = store.enqueue(make_spec(), now=T0)
    store.outbox_add(mail_for(job), now=T0)
    store.outbox_add(mail_for(job), now=T0)
    first, second = store.outbox_claim(now=T0)
    assert store.outbox_hold([first.id, 999_999], until=T0 + 600, now=T0) == 1
    (held,) = [m for m in store.outbox_list() if m.id == first.id]
    assert (held.state, held.next_attempt_at, held.attempts) == ("pending", T0 + 600, 0)
    assert store.outbox_claim(now=T0 + 599) == []
    assert [m.id for m in store.outbox_claim(now=T0 + 600)] == [first.id]
    assert store.outbox_hold([second.id], until=T0, now=T0) == 1
    store.outbox_sent(second.id, now=T0)
    assert store.outbox_hold([second.id], until=T0 + 1, now=T0) == 0  # only claimed mails


def test_outbox_digest_marks_the_folded_mails_digested_with_its_id(store, make_spec):
    """Issue 15 outside test, finding 6: folded admin mails are not 'sent'; only the digest goes out."""
    job, _ = store.enqueue(make_spec(), now=T0)
    store.outbox_add(mail_for(job), now=T0)
    store.outbox_add(mail_for(job), now=T0)
    first, second = store.outbox_claim(now=T0)
    (digest_mail, *_) = mail_for(job)
    digest_id = store.outbox_digest(digest_mail, [first.id, second.id], now=T0 + 1)
    mails = {m.id: m for m in store.outbox_list()}
    assert {(mails[i].state, mails[i].digest_id, mails[i].sent_at) for i in (first.id, second.id)} == \
        {("digested", digest_id, None)}
    assert (mails[digest_id].state, mails[digest_id].digest_id) == ("pending", None)
    assert store.outbox_counts()["digested"] == 2
    assert [m.id for m in store.outbox_claim(now=T0 + 1)] == [digest_id]  # the folded ones never go out
    assert [m.id for m in store.outbox_list(state="digested", before=second.id)] == [first.id]
    assert [m.id for m in store.outbox_list(limit=2, before=digest_id)] == [second.id, first.id]


def test_outbox_counts_and_list_limited_to_owners_cover_their_jobs_mails_only(store, make_spec):
    """Issue 15 outside test, finding 11: the status view of an owner-limited token."""
    mine, _ = store.enqueue(make_spec(owner="alice"), now=T0)
    theirs, _ = store.enqueue(dataclasses.replace(make_spec(owner="bob"), idempotency_key="bob"), now=T0)
    store.outbox_add(mail_for(mine), job_id=mine.id, now=T0)
    store.outbox_add(mail_for(theirs), job_id=theirs.id, now=T0)
    store.outbox_add(mail_for(theirs), now=T0)  # no job (an admin digest)
    assert sum(store.outbox_counts().values()) == 3
    assert sum(store.outbox_counts(owners=["alice"]).values()) == 1
    assert sum(store.outbox_counts(owners=[]).values()) == 0
    assert [m.job_id for m in store.outbox_list(owners=["alice", "carol"])] == [mine.id]
    assert [m.job_id for m in store.outbox_list(owners=["bob"], state="pending")] == [theirs.id]
