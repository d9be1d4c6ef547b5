"""Atomic file writes: write `name.tmp` beside the target, fsync, then rename over it. JSON is written strictly:
NaN and ±Infinity (which `json.dumps` would write, though JSON has no such values) become null."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def finite_json(obj):
    """`obj` (nested dicts, lists, tuples) with every NaN or infinite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = 1) -> str:
    """Valid JSON for `obj`: non-finite floats written as null (see `finite_json`)."""
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    atomic_write_text(path, json_text(obj, indent) + "\n")
