"""Validation Dice of every cell of one or more suite folders, step by step, as a markdown table.

Usage: python benchmarks/val_curves.py benchmarks/results/acdc_lite_10pct [more suite folders ...]
Reads each cell's metrics.csv (rows `step,stage,val,dice,value`); the best value of each row is in bold.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def curve(cell: Path) -> dict[int, float]:
    with open(cell / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f)
                if r["split"] == "val" and r["name"] == "dice"}


def table(folders: list[Path]) -> str:
    curves = {f"{folder.name}/{cell.name}" if len(folders) > 1 else cell.name: curve(cell)
              for folder in folders for cell in sorted(folder.iterdir()) if (cell / "metrics.csv").is_file()}
    steps = sorted({s for c in curves.values() for s in c})
    lines = ["| cell | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|"]
    for name, c in curves.items():
        best = max(c.values(), default=None)
        vals = [("**{:.3f}**" if c[s] == best else "{:.3f}").format(c[s]) if s in c else "" for s in steps]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    print(table(ap.parse_args().folders))


if __name__ == "__main__":
    main()
