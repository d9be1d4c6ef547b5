"""Validation Dice of every cell of one or more suite folders, step by step, as a markdown table (the table
that `ssmis bench` also writes into results.md).

Usage: python benchmarks/val_curves.py benchmarks/results/acdc_lite_10pct [more suite folders ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssmis.bench.report import val_curves_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    folders = ap.parse_args().folders
    runs = {f"{folder.name}/{cell.name}" if len(folders) > 1 else cell.name: cell / "metrics.csv"
            for folder in folders for cell in sorted(folder.iterdir()) if (cell / "metrics.csv").is_file()}
    print("\n".join(val_curves_table(runs)))


if __name__ == "__main__":
    main()
