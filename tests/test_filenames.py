"""Names made from a user's name still fit NAME_MAX (watchfolder.filenames)."""

from __future__ import annotations

from pathlib import Path

import pytest

from watchfolder.filenames import NAME_MAX, beside, beside_str, fit_name


def test_a_name_that_fits_is_unchanged():
    assert fit_name("run1", " (2)") == "run1 (2)"
    assert fit_name("x" * 251, " (2)") == "x" * 251 + " (2)"


@pytest.mark.parametrize("length", [240, 253, 255])
def test_a_long_name_is_cut_on_a_character_boundary_tagged_and_always_the_same(length):
    name = ("ü" * 200)[: length // 2] + "x" * (length % 2)
    assert len(name.encode()) == length
    for suffix in (" (2)", " (13)", ".watchfolder-receipt.json", ".watchfolder-error.txt"):
        short = fit_name(name, suffix)
        assert short.endswith(suffix) and len(short.encode()) <= NAME_MAX
        assert short.encode().decode("utf-8") == short  # valid UTF-8: no character split
        assert name.startswith(short[: -len(suffix)].rsplit("~", 1)[0])
        assert fit_name(name, suffix) == short  # deterministic: the watcher finds what followup wrote
    # Two long names that start alike stay apart.
    other = name[:-1] + "y"
    assert fit_name(other, " (2)") != fit_name(name, " (2)")


def test_beside_names_the_marker_in_the_same_folder(tmp_path):
    assert beside(tmp_path / "acq", ".watchfolder-receipt.json") == tmp_path / "acq.watchfolder-receipt.json"
    long = beside(tmp_path / ("a" * 240), ".watchfolder-receipt.json")
    assert long.parent == tmp_path and len(long.name.encode()) == NAME_MAX


@pytest.mark.parametrize("path", ["/data/acq", "/data/acq/", "rel/acq", "/data/é acq", "/data/" + "x" * 300,
                                  "/data/" + "é" * 130])
def test_beside_str_names_the_same_file_as_beside(path):
    for suffix in (".watchfolder-receipt.json", ".watchfolder-error.txt"):
        # The rule as pathlib states it: the name beside, in the same folder, fitted.
        expected = Path(path).with_name(fit_name(Path(path).name, suffix))
        assert beside_str(path, suffix) == str(expected)
        assert beside(path, suffix) == expected
