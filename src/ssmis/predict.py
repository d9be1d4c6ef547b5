"""`ssmis predict`: a trained run's model -> masks for new scans in the input's own format (NIfTI with its affine
and header, PNG at its size, HDF5 `label`), `measurements.csv` per case, optional overlay PNGs."""

from __future__ import annotations

import csv
import gzip
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssmis.atomic import atomic_write_bytes, atomic_write_text
from ssmis.data.adapter import DataError, resolve_root
from ssmis.errors import UserError

NIFTI = (".nii.gz", ".nii")
IMAGES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
HDF5 = (".h5", ".hdf5")
_CHANNEL_FILE = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")        # nnU-Net: CASE_0000.nii.gz, CASE_0001...
_UNIT_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}
PIXEL_COLUMNS = ("pixel size(mm)", "pixel_size_mm")                    # HC18 CSVs, or a plain column name
HC_REF_COLUMNS = ("head circumference (mm)", "hc_mm")
HC18_CSVS = ("training_set_pixel_size_and_HC.csv", "test_set_pixel_size.csv")
_COLOURS = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 90], [70, 130, 240], [240, 200, 40], [200, 80, 220],
                     [40, 210, 220], [250, 140, 30]], np.float32)


@dataclass
class Case:
    name: str                 # case id: file name without its extension (and without _0000 for nnU-Net channels)
    kind: str                 # "nifti" | "image" | "h5"
    paths: list[Path]         # one file, or one per channel (nnU-Net)
    out: Path                 # output mask path


@dataclass
class Model:
    """A trained network with what inference needs from its run config."""

    net: object
    cfg: object               # RunConfig
    raw: dict                 # the config as stored in the checkpoint
    state_step: int
    device: object
    precision: object
    class_names: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)    # two-network runs: the modules an ensemble would average
    averaged: bool = False                              # net is their softmax average, not network 1

    @property
    def channels(self) -> int:
        return int(self.net.init_args["in_channels"])

    @property
    def num_classes(self) -> int:
        return int(self.net.init_args["num_classes"])

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Label map at the image's size: slice-wise for a 2D model, sliding window for a 3D one (as `ssmis eval`)."""
        from ssmis.eval.inference import predict_case

        if len(self.cfg.data.patch_size) == 3 and image.ndim != 4:
            raise ValueError(f"a 3D model needs a volume, got an image of shape {image.shape}")
        labels = predict_case(self.net, image, self.cfg, self.device, self.precision)
        if self.cfg.eval.largest_component:
            from ssmis.eval.postprocess import largest_component_per_class

            labels = largest_component_per_class(labels, self.num_classes)
        return labels


def load_trained_model(source: str | Path, checkpoint: str = "best", device: str = "auto",
                       ensemble: bool = False) -> Model:
    """The evaluated model of a run directory (its `checkpoints/<checkpoint>.pt`) or of a checkpoint file; with
    `ensemble`, the softmax average of a two-network run's networks (C3S3, MEDL) instead of network 1."""
    import torch

    from ssmis.config import load_config
    from ssmis.engine import allocator
    from ssmis.engine.amp import resolve_precision
    from ssmis.engine.checkpoint import load_checkpoint
    from ssmis.models import model_from_args

    source = Path(source)
    if source.is_dir():
        path = source / "checkpoints" / f"{checkpoint}.pt"
        if not path.is_file():
            raise UserError(str(source), f"no checkpoints/{checkpoint}.pt", "Point --run to a trained run directory.")
    elif source.is_file():
        path = source
    else:
        raise UserError(str(source), "not found", "Give a run directory or a checkpoint file (.pt).")
    state = load_checkpoint(path)
    if "model_name" not in state or "config" not in state:
        raise UserError(str(path), "not an ssmis checkpoint (no model arguments or config)", "Use a checkpoint from `ssmis train`.")
    cfg = load_config(None, data=state["config"])
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device", "cuda requested but no CUDA device is available", "Use --device cpu.")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    precision = resolve_precision(cfg.train.amp, cfg.train.channels_last, dev, len(cfg.data.patch_size))
    if dev.type == "cpu":
        allocator.apply(cfg.train.cpu_allocator)    # sliding windows over volumes allocate large tensors too
    members = state.get("ensemble") or _pair_members(state) or []
    if ensemble:
        net = _ensemble(members, state, path, model_from_args)
    else:
        net = model_from_args(state["model_name"], state["model_args"])
        net.load_state_dict(state["eval_weights"])
    net = net.to(dev)
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last if len(cfg.data.patch_size) == 2 else torch.channels_last_3d)
    net.eval()
    model = Model(net, cfg, state["config"], int(state.get("step", -1)), dev, precision)
    model.class_names = _class_names(cfg, model.num_classes)
    model.members = [m["module"] for m in members]
    model.averaged = ensemble
    return model


