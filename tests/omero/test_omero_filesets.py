"""The child's fileset rule (pure Python: runs without omero-py)."""

from __future__ import annotations

import pytest


def test_given_filesets_then_multi_file_rule_then_one_per_file(child_module):
    files = ["a.tif", "scan.vsi", "_scan_/stack1/f.ets", "_other_/x.ets", "c.ics", "c.ids", "d.hdr", "d.img",
             "m.mhd", "m.raw", "s.mrxs", "s/Slidedat.ini", "s/Data0000.dat", "v.dv", "v.dv.log", "g/1", "g/2"]
    groups = child_module.group_filesets(files, [["g/1", "g/2"]])
    assert groups[0] == ["g/1", "g/2"]
    assert sorted(map(sorted, groups[1:])) == sorted(map(sorted, [
        ["scan.vsi", "_scan_/stack1/f.ets"], ["s.mrxs", "s/Slidedat.ini", "s/Data0000.dat"], ["c.ics", "c.ids"],
        ["d.hdr", "d.img"], ["m.mhd", "m.raw"], ["v.dv", "v.dv.log"], ["a.tif"], ["_other_/x.ets"]]))
    assert sorted(p for g in groups for p in g) == sorted(files)


def test_a_fileset_naming_an_unlisted_file_is_refused(child_module):
    with pytest.raises(child_module.Failure, match="'b.tif', which the acquisition's files do not list"):
        child_module.group_filesets(["a.tif"], [["a.tif", "b.tif"]])
    with pytest.raises(child_module.Failure, match="already in an earlier fileset"):
        child_module.group_filesets(["a.tif"], [["a.tif"], ["a.tif"]])


def test_the_double_answers_exactly_the_childs_queries(child_module):
    from pathlib import Path

    double = (Path(__file__).parent / "double" / "server.py").read_text()
    names = [n for n in vars(child_module) if n.startswith("Q_")]
    for name in names:
        assert f"C.{name}" in double, f"the double does not answer {name}"
    queries = [q for n in names for q in (lambda v: v.values() if isinstance(v, dict) else [v])(getattr(child_module, n))]
    assert sorted(child_module.QUERIES) == sorted(queries)
