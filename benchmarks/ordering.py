"""Check methods.md's ACDC-lite ordering (rules 1-4, tolerance max(std_A, std_B, 1 Dice point)) on bench results.

Usage: python benchmarks/ordering.py benchmarks/results/acdc_lite_5pct benchmarks/results/acdc_lite_10pct
       [--checkpoint best|last]
Each argument is a suite folder (its results.csv) or a results.csv; cells of all of them are pooled, so rule 4
(10 % ≥ 5 %) compares across the two suites.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssmis.bench.ordering import check_ordering, ordering_table, read_dice, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="suite folders or results.csv files")
    ap.add_argument("--checkpoint", choices=["best", "last"], default="best")
    a = ap.parse_args()
    dice: dict = {}
    for r in a.results:
        path = r / "results.csv" if r.is_dir() else r
        for key, seeds in read_dice(path, a.checkpoint).items():
            dice.setdefault(key, {}).update(seeds)
    checks = check_ordering(dice)
    print(f"Checkpoint: {a.checkpoint}-val. " + summary(checks) + ".\n")
    print("\n".join(ordering_table(checks)))


if __name__ == "__main__":
    main()
