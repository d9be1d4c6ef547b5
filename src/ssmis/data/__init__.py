"""Data layouts (adapters), splits, and the in-memory training/evaluation sets."""

from ssmis.data import folders, hc18, head_phantom, la_h5, nnunet, phantom, sphere, ssl4mis_h5  # noqa: F401  (registers layouts)