def _ensemble(members: list[dict], state: dict, path: Path, model_from_args):
    """The SoftmaxAverage of a checkpoint's ensemble `members` (module, model name, args), with their weights."""
    from ssmis.models.ensemble import SoftmaxAverage

    if not members:
        method = state["config"].get("method", {}).get("name", "?")
        raise UserError(str(path), f"no ensemble in this checkpoint: {method} trains one evaluated network",
                        "Drop --ensemble; it applies to two-network methods (c3s3, medl).")
    nets = []
    for m in members:
        net = model_from_args(m["model_name"], m["model_args"])
        net.load_state_dict(state["modules"][m["module"]])
        nets.append(net)
    return SoftmaxAverage(nets)


def _pair_members(state: dict) -> list[dict] | None:
    """For a two-network run whose checkpoint predates the `ensemble` entry: network 1 as stored, network 2 rebuilt
    from the run's method.net2 / net2_args with network 1's channels and classes (as the run built it); its weights
    then load strictly, so a mismatch fails loudly."""
    from ssmis.methods.pair import DEFAULT_NET2, TwoNetworks
    from ssmis.registry import METHODS

    method = state["config"].get("method", {})
    if method.get("name") not in METHODS.list() or not issubclass(METHODS.get(method["name"]), TwoNetworks):
        return None
    dims = len(state["config"]["data"]["patch_size"])
    net2 = method.get("net2", "auto")
    args = {k: state["model_args"][k] for k in ("in_channels", "num_classes")}
    return [{"module": "net1", "model_name": state["model_name"], "model_args": state["model_args"]},
            {"module": "net2", "model_name": DEFAULT_NET2[dims] if net2 == "auto" else net2,
             "model_args": {**args, **method.get("net2_args", {})}}]


def _class_names(cfg, k: int) -> list[str]:
    """The training data's class names when its adapter can say them, else class0..classK-1."""
    from ssmis.data.adapter import make_adapter

    try:
        names = make_adapter(cfg.data.layout, cfg.data.root, cfg.data).info().class_names
    except (UserError, OSError, ValueError):
        names = None
    names = names if names and len(names) == k else [f"class{c}" for c in range(k)]
    return [re.sub(r"[^A-Za-z0-9]+", "_", n).strip("_") or f"class{c}" for c, n in enumerate(names)]


def is_ellipse_target(raw_cfg: dict) -> bool:
    """A model whose target is an ellipse (HC18 data, the ERSR method or an ellipse plug-in) gets the HC measured."""
    plugins = raw_cfg.get("plugins") or []
    return (raw_cfg.get("data", {}).get("layout") == "hc18" or raw_cfg.get("method", {}).get("name") == "ersr"
            or any(isinstance(p, dict) and "ellipse" in str(p.get("name", "")) for p in plugins))


# ---- inputs ----------------------------------------------------------------------------------------------------
def _kind(path: Path) -> tuple[str, str] | None:
    name = path.name.lower()
    for kind, suffixes in (("nifti", NIFTI), ("image", IMAGES), ("h5", HDF5)):
        for s in suffixes:
            if name.endswith(s):
                return kind, path.name[: -len(s)]
    return None


def _out_name(kind: str, stem: str, src: Path) -> str:
    if kind == "nifti":
        return stem + (".nii.gz" if src.name.lower().endswith(".gz") else ".nii")
    return stem + (".png" if kind == "image" else ".h5")


