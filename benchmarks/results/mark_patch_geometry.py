"""One-off record keeping (issue 18): every ACDC-lite cell made before `data.augment_at` existed resized its
slices to the patch at load and augmented them there, which is `data.augment_at: patch`. This writes that
value into the config.yaml of each finished cell (bench_cell.json or a test evaluation present) that lacks it, so the configs say
how the cells were made and `ssmis bench` recognises them under configs/acdc_lite.yaml.
Run: python benchmarks/results/mark_patch_geometry.py"""

from pathlib import Path

root = Path(__file__).parent
for cfg in sorted(root.glob("acdc_lite_*/*/config.yaml")):
    finished = (cfg.parent / "bench_cell.json").is_file() or (cfg.parent / "eval" / "test-last" / "summary.json").is_file()
    if not finished or "augment_at:" in cfg.read_text():
        continue
    lines = cfg.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("  image_order:"))
    lines.insert(at + 1, "  augment_at: patch\n")
    cfg.write_text("".join(lines))
    print(f"marked {cfg.parent}")
