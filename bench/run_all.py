"""Run every benchmark in bench/ (``make bench``). Each prints its figures, baselines and ratios."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    here = Path(__file__).parent
    failures = 0
    for script in sorted(here.glob("bench_*.py")):
        print(f"\n##### {script.name}", flush=True)
        start = time.monotonic()
        result = subprocess.run([sys.executable, str(script), *sys.argv[1:]])
        print(f"##### {script.name}: exit {result.returncode} in {time.monotonic() - start:.0f} s", flush=True)
        failures += result.returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
