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


def pad_to_square(arr: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Zero-pad the shorter of the last two axes symmetrically to a square of side max(H, W) (HC18-lite: the
    aspect ratio is kept). Returns the padded array and the box (top, left, H, W) of the original inside it."""
    h, w = arr.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if h == w:
        return arr, (0, 0, h, w)
    pad = [(0, 0)] * (arr.ndim - 2) + [(top, side - h - top), (left, side - w - left)]
    return np.pad(arr, pad), (top, left, h, w)


def crop_box(arr: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Inverse of pad_to_square on the last two axes."""
    top, left, h, w = box
    return arr[..., top:top + h, left:left + w]
