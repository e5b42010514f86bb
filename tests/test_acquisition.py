"""The acquisition contract: descriptors and from_path, with odd inputs."""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path

import pytest
from helpers import TARGET, write_manifest

from watchfolder.errors import AcquisitionError
from watchfolder.job import FileEntry, Target
from watchfolder.watch.acquisition import (
    NotADescriptor,
    check_listed,
    from_path,
    is_descriptor,
    is_excluded,
    locate,
    read_descriptor,
    walk_files,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "acquisitions"


def write_json(path: Path, data, *, bom: bool = False) -> Path:
    raw = json.dumps(data, ensure_ascii=False).encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + raw)
    return path


# ---------------------------------------------------------------------------
# is_descriptor / read_descriptor


@pytest.mark.parametrize(
    "obj, expected",
    [
        ({"owner": "jdoe"}, True),
        ({"files": []}, True),
        ({"target": {"dataset": "d"}, "Exposure": 3}, True),
        ({"Exposure": 3, "Objective": "63x"}, False),
        ({}, False),
        ([{"owner": "jdoe"}], False),
        ("owner", False),
        (None, False),
    ],
)
def test_is_descriptor(obj, expected):
    assert is_descriptor(obj) is expected


def test_read_full_descriptor(tmp_path):
    path = write_json(
        tmp_path / "m.json",
        {
            "owner": "jdoe",
            "group": "smith-lab",
            "email": "jdoe@example.org",
            "target": TARGET,
            "name": "slide 3",
            "description": "two\nlines",
            "annotations": {"microscope": "LSM 980", "magnification": 63},
            "files": [{"path": "a/b.tif", "size": 10, "sha256": "AB" * 32}, "c.tif"],
            "filesets": [["a/b.tif", "c.tif"]],
        },
    )
    d = read_descriptor(path)
    assert d.owner == "jdoe" and d.group == "smith-lab" and d.email == "jdoe@example.org"
    assert d.target == Target(project="Brain atlas", dataset="2026-11-28 slide 3")
    assert d.annotations == {"microscope": "LSM 980", "magnification": "63"}
    assert [f.path for f in d.files] == ["a/b.tif", "c.tif"]
    assert d.files[0].sha256 == "ab" * 32  # normalised to lower case
    assert d.files[1].size is None
    assert d.filesets == (("a/b.tif", "c.tif"),)
    assert d.warnings == ()
    assert d.raw_bytes_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_bom_is_accepted(tmp_path):
    path = write_json(tmp_path / "m.json", {"owner": "jdoe", "target": {"dataset": "d"}}, bom=True)
    d = read_descriptor(path)
    assert d.owner == "jdoe"
    # The hash covers the exact bytes, BOM included: a re-save without BOM is a new drop.
    assert d.raw_bytes_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "m.json"
    # The comma after "jdoe" is missing: the parser stops at the next key.
    path.write_text('{\n  "owner": "jdoe"\n  "target": {"dataset": "d"}\n}\n', encoding="utf-8")
    with pytest.raises(AcquisitionError) as err:
        read_descriptor(path)
    message = str(err.value)
    assert "invalid JSON at line 3, column 3: Expecting ',' delimiter" in message
    assert str(path) in message and "fix the file" in message


def test_invalid_json_with_bom_counts_lines_after_bom(tmp_path):
    path = tmp_path / "m.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"owner": "jdoe",,}')
    with pytest.raises(AcquisitionError, match=r"line 1, column 18"):
        read_descriptor(path)


def test_not_utf8_is_reported_with_position(tmp_path):
    path = tmp_path / "m.json"
    path.write_bytes(b'{"owner": "j\xe9r\xf4me"}')
    with pytest.raises(AcquisitionError, match=r"not UTF-8 .*line 1, column 13.*save the file as UTF-8"):
        read_descriptor(path)


