"""Patient-level labelled/unlabelled/val/test splits: drawn by seed, from a protocol, or from a file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ssmis.atomic import json_text
from ssmis.data.adapter import Adapter, Item
from ssmis.errors import UserError

PARTS = ("labeled", "unlabeled", "val", "test")


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
        """Every id must exist, and no patient may sit on two sides (labelled and unlabelled share the train side)."""
        for part in PARTS:
            unknown = [c for c in getattr(self, part) if c not in patient_of]
            if unknown:
                raise UserError(where, f"{part} names unknown cases {unknown[:3]}", "Check the case ids against the dataset.")
        sides = {"labeled": "labeled", "unlabeled": "unlabeled", "val": "val", "test": "test"}
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
        return splits
    if cfg.protocol:
        splits = adapter.protocol_splits(cfg.labeled, cfg.seed)
        if splits is not None:
            splits.check(patient_of, f"{adapter.name} protocol split")
            return splits
    splits = random_splits(train_items, eval_items, cfg.labeled, cfg.val, cfg.test, cfg.seed,
                           fixed=getattr(adapter, "fixed_eval_splits", lambda: None)())
    splits.check(patient_of)
    return splits


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
