"""Learning-curve plots from metrics.csv (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_series(metrics_csv: Path, split: str, name: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row["split"] == split and row["name"] == name:
                xs.append(int(row["step"]))
                ys.append(float(row["value"]))
    return xs, ys


def plot_curves(metrics_csv: Path, out_png: Path, runs: dict[str, Path] | None = None) -> Path:
    """Training loss and validation Dice against steps; `runs` overlays several runs (label -> metrics.csv)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = runs or {"run": Path(metrics_csv)}
    fig, (ax_l, ax_v) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, path in runs.items():
        xs, ys = read_series(path, "train", "loss")
        if xs:
            ax_l.plot(xs, ys, label=label, lw=1)
        xs, ys = read_series(path, "val", "dice")
        if xs:
            ax_v.plot(xs, ys, marker="o", ms=3, label=label)
    ax_l.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax_v.set(xlabel="step", ylabel="mean foreground Dice", title="Validation Dice")
    for ax in (ax_l, ax_v):
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend()
    return save_figure(fig, out_png)


def save_figure(fig, out_png: str | Path) -> Path:
    """Lay out, write (folders made) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

