"""LA (2018 Atrial Segmentation Challenge) as the semi-supervised literature ships it, read where it lies:
`<case>/mri_norm2.h5` (`image`, `label`; no spacing) listed in `train.list` (80 cases) and `test.list` (20), in
any of these arrangements (ROOT = data.root):

* BCP / MC-Net / SS-Net: `ROOT/train.list`, `ROOT/test.list`, `ROOT/2018LA_Seg_Training Set/<case>/mri_norm2.h5`;
* UA-MT: ROOT is `2018LA_Seg_Training Set` itself (UA-MT's `--root_path`), the lists one level up;
* flat: `ROOT/<case>/mri_norm2.h5` beside the lists (or the case folder renamed).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ssmis.data.adapter import Adapter, DataError, DatasetInfo, Item
from ssmis.data.splits import Splits
from ssmis.data.ssl4mis_h5 import read_h5, read_list
from ssmis.errors import UserError
from ssmis.registry import LAYOUTS

CASE_FOLDER = "2018LA_Seg_Training Set"
VOLUME = "mri_norm2.h5"
LISTS = ("train.list", "test.list")


def find_lists(root: Path) -> Path | None:
    """The folder holding both train.list and test.list: `root`, else its parent (UA-MT), else None."""
    for folder in (root, root.parent):
        if all((folder / name).is_file() for name in LISTS):
            return folder
    return None


def named_folders(root: Path, list_dir: Path) -> list[Path]:
    """Where the case folders lie in the public layouts, in the order tried (duplicates removed)."""
    out: list[Path] = []
    for folder in (root, root / CASE_FOLDER, list_dir, list_dir / CASE_FOLDER):
        if folder not in out:
            out.append(folder)
    return out


def folders_with_volumes(root: Path, list_dir: Path) -> list[Path]:
    """Folders holding `*/mri_norm2.h5`: the named ones first, then any other subfolder of the list folder."""
    others = sorted(d for d in list_dir.iterdir() if d.is_dir())
    out: list[Path] = []
    for folder in named_folders(root, list_dir) + others:
        if folder.is_dir() and folder not in out and next(folder.glob(f"*/{VOLUME}"), None) is not None:
            out.append(folder)
    return out


def _case(line: str) -> str:
    """A list line is a case id; some forks write `<case>/mri_norm2.h5`."""
    return line.removesuffix(VOLUME).strip("/")


@LAYOUTS.register("la_h5")
class LAAdapter(Adapter):
    """LA as UA-MT/BCP ship it: `<case>/mri_norm2.h5` + `train.list`/`test.list`, the case folders in
    `2018LA_Seg_Training Set/` beside the lists, or the lists one level above them, or flat (no val list).
    Arrays are returned in their stored axis order, so the literature's 112×112×80 patches apply unchanged.
    """

    name = "la_h5"

    @classmethod
    def detect(cls, root: Path) -> bool:
        list_dir = find_lists(root)
        return list_dir is not None and bool(folders_with_volumes(root, list_dir))

    @classmethod
    def near_miss(cls, root: Path) -> str | None:
        list_dir = find_lists(root)
        if list_dir is None or folders_with_volumes(root, list_dir):
            return None
        where = " or ".join(f"'{d}'" for d in named_folders(root, list_dir))
        return f"la_h5: {list_dir / 'train.list'} and test.list found, but no <case>/{VOLUME} in {where}"

    @cached_property
    def _list_dir(self) -> Path:
        folder = find_lists(self.root)
        if folder is None:
            raise DataError(str(self.root), "no train.list and test.list here or one level up",
                            f"Point data.root to the folder holding train.list, test.list and '{CASE_FOLDER}/' "
                            f"(BCP layout), or to '{CASE_FOLDER}' itself with the lists one level up (UA-MT layout).")
        return folder

    @cached_property
    def _lists(self) -> dict[str, list[str]]:
        return {role: [_case(ln) for ln in read_list(self._list_dir / f"{role}.list")] for role in ("train", "test")}

    @cached_property
    def _volumes(self) -> Path:
        """The folder of the case folders: of those holding volumes, the one with the most listed cases."""
        cases = self._lists["train"] + self._lists["test"]
        folders = folders_with_volumes(self.root, self._list_dir)
        hits = {d: sum((d / c / VOLUME).is_file() for c in cases) for d in folders}
        best = max(hits, key=hits.get, default=None)       # ties: the first in the order tried
        if best is None or hits[best] == 0:
            tried = ", ".join(f"'{d}'" for d in named_folders(self.root, self._list_dir))
            raise DataError(str(self.root), f"found none of the {len(cases)} cases of {self._list_dir / 'train.list'} "
                            f"and test.list as <case>/{VOLUME} (looked in {tried} and the other subfolders of "
                            f"'{self._list_dir}')",
                            f"Point data.root to the folder holding the lists and '{CASE_FOLDER}/', or to "
                            f"'{CASE_FOLDER}' itself with the lists one level up.")
        return best

    @property
    def case_folder(self) -> Path:
        """Where the case folders were found (`ssmis data check` prints it)."""
        return self._volumes

    @cached_property
    def _k(self) -> int:
        return getattr(self.cfg, "num_classes", None) or 2

    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, self._k, 3, 1, False, ["background", "left atrium"] if self._k == 2 else None)

    def items(self, role):
        role = "train" if role == "train" else "test"
        return [Item(c, c, True, str(self._volumes / c / VOLUME), {"list": role}) for c in self._lists[role]]

    def load(self, item: Item) -> dict:
        if not Path(item.source).is_file():
            raise DataError(item.source, f"file not found (case {item.id} of {item.meta.get('list', 'train')}.list; "
                            f"cases are read from '{self._volumes}', where the most listed cases were found)",
                            f"Restore {item.id}/{VOLUME} there, or remove the case from the list.")
        image, label = read_h5(Path(item.source), 3, self._k, item.has_label)
        sample = {"image": image[None], "case": item.id, "patient": item.patient, "spacing": None}
        if label is not None:
            sample["label"] = label
        return sample

    def fixed_eval_splits(self) -> tuple[list[str], list[str]]:
        return [], list(self._lists["test"])

    def protocol_splits(self, labeled: float, seed: int) -> Splits:
        """The first N cases of train.list are labelled (N a count, or a fraction < 1 of it); test.list is test."""
        train = self._lists["train"]
        n = int(labeled) if labeled >= 1 else max(1, round(labeled * len(train)))
        if n > len(train):
            raise UserError("split.labeled", f"asks for {n} labelled cases but train.list has {len(train)}",
                            "Lower it (the LA protocol labels 4, 8 or 16 of the 80).")
        meta = {"rule": "LA protocol (UA-MT): the first N cases of train.list are labelled, the rest unlabelled; "
                        "test.list is test; LA has no val split (val is empty)",
                "labeled_cases": n, "unlabeled_cases": len(train) - n, "test_cases": len(self._lists["test"]),
                "seed": seed}
        return Splits(train[:n], train[n:], [], list(self._lists["test"]), meta)
