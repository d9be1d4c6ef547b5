"""Training slices kept at their own size and augmented in the reference order by one resample per batch.

SSL4MIS's RandomGenerator (methods.md, Augmentation) rotates or rot90-flips the slice at its own size and only
then zooms it to the patch (order 0). Resizing at load and rotating the resized patch instead is not the same
map when the zoom is anisotropic (ACDC: 216x256 -> 128x128), so that order moves foreground pixels of rotated
slices. Here every output pixel of the patch is traced back through the zoom and the geometric step to the
stored slice and read there, for the whole batch at once, on the device the slices live on (CPU or GPU):

* order 0 (ACDC's images, every label map): exactly the reference's two nearest-neighbour steps, i.e. the zoom
  coordinate is rounded first (scipy's `zoom`, half up), then the rotation's source coordinate (scipy's `rotate`,
  constant zero outside [0, n-1]); rot90 and flips are integer maps and need no rounding;
* order >= 1 images: one bilinear read at the composed continuous coordinate (one resample instead of two).

Slices are stored flat (one buffer, per-slice offset and size), so nothing is padded to a common size;
`data.pad_square` is a coordinate shift, not stored zeros. The random draws are those of
`augment.random_geometry` (same generator, same order), so a batch is a function of the seed and the stream
position on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ssmis.data.augment import GeometryDraw, draw_geometry, intensity_jitter  # noqa: F401  (re-exported)
from ssmis.errors import UserError


def geometry_matrix(g: GeometryDraw, h0: Tensor, w0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample, the 3×3 affine map from a pixel (row, col, 1) of the augmented array to the source slice of
    size (h0, w0) that the reference reads there (rot90 + flip: integer maps; rotation: scipy.ndimage.rotate,
    counter-clockwise on screen about the centre, no reshape), and the augmented array's size (ha, wa)."""
    b, dev = h0.shape[0], h0.device
    rf, k = g.rotflip.to(dev), g.k.to(dev)
    k = torch.where(rf, k, torch.zeros_like(k))
    odd = (k % 2) == 1
    ha, wa = torch.where(odd, w0, h0), torch.where(odd, h0, w0)
    eye = torch.eye(3, dtype=torch.float64, device=dev).expand(b, 3, 3)

    def affine(a, bb, c, d, e, f):       # [[a, b, c], [d, e, f], [0, 0, 1]] per sample
        z, one = torch.zeros_like(ha), torch.ones_like(ha)
        return torch.stack([torch.stack([a, bb, c], -1), torch.stack([d, e, f], -1),
                            torch.stack([z, z, one], -1)], 1)

    z, one = torch.zeros_like(ha), torch.ones_like(ha)
    ax = g.axis.to(dev)
    flip = torch.where(((rf & (ax == 0)))[:, None, None], affine(-one, z, ha - 1, z, one, z), eye)
    flip = torch.where(((rf & (ax == 1)))[:, None, None], affine(one, z, z, z, -one, wa - 1), flip)
    m = flip                                        # undo the flip, then the quarter turns one by one:
    hc, wc = ha, wa                                 # np.rot90: out[i, j] = m[j, W - 1 - i], out is W×H
    for turn in range(3):
        sel = k > turn
        m = torch.where(sel[:, None, None], affine(z, one, z, -one, z, hc - 1) @ m, m)
        hc, wc = torch.where(sel, wc, hc), torch.where(sel, hc, wc)
    t = g.angle.to(dev).to(torch.float64) * (np.pi / 180)
    cos, sin = torch.cos(t), torch.sin(t)
    cr, cc = (h0 - 1) / 2, (w0 - 1) / 2
    rot = affine(cos, sin, cr - cos * cr - sin * cc, -sin, cos, cc + sin * cr - cos * cc)
    m = torch.where(g.rotate.to(dev)[:, None, None], rot, m)
    return m, ha, wa