def test_json_without_contract_keys_is_data(tmp_path):
    path = write_json(tmp_path / "cells.czi.json", {"Exposure": 12, "Laser": "488"})
    with pytest.raises(NotADescriptor, match="treated as data"):
        read_descriptor(path)
    # A JSON array is instrument data as well.
    write_json(path, [1, 2, 3])
    with pytest.raises(NotADescriptor):
        read_descriptor(path)


def test_unknown_fields_and_duplicate_keys_become_warnings(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(
        '{"owner": "x", "owner": "jdoe", "target": {"dataset": "d"}, "ownr": 1, "instrument": "A",'
        ' "files": [{"path": "a", "md5": "0"}]}',
        encoding="utf-8",
    )
    d = read_descriptor(path)
    assert d.owner == "jdoe"
    text = "\n".join(d.warnings)
    assert "duplicate key 'owner'" in text
    assert "unknown field 'ownr' ignored; did you mean 'owner'?" in text
    assert "unknown field 'instrument' ignored" in text
    assert "files[0]: unknown field 'md5'" in text


@pytest.mark.parametrize(
    "body, message",
    [
        ({"owner": "j doe"}, "owner: must be a user or group name"),
        ({"owner": 5}, "owner: must be a string"),
        ({"group": "a/b"}, "group: must be a user or group name"),
        ({"email": "not-an-address"}, "email: must be an address"),
        ({"target": {"project": "P"}}, "target: keys \\['project'\\] do not form a target"),
        ({"target": {"dataset_id": -1}}, "target.dataset_id: must be a positive integer"),
        ({"target": "P/D"}, "target: must be an object"),
        ({"name": "a\nb"}, "name: must be one line"),
        ({"annotations": ["a"]}, "annotations: must be an object"),
        ({"annotations": {"a": {"b": 1}}}, "annotations.a: must be a string"),
        ({"annotations": {"a": True}}, "annotations.a: must be a string"),
        ({"files": "a.tif"}, "files: must be a list"),
        ({"files": []}, "files: the list is empty"),
        ({"files": [{"path": "/etc/passwd"}]}, "files\\[0\\].path: '/etc/passwd' is absolute"),
        ({"files": [{"path": "C:\\data\\a.tif"}]}, "is absolute"),
        ({"files": [{"path": "../outside.tif"}]}, "contains '..'"),
        ({"files": [{"path": "a/../../b"}]}, "contains '..'"),
        ({"files": [{"path": ""}]}, "must be a relative path"),
        ({"files": [{"path": "a", "size": -1}]}, "files\\[0\\].size: must be a whole number"),
        ({"files": [{"path": "a", "size": 1.5}]}, "files\\[0\\].size"),
        ({"files": [{"path": "a", "size": True}]}, "files\\[0\\].size"),
        ({"files": [{"path": "a", "sha256": "abc"}]}, "sha256: must be 64 hexadecimal digits"),
        ({"files": ["a", "./a"]}, "'a' is listed twice"),
        ({"files": ["a"], "filesets": [["b"]]}, "filesets\\[0\\]\\[0\\]: 'b' is not in files"),
        ({"files": ["a", "b"], "filesets": [["a"], ["a", "b"]]}, "already in filesets\\[0\\]"),
        ({"files": ["a"], "filesets": [[]]}, "filesets\\[0\\]: is empty"),
        ({"filesets": "a"}, "filesets: must be a list of lists"),
    ],
)
def test_invalid_fields_are_named(tmp_path, body, message):
    path = write_json(tmp_path / "m.json", body)
    with pytest.raises(AcquisitionError, match=message) as err:
        read_descriptor(path)
    assert str(path) in str(err.value)


def test_paths_are_normalised(tmp_path):
    path = write_json(tmp_path / "m.json", {"files": ["./a//b.tif", "win\\c.tif"]})
    assert [f.path for f in read_descriptor(path).files] == ["a/b.tif", "win/c.tif"]


def test_missing_and_folder_descriptor(tmp_path):
    with pytest.raises(AcquisitionError, match="does not exist"):
        read_descriptor(tmp_path / "nope.json")
    with pytest.raises(AcquisitionError, match="is a folder"):
        read_descriptor(tmp_path)


# ---------------------------------------------------------------------------
# patterns and walking


@pytest.mark.parametrize(
    "rel, excluded",
    [
        ("a.tif", False),
        ("~$report.docx", True),
        ("scan.tmp", True),
        ("copy.part", True),
        (".DS_Store", True),
        (".hidden/a.tif", True),
        ("sub/.partial", True),
        ("sub/a.tif", False),
    ],
)
def test_default_excludes(rel, excluded):
    assert is_excluded(rel) is excluded


def test_include_patterns():
    assert not is_excluded("a/b.czi", include=("*.czi",))
    assert is_excluded("a/b.txt", include=("*.czi",))
    assert not is_excluded("raw/b.txt", include=("raw/*",))


def test_walk_skips_dot_folders_and_symlinked_folders(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "x.tif").write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_bytes(b"x")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "alias.tif").symlink_to(tmp_path / "d" / "e" / "x.tif")
    (tmp_path / "up.tif").symlink_to("d/e/x.tif")
    left_out = []
    found = [rel for rel, _ in walk_files(tmp_path, left_out=left_out)]
    # A link to a file of the acquisition is not followed: x.tif is imported once, by its own name.
    assert found == ["d/e/x.tif"]
    assert "alias.tif (a symbolic link to d/e/x.tif, not followed: that file is imported by its own name)" in left_out
    assert "up.tif (a symbolic link to d/e/x.tif, not followed: that file is imported by its own name)" in left_out
    assert "loop (a symbolic link to a folder, not followed)" in left_out


