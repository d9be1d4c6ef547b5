"""Data layouts (adapters), splits, and the in-memory training/evaluation sets."""

from ssmis.data import phantom  # noqa: F401  (registers layouts)
