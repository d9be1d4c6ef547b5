"""The data-adapter contract: one class per on-disk layout, read where the data lie (no conversion)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from ssmis.errors import UserError
from ssmis.registry import LAYOUTS

Role = Literal["train", "eval"]


@dataclass(frozen=True)
class Item:
    """One loadable case: a 2D image, a 2D slice file, or a 3D volume."""

    id: str                      # unique case id, e.g. "patient001_frame01" or "010_2HC"
    patient: str                 # the unit of splitting: all items of a patient go to one side
    has_label: bool
    source: str                  # file (or description) named in error messages
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class DatasetInfo:
    layout: str
    num_classes: int
    spatial_dims: int            # of the stored items: 2 (images/slices) or 3 (volumes)
    channels: int
    spacing_known: bool
    class_names: list[str] | None = None
    eval_spatial_dims: int | None = None   # dims of eval items when they differ (ACDC: 2D slices, 3D volumes)
    spacing_stated: tuple[float, ...] | None = None   # data.spacing, where the files carry none (not read from them)


class DataError(UserError):
    """A file that cannot be read or is inconsistent; `where` is the file."""


class Adapter(ABC):
    """Reads one layout. Samples are dicts of numpy arrays:

    image float32 C×H×W or C×D×H×W; label int64 H×W or D×H×W (absent when the item has no label);
    case, patient, spacing (mm, array axis order, None when unknown), and where they exist
    slice_index, num_slices (position of a slice within its volume).
    """

    name: ClassVar[str]
    needs_root: ClassVar[bool] = True      # False for the built-in phantoms

    def __init__(self, root: Path | None, cfg: Any = None):
        self.root = Path(root) if root is not None else None
        self.cfg = cfg

    @classmethod
    def detect(cls, root: Path) -> bool:
        return False

    @classmethod
    def near_miss(cls, root: Path) -> str | None:
        """When `detect` fails but some of the layout's files are there: what is missing (for the error message)."""
        return None

    @abstractmethod
    def info(self) -> DatasetInfo: ...

    @abstractmethod
    def items(self, role: Role) -> list[Item]:
        """`train`: the pool that labelled/unlabelled sets are drawn from; `eval`: the pool of val/test cases."""

    @abstractmethod
    def load(self, item: Item) -> dict: ...

    def protocol_splits(self, labeled: float, seed: int) -> "Splits | None":  # noqa: F821
        """The literature's split of this dataset, or None when it has none."""
        return None


DATA_ENV = "SSMIS_DATA"


def resolve_root(root: str | Path | None) -> Path | None:
    """The dataset root: `root` as given where it exists. Only as a fallback, the folder in $SSMIS_DATA: no root
    -> $SSMIS_DATA itself; a missing relative root -> $SSMIS_DATA/<root>, else $SSMIS_DATA/<its last part> (so
    a config's `../shared/data/ACDC` finds $SSMIS_DATA/ACDC). Anything else is returned unchanged."""
    env = os.environ.get(DATA_ENV)
    if root is None:
        return Path(env) if env else None
    p = Path(root)
    if p.exists() or p.is_absolute() or not env:
        return p
    for cand in (Path(env) / p, Path(env) / p.name):
        if cand.exists():
            return cand
    return p


def _existing_root(root: Path, given: str | Path | None) -> Path:
    """`root` (resolved from `given`) if it exists, else a user error naming the path as given."""
    if root.exists():
        return root
    env = os.environ.get(DATA_ENV)
    raise UserError(str(given), "dataset root does not exist",
                    f"Check the path (also looked under ${DATA_ENV}={env})." if env else
                    f"Check the path, or set ${DATA_ENV} to the folder that holds your datasets.")


