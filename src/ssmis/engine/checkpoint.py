"""Full-state checkpoints, written atomically and loadable with weights_only=True."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ssmis.atomic import atomic_write_bytes
from ssmis.errors import UserError

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Serialise in memory first, so a failure while pickling or writing never touches the old file."""
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), "checkpoint not found", "Train first, or choose --checkpoint last/best.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure means a damaged file)
        raise UserError(str(path), f"checkpoint cannot be read ({type(e).__name__})",
                        "The file is damaged; resume from another checkpoint or retrain.") from None