def test_walk_refuses_symlink_escaping_root(tmp_path):
    outside = tmp_path / "outside.tif"
    outside.write_bytes(b"secret")
    root = tmp_path / "acq"
    root.mkdir()
    (root / "a.tif").symlink_to(outside)
    with pytest.raises(AcquisitionError, match="symlink points outside the acquisition folder"):
        list(walk_files(root))


def test_locate_matches_nfc_and_nfd(tmp_path):
    nfd = unicodedata.normalize("NFD", "café")
    nfc = unicodedata.normalize("NFC", "café")
    assert nfd != nfc
    (tmp_path / nfd).mkdir()
    (tmp_path / nfd / "zoë.tif").write_bytes(b"1")
    assert locate(tmp_path, f"{nfc}/zoë.tif") == f"{nfd}/zoë.tif"
    assert locate(tmp_path, f"{nfd}/zoë.tif") == f"{nfd}/zoë.tif"
    assert locate(tmp_path, "cafe/zoë.tif") is None


# ---------------------------------------------------------------------------
# from_path


def test_example_manifest(tmp_path):
    spec = from_path(EXAMPLES / "slide3", source="cli:test")
    assert spec.owner == "jdoe" and spec.email == "jdoe@example.org"
    assert spec.target == Target(project="Brain atlas", dataset="2026-11-28 slide 3")
    assert spec.root == str((EXAMPLES / "slide3").resolve())
    assert [f.path for f in spec.files] == ["tile_001.ome.tiff", "tile_002.ome.tiff"]
    for f in spec.files:
        data = (EXAMPLES / "slide3" / f.path).read_bytes()
        assert f.size == len(data) and f.sha256 == hashlib.sha256(data).hexdigest()
    assert spec.extra["descriptor"] == "watchfolder.json"
    assert spec.source == "cli:test"


def test_example_sidecar_from_data_file_sidecar_or_folder():
    data = EXAMPLES / "sidecar" / "cells_01.ome.tiff"
    for given in (data, data.with_name(data.name + ".json"), data.parent):
        spec = from_path(given, source="cli:test")
        assert spec.owner == "jdoe"
        assert spec.root == str(data.parent.resolve())
        assert [(f.path, f.size) for f in spec.files] == [("cells_01.ome.tiff", data.stat().st_size)]


