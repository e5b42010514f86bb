"""Mail content: each mail kind composed from real jobs, sent to a real SMTP server, parsed back.

Also the templates (override, refusal of bad ones) and, end to end, the outbox:
a store finishing jobs, the sender delivering through SMTP while the server
goes down and comes back.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from mailserver import EphemeralController, Received, Recorder

from watchfolder import config as wconfig
from watchfolder.config import SmtpConfig
from watchfolder.errors import ConfigError, PermanentImportError
from watchfolder.job import (
    ErrorKind,
    FileEntry,
    HistoryEntry,
    Job,
    JobError,
    JobSpec,
    JobState,
    RetryPolicy,
    Target,
)
from watchfolder.mail.message import Mail
from watchfolder.mail.notify import LOG_TAIL_LINES, MAX_LISTED, Notifier
from watchfolder.mail.transports import SmtpTransport

T0 = 1_795_000_000.0  # a fixed clock: 2026-11-18
ADMIN = "admin@facility.example.org"
SENDER = "imports@facility.example.org"


def make_config(tmp_path: Path, *, notify: dict | None = None, importer: dict | None = None, server=None):
    raw = {
        "data_dir": str(tmp_path / "data"),
        "notify": {"from": SENDER, "admin_email": ADMIN, "contact": "imaging@facility.example.org", **(notify or {})},
        "importer": importer or {"kind": "archive"},
        "server": server or {},
    }
    for key in [k for k, v in raw["notify"].items() if v is None]:
        del raw["notify"][key]
    return wconfig.parse(raw, path=tmp_path / "watchfolder.yaml", environ={})


def omero_config(tmp_path: Path, **notify):
    return make_config(
        tmp_path,
        notify=notify,
        importer={"kind": "omero", "omero": {"admin_password": "x", "web_url": "https://omero.example.org/"}},
    )


def make_job(
    state: JobState = JobState.SUCCEEDED,
    *,
    owner: str = "jdoe",
    email: str | None = "jdoe@example.org",
    name: str | None = None,
    files: tuple[FileEntry, ...] = (FileEntry("slide3/tile_001.ome.tiff", 1_048_576), FileEntry("slide3/tile_002.ome.tiff", 2048)),
    target: Target = Target(project="Brain atlas", dataset="2026-11-28 slide 3"),
    source: str = "watch:lsm980",
    result: dict | None = None,
    error: JobError | None = None,
    attempts: int = 1,
    log_path: str | None = None,
    job_id: int = 42,
    history: list[HistoryEntry] | None = None,
) -> Job:
    spec = JobSpec(
        owner=owner, root=f"/drop/{owner}/acq-7", files=files, target=target, source=source,
        group="smith-lab", email=email, name=name,
    )
    return Job(
        id=job_id, spec=spec, idempotency_key=spec.key(), state=state, attempts=attempts, max_attempts=5,
        created_at=T0, updated_at=T0 + 200, started_at=T0 + 75 if attempts else None, finished_at=T0 + 200,
        result=result, error=error, log_path=log_path, history=history or [],
    )


OMERO_RESULT = {"image_ids": [101, 102, 103], "fileset_ids": [7], "dataset_id": 55}


@pytest.fixture
def smtp():
    """A real SMTP server and a transport to it; ``deliver(mails)`` returns what the server received."""
    recorder = Recorder()
    controller = EphemeralController(recorder)
    controller.start()
    transport = SmtpTransport(SmtpConfig(host="127.0.0.1", port=controller.port, timeout=10.0))

    def deliver(mails: list[Mail]) -> list[Received]:
        before = len(recorder.received)
        for mail in mails:
            transport.send(mail.as_bytes(), SENDER, mail.recipients)
        return recorder.wait_for(before + len(mails))[before:]

    yield deliver
    transport.close()
    controller.stop()


# ------------------------------------------------------------------ success


def test_success_in_omero_lists_images_with_links(tmp_path, smtp):
    notifier = Notifier(omero_config(tmp_path))
    mails = notifier.compose(make_job(result=OMERO_RESULT))
    assert [m.kind for m in mails] == ["job_succeeded"]
    (got,) = smtp(mails)
    msg = got.message
    assert got.rcpt_tos == ["jdoe@example.org"]
    assert msg["To"] == "jdoe@example.org"
    assert msg["Subject"] == "Imported into OMERO: acq-7"
    assert msg["From"].addresses[0].addr_spec == SENDER
    assert msg["Auto-Submitted"] == "auto-generated"
    text = got.text()
    assert "2 files, 1.0 MiB, 3 images" in text
    assert 'project "Brain atlas" / dataset "2026-11-28 slide 3" in OMERO' in text
    assert "https://omero.example.org/webclient/?show=dataset-55" in text
    for image_id in (101, 102, 103):
        assert f"image {image_id}: https://omero.example.org/webclient/?show=image-{image_id}" in text
    assert "slide3/tile_001.ome.tiff (1.0 MiB)" in text and "slide3/tile_002.ome.tiff (2.0 KiB)" in text
    assert "the import took 2 min 5 s" in text and "(3 min 20 s after the acquisition was detected)" in text
    assert "Job 42" in text
    html = got.html()
    assert '<a href="https://omero.example.org/webclient/?show=image-102">image 102</a>' in html
    assert '<a href="https://omero.example.org/webclient/?show=dataset-55">' in html
    assert "&quot;Brain atlas&quot;" in html


def test_success_without_web_url_names_images_without_links(tmp_path, smtp):
    config = make_config(tmp_path, importer={"kind": "omero", "omero": {"admin_password": "x"}})
    (got,) = smtp(Notifier(config).compose(make_job(result={"image_ids": [5], "fileset_ids": [1]})))
    text = got.text()
    assert "  image 5\n" in text and "webclient" not in text and "webclient" not in got.html()
    assert "1 image" in text


def test_success_in_archive_names_the_destination(tmp_path, smtp):
    result = {
        "destination": "/archive/jdoe/Brain atlas/2026-11-28 slide 3",
        "files": [{"path": "slide3/tile_001.ome.tiff", "dest": "/archive/x/tile_001.ome.tiff", "size": 1_048_576,
                   "sha256": "ab" * 32}],
        "bytes": 1_050_624,
    }
    (got,) = smtp(Notifier(make_config(tmp_path)).compose(make_job(result=result)))
    assert got.message["Subject"] == "Imported into the archive: acq-7"
    text = got.text()
    assert "Where:  /archive/jdoe/Brain atlas/2026-11-28 slide 3" in text
    assert "image" not in text.lower().replace("watchfolder", "")  # no image count for an archive
    assert "2 files, 1.0 MiB" in text
    assert "<code>/archive/jdoe/Brain atlas/2026-11-28 slide 3</code>" in got.html()


def test_long_file_and_image_lists_are_cut(tmp_path):
    files = tuple(FileEntry(f"f{i:03}.tif", 10) for i in range(MAX_LISTED + 5))
    result = {"image_ids": list(range(1, MAX_LISTED + 8)), "fileset_ids": [1]}
    (mail,) = Notifier(omero_config(tmp_path)).compose(make_job(files=files, result=result))
    text = mail.message.get_body(("plain",)).get_content()
    assert "f019.tif" in text and "f020.tif" not in text and "… and 5 more" in text
    assert "… and 7 more" in text


# ------------------------------------------------------------------ failure


def test_failure_mails_owner_and_admin_with_log_tail(tmp_path, smtp):
    log_file = tmp_path / "42.log"
    log_file.write_text("".join(f"line {i}: converting tile\n" for i in range(1, 81)), encoding="utf-8")
    error = JobError(ErrorKind.PERMANENT, "tile_001.ome.tiff: unsupported pixel type 'bit'")
    job = make_job(JobState.FAILED, error=error, log_path=str(log_file), result=None)
    mails = Notifier(make_config(tmp_path)).compose(job)
    assert [(m.kind, m.recipients) for m in mails] == [
        ("job_failed", ("jdoe@example.org",)),
        ("admin_failure", (ADMIN,)),
    ]
    owner, admin = smtp(mails)

    assert owner.message["Subject"] == "Not imported: acq-7 (job 42)"
    text = owner.text()
    assert "Why:    tile_001.ome.tiff: unsupported pixel type 'bit'" in text
    assert "importing the same files again would fail the same way" in text
    assert "Contact imaging@facility.example.org and mention job 42" in text
    assert "/drop/jdoe/acq-7" in text
    assert "unsupported pixel type &#x27;bit&#x27;" in owner.html()
    assert owner.message["Reply-To"] == "imaging@facility.example.org"

    # strip(): CPython folds a 70-77 character subject onto its own continuation line,
    # which unfolds with a leading space (valid RFC 5322; clients trim it).
    subject = admin.message["Subject"].strip()
    assert subject == "[watchfolder] Job 42 failed: tile_001.ome.tiff: unsupported pixel type 'bit'"
    atext = admin.text()
    assert "mail sent to: jdoe@example.org" in atext
    first_kept = 80 - LOG_TAIL_LINES + 1
    assert f"line {first_kept}: converting" in atext and "line 80: converting" in atext
    assert f"line {first_kept - 1}: converting" not in atext
    assert f"line {first_kept}: converting" in admin.html() and "<pre" in admin.html()


def test_admin_mail_says_when_the_log_is_missing(tmp_path):
    job = make_job(JobState.FAILED, error=JobError(ErrorKind.PERMANENT, "boom"), log_path=str(tmp_path / "none.log"))
    admin = [m for m in Notifier(make_config(tmp_path)).compose(job) if m.kind == "admin_failure"][0]
    text = admin.message.get_body(("plain",)).get_content()
    assert f"(no log file: {tmp_path / 'none.log'} does not exist)" in text


@pytest.mark.parametrize(
    "error, attempts, source, advice",
    [
        (JobError(ErrorKind.PERMANENT, "manifest: files[0].size: must be an integer"), 0, "watch:lsm980",
         "the acquisition was not accepted"),
        (JobError(ErrorKind.PERMANENT, "target: unknown key 'datset'"), 0, "api:portal",
         "correct the request as the reason says and submit it again"),
        (JobError(ErrorKind.PERMANENT, "OMERO refused the admin login", config_error=True), 1, "watch:lsm980",
         "nothing is wrong with your data"),
        (JobError(ErrorKind.TRANSIENT, "gave up after 5 attempts: connection refused"), 5, "watch:lsm980",
         "failed 5 times for a reason that is usually temporary"),
    ],
    ids=["rejected-at-detection", "api", "config-error", "transient-exhausted"],
)
def test_failure_advice_fits_the_cause(tmp_path, error, attempts, source, advice):
    job = make_job(JobState.FAILED, error=error, attempts=attempts, source=source)
    owner = Notifier(make_config(tmp_path)).compose(job)[0]
    text = owner.message.get_body(("plain",)).get_content()
    assert error.message in text
    assert advice in " ".join(text.split())


def test_the_admin_mail_of_a_job_that_ran_out_of_attempts_does_not_call_it_permanent(tmp_path):
    # Follow-up E: "failed permanently" beside "(transient)" contradicted itself; the job's
    # state (failed) is what says it is not tried again.
    job = make_job(JobState.FAILED, error=JobError(ErrorKind.TRANSIENT, "gave up after 5 attempts: timeout"),
                   attempts=5)
    admin = Notifier(make_config(tmp_path)).compose(job)[1]
    text = admin.message.get_body(("plain",)).get_content()
    assert f"Job {job.id} failed; it is not tried again automatically." in text
    assert "permanently" not in text and "(transient)" in text


def test_config_error_is_flagged_for_the_admin(tmp_path):
    job = make_job(JobState.FAILED, error=JobError(ErrorKind.PERMANENT, "bad admin password", config_error=True))
    admin = Notifier(make_config(tmp_path)).compose(job)[1]
    assert "(permanent, caused by the service's configuration)" in admin.message.get_body(("plain",)).get_content()


# ---------------------------------------------------------------- cancelled


def test_cancelled_job_gets_a_short_owner_mail_and_no_admin_mail(tmp_path, smtp):
    history = [HistoryEntry(T0 + 100, JobState.CANCELLED, "cancelled by admin alice")]
    job = make_job(JobState.CANCELLED, history=history)
    mails = Notifier(make_config(tmp_path)).compose(job)
    assert [m.kind for m in mails] == ["job_cancelled"]
    (got,) = smtp(mails)
    assert got.message["Subject"] == "Import cancelled: acq-7 (job 42)"
    text = got.text()
    assert "was cancelled (cancelled by admin alice)." in text
    assert "ask imaging@facility.example.org to retry job 42" in text


def test_unfinished_job_composes_nothing(tmp_path):
    assert Notifier(make_config(tmp_path)).compose(make_job(JobState.RUNNING)) == []


# --------------------------------------------------------------- recipients


@pytest.mark.parametrize(
    "email, result, default_domain, expected, noted",
    [
        ("given@example.org", {"owner_email": "omero@example.org"}, "uni.example", "given@example.org", False),
        (None, {"owner_email": "omero@example.org", "image_ids": []}, "uni.example", "omero@example.org", False),
        (None, None, "uni.example", "jdoe@uni.example", False),
        (None, None, None, ADMIN, True),
    ],
    ids=["job-email", "omero-email", "default-domain", "admin-fallback"],
)
def test_owner_recipient_chain(tmp_path, email, result, default_domain, expected, noted):
    config = make_config(tmp_path, notify={"default_domain": default_domain})
    job = make_job(JobState.SUCCEEDED, email=email, result=result or {"destination": "/a"})
    (mail,) = Notifier(config).compose(job)
    assert mail.recipients == (expected,)
    text = mail.message.get_body(("plain",)).get_content()
    assert ("meant for the owner jdoe, who has no known email address" in text) is noted


def test_non_ascii_owner_is_not_turned_into_an_address(tmp_path):
    config = make_config(tmp_path, notify={"default_domain": "uni.example"})
    (mail,) = Notifier(config).compose(make_job(owner="jörg", email=None, result={"destination": "/a"}))
    assert mail.recipients == (ADMIN,)


def test_job_without_any_resolvable_address(tmp_path, caplog):
    config = make_config(tmp_path, notify={"admin_email": None})
    notifier = Notifier(config)
    with caplog.at_level(logging.WARNING, logger="watchfolder.mail.notify"):
        assert notifier.compose(make_job(email=None, result={"destination": "/a"})) == []
        failed = make_job(JobState.FAILED, email=None, error=JobError(ErrorKind.PERMANENT, "x"))
        assert notifier.compose(failed) == []
    assert "job 42: owner 'jdoe' has no email address and notify.admin_email is not set" in caplog.text


def test_admin_fallback_also_gets_the_admin_failure_mail(tmp_path, smtp):
    job = make_job(JobState.FAILED, email=None, error=JobError(ErrorKind.PERMANENT, "unknown user jdoe"))
    owner, admin = smtp(Notifier(make_config(tmp_path)).compose(job))
    assert owner.rcpt_tos == [ADMIN] and "who has no known email address" in owner.text()
    assert "who has no known email address" in owner.html()
    assert "mail sent to: admin@facility.example.org" in admin.text()


# ------------------------------------------------------------------ headers


def test_message_id_and_date_are_fixed_at_composition(tmp_path):
    notifier = Notifier(make_config(tmp_path))
    job = make_job(result={"destination": "/a"})
    first, again = notifier.compose(job)[0], notifier.compose(job)[0]
    assert first.message["Message-ID"] == again.message["Message-ID"]
    assert first.message["Message-ID"].endswith("@facility.example.org>")
    assert first.message["Date"].datetime.timestamp() == T0 + 200
    other = notifier.compose(make_job(result={"destination": "/a"}, job_id=43))[0]
    assert other.message["Message-ID"] != first.message["Message-ID"]
    assert first.message["X-Watchfolder-Job"] == "42"


def test_unicode_names_and_subjects(tmp_path, smtp):
    job = make_job(
        owner="jörg",
        email="joerg@example.org",
        name="Schnitt 3 – Gehirn ü 東京",
        files=(FileEntry("größe/ß.czi", 3000),),
        target=Target(project="Atlas Ω", dataset="Çà & <b>"),
        result=OMERO_RESULT,
    )
    (got,) = smtp(Notifier(omero_config(tmp_path)).compose(job))
    header_block = got.raw.split(b"\r\n\r\n", 1)[0]
    assert header_block.isascii()  # headers travel RFC 2047-encoded
    assert got.message["Subject"] == "Imported into OMERO: Schnitt 3 – Gehirn ü 東京"
    text = got.text()
    assert "Hello jörg," in text and "größe/ß.czi (2.9 KiB)" in text
    assert 'project "Atlas Ω" / dataset "Çà & <b>"' in text
    html = got.html()
    assert "Çà &amp; &lt;b&gt;" in html and "<b>Schnitt 3 – Gehirn ü 東京</b>" in html


def test_each_mail_has_its_own_boundary_and_parses_back_whole(tmp_path):
    """The composer sets the multipart boundary itself (the generator's own costs a regular
    expression per mail): each mail gets a fresh one, absent from its parts, and a parser finds
    exactly the text and HTML parts; headers of one mail never leak into the next (the header
    classes are shared, the headers are not)."""
    import email
    import email.policy

    notifier = Notifier(make_config(tmp_path))
    first = notifier.compose(make_job(result={"destination": "/a"}))[0]
    second = notifier.compose(make_job(result={"destination": "/b"}, job_id=43, owner="asmith"))[0]
    boundaries = set()
    for mail, job_id in ((first, "42"), (second, "43")):
        raw = mail.as_bytes()
        boundary = mail.message.get_boundary()
        boundaries.add(boundary)
        assert raw.count(b"--" + boundary.encode() + b"\r\n") == 2
        assert raw.count(b"--" + boundary.encode() + b"--") == 1
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
        assert parsed["X-Watchfolder-Job"] == job_id
        assert parsed.get_body(("plain",)).get_content().count("Hello") == 1
    assert len(boundaries) == 2
    assert "asmith" in second.message["Subject"] or "asmith" in second.as_bytes().decode()
    assert "asmith" not in first.as_bytes().decode()


def test_newlines_in_values_do_not_break_the_subject(tmp_path):
    job = make_job(JobState.FAILED, error=JobError(ErrorKind.PERMANENT, "line one\nBcc: evil@example.org"))
    admin = Notifier(make_config(tmp_path)).compose(job)[1]
    assert admin.message["Subject"] == "[watchfolder] Job 42 failed: line one Bcc: evil@example.org"
    assert admin.message["Bcc"] is None


# ------------------------------------------------------------------ watcher


def test_watcher_alert(tmp_path, smtp):
    notifier = Notifier(make_config(tmp_path))
    status = {"ok": False, "error": "/mnt/lsm980 is not mounted", "mode": "polling", "path": "/mnt/lsm980"}
    mails = notifier.compose_watcher_alert("lsm980", status, T0, now=T0 + 1500)
    assert [(m.kind, m.recipients) for m in mails] == [("watcher_unhealthy", (ADMIN,))]
    (got,) = smtp(mails)
    assert got.message["Subject"] == '[watchfolder] Watch folder "lsm980" unhealthy for 25 min 0 s'
    text = got.text()
    assert "Problem: /mnt/lsm980 is not mounted" in text
    assert "  mode: polling" in text
    assert "<td>/mnt/lsm980 is not mounted</td>" in got.html()
    again = notifier.compose_watcher_alert("lsm980", status, T0, now=T0 + 1600)[0]
    assert again.message["Message-ID"] == mails[0].message["Message-ID"]  # one episode, one id


def test_watcher_alert_without_admin(tmp_path):
    notifier = Notifier(make_config(tmp_path, notify={"admin_email": None}))
    assert notifier.compose_watcher_alert("w", {"ok": False}, T0, now=T0 + 1) == []


# ---------------------------------------------------------------- templates


def write_templates(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "templates"
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text, encoding="utf-8")
    return folder


def test_override_replaces_one_file_and_keeps_the_others(tmp_path):
    folder = write_templates(
        tmp_path, job_succeeded__txt="Subject: Fertig: $acquisition ($image_count Bilder)\nHallo $owner, $summary.\n"
    )
    config = omero_config(tmp_path, templates_dir=str(folder))
    (mail,) = Notifier(config).compose(make_job(result=OMERO_RESULT))
    assert mail.message["Subject"] == "Fertig: acq-7 (3 Bilder)"
    assert mail.message.get_body(("plain",)).get_content() == "Hallo jdoe, 2 files, 1.0 MiB, 3 images.\n"
    assert "image 101" in mail.message.get_body(("html",)).get_content()  # the default HTML


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("job_failed.txt", "Subject: x\nReason: $reasn\n", ["job_failed.txt", "$reasn", "did you mean $reason"]),
        ("job_failed.html", "<p>$log_tail</p>", ["job_failed.html", "$log_tail"]),
        ("admin_failure.txt", "Subject: costs 5$ per $job_id\n", ["admin_failure.txt", "'$ per $job_id'", "$$"]),
        ("job_succeeded.txt", "Imported $acquisition\n", ["job_succeeded.txt", "first line must be the subject"]),
        ("job_succeded.txt", "Subject: x\n", ["job_succeded.txt", "did you mean job_succeeded.txt"]),
        ("watcher_unhealthy.txt", "Subject: $subject\n", ["watcher_unhealthy.txt", "$subject", "subject line"]),
    ],
    ids=["unknown-variable", "variable-of-another-kind", "bad-dollar", "no-subject", "unknown-file", "subject-loop"],
)
def test_bad_override_fails_at_start_naming_file_and_variable(tmp_path, name, text, words):
    folder = write_templates(tmp_path, **{name.replace(".", "__"): text})
    config = make_config(tmp_path, notify={"templates_dir": str(folder)})
    with pytest.raises(ConfigError) as err:
        Notifier(config)
    for word in words:
        assert word in str(err.value)


def test_other_files_in_the_templates_folder_are_ignored(tmp_path):
    folder = write_templates(tmp_path, README__md="$nothing to see")
    Notifier(make_config(tmp_path, notify={"templates_dir": str(folder)}))


# ------------------------------------------------------------------- outbox


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finish_jobs(store, count: int, now: float) -> list[int]:
    """Run ``count`` jobs through the store to success, the last one to a permanent failure."""
    ids = []
    for i in range(count):
        spec = JobSpec(
            owner=f"user{i}", root=f"/drop/acq{i}", files=(FileEntry("a.tif", 10),),
            target=Target(dataset="d"), source="api:test", email=f"user{i}@example.org",
        )
        job, _ = store.enqueue(spec, now=now)
        claimed = store.claim("w1", now=now)
        assert claimed.id == job.id
        if i < count - 1:
            store.succeed(job.id, "w1", {"destination": f"/archive/acq{i}"}, now=now + 1)
        else:
            store.fail(job.id, "w1", PermanentImportError("unsupported file a.tif"), now=now + 1)
        ids.append(job.id)
    return ids


@pytest.fixture
def outbox_parts(tmp_path):
    outbox = pytest.importorskip("watchfolder.mail.outbox", reason="the outbox sender is not written yet")
    store_mod = pytest.importorskip("watchfolder.store")
    notifier = Notifier(make_config(tmp_path))
    store = store_mod.SQLiteStore(
        tmp_path / "jobs.db", composer=notifier.compose, mail_retry=RetryPolicy(5, (10.0, 60.0)),
        logs_dir=tmp_path / "logs",
    )
    yield outbox, store
    close = getattr(store, "close", None)
    if close:
        close()


def test_smtp_down_then_up_delivers_each_mail_once(outbox_parts):
    outbox, store = outbox_parts
    finish_jobs(store, 3, T0)  # 2 successes + 1 failure (owner + admin) = 4 mails
    assert store.outbox_counts()["pending"] == 4

    port = free_port()  # nothing listens here yet: the server is down
    transport = SmtpTransport(SmtpConfig(host="127.0.0.1", port=port, timeout=10.0))
    sender = outbox.OutboxSender(store, transport)
    assert sender.loop(now=T0 + 2) == 0
    pending = store.outbox_list(state="pending")
    assert len(pending) == 4
    assert all(m.attempts == 1 and f"127.0.0.1:{port}" in m.last_error for m in pending)
    assert sender.loop(now=T0 + 5) == 0  # backing off: not due yet, no attempt
    assert all(m.attempts == 1 for m in store.outbox_list(state="pending"))

    recorder = Recorder()
    controller = EphemeralController(recorder, port=port)
    controller.start()
    try:
        assert sender.loop(now=T0 + 13) == 4
        assert sender.loop(now=T0 + 10_000) == 0
        got = recorder.wait_for(4)
        transport.close()  # QUIT: the server has seen everything the client sent
    finally:
        controller.stop()
    assert len(recorder.received) == 4
    assert len({r.message["Message-ID"] for r in got}) == 4
    assert sorted(r.rcpt_tos[0] for r in got) == sorted(
        ["user0@example.org", "user1@example.org", "user2@example.org", ADMIN]
    )
    assert store.outbox_counts() == {"pending": 0, "sending": 0, "sent": 4, "failed": 0}
    # The stored bytes are what the server got: a resend carries the same Message-ID.
    stored = {m.raw for m in store.outbox_list(state="sent")}
    assert {r.raw for r in got} == stored


def test_outbox_retries_4xx_and_keeps_5xx_as_failed(outbox_parts):
    outbox, store = outbox_parts
    finish_jobs(store, 3, T0)
    recorder = Recorder()
    recorder.rcpt_replies["user0@example.org"] = "450 4.2.1 Mailbox busy"
    recorder.rcpt_replies["user1@example.org"] = "550 5.1.1 No such user"
    controller = EphemeralController(recorder)
    controller.start()
    transport = SmtpTransport(SmtpConfig(host="127.0.0.1", port=controller.port, timeout=10.0))
    sender = outbox.OutboxSender(store, transport)
    try:
        assert sender.loop(now=T0 + 2) == 2  # user2's failure mail and the admin's
        (failed,) = store.outbox_list(state="failed")
        assert failed.recipients == ("user1@example.org",) and "550 5.1.1 No such user" in failed.last_error
        (waiting,) = store.outbox_list(state="pending")
        assert waiting.recipients == ("user0@example.org",) and "450 4.2.1 Mailbox busy" in waiting.last_error

        del recorder.rcpt_replies["user0@example.org"]
        assert sender.loop(now=T0 + 13) == 1
        assert recorder.wait_for(3)[-1].rcpt_tos == ["user0@example.org"]
        assert store.outbox_counts() == {"pending": 0, "sending": 0, "sent": 3, "failed": 1}
    finally:
        transport.close()
        controller.stop()


def test_reject_mails_the_owner_and_the_admin_through_the_store(outbox_parts):
    _, store = outbox_parts
    spec = JobSpec(owner="jdoe", root="/drop/jdoe/x", files=(), target=Target(dataset="d"), source="watch:w",
                   email="jdoe@example.org")
    store.reject(spec, "watchfolder.json: invalid JSON at line 3", now=T0)
    mails = {m.kind: m for m in store.outbox_list()}
    assert set(mails) == {"job_failed", "admin_failure"}
    assert mails["job_failed"].subject == "Not imported: x (job 1)"
    assert b"invalid JSON at line 3" in mails["admin_failure"].raw



def test_odd_results_still_compose(tmp_path):
    """compose runs inside the finishing transaction: a strange result must not break it."""
    result = {"image_ids": "abc", "bytes": "x", "files": "zz", "dataset_id": "7", "owner_email": 5}
    (mail,) = Notifier(omero_config(tmp_path)).compose(make_job(result=result))
    text = mail.message.get_body(("plain",)).get_content()
    assert "0 images" in text and "2 files, 1.0 MiB" in text


def test_override_with_byte_order_mark_and_crlf(tmp_path):
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "job_cancelled.txt").write_bytes("\ufeffSubject: Abgebrochen: $acquisition\r\nJob $job_id\r\n".encode())
    (mail,) = Notifier(make_config(tmp_path, notify={"templates_dir": str(folder)})).compose(
        make_job(JobState.CANCELLED)
    )
    assert mail.message["Subject"] == "Abgebrochen: acq-7"
    assert "Job 42" in mail.message.get_body(("plain",)).get_content()


# ------------------------------------------------------------- what the owner recognises (issue 15)


def _described(job: Job) -> Job:
    import dataclasses

    spec = dataclasses.replace(job.spec, description="Hippocampus CA1, mouse 7, GFP", annotations={
        "objective": "63x/1.4 oil", "microscope": "LSM 980"})
    return dataclasses.replace(job, spec=spec)


def test_success_and_failure_mails_repeat_description_and_annotations(tmp_path, smtp):
    notifier = Notifier(omero_config(tmp_path))
    failed = make_job(JobState.FAILED, error=JobError(ErrorKind.PERMANENT, "slide3/tile_001.ome.tiff: no reader "
                                                      "accepts this file; export it as OME-TIFF"))
    succeeded, owner_failed, _admin = smtp(notifier.compose(_described(make_job(result=OMERO_RESULT)))
                                           + notifier.compose(_described(failed)))
    for got in (succeeded, owner_failed):
        text = got.text()
        assert "Description: Hippocampus CA1, mouse 7, GFP\n" in text
        assert "Annotations:\n  microscope: LSM 980\n  objective: 63x/1.4 oil\n" in text
        assert "<b>objective</b>: 63x/1.4 oil" in got.html()
    assert "https://omero.example.org/webclient/?show=image-101" in succeeded.text()
    text = owner_failed.text()
    assert "Why:    slide3/tile_001.ome.tiff: no reader accepts this file; export it as OME-TIFF" in text
    assert "Traceback" not in text
    # Without description or annotations the mail has no empty headings.
    (plain,) = smtp(notifier.compose(make_job(result=OMERO_RESULT)))
    assert "Description:" not in plain.text() and "Annotations:" not in plain.text()


@pytest.mark.parametrize("name", [
    "2026-11-28 Überblick über die Aufnahme des Hippocampus, Region CA1, Maus 7, Objektiv 63x/1.4 Öl",
    "Imaging run — très longue acquisition nommée par le logiciel du microscope sans espace" + "x" * 60,
    "显微镜采集 2026-11-28 海马体 CA1 区域 小鼠 7 号 物镜 63 倍 油浸 非常长的名字需要折行",
    "plain ascii acquisition name that is long enough to be folded over more than one header line",
])
@pytest.mark.parametrize("email_address", ["jdoe@example.org", "jörg@example.org"])
def test_long_subjects_fold_without_doubled_spaces(tmp_path, smtp, name, email_address):
    import email
    import email.policy
    from email.header import decode_header, make_header

    notifier = Notifier(make_config(tmp_path))
    (got,) = smtp(notifier.compose(make_job(name=name, email=email_address, result={"destination": "/a"})))
    expected = f"Imported into the archive: {name}"
    assert got.message["Subject"] == expected
    if email_address.isascii():  # (compat32 cannot read the raw UTF-8 headers of an SMTPUTF8 mail at all)
        legacy = email.message_from_bytes(got.raw)  # how older clients (compat32) read it
        assert str(make_header(decode_header(legacy["Subject"]))) == expected
    header_block = got.raw.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 998 for line in header_block.split(b"\r\n"))


def test_the_admin_digest_groups_alike_reasons_as_the_dashboard_and_escapes_names(tmp_path):
    """Finding 10: reasons naming other files are one digest line; a newline in a name stays in its line."""
    digest = Notifier(make_config(tmp_path)).compose_admin_digest([
        (1, "scan_1.xyz: no reader accepts this file"),
        (2, "scan_22.xyz: no reader accepts this file"),
        (3, "acq\nforged line.czi: no reader accepts this file"),
        (4, "unknown owner 'x'"),
    ], now=1_795_000_000.0)
    text = digest.message.get_body(("plain",)).get_content()
    assert "2 x scan_1.xyz: no reader accepts this file (and alike)\n    jobs 1, 2\n" in text
    assert "1 x acq\\nforged line.czi: no reader accepts this file\n    jobs 3\n" in text
    assert "1 x unknown owner 'x'\n    jobs 4\n" in text
    assert not any(line.startswith("forged") for line in text.splitlines())
