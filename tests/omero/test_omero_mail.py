"""The owner's success mail after a real import (omero-py over Ice against the double) links each image in OMERO.web."""

from __future__ import annotations

import email
import email.policy

import pytest
from conftest import run_job

from watchfolder.importers import create_importer
from watchfolder.job import JobState, Target
from watchfolder.mail.notify import Notifier

pytestmark = pytest.mark.omero


def test_success_mail_links_each_imported_image_in_omero_web(store, omero_config, make_spec, double, tmp_path):
    config = omero_config(web_url="https://omero.example.org/")
    importer = create_importer(config)
    try:
        # Bio-Formats' synthetic .fake images: the double (and the child, with Java) read them.
        spec = make_spec({"cells_a.fake": b"a" * 3000, "cells_b.fake": b"b" * 4000},
                         target=Target(project="Brain atlas", dataset="slide 3"), importer="omero",
                         name="2026-11-28 slide 3", description="Hippocampus CA1, mouse 7",
                         annotations={"objective": "63x/1.4 oil"})
        job = run_job(store, importer, spec)
    finally:
        importer.close()
    assert job.state is JobState.SUCCEEDED, job.error
    images = job.result["image_ids"]
    assert len(images) == 2 and sorted(images) == sorted(i["id"] for i in double.state()["images"])

    (mail,) = Notifier(config).compose(job)
    raw = mail.as_bytes()
    (tmp_path / "success-omero.eml").write_bytes(raw)
    message = email.message_from_bytes(raw, policy=email.policy.default)
    text = message.get_body(("plain",)).get_content()
    (tmp_path / "success-omero.txt").write_text(f"Subject: {message['Subject']}\n\n{text}", encoding="utf-8")
    assert message["Subject"] == "Imported into OMERO: 2026-11-28 slide 3"
    for image_id in images:
        assert f"image {image_id}: https://omero.example.org/webclient/?show=image-{image_id}" in text
    assert "Description: Hippocampus CA1, mouse 7" in text and "objective: 63x/1.4 oil" in text
    html = message.get_body(("html",)).get_content()
    assert f'<a href="https://omero.example.org/webclient/?show=image-{images[0]}">' in html


def test_owner_mail_goes_to_the_owners_email_from_omero(store, importer, make_spec, double):
    # Outside tester, finding 4: with no email in the job, every owner mail went to the
    # admin ("has no known email address") although OMERO has jdoe's address.
    job = run_job(store, importer, make_spec({"a.fake": b""}, group="lab", email=None))
    assert job.state is JobState.SUCCEEDED, job.error

    (mail,) = Notifier(importer.config).compose(job)
    assert mail.recipients == ("jdoe@example.org",)
    assert job.result["owner_email"] == "jdoe@example.org"
    assert "no known email address" not in mail.message.get_body(("plain",)).get_content()


def test_the_last_attempts_failure_promises_no_retry(store, omero_config, make_spec, double):
    # Outside tester, low (a): a stalled import said "will try again" in the job's error, its
    # log and the owner's mail, on the last attempt too. The words now come from the state.
    from pathlib import Path

    double.faults(slow=5)  # logins take 5 s, the child says nothing meanwhile: a stall
    importer = create_importer(omero_config(idle_timeout=1))
    spec = make_spec({"a.fake": b""}, group="lab")
    try:
        for now in (1000.0, 1100.0, 1200.0):  # the store's policy: 3 attempts, 10 s then 60 s apart
            job = run_job(store, importer, spec, now=now)
    finally:
        importer.close()

    assert job.state is JobState.FAILED and job.attempts == 3 and job.error.kind == "transient", job.error
    assert "stalled" in job.error.message
    log = Path(job.log_path).read_text()
    assert log.count("tried again at") == 2 and "(attempt 3 of 3)" in log
    assert log.rstrip().endswith("not tried again: that was the last of 3 attempt(s); the job has failed")
    owner_mail = next(m for m in Notifier(importer.config).compose(job) if m.kind == "job_failed")
    text = owner_mail.message.get_body(("plain",)).get_content()
    for words in ("will try again", "retried automatically", "tried again at"):
        assert words not in job.error.message and words not in text
    assert "failed 3 times" in text