def test_a_fifo_listed_in_a_submitted_manifest_is_refused_with_no_advice_to_wait(tmp_path):
    # a10 F6: via the API or `submit`, a manifest listing a FIFO got "missing or incomplete ...
    # Wait until the copy finishes": waiting never makes a FIFO a file (the watcher said so already).
    folder = tmp_path / "acq"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"pixels")
    os.mkfifo(folder / "b.tif")
    (folder / "watchfolder.json").write_text(json.dumps(
        {"owner": "jdoe", "target": {"dataset": "d"}, "files": [{"path": "a.tif"}, {"path": "b.tif"}]}))
    with pytest.raises(AcquisitionError) as info:
        from_path(folder, source="api:test")
    message = str(info.value)
    assert "b.tif (a named pipe (FIFO))" in message and "not a regular file" in message, message
    assert "waiting will not change that" in message and "Wait until the copy finishes" not in message


def test_a_folder_link_out_of_a_submitted_folder_is_left_out_a_file_link_out_refuses_it(tmp_path):
    # a10 F6: README "a link to a folder is left out (and said so); a link to a file outside
    # the acquisition fails the job" -- a folder link pointing outside refused the whole folder.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.tif").write_bytes(b"not yours")
    folder = tmp_path / "acq"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"pixels")
    (folder / "sub").symlink_to(outside)
    spec = from_path(folder, source="api:test", owner="jdoe", target=Target(dataset="d"))
    assert [f.path for f in spec.files] == ["a.tif"]
    assert "sub (a symbolic link to a folder, not followed)" in spec.extra["left_out"]
    (folder / "x.tif").symlink_to(outside / "secret.tif")
    with pytest.raises(AcquisitionError, match="x.tif: symlink points outside the acquisition folder"):
        from_path(folder, source="api:test", owner="jdoe", target=Target(dataset="d"))


def test_another_owner_does_not_get_the_manifests_email():
    # Issue 14: `submit --owner alice` on jdoe's manifest mailed jdoe.
    spec = from_path(EXAMPLES / "slide3", source="cli:test", owner="alice")
    assert spec.owner == "alice" and spec.email is None
    assert from_path(EXAMPLES / "slide3", source="cli:test", owner="jdoe").email == "jdoe@example.org"
    given = from_path(EXAMPLES / "slide3", source="cli:test", owner="alice", email="alice@example.org")
    assert given.email == "alice@example.org"


def test_example_layout_needs_owner_and_target():
    folder = EXAMPLES / "layout" / "jdoe" / "2026-11-28 plate"
    with pytest.raises(AcquisitionError, match=r"no owner; set \"owner\" .*\(--owner\)"):
        from_path(folder, source="cli:test")
    with pytest.raises(AcquisitionError, match=r"no target; set \"target\" .*\(--project/--dataset\)"):
        from_path(folder, source="cli:test", owner="jdoe")
    spec = from_path(folder, source="cli:test", owner="jdoe", target=Target(dataset="2026-11-28 plate"))
    assert [f.path for f in spec.files] == ["well_A01.ome.tiff", "well_A02.ome.tiff"]


def test_arguments_override_descriptor(tmp_path):
    write_manifest(tmp_path / "acq", {"a.tif": b"a"}, annotations={"k": "1", "m": "x"}, email="a@example.org")
    spec = from_path(
        tmp_path / "acq",
        source="api:portal",
        owner="other",
        target=Target(dataset="elsewhere"),
        email="o@example.org",
        annotations={"k": "2"},
        idempotency_key="client-key-1",
        name="n",
        description="d",
        group="g",
    )
    assert (spec.owner, spec.email, spec.name, spec.description, spec.group) == (
        "other", "o@example.org", "n", "d", "g",
    )
    assert spec.target == Target(dataset="elsewhere")
    assert spec.annotations == {"k": "2", "m": "x"}
    assert spec.key() == "client-key-1"


