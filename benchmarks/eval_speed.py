"""Time `score_folders` on the 40 ACDC test volumes against copies shifted by 2 voxels; append to docs/benchmarks.md.

Run from the repository root: `.venv/bin/python benchmarks/eval_speed.py [--data ../shared/data] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np

from ssmis.eval.score_folders import score_folders
from _common import cpu_model  # noqa: E402  (benchmarks/ is the script folder)

REPO = Path(__file__).resolve().parents[1]
SHIFT = 2


def build_folders(acdc: Path, cases: list[str], root: Path) -> tuple[Path, Path]:
    """ref/ = the test labels, pred/ = the same labels moved SHIFT voxels along the last axis (zero fill)."""
    pred, ref = root / "pred", root / "ref"
    pred.mkdir(), ref.mkdir()
    for case in cases:
        with h5py.File(acdc / "data" / f"{case}.h5", "r") as f:
            label = f["label"][()]
        moved = np.zeros_like(label)
        moved[..., SHIFT:] = label[..., :-SHIFT]
        for folder, array in ((ref, label), (pred, moved)):
            with h5py.File(folder / f"{case}.h5", "w") as f:
                f.create_dataset("label", data=array)
    return pred, ref




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding ACDC/")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    acdc = args.data / "ACDC"
    cases = (acdc / "test.list").read_text().split()
    with tempfile.TemporaryDirectory(prefix="ssmis_eval_speed_") as tmp:
        pred, ref = build_folders(acdc, cases, Path(tmp))
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            score_folders(pred, ref, out=Path(tmp) / f"eval{i}")
            times.append(time.perf_counter() - start)
        summary = json.loads((Path(tmp) / "eval0" / "summary.json").read_text())
    command = shlex.join([os.path.relpath(sys.executable, REPO), *sys.argv])
    section = f"""
## Evaluation speed: `score_folders` on the ACDC test set

- Command: `{command}` (from the repository root)
- Date: {datetime.date.today().isoformat()}; CPU: {cpu_model()}, {os.cpu_count()} cores
- Versions: python {sys.version.split()[0]}, torch {version("torch")}, numpy {np.__version__}, scipy {version("scipy")}
- Workload: {len(cases)} test volumes (HDF5 labels, classes 1-3) against copies shifted by {SHIFT} voxels along
  the last axis; reading, metrics, per_case.csv and summary.json; imports excluded.
- Wall time: median {statistics.median(times):.2f} s over {len(times)} runs ({", ".join(f"{t:.2f}" for t in times)} s)
- Headline of the shifted copy (voxel units, spacing unknown in HDF5): Dice {summary["mean"]["dice"]:.4f},
  HD95 {summary["mean"]["hd95_vox"]:.3f} vox, ASD {summary["mean"]["asd_vox"]:.3f} vox
"""
    doc = REPO / "docs" / "benchmarks.md"
    doc.parent.mkdir(exist_ok=True)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    doc.write_text(text + section)
    print(section)


if __name__ == "__main__":
    main()
