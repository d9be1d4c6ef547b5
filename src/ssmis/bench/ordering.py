"""The ordering of methods that ACDC-lite must reproduce (methods.md, ACDC-lite, "Ordering that must hold"),
checked on bench results with its tolerance rule: "A ≥ B" fails when mean(A) < mean(B) − max(std_A, std_B, 1 Dice
point), with means and standard deviations (ddof 0) over the seeds run.

The rules, per labelled count:
1. every semi-supervised method ≥ labels only;
2. the copy-paste / perturbation family (BCP, ABD, UniMatch) ≥ MT, UA-MT and CPS;
3. each add-on ≥ its host (ABD ≥ BCP, UniMatch ≥ FixMatch, M3HL ≥ BCP, ...);
4. for every method, the larger labelled count ≥ the smaller.
A rule between methods that were not run is skipped."""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPERVISED = "supervised"
FAMILY = ("bcp", "abd", "unimatch")
CLASSIC = ("mean_teacher", "ua_mt", "cps")
ADD_ONS = (("abd", "bcp"), ("m3hl", "bcp"), ("transmedseg", "bcp"), ("unimatch", "fixmatch"),
           ("metassl_mt", "mean_teacher"), ("metassl_cps", "cps"), ("metassl_fixmatch", "fixmatch"),
           ("metassl_bcp", "bcp"), ("cad", "abd"))
POINT = 0.01          # one Dice point on the 0-1 scale


@dataclass(frozen=True)
class Check:
    rule: int
    a: str                # "method @ labelled"
    b: str
    mean_a: float
    mean_b: float
    tolerance: float      # max(std_a, std_b, 1 point)
    seeds_a: int
    seeds_b: int

    @property
    def holds(self) -> bool:
        return self.mean_a >= self.mean_b - self.tolerance

    @property
    def strict(self) -> bool:
        """A ≥ B without the tolerance."""
        return self.mean_a >= self.mean_b


def read_dice(results_csv: Path, checkpoint: str = "best") -> dict[tuple[str, float], dict[int, float]]:
    """{(method, labelled): {seed: mean foreground Dice}} from a bench results.csv."""
    out: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
    with open(results_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r["checkpoint"] == checkpoint and r["class"] == "mean" and r["dice"] != "":
                out[(r["method"], float(r["labeled"]))][int(r["seed"])] = float(r["dice"])
    return dict(out)


def _stats(values: dict[int, float]) -> tuple[float, float]:
    v = np.array(list(values.values()), float)
    return float(v.mean()), float(v.std())


def check_ordering(dice: dict[tuple[str, float], dict[int, float]]) -> list[Check]:
    """Every applicable check of rules 1-4 on {(method, labelled): {seed: Dice}}."""
    stats = {k: _stats(v) for k, v in dice.items() if v}
    labelled = sorted({lab for _, lab in stats})
    checks: list[Check] = []

    def add(rule: int, a: tuple[str, float], b: tuple[str, float]) -> None:
        if a in stats and b in stats:
            (ma, sa), (mb, sb) = stats[a], stats[b]
            checks.append(Check(rule, f"{a[0]} @ {a[1]:g}", f"{b[0]} @ {b[1]:g}", ma, mb, max(sa, sb, POINT),
                                len(dice[a]), len(dice[b])))

    for lab in labelled:
        methods = sorted({m for m, l in stats if l == lab})
        for m in methods:
            if m != SUPERVISED:
                add(1, (m, lab), (SUPERVISED, lab))
        for a in FAMILY:
            for b in CLASSIC:
                add(2, (a, lab), (b, lab))
        for a, b in ADD_ONS:
            add(3, (a, lab), (b, lab))
    for lo, hi in zip(labelled, labelled[1:]):
        for m in sorted({m for m, _ in stats}):
            add(4, (m, hi), (m, lo))
    return checks


def ordering_table(checks: list[Check]) -> list[str]:
    """Markdown: one row per check, failures first within each rule."""
    lines = ["| rule | A ≥ B | mean A | mean B | A − B | tolerance | seeds A/B | verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in sorted(checks, key=lambda c: (c.rule, c.holds, c.a, c.b)):
        verdict = "holds" if c.strict else ("holds within tolerance" if c.holds else "**fails**")
        lines.append(f"| {c.rule} | {c.a} ≥ {c.b} | {c.mean_a:.4f} | {c.mean_b:.4f} | {c.mean_a - c.mean_b:+.4f} | "
                     f"{c.tolerance:.4f} | {c.seeds_a}/{c.seeds_b} | {verdict} |")
    return lines


def summary(checks: list[Check]) -> str:
    fails = [c for c in checks if not c.holds]
    if not checks:
        return "no check applies (too few methods)"
    seeds = sorted({c.seeds_a for c in checks} | {c.seeds_b for c in checks})
    few = "" if min(seeds) >= 3 else (f"; provisional: the rule asks for means over seeds 0-2, these use "
                                      f"{'-'.join(map(str, seeds)) if len(seeds) > 1 else seeds[0]} seed(s)")
    return (f"{len(checks) - len(fails)} of {len(checks)} checks hold, {len(fails)} fail"
            + (": " + ", ".join(f"{c.a} ≥ {c.b}" for c in fails) if fails else "") + few)