def test_manifest_missing_and_short_files_are_listed(tmp_path):
    folder = tmp_path / "acq"
    write_manifest(folder, {"a.tif": b"aaaa", "sub/b.tif": b"bbbb", "c.tif": b"cc"})
    (folder / "sub" / "b.tif").unlink()
    (folder / "c.tif").write_bytes(b"c")  # still being copied
    with pytest.raises(AcquisitionError) as err:
        from_path(folder, source="cli:t")
    message = str(err.value)
    assert "2 listed file(s) missing or incomplete" in message
    assert "sub/b.tif (missing)" in message
    assert "c.tif (size 1 bytes, listed 2)" in message
    assert "a.tif" not in message.replace("watchfolder.json", "")


def test_manifest_without_files_takes_the_folder(tmp_path):
    folder = tmp_path / "acq"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"a")
    (folder / "deep").mkdir()
    (folder / "deep" / "b.tif").write_bytes(b"")  # empty files are files too
    (folder / "scan.tmp").write_bytes(b"temp")
    (folder / ".DS_Store").write_bytes(b"mac")
    write_json(folder / "watchfolder.json", {"owner": "jdoe", "target": TARGET})
    spec = from_path(folder, source="cli:t")
    assert [(f.path, f.size) for f in spec.files] == [("a.tif", 1), ("deep/b.tif", 0)]


def test_zero_file_manifest_is_refused(tmp_path):
    folder = tmp_path / "acq"
    folder.mkdir()
    write_json(folder / "watchfolder.json", {"owner": "jdoe", "target": TARGET, "files": []})
    with pytest.raises(AcquisitionError, match="files: the list is empty"):
        from_path(folder, source="cli:t")


def test_empty_folder_is_refused(tmp_path):
    folder = tmp_path / "acq"
    folder.mkdir()
    write_json(folder / "watchfolder.json", {"owner": "jdoe", "target": TARGET})
    with pytest.raises(AcquisitionError, match="no files to import"):
        from_path(folder, source="cli:t")


def test_empty_listed_file(tmp_path):
    write_manifest(tmp_path / "acq", {"empty.tif": b""})
    spec = from_path(tmp_path / "acq", source="cli:t")
    assert [(f.path, f.size) for f in spec.files] == [("empty.tif", 0)]


def test_spaces_and_unicode_names_nfc_manifest_nfd_disk(tmp_path):
    folder = tmp_path / "Zoë's slide 3"
    folder.mkdir()
    nfd_name = unicodedata.normalize("NFD", "tête de souris é.tif")
    (folder / nfd_name).write_bytes(b"abc")
    write_json(
        folder / "watchfolder.json",
        {
            "owner": "jdoe",
            "target": {"dataset": "Zoë 2026"},
            "files": [{"path": unicodedata.normalize("NFC", "tête de souris é.tif"), "size": 3}],
            "filesets": [[unicodedata.normalize("NFC", "tête de souris é.tif")]],
        },
    )
    spec = from_path(folder, source="cli:t")
    # The job names the file as it is spelled on disk, so the importer can open it.
    assert spec.files[0].path == nfd_name
    assert spec.filesets == ((nfd_name,),)
    assert os.path.exists(os.path.join(spec.root, spec.files[0].path))


def test_deep_and_long_paths(tmp_path):
    parts = [f"level {i:02d} " + "x" * 40 for i in range(30)]
    rel = "/".join(parts) + "/image.tif"
    assert len(rel) > 1200
    write_manifest(tmp_path / "acq", {rel: b"deep"})
    spec = from_path(tmp_path / "acq", source="cli:t")
    assert spec.files[0].path == rel and spec.files[0].size == 4
    # Also found by walking a plain folder.
    (tmp_path / "acq" / "watchfolder.json").unlink()
    spec = from_path(tmp_path / "acq", source="cli:t", owner="jdoe", target=Target(dataset="d"))
    assert [f.path for f in spec.files] == [rel]


