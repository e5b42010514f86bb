"""Fileset grouping of a 2,000-file folder: Bio-Formats (as OMERO's importer) beside the suffix rules.

    .venv/bin/python bench/bench_bioformats.py [--files 2000] [--rounds 3]

Builds, in a temp folder, an acquisition of ``--files`` files made by
Bio-Formats' own ImageConverter: multi-file OME-TIFFs (three files sharing one
OME-XML, one per sub-folder) and single ``.fake`` images, about 90 % / 10 %.
Then, in the OMERO Python (.venv-omero/bin/python or
$WATCHFOLDER_OMERO_PYTHON), in one process per round as the child runs it:

- Bio-Formats: the JVM started once (its cost printed apart), then
  ``bfgroup.BioFormats.group`` over every file (each unclaimed file opened with
  ImageReader, its used files claimed);
- suffix rules: ``child.group_filesets`` on the same file list;
- Bio-Formats grouping with the child's pixel check (``pixels="check"``: a tile of the
  first and last plane of each series read), the cost of catching a cut-off file
  before upload.

Prints the median time per file of each, the ratio, and the number of filesets
each found (the rules cannot see that three OME-TIFFs form one image). Nothing
is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD_DIR = REPO / "watchfolder" / "omero_child"

ROUND = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import bfgroup, child
root = sys.argv[2]
files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
t0 = time.perf_counter()
bf = bfgroup.BioFormats()
jvm = time.perf_counter() - t0
# A warm-up (JIT, page cache) on a part, so neither timed pass below gets it for free.
bf.group(root, files[:300], pixels="check")
t1 = time.perf_counter()
groups, refused = bf.group(root, files)
t2 = time.perf_counter()
rules = child.group_filesets(files)
t3 = time.perf_counter()
bf.group(root, files, pixels="check")
t4 = time.perf_counter()
print(json.dumps({"files": len(files), "jvm_s": jvm, "bioformats_s": t2 - t1, "rules_s": t3 - t2,
                  "check_s": t4 - t3,
                  "bioformats_filesets": len(groups), "rules_filesets": len(rules), "refused": len(refused)}))
'''


def omero_python() -> str | None:
    for python in filter(None, [os.environ.get("WATCHFOLDER_OMERO_PYTHON"), str(REPO / ".venv-omero/bin/python")]):
        if os.path.exists(python):
            return python
    return None


def build(folder: Path, jar: Path, n_files: int) -> None:
    source = folder / "src"
    source.mkdir()
    fake = source / "stack&sizeZ=3&sizeX=32&sizeY=32.fake"
    fake.touch()
    subprocess.run(["java", "-cp", str(jar), "loci.formats.tools.ImageConverter", "-no-upgrade", fake.name,
                    "stack_Z%z.ome.tiff"], cwd=source, check=True, capture_output=True)
    tiffs = sorted(source.glob("*.ome.tiff"))
    acq = folder / "acq"
    acq.mkdir()
    stacks = (n_files * 9 // 10) // len(tiffs)
    for i in range(stacks):
        sub = acq / f"pos{i:04d}"
        sub.mkdir()
        for t in tiffs:
            try:
                os.link(t, sub / t.name)
            except OSError:
                shutil.copy(t, sub / t.name)
    for i in range(n_files - stacks * len(tiffs)):
        (acq / f"single_{i:04d}.fake").touch()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    python = omero_python()
    if python is None:
        print("skipped: no OMERO Python (run scripts/omero-env)")
        return 0
    why = subprocess.run([python, "-c", f"import sys; sys.path.insert(0, {str(CHILD_DIR)!r}); import bfgroup; "
                                        "print(bfgroup.why_unavailable() or '')"], capture_output=True, text=True)
    if why.returncode or why.stdout.strip():
        print(f"skipped: no Bio-Formats in {python}: {why.stdout.strip() or why.stderr.strip()[-300:]}")
        return 0
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    jar = Path(prefix.stdout.strip()) / "share" / "bioformats" / "bioformats_package.jar"
    base = os.environ.get("WATCHFOLDER_BENCH_DIR") or None
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        folder = Path(tmp)
        build(folder, jar, args.files)
        rounds = []
        for _ in range(args.rounds):
            out = subprocess.run([python, "-c", ROUND, str(CHILD_DIR), str(folder / "acq")],
                                 capture_output=True, text=True, check=True)
            rounds.append(json.loads(out.stdout.strip().splitlines()[-1]))
    n = rounds[0]["files"]
    bf = statistics.median(r["bioformats_s"] for r in rounds)
    rules = statistics.median(r["rules_s"] for r in rounds)
    jvm = statistics.median(r["jvm_s"] for r in rounds)
    print(f"files: {n}; rounds: {len(rounds)} (medians)")
    print(f"JVM start (once per job):          {jvm:8.3f} s")
    print(f"Bio-Formats grouping:              {bf:8.3f} s  = {bf / n * 1000:7.3f} ms/file  "
          f"-> {rounds[0]['bioformats_filesets']} filesets")
    print(f"suffix rules (today's, baseline):  {rules:8.3f} s  = {rules / n * 1000:7.3f} ms/file  "
          f"-> {rounds[0]['rules_filesets']} filesets")
    print(f"ratio Bio-Formats / rules: {bf / rules if rules else float('inf'):.0f}x "
          "(the price of grouping as OMERO does; no target)")
    check = statistics.median(r["check_s"] for r in rounds)
    print(f"grouping + pixel check (the child's): {check:8.3f} s  = {check / n * 1000:7.3f} ms/file  "
          f"ratio to grouping alone {check / bf if bf else float('inf'):.2f}x (a tile of the first and the "
          "last plane of each series, as the server reads every plane; no target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