def make_adapter(layout: str, root: str | Path | None, cfg: Any = None) -> Adapter:
    """Build the adapter for `layout` ('auto' detects it from the files under `root`)."""
    import ssmis.data  # noqa: F401  (registers the built-in layouts)

    given, root = root, resolve_root(root)
    if layout == "auto":
        if root is None:
            raise UserError("data.root", "no dataset root given",
                            f"Set data.root (or ${DATA_ENV}), or data.layout=phantom.")
        layout = detect_layout(_existing_root(root, given))
    cls = LAYOUTS.get(layout, "data.layout")
    if getattr(cfg, "restack_volumes", False) and layout != "ssl4mis_h5":
        raise UserError("data.restack_volumes", f"applies to the ssl4mis_h5 layout only, not to {layout}",
                        "Remove it (its volumes are stored whole).")
    if not cls.needs_root:
        adapter = cls(Path(given) if given is not None else None, cfg)
    elif root is None:
        raise UserError("data.root", f"layout {layout!r} needs a dataset root", f"Set data.root=PATH (or ${DATA_ENV}).")
    else:
        adapter = cls(_existing_root(root, given), cfg)
    spacing = getattr(cfg, "spacing", None)
    return with_spacing(adapter, spacing) if spacing else adapter


def with_spacing(adapter: Adapter, spacing: list[float]) -> Adapter:
    """`adapter` whose samples carry the stated spacing (`data.spacing`, mm in array axis order; one value =
    isotropic). Only for layouts whose files carry none: a stated spacing never replaces a stored one. 2D samples
    of a 3D dataset (slices) get the last two values."""
    info = adapter.info()
    if info.spacing_known:
        raise UserError("data.spacing", f"the {info.layout} layout stores the spacing of every case",
                        "Remove data.spacing; it is for layouts whose files carry none (ssl4mis_h5, la_h5, folders).")
    dims = max(info.spatial_dims, info.eval_spatial_dims or 0)
    if len(spacing) not in (1, dims):
        raise UserError("data.spacing", f"{list(spacing)} has {len(spacing)} values; {info.layout} data are {dims}D",
                        f"Give one value (isotropic) or {dims} (mm, in the arrays' axis order).")
    full = tuple(float(s) for s in spacing) * (dims if len(spacing) == 1 else 1)
    load, base = adapter.load, adapter.info

    def load_with_spacing(item: Item) -> dict:
        sample = load(item)
        sample["spacing"] = full[-(sample["image"].ndim - 1):]
        return sample

    def info_with_spacing() -> DatasetInfo:
        i = base()
        i.spacing_known, i.spacing_stated = True, full
        return i

    adapter.load, adapter.info = load_with_spacing, info_with_spacing
    return adapter


def detect_layout(root: Path) -> str:
    import ssmis.data  # noqa: F401

    if not root.exists():
        raise UserError(str(root), "path does not exist", "Check the dataset path.")
    if root.is_dir() and not any(root.iterdir()):
        raise UserError(str(root), "folder is empty", "Point to a dataset folder.")
    found = [n for n in LAYOUTS.list() if LAYOUTS.get(n).detect(root)]
    if not found:
        hints = [h for h in (LAYOUTS.get(n).near_miss(root) for n in LAYOUTS.list()) if h]
        raise UserError(str(root), "unknown data layout" + "".join(f" ({h})" for h in hints),
                        f"Expected one of: {', '.join(LAYOUTS.list())} (see README, 'Data layouts'), or force one with --layout.")
    if len(found) > 1:
        raise UserError(str(root), f"matches several layouts ({', '.join(found)})", "Force one with --layout / data.layout.")
    return found[0]


def as_label(arr: np.ndarray, source: str, num_classes: int | None = None) -> np.ndarray:
    lab = np.asarray(arr)
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
            raise DataError(source, "label holds non-integer values", "Labels must be integer class indices.")
    lab = lab.astype(np.int64)
    if num_classes is not None and lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        bad = sorted(set(np.unique(lab).tolist()) - set(range(num_classes)))
        raise DataError(source, f"label values {bad[:5]} outside the classes 0..{num_classes - 1}",
                        "Fix the mask or set data.num_classes / data.mask_values.")
    return lab