def test_listed_symlink_escaping_root_is_refused(tmp_path):
    (tmp_path / "outside.tif").write_bytes(b"1234")
    folder = tmp_path / "acq"
    folder.mkdir()
    (folder / "a.tif").symlink_to(tmp_path / "outside.tif")
    write_json(folder / "watchfolder.json", {"owner": "jdoe", "target": TARGET, "files": [{"path": "a.tif"}]})
    with pytest.raises(AcquisitionError, match="symlink points outside"):
        from_path(folder, source="cli:t")
    (folder / "watchfolder.json").unlink()
    with pytest.raises(AcquisitionError, match="symlink points outside"):
        from_path(folder, source="cli:t", owner="jdoe", target=Target(dataset="d"))


def test_symlink_inside_root_is_kept(tmp_path):
    write_manifest(tmp_path / "acq", {"real.tif": b"r"})
    (tmp_path / "acq" / "link.tif").symlink_to("real.tif")
    spec = from_path(tmp_path / "acq", source="cli:t")
    assert [f.path for f in spec.files] == ["real.tif"]


def test_symlinked_acquisition_folder_resolves(tmp_path):
    write_manifest(tmp_path / "real", {"a.tif": b"a"})
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    spec = from_path(tmp_path / "alias", source="cli:t")
    assert spec.root == str((tmp_path / "real").resolve())


def test_data_json_is_not_taken_for_a_sidecar(tmp_path):
    data = tmp_path / "cells.czi"
    data.write_bytes(b"pixels")
    write_json(tmp_path / "cells.czi.json", {"Exposure": 10})
    with pytest.raises(AcquisitionError, match="no owner"):
        from_path(data, source="cli:t")
    spec = from_path(tmp_path, source="cli:t", owner="jdoe", target=Target(dataset="d"))
    # A data JSON is part of the acquisition; it is not dropped as a descriptor.
    assert [f.path for f in spec.files] == ["cells.czi", "cells.czi.json"]


def test_sidecar_size_checked_and_checksum_passed(tmp_path):
    data = tmp_path / "cells.czi"
    data.write_bytes(b"pixels")
    digest = hashlib.sha256(b"pixels").hexdigest()
    write_json(
        tmp_path / "cells.czi.json",
        {"owner": "jdoe", "target": {"dataset": "d"}, "files": [{"path": "cells.czi", "size": 6, "sha256": digest}]},
    )
    spec = from_path(data, source="cli:t")
    assert spec.files[0].sha256 == digest
    data.write_bytes(b"pix")
    with pytest.raises(AcquisitionError, match="cells.czi has 3 bytes, the sidecar lists 6"):
        from_path(data, source="cli:t")


def test_invalid_sidecar_is_an_error_not_data(tmp_path):
    (tmp_path / "cells.czi").write_bytes(b"pixels")
    (tmp_path / "cells.czi.json").write_text('{"owner": "jdoe", "target": }', encoding="utf-8")
    with pytest.raises(AcquisitionError, match="invalid JSON at line 1, column 29"):
        from_path(tmp_path / "cells.czi", source="cli:t")


def test_warnings_travel_in_extra(tmp_path):
    write_manifest(tmp_path / "acq", {"a.tif": b"a"}, instrument="LSM")
    spec = from_path(tmp_path / "acq", source="cli:t")
    assert any("unknown field 'instrument'" in w for w in spec.extra["warnings"])


def test_missing_path(tmp_path):
    with pytest.raises(AcquisitionError, match="does not exist; check the path"):
        from_path(tmp_path / "nope", source="cli:t")


def test_check_listed_reports_non_regular(tmp_path):
    (tmp_path / "dir.tif").mkdir()
    from watchfolder.job import FileEntry

    check = check_listed(tmp_path, [FileEntry("dir.tif")])
    assert not check.complete and check.missing == ["dir.tif (not a regular file)"]