def collect_cases(inputs: list[str | Path], out_dir: Path, channels: int = 1) -> list[Case]:
    """Input files and folders (searched recursively) -> cases; names keep a folder's sub-structure under `out_dir`.

    HC18 annotation files (`*_Annotation.png`) and files under `out_dir` are left out. With a multi-channel model,
    nnU-Net channel files `CASE_0000`, `CASE_0001`, ... of one folder form one case.
    """
    out_dir = Path(out_dir).resolve()
    found: list[tuple[Path, Path]] = []                      # (file, path relative to the output folder)
    for raw in inputs:
        p = Path(raw)
        if p.is_file():
            if _kind(p) is None:
                raise UserError(str(p), "unsupported file type",
                                f"Give NIfTI ({', '.join(NIFTI)}), images ({', '.join(IMAGES)}) or HDF5 ({', '.join(HDF5)}).")
            found.append((p, Path(p.name)))
        elif p.is_dir():
            files = [f for f in sorted(p.rglob("*")) if f.is_file() and _kind(f) is not None
                     and not any(part.startswith(".") for part in f.relative_to(p).parts)
                     and "_Annotation" not in f.name and out_dir not in f.resolve().parents]
            if not files:
                raise UserError(str(p), "no NIfTI, image or HDF5 files in this folder", "Check the path.")
            found += [(f, f.relative_to(p)) for f in files]
        else:
            raise UserError(str(p), "input not found", "Check the path.")
    cases: list[Case] = []
    groups: dict[tuple[Path, str], list[tuple[int, Path, Path]]] = {}
    for f, rel in found:
        kind, stem = _kind(f)
        m = _CHANNEL_FILE.fullmatch(stem) if kind == "nifti" and channels > 1 else None
        if m:
            groups.setdefault((rel.parent, m["case"]), []).append((int(m["channel"]), f, rel))
        else:
            cases.append(Case(stem, kind, [f], out_dir / rel.parent / _out_name(kind, stem, f)))
    for (rel_parent, name), members in groups.items():
        members.sort()
        cases.append(Case(name, "nifti", [f for _, f, _ in members],
                          out_dir / rel_parent / _out_name("nifti", name, members[0][1])))
    sources = {f.resolve() for f, _ in found}
    seen: dict[Path, Case] = {}
    for c in cases:
        if c.out.resolve() in sources:
            raise UserError(str(c.out), "the output would replace an input file", "Choose another --out folder.")
        if c.out in seen:
            raise UserError(str(c.paths[0]), f"writes the same output as {seen[c.out].paths[0]} ({c.out.name})",
                            "Predict these inputs into different --out folders.")
        seen[c.out] = c
    return sorted(cases, key=lambda c: str(c.out))


def read_pixel_csv(path: Path) -> dict[str, dict]:
    """filename -> {"pixel_mm", "hc_ref_mm"} from an HC18-style CSV (`filename`, `pixel size(mm)`[, HC])."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise UserError(str(path), "pixel-size CSV not found", "Check --pixel-csv.") from None
    cols = rows[0].keys() if rows else set()
    px_col = next((c for c in PIXEL_COLUMNS if c in cols), None)
    if "filename" not in cols or px_col is None:
        raise UserError(str(path), f"needs the columns filename and {PIXEL_COLUMNS[0]!r} (or {PIXEL_COLUMNS[1]!r})",
                        "Use the HC18 CSV layout.")
    hc_col = next((c for c in HC_REF_COLUMNS if c in cols), None)
    try:
        return {r["filename"]: {"pixel_mm": float(r[px_col]),
                                "hc_ref_mm": float(r[hc_col]) if hc_col and r.get(hc_col) else None} for r in rows}
    except ValueError as e:
        raise UserError(str(path), f"a value is not a number ({e})", "Fix the CSV.") from None


def _pixel_table(pixel_csv: str | Path | None, model: Model) -> dict[str, dict]:
    """Entries of --pixel-csv, else of the HC18 CSVs beside the run's training data (when that is HC18)."""
    if pixel_csv is not None:
        return read_pixel_csv(Path(pixel_csv))
    table: dict[str, dict] = {}
    root = resolve_root(model.cfg.data.root)
    if model.cfg.data.layout == "hc18" and root:
        for name in HC18_CSVS:
            if (Path(root) / name).is_file():
                table.update(read_pixel_csv(Path(root) / name))
    return table


