"""Copy-paste and patch-displacement building blocks, written once (methods.md "BCP" and "ABD").

* BCP: a ones mask with one zero box of ⌊⅔·side⌋ per axis (`random_box`, `box_mask`), and the bidirectional
  mix of labelled and unlabelled images, labels or pseudo-labels with that mask (`mix`, `bidirectional_mix`).
* ABD: the image cut into a grid of patches (`to_patches` / `from_patches`), patch confidence = mean
  max-probability per patch (`patch_confidence`), patch class profile = softmax of the mean logits per patch
  (`patch_logit_mean`, `profile_kl`), and the bidirectional displacement of patches between two views
  (`swap_patches`, `abd_r_indices` + `abd_r`, `abd_i_indices` + `abd_i`), labels moved along where there are some.

Everything works on whole batches (B×C×spatial images, B×spatial labels); spatial sizes are read from the
tensors, so the same code serves 2D (H×W) and 3D (D×H×W). Randomness uses the global torch RNG (drawn on the
CPU, so a checkpoint restores it and results do not depend on the device).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

# ---- BCP: box mask and bidirectional mixing -------------------------------------------------------------


def box_side(side: int, ratio: float = 2 / 3) -> int:
    """⌊ratio·side⌋ (the reference computes int(side·2/3)); a tiny epsilon keeps 96·(2/3) at 64, not 63."""
    return int(math.floor(side * ratio + 1e-9))


def random_box(spatial: Sequence[int], ratio: float = 2 / 3) -> tuple[slice, ...]:
    """One box of side ⌊ratio·side⌋ in every axis at a uniformly random offset in 0 … side − box (all offsets
    that keep the box inside the image; the BCP code's `randint(0, side - box)` never draws the last one)."""
    box = []
    for s in spatial:
        b = box_side(int(s), ratio)
        if not 0 < b <= s:
            raise ValueError(f"box side {b} does not fit an axis of {s} pixels (ratio {ratio})")
        o = int(torch.randint(0, int(s) - b + 1, (1,)))
        box.append(slice(o, o + b))
    return tuple(box)


def box_mask(spatial: Sequence[int], ratio: float = 2 / 3, device: torch.device | str | None = None,
             box: tuple[slice, ...] | None = None) -> Tensor:
    """BCP's M ∈ {0,1}^spatial (float32): 1 everywhere except one zero box (`random_box` unless given).

    One mask per iteration, shared by the whole batch: it broadcasts against B×C×spatial images and
    B×spatial labels."""
    spatial = tuple(int(s) for s in spatial)
    mask = torch.ones(spatial, dtype=torch.float32, device=device)
    mask[box if box is not None else random_box(spatial, ratio)] = 0
    return mask


def mix(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """a where mask = 1, b where mask = 0 (= a⊙M + b⊙(1 − M) for a binary M, exactly, in any dtype).

    `mask` must broadcast against a and b: a spatial-only mask (shared box) works for images and labels."""
    out = torch.where(mask.to(device=a.device) > 0.5, a, b)
    return _like(out, a)


def bidirectional_mix(l_a: Tensor, l_b: Tensor, u_a: Tensor, u_b: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """BCP's two mixed samples (ACDC naming):

    X_in  = u_a⊙M + l_a⊙(1 − M)   (unlabelled outside the box, labelled crop inside),
    X_out = l_b⊙M + u_b⊙(1 − M)   (labelled outside, unlabelled crop inside).

    Works alike for images and for their targets (labels y_a, y_b and pseudo-labels p̂_a, p̂_b), so every
    pixel's target comes from the image the pixel comes from."""
    return mix(u_a, l_a, mask), mix(l_b, u_b, mask)


# ---- ABD: patch grid -------------------------------------------------------------------------------------


def _grid(spatial: Sequence[int], grid: int | Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Patches per axis and patch side per axis; the image must divide into the grid."""
    g = (grid,) * len(spatial) if isinstance(grid, int) else tuple(grid)
    if len(g) != len(spatial):
        raise ValueError(f"grid {g} does not match {len(spatial)} spatial axes")
    if any(s % n for s, n in zip(spatial, g)):
        raise ValueError(f"image size {tuple(spatial)} does not divide into a {'x'.join(map(str, g))} patch grid")
    return g, tuple(s // n for s, n in zip(spatial, g))


def to_patches(x: Tensor, grid: int | Sequence[int]) -> Tensor:
    """B×C×S₁…Sₙ -> B×K×C×P₁…Pₙ with K = ∏ grid, patches in row-major grid order (2D: k = row·w + col)."""
    b, c, *spatial = x.shape
    g, p = _grid(spatial, grid)
    n = len(spatial)
    shape = [b, c] + [v for gp in zip(g, p) for v in gp]                       # B, C, g1, p1, g2, p2, …
    order = [0] + [2 + 2 * i for i in range(n)] + [1] + [3 + 2 * i for i in range(n)]
    return x.reshape(shape).permute(order).reshape(b, math.prod(g), c, *p)


def from_patches(patches: Tensor, grid: int | Sequence[int]) -> Tensor:
    """Inverse of `to_patches`: B×K×C×P₁…Pₙ -> B×C×S₁…Sₙ."""
    b, k, c, *p = patches.shape
    n = len(p)
    g = (grid,) * n if isinstance(grid, int) else tuple(grid)
    if math.prod(g) != k:
        raise ValueError(f"{k} patches do not form a {'x'.join(map(str, g))} grid")
    x = patches.reshape(b, *g, c, *p)                                          # B, g1…gn, C, p1…pn
    order = [0, n + 1] + [v for i in range(n) for v in (1 + i, n + 2 + i)]
    return x.permute(order).reshape(b, c, *[gi * pi for gi, pi in zip(g, p)])


def patch_logit_mean(x: Tensor, grid: int | Sequence[int]) -> Tensor:
    """Mean of x (B×C×spatial) over each patch: B×K×C."""
    return to_patches(x, grid).flatten(3).mean(-1)


def patch_confidence(probs: Tensor, grid: int | Sequence[int]) -> Tensor:
    """s_k = mean over patch k of the confidence map max_c p_c (probs B×C×spatial, softmax): B×K."""
    return patch_logit_mean(probs.detach().float().amax(1, keepdim=True), grid)[..., 0]


def profile_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(softmax p ‖ softmax q_j) = Σ p (log p − log q_j) for p: B×C and q: B×J×C -> B×J (ABD's
    `kl_div(q.softmax().log(), p.softmax(), reduction='sum')`)."""
    log_p = p_logits.float().log_softmax(-1)[:, None]
    log_q = q_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def swap_patches(x1: Tensor, x2: Tensor, dst1: Tensor, src2: Tensor, dst2: Tensor, src1: Tensor,
                 grid: int | Sequence[int], apply: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Bidirectional displacement, per sample i: x1's patch dst1[i] <- x2's patch src2[i], and x2's patch
    dst2[i] <- x1's patch src1[i]. Sources are read from the inputs, so the two writes never see each other.

    x1, x2: B×C×spatial (labels: add the channel axis, `y[:, None]`); indices: B flat grid indices;
    `apply` (B, bool) limits the displacement to some samples (the others are returned unchanged). All other
    pixels are bit-identical to the inputs."""
    p1, p2 = to_patches(x1, grid), to_patches(x2, grid)
    idx = torch.arange(x1.shape[0], device=x1.device)
    if apply is not None:
        idx = idx[apply.to(x1.device)]
    dst1, src2, dst2, src1 = (t.to(x1.device)[idx] for t in (dst1, src2, dst2, src1))
    out1, out2 = p1.clone(), p2.clone()
    out1[idx, dst1] = p2[idx, src2]
    out2[idx, dst2] = p1[idx, src1]
    return _like(from_patches(out1, grid), x1), _like(from_patches(out2, grid), x2)


# ---- ABD-R (unlabelled) and ABD-I (labelled) ------------------------------------------------------------


def abd_r_indices(conf1: Tensor, conf2: Tensor, prof1: Tensor, prof2: Tensor, top_k: int = 4,
                  use_kl: Tensor | bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Patch indices of ABD-R for views 1 and 2, per sample (conf: B×K patch confidences, prof: B×K×C patch
    mean logits). Returns (b, c, d, a): view 1's patch b <- view 2's patch c, view 2's patch d <- view 1's patch a.

    b = argmin s¹, d = argmin s² (least confident patches). KL-matched choice (`use_kl`, per sample):
    a = argmin_{j ∈ top-K(s¹)} KL(q²_d ‖ q¹_j), c = argmin_{j ∈ top-K(s²)} KL(q¹_b ‖ q²_j); otherwise the
    simple choice of the BCP host: a = argmax s¹, c = argmax s²."""
    bs, k = conf1.shape
    rows = torch.arange(bs, device=conf1.device)
    b, d = conf1.argmin(1), conf2.argmin(1)
    top = min(top_k, k)
    t1, t2 = conf1.topk(top, 1).indices, conf2.topk(top, 1).indices
    c_dim = prof1.shape[-1]
    q1_top = prof1.gather(1, t1[..., None].expand(bs, top, c_dim))
    q2_top = prof2.gather(1, t2[..., None].expand(bs, top, c_dim))
    a_kl = t1.gather(1, profile_kl(prof2[rows, d], q1_top).argmin(1, keepdim=True))[:, 0]
    c_kl = t2.gather(1, profile_kl(prof1[rows, b], q2_top).argmin(1, keepdim=True))[:, 0]
    use_kl = torch.as_tensor(use_kl, device=conf1.device).expand(bs)
    a = torch.where(use_kl, a_kl, conf1.argmax(1))
    c = torch.where(use_kl, c_kl, conf2.argmax(1))
    return b, c, d, a


def abd_r(x1: Tensor, x2: Tensor, logits1: Tensor, logits2: Tensor, grid: int | Sequence[int] = 4,
          top_k: int = 4, kl_prob: float = 1.0) -> tuple[Tensor, Tensor]:
    """ABD-R: the least confident patch of each view is replaced by a confident patch of the other view.

    x1, x2: the two views (B×C×spatial); logits1, logits2: each network's logits on its own view (detached
    here). Per sample the KL-matched choice is used with probability `kl_prob` (cross-teaching host: 1,
    BCP host: 0.5), else the simple one (`abd_r_indices`). Returns the displaced (x1', x2')."""
    logits1, logits2 = logits1.detach().float(), logits2.detach().float()
    conf1, conf2 = patch_confidence(logits1.softmax(1), grid), patch_confidence(logits2.softmax(1), grid)
    use_kl = torch.rand(x1.shape[0]) < kl_prob
    b, c, d, a = abd_r_indices(conf1, conf2, patch_logit_mean(logits1, grid), patch_logit_mean(logits2, grid),
                               top_k, use_kl.to(conf1.device))
    return swap_patches(x1, x2, b, c, d, a, grid)


def abd_i_indices(conf1: Tensor, conf2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Patch indices of ABD-I: (e, h, g, f) = (argmax s¹, argmin s², argmax s², argmin s¹), so that view 1's
    most confident patch e <- view 2's least confident patch h, and view 2's patch g <- view 1's patch f."""
    return conf1.argmax(1), conf2.argmin(1), conf2.argmax(1), conf1.argmin(1)


def abd_i(x1: Tensor, x2: Tensor, y1: Tensor, y2: Tensor, logits1: Tensor, logits2: Tensor,
          grid: int | Sequence[int] = 4, prob: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ABD-I (labelled samples, harder examples): with probability `prob` per sample, view 1's most
    confident patch receives view 2's least confident patch and view 2's most confident patch receives view
    1's least confident patch; the labels y1 (weak) and y2 (strong) move identically.
    Returns (x1', x2', y1', y2')."""
    logits1, logits2 = logits1.detach().float(), logits2.detach().float()
    conf1, conf2 = patch_confidence(logits1.softmax(1), grid), patch_confidence(logits2.softmax(1), grid)
    apply = torch.rand(x1.shape[0]) < prob
    e, h, g, f = abd_i_indices(conf1, conf2)
    x1n, x2n = swap_patches(x1, x2, e, h, g, f, grid, apply)
    y1n, y2n = swap_patches(y1[:, None], y2[:, None], e, h, g, f, grid, apply)
    return x1n, x2n, y1n[:, 0], y2n[:, 0]


def _like(out: Tensor, ref: Tensor) -> Tensor:
    """Keep channels_last(_3d) when the reference tensor uses it (the engine's CPU default)."""
    if ref.ndim == 4 and out.ndim == 4 and ref.is_contiguous(memory_format=torch.channels_last) \
            and not ref.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    if ref.ndim == 5 and out.ndim == 5 and ref.is_contiguous(memory_format=torch.channels_last_3d) \
            and not ref.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last_3d)
    return out
