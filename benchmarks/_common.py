"""What every benchmark script records beside its numbers: the CPU model, and appending to docs/benchmarks.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def record(text: str) -> None:
    with open(ROOT / "docs" / "benchmarks.md", "a") as f:
        f.write(text)


def section(title: str, command: str, machine: str, notes: list[str], columns: list[str], rows: list[str]) -> str:
    """A docs/benchmarks.md section: `## title`, the exact command, date and CPU (+ `machine`, e.g. threads and
    torch version), one bullet per note, then a table with `columns` over the pre-formatted `rows`."""
    import datetime

    return "\n".join([
        "", f"## {title}", "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today()}; CPU: {cpu_model()}, {machine}",
        *[f"- {n}" for n in notes], "",
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows, ""])
