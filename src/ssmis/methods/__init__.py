"""Semi-supervised methods, one file each, registered by name."""

from __future__ import annotations

import importlib
import pkgutil

from pydantic import ValidationError

from ssmis.methods.base import Batch, BuildContext, Method, MethodConfig, StepOutput
from ssmis.registry import METHODS

# every module of this package registers its method on import; an import error is raised, never skipped
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["Batch", "BuildContext", "Method", "MethodConfig", "StepOutput", "method_config", "describe_methods",
           "slot_hosts"]


def method_config(section: dict, source: str = "config") -> MethodConfig:
    """Validate a `method:` section against the named method's own Config."""
    from ssmis.config.load import validation_to_user_error
    from ssmis.errors import UserError

    if not isinstance(section, dict) or "name" not in section:
        raise UserError(f"{source}: method.name", "missing", f"Choose one of: {', '.join(METHODS.list())}.")
    cls = METHODS.get(section["name"], f"{source}: method.name")
    try:
        return cls.Config.model_validate(section)
    except ValidationError as err:
        raise validation_to_user_error(err, cls.Config, source, prefix="method.") from None


def describe_methods() -> list[tuple[str, str, str]]:
    """(name, dimensions such as '2D/3D', first docstring line) of every registered method."""
    out = []
    for n in METHODS.list():
        cls = METHODS.get(n)
        dims = "/".join(f"{d}D" for d in sorted(cls.spatial_dims))
        out.append((n, dims, (cls.__doc__ or "").strip().splitlines()[0]))
    return out


def slot_hosts() -> dict[str, list[str]]:
    """Plug-in slot -> the registered methods that offer it (class-level; see each method's docstring)."""
    out: dict[str, list[str]] = {}
    for n in METHODS.list():
        for slot in METHODS.get(n).provides:
            out.setdefault(slot, []).append(n)
    return out