def test_listed_files_through_symlinked_folders_inside_are_accepted_and_outside_refused(tmp_path):
    acq = tmp_path / "acq"
    (acq / "real" / "deep").mkdir(parents=True)
    (acq / "real" / "deep" / "a.tif").write_bytes(b"aaa")
    (acq / "inside").symlink_to(acq / "real")  # a folder alias that stays in the acquisition
    outside = tmp_path / "outside" / "deep"
    outside.mkdir(parents=True)
    (outside / "b.tif").write_bytes(b"bb")
    (acq / "real" / "escape").symlink_to(tmp_path / "outside")  # nested, leaves the acquisition

    ok = check_listed(acq, [FileEntry("inside/deep/a.tif", 3)])
    assert ok.complete and len(ok.present) == 1
    with pytest.raises(AcquisitionError, match="outside"):
        check_listed(acq, [FileEntry("real/escape/deep/b.tif", 2)])


def _plate_folder(tmp_path: Path) -> tuple[Path, list[FileEntry]]:
    """A folder of many listed files with every odd case among them."""
    acq = tmp_path / "plate"
    images = acq / "Images" / "deep"
    images.mkdir(parents=True)
    entries = []
    for i in range(40):
        (images / f"f{i:02d}.tiff").write_bytes(b"x" * i)
        entries.append(FileEntry(f"Images/deep/f{i:02d}.tiff", i))
    nfd = unicodedata.normalize("NFD", "zoë.tiff")
    (images / nfd).write_bytes(b"nfd")
    (images / "alias.tiff").symlink_to(images / "f03.tiff")
    (images / "folder.tiff").mkdir()
    (acq / "linked").symlink_to(images)
    entries += [
        FileEntry("Images/deep/" + unicodedata.normalize("NFC", "zoë.tiff"), 3),  # other Unicode form
        FileEntry("Images/deep/alias.tiff", 3),  # symlink inside
        FileEntry("Images/deep/folder.tiff"),  # not a regular file
        FileEntry("Images/deep/gone.tiff", 1),  # missing
        FileEntry("Images/deep/f05.tiff", 6),  # wrong size
        FileEntry("linked/f07.tiff", 7),  # through a symlinked folder
        *[FileEntry(f"linked/f{i:02d}.tiff", i) for i in range(20, 40)],
    ]
    return acq, entries


def test_check_listed_in_one_pass_agrees_with_the_file_by_file_check(tmp_path, monkeypatch):
    from watchfolder.watch import acquisition

    acq, entries = _plate_folder(tmp_path)
    listed = check_listed(acq, entries)
    monkeypatch.setattr(acquisition, "LIST_FOLDER_FROM", 10**9)
    one_by_one = check_listed(acq, entries)
    assert [(e, s.st_ino) for e, s in listed.present] == [(e, s.st_ino) for e, s in one_by_one.present]
    assert listed.missing == one_by_one.missing == [
        "Images/deep/folder.tiff (not a regular file)",
        "Images/deep/gone.tiff (missing)",
        "Images/deep/f05.tiff (size 5 bytes, listed 6)",
    ]
    assert len(listed.present) == 40 + 3 + 20
    assert (listed.absent, listed.sizes) == (one_by_one.absent, one_by_one.sizes)
    assert listed.absent == ["Images/deep/gone.tiff"] and listed.sizes == [("Images/deep/f05.tiff", 5, 6)]


def test_check_listed_lists_a_folder_of_many_files_once(tmp_path, monkeypatch):
    # Issue 13: a 100,000-file manifest was checked with an lstat per file plus one per
    # folder above it, every time it was looked at.
    folder = tmp_path / "plate" / "Images" / "a" / "b"
    folder.mkdir(parents=True)
    entries = []
    for i in range(500):
        (folder / f"f{i:03d}.tiff").write_bytes(b"1")
        entries.append(FileEntry(f"Images/a/b/f{i:03d}.tiff", 1))
    calls = {"lstat": 0, "stat": 0, "scandir": 0}
    for name in calls:
        real = getattr(os, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, counting)
    check = check_listed(tmp_path / "plate", entries)
    monkeypatch.undo()
    assert check.complete and len(check.present) == 500
    assert calls["scandir"] == 1 and calls["lstat"] + calls["stat"] <= 3  # the folders above, once


