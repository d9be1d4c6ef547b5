"""Meta-labels of 2D training slices: free per-slice integers that SPCL's contrastive pre-training uses as
targets (methods.md "SPCL", Components, Meta-labels; [CODE jizongFox/Self-paced-Contrastive-Learning
semi_seg/data/dataset.py, semi_seg/epochers/helper.py]).

* `partition`: the slice position i (0-based) in a scan of L slices cut into P groups. ACDC's rule (P = 3):
  i ≤ ⌊L/3⌋ − 1 → 0, i ≤ 2⌊L/3⌋ → 1, else 2; the rule of the other datasets (P = 8 or 4): i // (⌊L/P⌋ + 1).
  `rule: auto` takes the ACDC rule at P = 3 and the other one otherwise.
* `scan`: the volume a slice comes from (SSL4MIS slice files `<volume>_slice_K`: the `<volume>` part; slices cut
  from a stored volume: its case id).
* `patient`: the adapter's patient id; where a case id reads `<patient>_frameNN` (ACDC in SSL4MIS or nnU-Net
  naming), the part before `_frame`, so that the ED and ES scans of a patient share it.
* `phase` (cardiac cycle): 0 for the first frame of a patient (lowest frame number: ED in ACDC), 1 for the others;
  the reference's rule "phase code 00 → 0, else 1" on its own file naming. Only where frames are known.
* `self`: every slice its own class (SimCLR: only the twin view is positive).
* `item.<key>`: any integer an adapter puts in an item's `meta` (e.g. `item.frame`, `item.index`).

Labels are returned as integer tensors; only equality matters to the loss, so the encoding is arbitrary (the
reference re-encodes per batch).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ssmis.data.adapter import Item
from ssmis.data.splits import SLICE_FILE
from ssmis.errors import UserError

BUILTIN = ("partition", "scan", "patient", "phase", "self")
_FRAME = re.compile(r"(?P<patient>.+?)_frame(?P<frame>\d+)")


def partition_labels(slice_index, num_slices, groups: int = 3, rule: str = "auto") -> np.ndarray:
    """The partition (0 … P−1) of each slice from its 0-based position i and its scan's slice count L."""
    i = np.asarray(slice_index, dtype=np.int64)
    n = np.asarray(num_slices, dtype=np.int64)
    if i.size and (i.min() < 0 or np.any(i >= n)):
        raise ValueError("partition labels need slice positions 0 <= i < L (2D images have none)")
    if rule == "auto":
        rule = "acdc" if groups == 3 else "floor"
    if rule == "acdc":
        if groups != 3:
            raise ValueError(f"the ACDC partition rule has 3 groups, not {groups}")
        third = n // 3
        return np.where(i <= third - 1, 0, np.where(i <= 2 * third, 1, 2)).astype(np.int64)
    if rule == "floor":
        return (i // (n // groups + 1)).astype(np.int64)
    raise ValueError(f"unknown partition rule {rule!r} (auto, acdc, floor)")


@dataclass(frozen=True)
class SliceOrigin:
    """Where one training slice comes from."""

    scan: str
    patient: str
    frame: int | None
    item: Item


def slice_origin(item: Item) -> SliceOrigin:
    """Scan, patient and frame of the slices of `item` (a slice file or a volume cut into slices)."""
    m = SLICE_FILE.fullmatch(item.id) if "slice_index" in item.meta else None
    scan = m["volume"] if m else item.id
    f = _FRAME.fullmatch(scan)
    patient = f["patient"] if f else item.patient
    frame = item.meta.get("frame", int(f["frame"]) if f else None)
    return SliceOrigin(scan, patient, None if frame is None else int(frame), item)


def _encode(values: list) -> Tensor:
    """Integer codes of arbitrary hashable values, in order of first appearance."""
    codes: dict = {}
    return torch.tensor([codes.setdefault(v, len(codes)) for v in values], dtype=torch.long)


def _phase(origins: list[SliceOrigin], where: str) -> Tensor:
    if any(o.frame is None for o in origins):
        missing = next(o for o in origins if o.frame is None)
        raise UserError(where, f"case {missing.item.id} has no cardiac phase (no frame number)",
                        "Use the phase meta-label on ACDC-like data only (case ids <patient>_frameNN).")
    first: dict[str, int] = {}
    for o in origins:
        first[o.patient] = min(first.get(o.patient, o.frame), o.frame)
    return torch.tensor([0 if o.frame == first[o.patient] else 1 for o in origins], dtype=torch.long)


def meta_label_values(name: str, origins: list[SliceOrigin], slice_index: Tensor, num_slices: Tensor,
                      groups: int = 3, rule: str = "auto", where: str = "pretrain.meta_labels") -> Tensor:
    """One meta-label (N integers) for N slices, given each slice's origin and position."""
    if name == "partition":
        if bool((slice_index < 0).any()):
            raise UserError(where, "the partition meta-label needs slices cut from volumes; these data are 2D images",
                            "Use the self meta-label (or an item.<key> the adapter provides).")
        return torch.from_numpy(partition_labels(slice_index.numpy(), num_slices.numpy(), groups, rule))
    if name == "scan":
        return _encode([o.scan for o in origins])
    if name == "patient":
        return _encode([o.patient for o in origins])
    if name == "phase":
        return _phase(origins, where)
    if name == "self":
        return torch.arange(len(origins), dtype=torch.long)
    if name.startswith("item."):
        key = name[len("item."):]
        vals = [o.item.meta.get(key) for o in origins]
        bad = next((o.item.id for o, v in zip(origins, vals) if not isinstance(v, (int, np.integer))
                    or isinstance(v, bool)), None)
        if bad is not None:
            raise UserError(where, f"{name}: case {bad} has no integer {key!r} in its adapter metadata",
                            "Name an integer the adapter provides for every training case.")
        return torch.tensor([int(v) for v in vals], dtype=torch.long)
    raise UserError(where, f"unknown meta-label {name!r}", f"Use one of {', '.join(BUILTIN)} or item.<key>.")


def check_meta_label_name(name: str) -> str:
    """A config validator: a known meta-label name."""
    if name in BUILTIN or (name.startswith("item.") and len(name) > len("item.")):
        return name
    raise ValueError(f"unknown meta-label {name!r}; use one of {', '.join(BUILTIN)} or item.<key>")