# ---- reading and writing ---------------------------------------------------------------------------------------
def read_case(case: Case, channels: int) -> dict:
    """{"image": C×H×W or C×D×H×W float32, "spacing": mm in array order or None, "ndim": 2 | 3, ...geometry}."""
    if case.kind == "nifti":
        import nibabel as nib

        from ssmis.data.nnunet import read_nifti

        parts = [read_nifti(p) for p in case.paths]
        for p, (arr, _, _) in zip(case.paths, parts):
            if arr.shape[1:] != parts[0][0].shape[1:]:
                raise DataError(str(p), f"size {arr.shape[1:]} differs from the first channel's {parts[0][0].shape[1:]}",
                                "All channel files of a case need the same size.")
        first = nib.load(str(case.paths[0]))
        unit = first.header.get_xyzt_units()[0] or "unknown"
        spacing = tuple(s * _UNIT_TO_MM.get(unit, 1.0) for s in parts[0][1])
        image = np.concatenate([arr for arr, _, _ in parts]).astype(np.float32, copy=False)
        ndim = 2 if len(first.shape) == 2 else 3
        return {"image": image, "spacing": spacing if ndim == 3 else spacing[1:], "ndim": ndim,
                "nifti": first, "shape": first.shape}
    path = case.paths[0]
    if case.kind == "image":
        from ssmis.data.folders import read_pixels, to_unit_float

        pixels = to_unit_float(read_pixels(path, grey=channels == 1))
        image = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
        return {"image": image, "spacing": None, "ndim": 2, "shape": pixels.shape[:2]}
    import h5py

    from ssmis.data.ssl4mis_h5 import read_h5

    try:
        with h5py.File(path, "r") as f:
            ndim = f["image"].ndim if "image" in f else 0
    except OSError as e:
        raise DataError(str(path), f"cannot read HDF5 ({e})", "Re-copy the file.") from None
    if ndim not in (2, 3):
        raise DataError(str(path), "no 2D or 3D dataset 'image'", "SSL4MIS HDF5 files store the scan as 'image'.")
    image, _ = read_h5(path, ndim, 2, False)
    return {"image": image[None], "spacing": None, "ndim": ndim, "shape": image.shape}


def write_mask(case: Case, mask: np.ndarray, sample: dict) -> None:
    """`mask` (H×W or D×H×W) in the input's format; NIfTI back to (X, Y, Z) with the input's affine and header."""
    dtype = np.uint8 if mask.max(initial=0) < 256 else np.int16
    if case.kind == "nifti":
        src = sample["nifti"]
        data = mask.transpose(2, 1, 0) if mask.ndim == 3 else mask[None].transpose(2, 1, 0)
        if len(sample["shape"]) == 2:
            data = data[:, :, 0]
        header = src.header.copy()
        header.set_data_dtype(dtype)
        img = type(src)(data.astype(dtype), src.affine, header)
        img.header.set_slope_inter(1, 0)
        raw = img.to_bytes()
        atomic_write_bytes(case.out, gzip.compress(raw, 6) if case.out.name.endswith(".gz") else raw)
    elif case.kind == "image":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8 if dtype == np.uint8 else np.uint16)).save(buf, format="PNG")
        atomic_write_bytes(case.out, buf.getvalue())
    else:
        import h5py

        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            f.create_dataset("label", data=mask.astype(dtype), compression="gzip")
        atomic_write_bytes(case.out, buf.getvalue())


# ---- measurements and overlays ---------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.6g}"
    return str(v)


def measure_case(mask: np.ndarray, spacing, model: Model, hc: bool, px_info: dict | None) -> tuple[dict, object]:
    """Measurement columns of one case (and the fitted head ellipse, for the overlay)."""
    from ssmis.eval.measure import class_volumes, head_circumference

    row: dict = {}
    classes = range(1, model.num_classes)
    unit = "ml" if mask.ndim == 3 else "mm2"
    for c, v in class_volumes(mask, classes, spacing).items():
        name = model.class_names[c]
        row[f"{name}_voxels"] = v["voxels"]
        row[f"{name}_{unit}"] = v[unit]
    ellipse = None
    if hc:
        if mask.ndim != 2:
            row["note"] = "head circumference needs a 2D image"
        else:
            ellipse = head_circumference(mask > 0, spacing)
            if ellipse is None:
                row["note"] = "no head found (empty prediction): no circumference"
            else:
                row.update({"hc_mm": ellipse.hc_mm, "hc_px": ellipse.hc_px, "semi_axis_a_mm": ellipse.a_mm,
                            "semi_axis_b_mm": ellipse.b_mm, "center_x_px": ellipse.center_x_px,
                            "center_y_px": ellipse.center_y_px, "angle_rad": ellipse.angle_rad})
                ref = (px_info or {}).get("hc_ref_mm")
                if ref is not None and ellipse.hc_mm is not None:
                    row.update({"hc_ref_mm": ref, "hc_abs_err_mm": abs(ellipse.hc_mm - ref)})
    return row, ellipse


