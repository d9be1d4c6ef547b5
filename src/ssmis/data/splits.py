"""Patient-level labelled/unlabelled/val/test splits: drawn by seed, from a protocol, or from a file."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ssmis.atomic import json_text
from ssmis.data.adapter import Adapter, Item
from ssmis.errors import UserError

PARTS = ("labeled", "unlabeled", "val", "test")
SLICE_FILE = re.compile(r"(?P<volume>.+)_slice_(?P<k>\d+)")   # SSL4MIS slice files: <volume>_slice_K


@dataclass
class Splits:
    labeled: list[str]
    unlabeled: list[str]
    val: list[str]
    test: list[str]
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json_text(asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> "Splits":
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(str(p), "splits file not found", "Check split.file.") from None
        except json.JSONDecodeError as e:
            raise UserError(str(p), f"not valid JSON ({e.msg})", "Fix or regenerate it with `ssmis data split`.") from None
        missing = [k for k in ("labeled", "val") if k not in raw]
        if missing:
            raise UserError(str(p), f"missing lists {missing}", f"A splits file has the lists {list(PARTS)}.")
        return cls(**{k: list(raw.get(k, [])) for k in PARTS}, meta=raw.get("meta", {}))

    def check(self, patient_of: dict[str, str], where: str = "splits") -> None:
        """Every id must exist, no case may be in two parts, and no patient may sit on two sides (labelled and
        unlabelled share the train side: SPCL labels one cardiac phase of a patient and not the other)."""
        parts: dict[str, str] = {}
        for part in PARTS:
            unknown = [c for c in getattr(self, part) if c not in patient_of]
            if unknown:
                raise UserError(where, f"{part} names unknown cases {unknown[:3]}", "Check the case ids against the dataset.")
            for c in getattr(self, part):
                if parts.setdefault(c, part) != part:
                    raise UserError(where, f"case {c} is in both {parts[c]} and {part}", "Give each case one part.")
        sides = {"labeled": "train", "unlabeled": "train", "val": "val", "test": "test"}
        seen: dict[str, str] = {}
        for part, side in sides.items():
            for c in getattr(self, part):
                pat = patient_of[c]
                if seen.setdefault(pat, side) != side:
                    raise UserError(where, f"patient {pat} is in both {seen[pat]} and {side}",
                                    "Split by patient: all cases of a patient go to one side.")


def _count(x: float, n: int, what: str) -> int:
    k = int(round(x * n)) if x < 1 else int(x)
    if x > 0 and k == 0:
        k = 1
    if k > n:
        raise UserError(f"split.{what}", f"asks for {k} patients but only {n} are available", "Lower it.")
    return k


def make_splits(adapter: Adapter, cfg) -> Splits:
    """Build the splits for a data adapter from a SplitConfig (see config.schema)."""
    train_items = adapter.items("train")
    eval_items = adapter.items("eval")
    patient_of = {it.id: it.patient for it in train_items + eval_items}
    if cfg.file:
        splits = Splits.read(cfg.file)
        splits.check(patient_of, cfg.file)
        return label_scans(splits, cfg.labeled_scans, patient_of)
    if cfg.protocol:
        splits = adapter.protocol_splits(cfg.labeled, cfg.seed)
        if splits is not None:
            splits.check(patient_of, f"{adapter.name} protocol split")
            return label_scans(splits, cfg.labeled_scans, patient_of)
    splits = random_splits(train_items, eval_items, cfg.labeled, cfg.val, cfg.test, cfg.seed,
                           fixed=getattr(adapter, "fixed_eval_splits", lambda: None)())
    splits.check(patient_of)
    return label_scans(splits, cfg.labeled_scans, patient_of)


def scan_of(case_id: str) -> str:
    """The scan a case belongs to: `<volume>` of an SSL4MIS slice file `<volume>_slice_K`, else the case itself."""
    m = SLICE_FILE.fullmatch(case_id)
    return m["volume"] if m else case_id


def label_scans(splits: Splits, scans: list[str] | None, patient_of: dict[str, str]) -> Splits:
    """split.labeled_scans: the training cases of these scans become the labelled set (in the split's order), every
    other training case unlabelled; val and test stay. The meta's counts describe the new sets (the base split's
    labelled/unlabelled counts are dropped); `patient_of` (case id -> patient) gives the labelled patients."""
    if not scans:
        return splits
    train = splits.labeled + splits.unlabeled
    have = {scan_of(c) for c in train}
    unknown = [s for s in scans if s not in have]
    if unknown:
        held = {scan_of(c) for c in splits.val + splits.test}
        where = "are val/test scans" if all(s in held for s in unknown) else "are not scans of the training split"
        raise UserError("split.labeled_scans", f"{unknown[:3]} {where}",
                        f"Name training scans (e.g. {sorted(have)[0]}); val and test scans are never labelled.")
    wanted = set(scans)
    lab = [c for c in train if scan_of(c) in wanted]
    unl = [c for c in train if scan_of(c) not in wanted]
    meta = {k: v for k, v in splits.meta.items() if not k.startswith(("labeled_", "unlabeled_", "restacked_"))}
    meta.update({"rule": f"labelled scans given by split.labeled_scans ({len(scans)}); every other training case "
                 "unlabelled; val/test as before", "labeled_scans": list(scans), "labeled_cases": len(lab),
                 "unlabeled_cases": len(unl), "labeled_patients": len({patient_of[c] for c in lab})})
    return Splits(lab, unl, splits.val, splits.test, meta)


def random_splits(train_items: list[Item], eval_items: list[Item], labeled: float, val: float, test: float,
                  seed: int, fixed: tuple[list[str], list[str]] | None = None) -> Splits:
    """Seeded patient permutation. With `fixed` (val ids, test ids) only labelled/unlabelled are drawn.

    Val, test and labelled patients are drawn among patients that have labels; patients without any label
    (nnU-Net imagesTs, images without masks) always go to the unlabelled pool."""
    rng = np.random.default_rng(seed)
    with_labels = {it.patient for it in train_items if it.has_label}
    if fixed is not None:
        val_ids, test_ids = fixed
        held = {it.patient for it in eval_items if it.id in set(val_ids) | set(test_ids)}
    else:
        pats = sorted(with_labels)
        perm = [pats[i] for i in rng.permutation(len(pats))]
        n_test, n_val = _count(test, len(perm), "test"), _count(val, len(perm), "val")
        test_p, val_p = set(perm[:n_test]), set(perm[n_test:n_test + n_val])
        held = test_p | val_p
        test_ids = [it.id for it in eval_items if it.patient in test_p]
        val_ids = [it.id for it in eval_items if it.patient in val_p]
    pool = sorted(with_labels - held)
    if not pool:
        raise UserError("split", "no labelled patients left for training", "Lower split.val / split.test.")
    order = [pool[i] for i in np.random.default_rng(seed + 1).permutation(len(pool))]
    n_lab = _count(labeled, len(order), "labeled")
    lab_p = set(order[:n_lab])
    lab = [it.id for it in train_items if it.patient in lab_p and it.has_label]
    unl = [it.id for it in train_items if it.patient not in lab_p and it.patient not in held]
    meta = {"labeled_patients": n_lab, "unlabeled_patients": len({it.patient for it in train_items} - lab_p - held),
            "seed": seed, "rule": "random by patient"}
    return Splits(lab, unl, list(val_ids), list(test_ids), meta)
