"""`ssmis bench`: a tiny phantom suite end to end, skipping finished cells, resuming an interrupted suite,
--dry-run, the report's content, and suite mistakes as one-line user errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SMALL
from ssmis.bench import run_suite
from ssmis.cli import main
from ssmis.errors import UserError

METHODS = ["supervised", "mean_teacher"]


def suite_file(tmp_path, name="tiny", grid=None, **extra):
    common = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in SMALL)}
    common.update({"train.iterations": 20, "train.eval_every": 10, "train.ckpt_every": 10, "train.log_every": 5})
    suite = {"name": name, "base": "phantom", "set": common,
             "grid": grid or {"method.name": METHODS, "seed": [0, 1]}, "qualitative": {"slices": 2}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path



@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The tiny suite (2 methods x 2 seeds, 20 steps) run once; returns (suite file, suite folder)."""
    tmp = tmp_path_factory.mktemp("bench")
    path, out = suite_file(tmp, ordering=True), tmp / "out"
    n = torch.get_num_threads()
    assert run_suite(path, out=out, progress=False) == 0
    torch.set_num_threads(n)
    return path, out


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_suite_runs_every_cell_and_writes_the_report(suite):
    path, out = suite
    names = {f"{m}-s{s}" for m in METHODS for s in (0, 1)}
    for n in names:
        d = out / n
        assert (d / "train_summary.json").is_file() and (d / "eval" / "test-best" / "summary.json").is_file()
        assert (d / "eval" / "test-last" / "summary.json").is_file()
        rec = json.loads((d / "bench_cell.json").read_text())
        assert rec["iterations"] == 20 and rec["s_per_it"] > 0 and rec["machine"]["cores"] >= 1
        assert 0 < rec["median_step_s"] <= rec["s_per_it"] * 1.5     # a median step, validation excluded
    # cells of one seed differ only in the method: same split, seed and steps
    cfg = {n: yaml.safe_load((out / n / "config.yaml").read_text()) for n in names}
    assert cfg["mean_teacher-s1"]["seed"] == 1 and cfg["mean_teacher-s1"]["method"]["name"] == "mean_teacher"
    assert (out / "supervised-s0" / "splits.json").read_text() == (out / "mean_teacher-s0" / "splits.json").read_text()

    rows = read_csv(out / "results.csv")
    assert len(rows) == 4 * 2 * 4                      # runs x checkpoints x (3 classes + mean)
    assert {r["cell"] for r in rows} == names and {r["checkpoint"] for r in rows} == {"best", "last"}
    assert {r["class_name"] for r in rows} == {"RV", "Myo", "LV", "mean"}
    one = next(r for r in rows if r["cell"] == "mean_teacher-s1" and r["checkpoint"] == "best" and r["class"] == "mean")
    summary = json.loads((out / "mean_teacher-s1" / "eval" / "test-best" / "summary.json").read_text())
    assert float(one["dice"]) == pytest.approx(summary["mean"]["dice"], abs=1e-6)
    assert one["seed"] == "1" and one["method"] == "mean_teacher" and one["iterations"] == "20"

    md = (out / "results.md").read_text()
    for word in ("**Data**", "**Split**", "**Selection**", "**Iterations**", "**Patch size**", "**Precision**",
                 "**Machine**", "Fair by construction", "32×32", "20 optimiser steps"):
        assert word in md, word
    assert "`supervised-s0`, `mean_teacher-s0` share split" in md
    lines = md.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    table = [line for line in lines[first:] if line.startswith("| ")][: 1 + len(METHODS)]
    assert table[0].startswith("| method | labelled | seeds | Dice RV | Dice Myo | Dice LV |")
    # methods.md's ordering check: rule 1 (mean_teacher ≥ supervised) over the 2 seeds of each
    check = lines[lines.index("### Ordering check (methods.md, ACDC-lite)"):]
    row = next(line for line in check if line.startswith("| 1 | mean_teacher @ "))
    assert "≥ supervised @ " in row and "| 2/2 |" in row and ("holds" in row or "fails" in row)
    curves = lines[lines.index("### Validation Dice by step"):]
    assert next(line for line in curves if line.startswith("| cell |")) == "| cell | 10 | 20 |"
    assert sum(line.startswith(f"| {n} | ") for line in curves for n in names) == len(names)
    body = {line.split(" | ")[0][2:]: line for line in table[1:]}
    assert set(body) == set(METHODS) and all("| 2 (0, 1) |" in line for line in body.values())
    # the mean over seeds in the table is the mean of the two runs' test Dice (best-val checkpoint)
    dice = [json.loads((out / f"supervised-s{s}" / "eval" / "test-best" / "summary.json").read_text())["mean"]["dice"]
            for s in (0, 1)]
    col = table[0].split(" | ").index("**Dice**")
    assert body["supervised"].split(" | ")[col].strip("*").startswith(f"{sum(dice) / 2:.4f}")
    assert "**" in "".join(table[1:])                  # the best of each column is bold
    for png in ("dice", "curves", "qualitative"):
        data = (out / "plots" / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"(plots/{png}.png)" in md


def test_second_run_trains_nothing(suite, monkeypatch):
    path, out = suite
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/*.pt")}
    assert len(stamps) == 8
    calls = []
    import ssmis.engine.run

    monkeypatch.setattr(ssmis.engine.run, "train", lambda *a, **k: calls.append(a) or pytest.fail("trained again"))
    before = (out / "results.md").stat().st_mtime_ns
    assert run_suite(path, out=out, progress=False) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/*.pt")} == stamps
    assert (out / "results.md").stat().st_mtime_ns > before      # the report is rewritten


def test_dry_run_lists_cells_and_their_state(suite, tmp_path, capsys):
    path, out = suite
    assert main(["bench", str(path), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "4 cells" in text and text.count("finished (skip)") == 4
    assert main(["bench", str(path), "--out", str(tmp_path / "fresh"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["supervised-s0", "mean_teacher-s0", "supervised-s1", "mean_teacher-s1"]
    assert all(" new " in line for line in lines)
    assert not (tmp_path / "fresh").exists()


def test_only_trains_the_matching_cells(tmp_path, monkeypatch, capsys):
    path = suite_file(tmp_path, grid={"method.name": METHODS, "seed": [0]})
    trained = []
    import ssmis.bench.grid as grid

    monkeypatch.setattr(grid, "_run_all", lambda cells, jobs, progress, threads=None: trained.extend(c.name for c in cells) or [])
    assert main(["bench", str(path), "--out", str(tmp_path / "o"), "--dry-run", "--only", "mean_*"]) == 0
    text = capsys.readouterr().out
    assert "supervised-s0" in text and "not selected (--only)" in text and text.count(" new ") == 1
    run_suite(path, out=tmp_path / "o", progress=False, only=["mean_*"])
    assert trained == ["mean_teacher-s0"]
    with pytest.raises(UserError, match="no cell of the suite matches bcp-"):
        run_suite(path, out=tmp_path / "o", progress=False, only=["bcp-*"])


def test_interrupted_suite_resumes(tmp_path, monkeypatch):
    """Ctrl-C in the middle of the second cell: the re-run skips the first, resumes the second from its
    checkpoint and trains the third, two cells side by side (--jobs 2)."""
    path = suite_file(tmp_path, "resume", grid={"method.name": ["supervised"], "seed": [0, 1, 2]})
    out = tmp_path / "out"
    import ssmis.engine.run

    real_train = ssmis.engine.run.train

    def interrupted(cfg, out=None, **kw):
        if cfg.seed == 1:
            real_train(cfg, out=out, **{**kw, "stop_after": 10})
            raise KeyboardInterrupt
        return real_train(cfg, out=out, **kw)

    monkeypatch.setattr(ssmis.engine.run, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_suite(path, out=out, progress=False)
    monkeypatch.setattr(ssmis.engine.run, "train", real_train)
    first = out / "supervised-s0" / "checkpoints" / "last.pt"
    stamp = first.stat().st_mtime_ns
    assert not (out / "supervised-s1" / "train_summary.json").exists()
    assert (out / "supervised-s1" / "checkpoints" / "last.pt").is_file()
    assert not (out / "supervised-s2").exists() and not (out / "results.md").exists()

    assert run_suite(path, out=out, jobs=2, progress=False) == 0
    assert first.stat().st_mtime_ns == stamp
    rec = json.loads((out / "supervised-s1" / "bench_cell.json").read_text())
    assert (rec["resumed_from"], rec["steps_this_session"], rec["iterations"]) == (10, 10, 20)
    assert "resumed at step 10" in (out / "supervised-s1" / "log.txt").read_text()
    steps = [int(r["step"]) for r in read_csv(out / "supervised-s1" / "metrics.csv") if r["name"] == "loss"]
    assert steps == [5, 10, 15, 20]
    assert json.loads((out / "supervised-s2" / "bench_cell.json").read_text())["resumed_from"] is None
    assert len({r["cell"] for r in read_csv(out / "results.csv")}) == 3


def test_differing_split_is_refused(suite, tmp_path):
    path, out = suite
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.pt"))
    split_file = copy / "mean_teacher-s0" / "splits.json"
    s = json.loads(split_file.read_text())
    s["test"] = s["test"][:1]
    split_file.write_text(json.dumps(s))
    with pytest.raises(UserError, match="comparison would be unfair"):
        run_suite(path, out=copy, report_only=True, progress=False)


def test_suite_mistakes_are_one_line_errors(tmp_path, capsys):
    bad_key = suite_file(tmp_path, "badkey", grid={"split.labled": [2, 3]})
    assert main(["bench", str(bad_key), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "badkey.yaml" in err and "labled" in err and "labeled" in err
    extra = suite_file(tmp_path, "extra", grdi={"seed": [0]})
    assert main(["bench", str(extra), "--dry-run"]) == 2
    assert "grdi: unknown key" in capsys.readouterr().err
    cfg = yaml.safe_load(bad_key.read_text())
    cfg["grid"] = {"seed": [0, 1]}
    cfg["set"]["seed"] = 3
    bad_key.write_text(yaml.safe_dump(cfg))
    assert main(["bench", str(bad_key), "--dry-run"]) == 2
    assert "also a grid key" in capsys.readouterr().err


@pytest.mark.parametrize("suite_path", sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_suite_resolves(suite_path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(suite_path.parents[1])                 # suites are run from the repository root
    rel = str(suite_path.relative_to(suite_path.parents[1]))
    assert main(["bench", rel, "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert " cells in " in capsys.readouterr().out


def readme_table_rows(readme: Path, marker: str) -> list[str]:
    """The body rows of the first `| method | labelled | seeds |` table after the line starting with `marker`."""
    lines = readme.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(marker))
    head = next(i for i in range(start, len(lines)) if lines[i].startswith("| method | labelled | seeds |"))
    end = next(i for i in range(head + 2, len(lines)) if not lines[i].startswith("| "))
    return lines[head + 2:end]


def test_readme_acdc_lite_table_matches_the_committed_results():
    """Every number of the README's ACDC-lite table is the mean over the listed seeds of the committed results.csv
    (cells finished later do not change the row until it lists their seed)."""
    import numpy as np

    root = Path(__file__).resolve().parents[1]
    names = {"supervised (labels only)": "supervised", "Mean Teacher": "mean_teacher", "UA-MT": "ua_mt", "CPS": "cps",
             "FixMatch": "fixmatch", "UniMatch": "unimatch", "BCP": "bcp", "ABD (BCP host, UNet/UNet)": "abd",
             "MetaSSL on MT": "metassl_mt", "MetaSSL on CPS": "metassl_cps", "MetaSSL on FixMatch": "metassl_fixmatch",
             "MetaSSL on BCP": "metassl_bcp", "CAD (reconstruction)": "cad", "M3HL": "m3hl",
             "MEDL (network 1)": "medl", "C3S3-2D (network 1)": "c3s3", "TransMedSeg": "transmedseg"}
    # suite folders per (labelled, row variant): rows marked "(pre-fix)" were made before a fix of their method
    # (issues 16 and 18) and their cells moved to the *_prefix folders; "+ SPCL init" rows start from SPCL encoders
    suites = {("5 %", ""): ["acdc_lite_5pct", "acdc_lite_5pct_seed_methods", "acdc_lite_5pct_pairs",
                            "acdc_lite_5pct_transmedseg"], ("5 %", " (pre-fix)"): ["acdc_lite_5pct_prefix"],
              ("10 %", ""): ["acdc_lite_10pct", "acdc_lite_10pct_recent"], ("10 %", " (pre-fix)"): ["acdc_lite_10pct_prefix"],
              ("5 %", " + SPCL init"): ["acdc_lite_spcl"], ("10 %", " + SPCL init"): ["acdc_lite_spcl"]}
    results = {}
    for (pct, variant), folders in suites.items():
        labelled = {"5 %": "68", "10 %": "136"}[pct]
        for folder in folders:
            path = root / "benchmarks" / "results" / folder / "results.csv"
            for r in read_csv(path) if path.is_file() else []:
                if r["class"] == "mean" and r["labeled"] == labelled:
                    results.setdefault((r["method"], pct, variant, r["checkpoint"]), []).append(r)
    rows = readme_table_rows(root / "README.md", "**ACDC-lite**")
    assert len(rows) >= 16
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        variant = next((v for v in (" (pre-fix)", " + SPCL init") if cells[0].endswith(v)), "")
        method, pct, seeds = names[cells[0].removesuffix(variant)], cells[1], {s.strip() for s in cells[2].split(",")}
        best, last = ([r for r in results[(method, pct, variant, ck)] if r["seed"] in seeds] for ck in ("best", "last"))
        assert len(best) == len(last) == len(seeds), row
        for text, rs, key in ((cells[3], best, "dice"), (cells[4], best, "jaccard"), (cells[5], best, "hd95_vox"),
                              (cells[6], best, "asd_vox"), (cells[7], last, "dice")):
            expected = np.mean([float(r[key]) for r in rs])
            digits = len(text.split()[0].split(".")[1])
            assert float(text.split()[0]) == pytest.approx(expected, abs=0.6 * 10 ** -digits), (row, key)


def test_readme_hc18_lite_table_matches_the_committed_results():
    """Every number of the README's HC18-lite table (Dice, Jaccard, HD95/ASD in mm, last Dice, HC error in mm) is the
    mean over the listed seeds of benchmarks/results/hc18_lite/results.csv."""
    import numpy as np

    root = Path(__file__).resolve().parents[1]
    names = {"supervised (labels only)": "supervised", "Mean Teacher": "mean_teacher", "BCP": "bcp", "ERSR": "ersr"}
    results = {}
    for r in read_csv(root / "benchmarks" / "results" / "hc18_lite" / "results.csv"):
        if r["class"] == "mean":
            results.setdefault((r["method"], f"{float(r['labeled']) * 100:g} %", r["checkpoint"]), []).append(r)
    rows = readme_table_rows(root / "README.md", "**HC18-lite**")
    assert len(rows) >= 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        method, pct, seeds = names[cells[0]], cells[1], {s.strip() for s in cells[2].split(",")}
        best, last = ([r for r in results[(method, pct, ck)] if r["seed"] in seeds] for ck in ("best", "last"))
        assert len(best) == len(last) == len(seeds), row
        for text, rs, key in ((cells[3], best, "dice"), (cells[4], best, "jaccard"), (cells[5], best, "hd95_mm"),
                              (cells[6], best, "asd_mm"), (cells[7], last, "dice"), (cells[8], best, "hc_err_mm")):
            expected = np.mean([float(r[key]) for r in rs])
            digits = len(text.split()[0].split(".")[1])
            assert float(text.split()[0]) == pytest.approx(expected, abs=0.6 * 10 ** -digits), (row, key)


def test_grid_over_method_configs_and_method_sections(tmp_path):
    """A grid over base configs (method variants, each with its own plug-ins and augmentation) names rows by the
    config file; a grid over whole method sections names them by their values; both are fair comparisons."""
    from ssmis.bench.grid import build_cells, load_suite
    from ssmis.bench.report import RunResult, check_fair

    common = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in SMALL)}
    for name, extra in (("plain", {}), ("with_metassl", {"plugins": [{"name": "metassl"}], "train": {"augment": "bcp"},
                                                         "method": {"name": "mean_teacher", "gate": 0.0}})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"base": "phantom", **extra}))
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump({"grid": {"base": ["plain.yaml", "with_metassl.yaml"], "seed": [0]}, "set": common}))
    cells = build_cells(load_suite(path), path, tmp_path / "out")
    assert [c.name for c in cells] == ["plain-s0", "with_metassl-s0"]
    assert cells[1].cfg.plugins[0]["name"] == "metassl" and cells[1].cfg.train.augment == "bcp"
    for c in cells:
        c.dir.mkdir(parents=True)
        (c.dir / "splits.json").write_text(json.dumps({"labeled": ["a"], "unlabeled": [], "val": [], "test": []}))
    from ssmis.data.splits import Splits

    results = [RunResult(c, {}, None, {}, None, Splits.read(c.dir / "splits.json")) for c in cells]
    assert [r.method for r in results] == ["plain", "with_metassl"]
    assert len(check_fair(results)) == 1                           # plug-ins and augmentation may differ
    # whole method sections: one row per section, named by its values
    path.write_text(yaml.safe_dump({"base": "phantom", "set": common, "grid": {
        "method": [{"name": "fixmatch", "unsup_loss": "ce"}, {"name": "fixmatch", "cutmix_p": 0.0}], "seed": [0]}}))
    cells = build_cells(load_suite(path), path, tmp_path / "out2")
    assert [c.name for c in cells] == ["fixmatch_unsup_lossce-s0", "fixmatch_cutmix_p0-s0"]
    # base given twice (or not at all) is a one-line error
    path.write_text(yaml.safe_dump({"base": "phantom", "grid": {"base": ["plain.yaml"]}}))
    with pytest.raises(UserError, match="either as `base` or as the grid key `base`"):
        load_suite(path)


def test_a_grid_over_labelled_scans(tmp_path):
    """split.labeled_scans in a grid: cells named by the number of scans, the report's labelled count is that number,
    and each cell labels exactly the slices of its scans."""
    from ssmis.config import load_config
    from ssmis.data.adapter import make_adapter
    from ssmis.data.splits import make_splits

    cfg = load_config("phantom", SMALL)
    base = make_splits(make_adapter(cfg.data.layout, cfg.data.root, cfg.data), cfg.split)
    scans = (base.labeled + base.unlabeled)[:2]
    path = suite_file(tmp_path, "scans", grid={"method.name": ["supervised"],
                                               "split.labeled_scans": [scans[:1], scans], "seed": [0]})
    n = torch.get_num_threads()
    assert run_suite(path, out=tmp_path / "out", progress=False) == 0
    torch.set_num_threads(n)
    for k in (1, 2):
        split = json.loads((tmp_path / "out" / f"supervised-{k}scans-s0" / "splits.json").read_text())
        assert sorted(split["labeled"]) == sorted(scans[:k]) and split["meta"]["labeled_scans"] == scans[:k]
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert {(r["cell"], r["labeled"]) for r in rows} == {("supervised-1scans-s0", "1"), ("supervised-2scans-s0", "2")}


def test_a_cell_another_process_is_training_is_left_to_it(tmp_path):
    """Two `ssmis bench` processes with overlapping --only selections: the second leaves the cell whose lock the
    first holds (nothing written in its folder), and trains it once the lock is free."""
    fcntl = pytest.importorskip("fcntl")
    from ssmis.bench.grid import run_cell

    cell = tmp_path / "supervised-l2-s0"
    with open(tmp_path / ".supervised-l2-s0.lock", "w") as held:    # the other process
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run_cell({}, str(cell), progress=False) == {"cell": cell.name, "action": "busy elsewhere"}
        assert not cell.exists()
        fcntl.flock(held, fcntl.LOCK_UN)
    assert "error" in run_cell({"bad": 1}, str(cell), progress=False)      # lock free: this process goes ahead
