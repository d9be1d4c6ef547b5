"""HC18 evaluation: `ssmis eval --run` reports the absolute head-circumference error in mm next to Dice and HD95,
per image in per_case.csv; empty predictions and failed fits are counted, never scored as 0 mm."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from skimage import draw

from ssmis.data.export import write_phantom
from ssmis.data.hc18 import ramanujan_perimeter
from ssmis.eval.hc_error import EMPTY, NO_FIT, format_hc, hc_row, hc_summary


def ellipse_mask(shape=(120, 160), center=(60, 80), a=50, b=30, angle=0.4):
    mask = np.zeros(shape, bool)
    mask[draw.ellipse(center[0], center[1], b, a, shape=shape, rotation=angle)] = True
    return mask


def test_hc_row_measures_an_ellipse_in_mm_against_its_reference():
    ref = ramanujan_perimeter(50, 30) * 0.2            # semi-axes 50 / 30 px at 0.2 mm per pixel
    row = hc_row(ellipse_mask(), (0.2, 0.2), ref)
    assert row["hc_note"] == ""
    assert row["hc_mm"] == pytest.approx(ref, rel=0.01)
    assert row["hc_abs_err_mm"] == pytest.approx(abs(row["hc_mm"] - ref)) and row["hc_abs_err_mm"] < 0.01 * ref
    # a 10 % larger head is 10 % off
    big = hc_row(ellipse_mask(a=55, b=33), (0.2, 0.2), ref)
    assert big["hc_abs_err_mm"] == pytest.approx(0.1 * ref, rel=0.05)


def test_empty_and_unfittable_predictions_are_counted_not_scored_as_zero():
    empty = hc_row(np.zeros((40, 40), bool), (0.1, 0.1), 150.0)
    assert empty["hc_note"] == EMPTY and math.isnan(empty["hc_abs_err_mm"]) and math.isnan(empty["hc_mm"])
    tiny = np.zeros((40, 40), bool)
    tiny[10, 10:12] = True                              # 2 pixels: no ellipse through its boundary
    assert hc_row(tiny, (0.1, 0.1), 150.0)["hc_note"] == NO_FIT
    good = hc_row(ellipse_mask(), (0.2, 0.2), ramanujan_perimeter(50, 30) * 0.2 + 3.0)   # 3 mm off
    s = hc_summary([good, empty, hc_row(tiny, (0.1, 0.1), 150.0)])
    assert (s["images"], s["measured"], s["empty_predictions"], s["failed_fits"]) == (3, 1, 1, 1)
    assert s["abs_err_mm"]["mean"] == pytest.approx(good["hc_abs_err_mm"])           # not pulled towards 0
    assert "1 of 3 images measured" in format_hc(s) and "1 empty predictions" in format_hc(s)
    assert hc_summary([{"class": 1, "dice": 0.5}]) is None                           # not an HC18 run
    none = hc_summary([empty])
    assert none["abs_err_mm"]["mean"] is None and "n/a" in format_hc(none)


def train_on_hc18_phantom(tmp_path, method: str, iterations: int, unlabeled_bs: int, test_at_end: bool) -> dict:
    """A small run of `method` on a written HC18-layout phantom (tmp_path/hc18, 64x64 images) into tmp_path/run."""
    from ssmis.config import load_config
    from ssmis.engine.run import train

    root = write_phantom(tmp_path / "hc18", "hc18", patients=10, size=32)
    cfg = load_config(None, data={
        "data": {"layout": "hc18", "root": str(root), "patch_size": [32, 32], "image_order": 1, "pad_square": True},
        "split": {"protocol": False, "labeled": 0.4, "val": 0.2, "test": 0.2, "seed": 0},
        "model": {"widths": [8, 16, 32, 64, 128]},
        "train": {"iterations": iterations, "labeled_bs": 2, "unlabeled_bs": unlabeled_bs, "eval_every": 50,
                  "ckpt_every": 50, "amp": "off", "threads": 1, "device": "cpu", "val_at": "patch"},
        "eval": {"upsample": "logits"}, "method": {"name": method}})
    return train(cfg, out=tmp_path / "run", progress=False, test_at_end=test_at_end)


def test_eval_of_an_hc18_run_reports_hc_error_per_image(tmp_path):
    r = train_on_hc18_phantom(tmp_path, "supervised", 150, unlabeled_bs=0, test_at_end=True)
    best = json.loads((tmp_path / "run" / "eval" / "test-best" / "summary.json").read_text())
    hc = best["hc"]
    rows = list(csv.DictReader(open(tmp_path / "run" / "eval" / "test-best" / "per_case.csv")))
    assert hc["images"] == len(rows) >= 2                                  # one row per test image (binary)
    assert hc["measured"] + hc["empty_predictions"] + hc["failed_fits"] == hc["images"]
    for row in rows:
        assert float(row["hc_ref_mm"]) > 0
        if row["hc_note"]:
            assert row["hc_abs_err_mm"] == "nan"
        else:
            assert float(row["hc_abs_err_mm"]) == pytest.approx(abs(float(row["hc_mm"]) - float(row["hc_ref_mm"])))
    assert r["test_best"]["hc"] == hc
    assert hc["measured"] >= 1 and hc["abs_err_mm"]["mean"] < 0.5 * np.mean([float(x["hc_ref_mm"]) for x in rows])


def test_predict_with_an_ersr_run_writes_masks_and_hc_and_goes_on_past_a_headless_image(tmp_path):
    """Issue 22: `ssmis predict` on HC18-style images with an ERSR run (one-logit network, rebuilt as `one_logit`)
    writes a mask per image and the HC in mm; an image with no head gets a note, not a number, and the run goes on."""
    from PIL import Image

    from ssmis.cli import main

    train_on_hc18_phantom(tmp_path, "ersr", 200, unlabeled_bs=2, test_at_end=False)
    root = tmp_path / "hc18"
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("002_HC.png", "003_HC.png"):
        (folder / name).write_bytes((root / "training_set" / name).read_bytes())
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "blank_HC.png")     # nothing to segment
    out = tmp_path / "out"
    rc = main(["predict", "--run", str(tmp_path / "run"), str(folder), "--out", str(out), "--measure", "hc",
               "--pixel-size", "0.1"])
    assert rc == 0
    rows = {r["case"]: r for r in csv.DictReader(open(out / "measurements.csv"))}
    assert set(rows) == {"002_HC", "003_HC", "blank_HC"}
    for case in rows:
        assert np.asarray(Image.open(out / f"{case}.png")).shape == (64, 64)
    assert rows["blank_HC"]["hc_mm"] == "" and "no head" in rows["blank_HC"]["note"]
    for case in ("002_HC", "003_HC"):                          # the trained ERSR student finds the phantom heads
        assert float(rows[case]["hc_mm"]) > 0 and rows[case]["note"] == ""
