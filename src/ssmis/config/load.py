"""Load a run config: bundled preset or YAML file (+ `base:` chain) < `--set a.b=value` overrides."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ssmis.config.schema import RunConfig
from ssmis.errors import UserError

PRESETS = Path(__file__).resolve().parent.parent / "presets"


def _resolve_path(ref: str, relative_to: Path | None) -> Path:
    p = Path(ref)
    candidates = [p] if p.is_absolute() else ([relative_to / p] if relative_to else []) + [p]
    candidates.append(PRESETS / (ref if ref.endswith(".yaml") else ref + ".yaml"))
    for c in candidates:
        if c.is_file():
            return c
    names = sorted(f.stem for f in PRESETS.glob("*.yaml"))
    close = difflib.get_close_matches(Path(ref).stem, names, n=1)
    hint = f"Did you mean the preset {close[0]!r}?" if close else f"Give a YAML path or a preset ({', '.join(names)})."
    raise UserError(ref, "config file not found", hint)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise UserError(str(path), "`base:` chain loops back to itself", "Remove the cycle.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(str(path), f"not valid YAML ({str(e).splitlines()[0]})", "Fix the syntax.") from None
    if not isinstance(data, dict):
        raise UserError(str(path), "a config must be a mapping of sections", "See configs/ for examples.")
    base = data.pop("base", None)
    if base is None:
        return data
    return merge_config(_read_yaml(_resolve_path(str(base), path.parent), seen + (path,)), data)


def merge_config(a: dict, b: dict) -> dict:
    """`b` over `a`, recursively; a `method` section naming another method replaces the old one."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "method":
            out[k] = merge_config(out[k], v)
        elif k == "method" and isinstance(v, dict) and isinstance(out.get(k), dict):
            # a different method replaces the section; the same method merges into it
            out[k] = merge_config(out[k], v) if v.get("name", out[k].get("name")) == out[k].get("name") else dict(v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML; list items by index, `plugins.0.tau=0.9`)."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}", "expected KEY=VALUE", "Example: --set train.iterations=500")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for p in parts[:-1]:
        if isinstance(node, list):
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise UserError(f"--set {key}", f"{p!r} is not a section", "Check the key path.")
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return None
    return model


def validation_to_user_error(err: ValidationError, root: type[BaseModel], source: str, prefix: str = "") -> UserError:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = (prefix + ".".join(str(p) for p in loc)).rstrip(".")     # a model-level check has no field location
    if e["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1], root)
        names = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        todo = f"Did you mean {close[0]!r}?" if close else (f"Valid keys: {', '.join(names)}." if names else "Remove it.")
        return UserError(f"{source}: {key}", "unknown key", todo)
    return UserError(f"{source}: {key}", e["msg"].removeprefix("Value error, ").rstrip("."),
                     "Fix the value (see `ssmis config show`).")


def load_config(ref: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict | None = None) -> RunConfig:
    """Resolve a config from a preset name or YAML path (or a dict) plus overrides; validate everything."""
    source = "config"
    raw: dict = copy.deepcopy(data) if data is not None else {}
    if ref is not None:
        path = _resolve_path(str(ref), None)
        source = str(ref)
        raw = merge_config(_read_yaml(path), raw)
    for o in overrides:
        apply_override(raw, o)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise validation_to_user_error(err, RunConfig, source) from None
    from ssmis.methods import method_config  # validates the method section against its own schema
    from ssmis.plugins import plugin_configs

    cfg.method = method_config(cfg.method, source).model_dump()
    cfg.plugins = [c.model_dump() for c in plugin_configs(cfg.plugins, source)]
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
