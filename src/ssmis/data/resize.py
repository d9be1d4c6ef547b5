"""Resizing of slices to the patch size and back (scipy zoom, as the SSL4MIS protocol does)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def resize2d(arr: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Zoom the last two axes of `arr` to `size` (order 0 = nearest, as for labels and ACDC images)."""
    h, w = arr.shape[-2:]
    if (h, w) == tuple(size):
        return arr
    factors = (1,) * (arr.ndim - 2) + (size[0] / h, size[1] / w)
    out = ndimage.zoom(arr, factors, order=order, mode="nearest" if order else "constant", grid_mode=False)
    return out
