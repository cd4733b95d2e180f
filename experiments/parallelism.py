"""Which way uses a 2-core machine better for a sweep: two jobs with one torch thread each (the joblib
launcher), or one job at a time with two threads? Times the same two cpu-scale cells both ways and writes
results/parallelism.md.

    DATA_MIRROR=../shared/data python experiments/parallelism.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reslora.io import atomic_path

ROOT = Path(__file__).resolve().parents[1]
CELLS = ["task=mrpc", "method=reslora_bs", "seed=0,1"]  # the cpu scale as configured
WAYS = {
    "2 jobs x 1 thread (hydra/launcher=joblib_cpu)": ["threads=1", "hydra/launcher=joblib_cpu"],
    "1 job x 2 threads (basic launcher, sequential)": ["threads=2"],
}


def timed(overrides: list[str], scratch: Path) -> float:
    command = [sys.executable, str(ROOT / "experiments" / "train.py"), "-m", *CELLS, *overrides,
               "logger.mode=disabled", f"runs_dir={scratch / 'runs'}", f"results_dir={scratch / 'results'}"]
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return time.time() - start


def main() -> None:
    rows = []
    for way, overrides in WAYS.items():
        with tempfile.TemporaryDirectory() as scratch:
            seconds = timed(overrides, Path(scratch))
        rows.append((way, seconds))
        print(f"{way}: {seconds:.1f} s")
    best = min(rows, key=lambda r: r[1])
    lines = ["# Two cores, two ways", "",
             f"Built by `python experiments/parallelism.py` on {os.cpu_count()} CPUs (load average at the end: "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}). The same two cpu-scale runs ({' '.join(CELLS)}), "
             "wall time of the whole sweep command:", "",
             "| way | wall time (s) |", "|---|---|", *[f"| {w} | {s:.1f} |" for w, s in rows], "",
             f"Faster: {best[0]}."]
    out = ROOT / "results" / "parallelism.md"
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
