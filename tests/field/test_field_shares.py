"""Cases 9 and 12: a share whose clock lags; a file the service may not read."""

from __future__ import annotations

import os
import time

import pytest
from drops import can_read_unreadable, manifest, run_without_dac_override
from helpers import wait_until


def set_server_time(paths, when):
    for p in paths:
        os.utime(p, (when, when), follow_symlinks=False)


def test_polling_sees_a_rename_within_the_same_second_on_a_share_whose_clock_lags(field):
    field.start("polling", rescan_interval=3600)
    server_now = int(time.time()) - 30  # the file server's clock is 30 s behind, 1 s resolution
    tmp = field.drop / "acqB.tmp"
    tmp.mkdir()
    set_server_time([tmp, field.drop], server_now)
    field.quiet_for(0.5)  # several polls list the folder as it is now
    manifest(tmp, {"a.tif": b"a" * 100})
    os.rename(tmp, field.drop / "acqB")
    acq = field.drop / "acqB"
    set_server_time([acq / "a.tif", acq / "watchfolder.json", acq, field.drop], server_now)
    [job] = field.settled(1, timeout=10)
    assert job.state.value == "succeeded", job.error


def test_permission_denied_fails_at_once_naming_the_file(field, tmp_path):
    if can_read_unreadable(tmp_path):
        pytest.skip("this process reads files whatever their mode (root with CAP_DAC_OVERRIDE); "
                    "test_permission_denied_without_privileges runs it without")
    field.start("events", quiet_period=0.3)
    folder = field.drop / "acq"
    manifest(folder, {"x.tif": b"x" * 100, "y.tif": b"y" * 100})
    (folder / "x.tif").chmod(0)
    [job] = field.settled(1, timeout=20)
    assert job.state.value == "failed", (job.state, job.error)
    assert job.error.kind.value == "permanent"
    assert job.attempts <= 1  # never retried (rejected at detection, or failed on its first attempt)
    assert "x.tif" in job.error.message and "permission" in job.error.message.lower()
    wait_until(lambda: any("permission" in m.lower() for m in field.mails()), 10, message="the owner's mail")


def test_permission_denied_without_privileges(tmp_path):
    """As root, run the test above in a child without the capabilities that bypass file modes."""
    result = run_without_dac_override(tmp_path, f"{__file__}::test_permission_denied_fails_at_once_naming_the_file",
                                      timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout, result.stdout[-2000:]
