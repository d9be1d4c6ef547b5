"""Plug-ins for the typed slots of host methods (targets, mask, unsup_loss, labeled_loss, inputs, features), one
transformation each (MetaSSL: one loss in two slots), registered by name."""

from __future__ import annotations

import importlib
import pkgutil

from ssmis.plugins.base import (SLOTS, Plugin, PluginConfig, PluginSet, SlotInputs, build_plugins, no_plugins,
                                plugin_configs)

# every module of this package registers its plug-ins on import; an import error is raised, never skipped
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["SLOTS", "Plugin", "PluginConfig", "PluginSet", "SlotInputs", "build_plugins", "no_plugins",
           "plugin_configs", "describe_plugins"]


def describe_plugins() -> list[tuple[str, str, str]]:
    """(name, slots joined by '+', first docstring line) of every registered plug-in."""
    from ssmis.registry import PLUGINS

    return [(n, "+".join(PLUGINS.get(n).declared_slots()), (PLUGINS.get(n).__doc__ or "").strip().splitlines()[0])
            for n in PLUGINS.list()]
