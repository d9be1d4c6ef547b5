"""Run directories: never overwritten silently; --resume requires the same config."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ssmis.errors import UserError


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):   # plug-in sections: plugins.0.tau
            out.update(_flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = v
    return out


# keys that may differ on resume: they do not change what is computed
RESUME_FREE = {"train.threads", "train.tensorboard", "train.log_every", "train.device", "train.ckpt_every",
               "train.cpu_allocator"}


_MISSING = object()


def config_differences(a: dict, b: dict, defaults: dict | None = None) -> list[str]:
    """Keys whose values differ between configs `a` (old) and `b` (new). A key the old config lacks (added to
    the schema since) counts only when the new value is not its default."""
    fa, fb, fd = _flatten(a), _flatten(b), _flatten(defaults or {})
    out = []
    for k in sorted(set(fa) | set(fb)):
        old, new = fa.get(k, _MISSING), fb.get(k, _MISSING)
        if old == new or k in RESUME_FREE or (old is _MISSING and k in fd and fd[k] == new):
            continue
        out.append(f"{k}: {'(absent)' if old is _MISSING else repr(old)} -> {'(absent)' if new is _MISSING else repr(new)}")
    return out


def prepare_run_dir(out: Path, cfg_dict: dict, resume: bool, overwrite: bool, defaults: dict | None = None) -> bool:
    """Create or check the run directory; returns True when an existing run is to be resumed."""
    out = Path(out)
    cfg_file = out / "config.yaml"
    if resume:
        if not cfg_file.is_file():
            raise UserError(str(out), "no run to resume here (no config.yaml)", "Start it without --resume.")
        old = yaml.safe_load(cfg_file.read_text()) or {}
        old.pop("ssmis", None)
        diff = config_differences(old, cfg_dict, defaults)
        if diff:
            raise UserError(str(out), "config differs from the run being resumed: " + "; ".join(diff[:8]),
                            "Resume with the same config, or start a new run with --out.")
        return (out / "checkpoints" / "last.pt").is_file()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(str(out), "run directory already exists",
                            "Pass --resume to continue it or --overwrite to replace it.")
        if not cfg_file.is_file():
            raise UserError(str(out), "refusing to overwrite a folder that is not an ssmis run (no config.yaml)",
                            "Choose another --out.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return False