def _add_ejection_fractions(rows: list[dict], model: Model) -> None:
    """ED/ES phase, EDV, ESV and EF on the rows of patients given with two or more frames (class 3 = LV)."""
    from ssmis.eval.measure import LV_CLASS, ejection_fractions

    if model.num_classes != 4 or model.class_names[LV_CLASS] not in ("LV", f"class{LV_CLASS}"):
        return
    lv = model.class_names[LV_CLASS]
    volumes = [r for r in rows if r.get(f"{lv}_voxels") is not None and r.get("ndim") == 3]
    by_case = {r["case"]: r for r in volumes}
    with_ml = all(r.get(f"{lv}_ml") is not None for r in volumes)
    key = f"{lv}_ml" if with_ml else f"{lv}_voxels"
    for case, ef in ejection_fractions({r["case"]: float(r[key]) for r in volumes}).items():
        r = by_case[case]
        r.update({"patient": ef["patient"], "phase": ef["phase"], "ef_pct": ef["ef_pct"]})
        if with_ml:
            r.update({"edv_ml": ef["edv"], "esv_ml": ef["esv"]})


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, (1, 99))
    g = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return np.repeat(g[..., None], 3, axis=2).astype(np.float32)


def overlay_rgb(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 H×W×3: grey image with each class tinted in its colour."""
    rgb = _grey_rgb(image)
    colours = _COLOURS[np.minimum(mask, len(_COLOURS) - 1)]
    fg = mask > 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours[fg]
    return rgb.astype(np.uint8)


def write_overlay(path: Path, image: np.ndarray, mask: np.ndarray, slice_axis: int, ellipse=None,
                  max_slices: int = 6) -> None:
    """A PNG for a quick look: 2D -> one overlay (with the fitted head ellipse); 3D -> up to `max_slices`
    slices with foreground, side by side."""
    from PIL import Image, ImageDraw

    if mask.ndim == 2:
        tiles = [overlay_rgb(image[0], mask)]
    else:
        vol, lab = np.moveaxis(image[0], slice_axis, 0), np.moveaxis(mask, slice_axis, 0)
        with_fg = [k for k in range(len(lab)) if lab[k].any()] or list(range(len(lab)))
        picks = sorted({with_fg[int(i)] for i in np.linspace(0, len(with_fg) - 1, min(max_slices, len(with_fg)))})
        tiles = [overlay_rgb(vol[k], lab[k]) for k in picks]
    h = max(t.shape[0] for t in tiles)
    sheet = np.full((h, sum(t.shape[1] for t in tiles) + 2 * (len(tiles) - 1), 3), 255, np.uint8)
    x = 0
    for t in tiles:
        sheet[: t.shape[0], x:x + t.shape[1]] = t
        x += t.shape[1] + 2
    im = Image.fromarray(sheet)
    if ellipse is not None:
        t = np.linspace(0, 2 * np.pi, 361)
        th = ellipse.angle_rad
        xs = ellipse.center_x_px + ellipse.a_px * np.cos(th) * np.cos(t) - ellipse.b_px * np.sin(th) * np.sin(t)
        ys = ellipse.center_y_px + ellipse.a_px * np.sin(th) * np.cos(t) + ellipse.b_px * np.cos(th) * np.sin(t)
        ImageDraw.Draw(im).line(list(zip(xs.tolist(), ys.tolist())), fill=(255, 230, 0), width=1)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# ---- the command -----------------------------------------------------------------------------------------------
def predict(run: str | Path, inputs: list[str | Path], out: str | Path, checkpoint: str = "best",
            pixel_size: float | None = None, pixel_csv: str | Path | None = None, overlay: bool = False,
            measure: str = "auto", device: str = "auto", progress: bool = True, ensemble: bool = False) -> int:
    """Predict every input case; returns 0, or 1 when some case failed (each failure is reported and skipped).
    `ensemble`: a two-network run's softmax average instead of network 1."""
    from tqdm import tqdm

    if pixel_size is not None and pixel_size <= 0:
        raise UserError("--pixel-size", f"{pixel_size} is not a positive size in mm", "Give the pixel size in mm.")
    if measure not in ("auto", "hc", "volumes"):
        raise UserError("--measure", f"unknown value {measure!r}", "Use auto, hc or volumes.")
    out = Path(out)
    model = load_trained_model(run, checkpoint, device, ensemble=ensemble)
    cases = collect_cases(inputs, out, model.channels)
    hc = measure == "hc" or (measure == "auto" and is_ellipse_target(model.raw))
    table = _pixel_table(pixel_csv, model)
    two_d = [c for c in cases if c.kind == "image" or c.kind == "h5"]
    if hc and pixel_size is None:
        missing = [c for c in two_d if c.paths[0].name not in table]
        if missing:
            raise UserError(str(missing[0].paths[0]), "no pixel size known for the head circumference in mm",
                            "Pass --pixel-size MM, or --pixel-csv with the columns filename and 'pixel size(mm)'.")
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    bar = tqdm(cases, desc="predict", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for case in bar:
        try:
            sample = read_case(case, model.channels)
            image = sample["image"]
            if image.shape[0] != model.channels:
                raise DataError(str(case.paths[0]), f"has {image.shape[0]} channels, the model takes {model.channels}",
                                "Give images with the channels the model was trained on.")
            mask = model.predict(image)
            write_mask(case, mask, sample)
            info = table.get(case.paths[0].name)
            spacing = sample["spacing"]
            if spacing is None and sample["ndim"] == 2 and (pixel_size is not None or info):
                spacing = (pixel_size or info["pixel_mm"],) * 2
            m2d = mask[0] if mask.ndim == 3 and sample["ndim"] == 2 else mask
            # shape and spacing in the input file's axis order (NIfTI X, Y, Z; images rows, columns)
            file_spacing = spacing[::-1] if spacing and case.kind == "nifti" else spacing
            row = {"case": case.name, "input": str(case.paths[0]), "output": str(case.out),
                   "shape": "x".join(map(str, sample["shape"][: sample["ndim"]])),
                   "spacing_mm": "x".join(f"{s:.6g}" for s in file_spacing) if file_spacing else "",
                   "ndim": sample["ndim"]}
            values, ellipse = measure_case(m2d, spacing, model, hc, info)
            row.update(values)
            rows.append(row)
            if overlay:
                rel = case.out.parent.relative_to(out.resolve())
                write_overlay(out / "overlays" / rel / f"{case.name}.png",
                              image[:, 0] if sample["ndim"] == 2 and image.ndim == 4 else image, m2d,
                              model.cfg.data.slice_axis, ellipse)
        except Exception as e:  # noqa: BLE001  (one bad case must not stop the others)
            msg = str(e) if isinstance(e, UserError) else f"{case.paths[0]}: {type(e).__name__}: {e}"
            failed.append((case, msg))
            tqdm.write(f"ssmis: predict: failed, skipped: {msg}", file=sys.stderr)
    _add_ejection_fractions(rows, model)
    if rows:
        _write_measurements(out / "measurements.csv", rows)
    print(f"wrote {len(rows)} masks to {out}" + (f" and {out / 'measurements.csv'}" if rows else "")
          + (f"; overlays in {out / 'overlays'}" if overlay and rows else ""))
    if failed:
        print(f"ssmis: predict: {len(failed)} of {len(cases)} cases failed: "
              + ", ".join(str(c.paths[0]) for c, _ in failed[:5]) + (" ..." if len(failed) > 5 else ""), file=sys.stderr)
        return 1
    return 0


def _write_measurements(path: Path, rows: list[dict]) -> None:
    first = ["case", "input", "output", "shape", "spacing_mm"]
    last = ["patient", "phase", "edv_ml", "esv_ml", "ef_pct", "hc_mm", "hc_px", "semi_axis_a_mm", "semi_axis_b_mm",
            "center_x_px", "center_y_px", "angle_rad", "hc_ref_mm", "hc_abs_err_mm", "note"]
    middle = []
    for r in rows:
        middle += [k for k in r if k not in first and k not in last and k != "ndim" and k not in middle]
    present = {k for r in rows for k in r}
    columns = first + middle + [k for k in last if k in present or k == "note"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())
