"""Post-processing of predicted label maps before scoring (off by default; recorded in every report)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component_per_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep, for each foreground class, only its largest connected component over the whole case (full
    connectivity: 8 in 2D, 26 in 3D); removed voxels become background. BCP's LA test (`--nms 1`) does this."""
    out = np.zeros_like(labels)
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for c in range(1, num_classes):
        comp, n = ndimage.label(labels == c, structure=structure)
        if n:
            out[comp == 1 + int(np.argmax(np.bincount(comp.ravel())[1:]))] = c
    return out
