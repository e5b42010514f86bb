"""The owner's success mail after a real archive import names where the files went."""

from __future__ import annotations

import email
import email.policy

from watchfolder.importers import create_importer
from watchfolder.job import JobState
from watchfolder.mail.notify import Notifier
from watchfolder.worker import Worker


def test_success_mail_gives_the_archive_path(store, make_config, make_spec, tmp_path):
    config = make_config(importer={"kind": "archive", "archive": {"root": str(tmp_path / "archive")}})
    importer = create_importer(config)
    spec = make_spec({"tile_001.ome.tiff": b"p" * 5000, "tile_002.ome.tiff": b"q" * 3000},
                     name="2026-11-28 slide 3", annotations={"microscope": "LSM 980"})
    job, _ = store.enqueue(spec)
    Worker(store, importer, name="w1").loop()
    job = store.get(job.id)
    assert job.state is JobState.SUCCEEDED, job.error
    destination = job.result["destination"]
    assert destination.startswith(str(tmp_path / "archive"))

    (mail,) = Notifier(config).compose(job)
    message = email.message_from_bytes(mail.as_bytes(), policy=email.policy.default)
    text = message.get_body(("plain",)).get_content()
    (tmp_path / "success-archive.txt").write_text(f"Subject: {message['Subject']}\n\n{text}", encoding="utf-8")
    assert message["Subject"] == "Imported into the archive: 2026-11-28 slide 3"
    assert f"Where:  {destination} (" in text
    assert "2 files, 7.8 KiB" in text and "microscope: LSM 980" in text
