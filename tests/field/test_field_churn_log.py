"""Outside try of issue 12: folders made and removed again and again under an events watch
(a staging tree churning) must not fill the log with watchdog's warning about its own
callbacks, which printed every watch it holds (kilobytes per folder)."""

from __future__ import annotations

import shutil
import time
import warnings

from drops import manifest


def test_folders_made_again_at_the_same_path_do_not_warn(field):
    field.start("events")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        field.service.stop()
        field.service = None
        field.start("events")  # the filter is set when the event source starts
        for _ in range(40):
            (field.drop / "vanish" / "a" / "b" / "c").mkdir(parents=True, exist_ok=True)
            time.sleep(0.01)
            shutil.rmtree(field.drop / "vanish", ignore_errors=True)
            time.sleep(0.01)
        manifest(field.drop / "acq", {"a.tif": b"a" * 100})
        [job] = field.settled(1)
    assert job.state.value == "succeeded"
    noisy = [str(w.message)[:200] for w in caught if "already exists for watch" in str(w.message)]
    assert noisy == [], noisy