def test_patterns_compiled_once_match_as_fnmatch_does():
    # The compiled matcher (issue 13: 100,000 files were matched pattern by pattern
    # through fnmatch) must decide exactly as fnmatchcase over each pattern.
    import fnmatch
    import itertools

    patterns = [".*", "*.tmp", "Thumbs.db", "a*b", "sub/*.x", "[ab]?.tif", "*~", "[!a]*"]
    paths = ["x/.git/y", "a.tmp", "dir/a.tmp", "Thumbs.db", "a/xb", "ab", "sub/q.x", "q/sub/q.x", "ab.tif",
             "c1.tif", "x~", "ok.tif", "a/b/c.tif", ".hidden", "[ab]", "a\nb"]

    def by_fnmatch(relpath, exclude, include):
        parts = relpath.split("/")
        if any(fnmatch.fnmatchcase(relpath, p) or any(fnmatch.fnmatchcase(c, p) for c in parts) for p in exclude):
            return True
        if include:
            return not any(fnmatch.fnmatchcase(parts[-1], p) or fnmatch.fnmatchcase(relpath, p) for p in include)
        return False

    for k in range(4):
        for exclude in itertools.combinations(patterns, k):
            for include in [(), ("*.tif",), ("sub/*", "*.x")]:
                for path in paths:
                    assert is_excluded(path, exclude, include) == by_fnmatch(path, exclude, include), (path, exclude)


def test_the_keys_of_a_one_file_acquisition_leave_its_own_name_out():
    from watchfolder.job import FileEntry, JobSpec, Target, shape_key

    def pair(stem: str, ext: str = ".vsi", unit: str | None = "file") -> JobSpec:
        files = (FileEntry(f"{stem}{ext}", 10), FileEntry(f"_{stem}_/stack1/frame_t.ets", 99))
        return JobSpec(owner="jdoe", root="/drop", files=files, target=Target(dataset="d"), source="watch:w",
                       extra={"unit": unit} if unit else {})

    assert shape_key(pair("cells")) == shape_key(pair("cells renamed"))  # the data file and its companion folder
    assert shape_key(pair("cells")) != shape_key(pair("cells", ".ets"))  # another format is other data
    # A folder acquisition keeps its files' names: renaming a file inside it is another acquisition.
    assert shape_key(pair("cells", unit=None)) != shape_key(pair("cells renamed", unit=None))


def test_an_unreadable_folder_beside_the_listed_files_is_said(tmp_path, monkeypatch):
    # U5/priv (mode 000) holds nothing the manifest lists: whatever is in it is not imported,
    # and the job log and mail say so (outside try of issue 12); a folder the manifest lists
    # files in is the import's to refuse, not said twice.
    from watchfolder.job import FileEntry
    from watchfolder.watch import acquisition
    from watchfolder.watch.acquisition import unlisted_files

    (tmp_path / "priv").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "a.tif").write_bytes(b"a")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith(("/priv", "/data")):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(acquisition.os, "scandir", scandir)
    out = unlisted_files(tmp_path, [FileEntry("a.tif", 1), FileEntry("data/x.tif", 1)])
    assert out == ["priv/ (a folder the service cannot read: permission denied; whatever it holds is not imported)"]


def test_a_name_that_is_not_utf8_is_shown_escaped_in_the_error(tmp_path):
    # 'r\xe9sum\xe9.tif' (Latin-1): the error showed 'r�sum�.tif', hiding which bytes to fix
    # (outside try of issue 12, second round); README: escaped as \udcXX.
    with open(os.path.join(os.fsencode(tmp_path), b"r\xe9sum\xe9.tif"), "wb"):
        pass
    with pytest.raises(AcquisitionError) as info:
        list(walk_files(tmp_path))
    text = str(info.value)
    assert "'r\\udce9sum\\udce9.tif' is not valid UTF-8" in text and "\ufffd" not in text, text