def source_coordinates(g: GeometryDraw, size: Tensor, patch: tuple[int, int], exact: bool,
                       geometry: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """For each sample and output pixel of the P×Q patch, the (row, col) in the sample's source slice of
    size[i] = (H, W) that the reference (geometric step at the source size, then zoom to the patch) reads.
    exact: round the zoom coordinate to the nearest pixel first (order-0 reference). float64, B×P×Q each.
    geometry: `geometry_matrix(g, H, W)` when the caller has it already."""
    h0, w0 = size[:, 0].to(torch.float64), size[:, 1].to(torch.float64)
    m, ha, wa = geometry if geometry is not None else geometry_matrix(g, h0, w0)
    p, q = patch
    f64 = dict(dtype=torch.float64, device=size.device)
    rows = torch.arange(p, **f64)[None] * ((ha - 1) / max(p - 1, 1))[:, None]      # scipy zoom, grid_mode=False
    cols = torch.arange(q, **f64)[None] * ((wa - 1) / max(q - 1, 1))[:, None]
    if exact:
        rows, cols = torch.floor(rows + 0.5), torch.floor(cols + 0.5)
    rows, cols = rows[:, :, None], cols[:, None, :]
    e = lambda i, j: m[:, i, j, None, None]                                        # noqa: E731
    return e(0, 0) * rows + e(0, 1) * cols + e(0, 2), e(1, 0) * rows + e(1, 1) * cols + e(1, 2)


@dataclass
class SourceSliceSet:
    """N training slices at their own size, stored flat: `images` C×total, `labels` total (uint8) or None;
    slice i occupies [offset[i], offset[i] + h·w) row-major; `box` = (top, left, H, W) of the slice inside its
    logical source frame (H, W = the frame: the slice itself, or its square when data.pad_square)."""

    images: Tensor
    labels: Tensor | None
    offset: Tensor          # N int64
    shape: Tensor           # N×2 int64 (h, w) as stored
    box: Tensor             # N×4 int64 (top, left, H, W)
    patch: tuple[int, int]
    image_order: int
    cases: list[str]
    slice_index: Tensor
    num_slices: Tensor

    def __len__(self) -> int:
        return self.offset.shape[0]

    def to(self, device: torch.device) -> "SourceSliceSet":
        mv = lambda t: None if t is None else t.to(device)            # noqa: E731
        return SourceSliceSet(mv(self.images), mv(self.labels), mv(self.offset), mv(self.shape), mv(self.box),
                              self.patch, self.image_order, self.cases, self.slice_index, self.num_slices)

    def _nearest(self, idx: Tensor, r: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """Flat positions and validity of the nearest reads at (r, c) of each sample's source frame; zero
        outside [0, n-1] of the frame (scipy's constant mode), and in the frame's padding."""
        box = self.box[idx]
        inside = (r >= 0) & (r <= box[:, 2, None, None] - 1) & (c >= 0) & (c <= box[:, 3, None, None] - 1)
        ri = torch.floor(r + 0.5).long() - box[:, 0, None, None]
        ci = torch.floor(c + 0.5).long() - box[:, 1, None, None]
        return self._positions(idx, ri, ci, inside)

    def _positions(self, idx: Tensor, ri: Tensor, ci: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        h, w = self.shape[idx, 0, None, None], self.shape[idx, 1, None, None]
        ok = ok & (ri >= 0) & (ri < h) & (ci >= 0) & (ci < w)
        pos = self.offset[idx, None, None] + ri.clamp(min=0) * w + ci.clamp(min=0)
        return torch.where(ok, pos, torch.zeros_like(pos)), ok

    @staticmethod
    def _take(flat: Tensor, pos: Tensor, ok: Tensor) -> Tensor:
        """flat: C×total (or total) -> B×C×P×Q (or B×P×Q), zero where not ok."""
        vals = flat[..., pos]                                                   # (C×)B×P×Q
        vals = torch.where(ok, vals, torch.zeros((), dtype=flat.dtype, device=flat.device))
        return vals.transpose(0, 1) if flat.ndim == 2 else vals

    def _read_bilinear(self, idx: Tensor, r: Tensor, c: Tensor) -> Tensor:
        """One bilinear read of the images at the continuous (r, c); zero beyond the stored slice."""
        box = self.box[idx]
        r = r - box[:, 0, None, None]
        c = c - box[:, 1, None, None]
        r0, c0 = torch.floor(r), torch.floor(c)
        fr, fc = (r - r0).to(torch.float32)[:, None], (c - c0).to(torch.float32)[:, None]
        r0, c0 = r0.long(), c0.long()
        every = torch.ones_like(r0, dtype=torch.bool)
        read = lambda dr, dc: self._take(self.images, *self._positions(idx, r0 + dr, c0 + dc, every))  # noqa: E731
        top = read(0, 0) * (1 - fc) + read(0, 1) * fc
        bottom = read(1, 0) * (1 - fc) + read(1, 1) * fc
        return top * (1 - fr) + bottom * fr

    def batch(self, idx: Tensor, gen: torch.Generator, augment: str, intensity: float = 0.0):
        g = draw_geometry(len(idx), gen, augment)
        dev_idx = idx.to(self.offset.device)
        frame = self.box[dev_idx, 2:]
        geometry = geometry_matrix(g, frame[:, 0].to(torch.float64), frame[:, 1].to(torch.float64))
        r, c = source_coordinates(g, frame, self.patch, exact=True, geometry=geometry)
        pos, ok = self._nearest(dev_idx, r, c)
        lab = None if self.labels is None else self._take(self.labels, pos, ok).long()
        if self.image_order == 0:
            img = self._take(self.images, pos, ok)
        else:
            rc = source_coordinates(g, frame, self.patch, exact=False, geometry=geometry)
            img = self._read_bilinear(dev_idx, *rc)
        img = intensity_jitter(img.contiguous(), gen, intensity)
        return img, lab, self.slice_index[idx], self.num_slices[idx]


def build_source_slice_set(slices, patch: tuple[int, int], labeled: bool, image_order: int = 0,
                           pad_square: bool = False) -> SourceSliceSet:
    """Keep every slice of `slices` ((item, image C×h×w, label h×w or None, position, count), as
    dataset.decoded_slices yields them) at its own size, flat."""
    imgs, labs, shapes, boxes, cases, pos, nums = [], [], [], [], [], [], []
    for it, im, lb, k, n in slices:
        h, w = im.shape[-2:]
        side = max(h, w)
        boxes.append(((side - h) // 2, (side - w) // 2, side, side) if pad_square else (0, 0, h, w))
        imgs.append(np.ascontiguousarray(im, np.float32).reshape(im.shape[0], -1))
        if labeled:
            if lb.size and (lb.max() > 255 or lb.min() < 0):
                raise UserError(it.source, f"label values {int(lb.min())}..{int(lb.max())} are not classes 0..255",
                                "Map the label values to class indices (data.mask_values).")
            labs.append(np.ascontiguousarray(lb, np.uint8).reshape(-1))
        shapes.append((h, w))
        cases.append(it.id)
        pos.append(k)
        nums.append(n)
    sizes = torch.tensor([h * w for h, w in shapes])
    return SourceSliceSet(torch.from_numpy(np.concatenate(imgs, 1)),
                          torch.from_numpy(np.concatenate(labs)) if labeled else None,
                          torch.cumsum(sizes, 0) - sizes, torch.tensor(shapes), torch.tensor(boxes), tuple(patch),
                          image_order, cases, torch.tensor(pos), torch.tensor(nums))
