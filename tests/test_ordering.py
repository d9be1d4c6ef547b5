"""methods.md's ordering check on bench results: the tolerance rule, which pairs each rule compares, and the
results.csv reader."""

from __future__ import annotations

import csv

import pytest

from ssmis.bench.ordering import check_ordering, ordering_table, read_dice, summary


def _csv(path, rows):
    cols = ["cell", "method", "labeled", "seed", "checkpoint", "class", "dice"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for method, lab, seed, ck, cls, dice in rows:
            w.writerow({"cell": f"{method}-l{lab}-s{seed}", "method": method, "labeled": lab, "seed": seed,
                        "checkpoint": ck, "class": cls, "dice": dice})


def test_reader_keeps_best_mean_rows_per_seed(tmp_path):
    p = tmp_path / "results.csv"
    _csv(p, [("bcp", 68, 0, "best", "mean", 0.6), ("bcp", 68, 0, "best", "1", 0.1), ("bcp", 68, 0, "last", "mean", 0.2),
             ("bcp", 68, 1, "best", "mean", 0.7), ("mean_teacher", 68, 0, "best", "mean", "")])
    assert read_dice(p) == {("bcp", 68.0): {0: 0.6, 1: 0.7}}
    assert read_dice(p, "last") == {("bcp", 68.0): {0: 0.2}}


def _by_pair(checks):
    return {(c.rule, c.a, c.b): c for c in checks}


def test_tolerance_is_the_larger_std_or_one_point():
    dice = {("supervised", 68): {0: 0.50, 1: 0.50, 2: 0.50},
            ("mean_teacher", 68): {0: 0.495, 1: 0.495, 2: 0.495},      # 0.5 point below: within 1 point
            ("ua_mt", 68): {0: 0.40, 1: 0.44, 2: 0.48},                 # mean 0.44, std 0.0327: fails
            ("cps", 68): {0: 0.30, 1: 0.50, 2: 0.61}}                   # mean 0.47, std 0.128: within its std
    c = _by_pair(check_ordering(dice))
    mt, ua, cps = (c[(1, f"{m} @ 68", "supervised @ 68")] for m in ("mean_teacher", "ua_mt", "cps"))
    assert mt.tolerance == pytest.approx(0.01) and mt.holds and not mt.strict
    assert ua.tolerance == pytest.approx(0.0326599, abs=1e-6) and not ua.holds
    assert cps.holds and cps.tolerance == pytest.approx(0.12832, abs=1e-5) and cps.seeds_a == 3
    assert "1 fail" in summary(list(c.values())) and "ua_mt @ 68 ≥ supervised @ 68" in summary(list(c.values()))


def test_rules_compare_the_right_pairs_and_skip_absent_methods():
    dice = {(m, lab): {0: v + (0.1 if lab == 136 else 0)} for m, v in
            (("supervised", 0.4), ("mean_teacher", 0.5), ("bcp", 0.7), ("abd", 0.72), ("fixmatch", 0.6),
             ("unimatch", 0.65)) for lab in (68, 136)}
    dice[("cps", 68)] = {0: 0.55}                                         # CPS only at 5 %
    checks = check_ordering(dice)
    pairs = {(c.rule, c.a, c.b) for c in checks}
    assert (2, "abd @ 68", "cps @ 68") in pairs and (2, "abd @ 136", "cps @ 136") not in pairs
    assert (3, "abd @ 68", "bcp @ 68") in pairs and (3, "unimatch @ 136", "fixmatch @ 136") in pairs
    assert (3, "cad @ 68", "abd @ 68") not in pairs                      # CAD was not run
    assert (4, "bcp @ 136", "bcp @ 68") in pairs and not any(c.rule == 4 and "cps" in c.a for c in checks)
    assert (2, "bcp @ 68", "fixmatch @ 68") not in pairs                  # FixMatch is not in rule 2
    assert all(c.holds for c in checks) and "provisional" in summary(checks)
    table = ordering_table(checks)
    assert len(table) == 2 + len(checks) and "**fails**" not in "\n".join(table)
