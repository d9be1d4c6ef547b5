"""Sliding-window inference: exact stitching, padding, weights, a naive reference, and MONAI agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ssmis.eval.sliding_window import (LA_UAMT, importance_map, predict_volume, sliding_window_probs,
                                       window_starts)
from ssmis.models.output import SegOutput
from ssmis.models.vnet import VNet



class ConvNet(nn.Module):
    """One conv layer returning SegOutput; k=1 is pointwise (window position cannot matter), k=3 with zero
    padding is not (window borders change the result), which exposes weighting and placement errors."""

    def __init__(self, cin: int = 3, k_out: int = 4, kernel: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(cin, k_out, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm3d(k_out)            # shows that eval mode is used (train-mode BN differs per window)
        with torch.no_grad():
            self.conv.weight.mul_(3.0)
            self.bn.running_mean.uniform_(-0.5, 0.5)

    def forward(self, x):
        return SegOutput(self.bn(self.conv(x)))


def full_softmax(model: nn.Module, vol: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(vol)[None]).logits, 1)[0].numpy()


def rand_volume(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------- exact stitching with a pointwise model

CASES = [  # spatial size, patch, dict(overlap=…) or dict(stride=…)
    ((19, 23, 13), (8, 8, 8), {"stride": (3, 5, 4)}),           # not a multiple of the stride
    ((19, 23, 13), (8, 8, 8), {"overlap": 0.5}),
    ((19, 23, 13), (8, 6, 8), {"overlap": (0.25, 0.0, 0.7)}),   # no overlap along one axis
    ((5, 9, 7), (8, 8, 8), {"overlap": 0.5}),                   # smaller than the patch along two axes
    ((3, 4, 2), (8, 8, 8), {"stride": 4}),                      # smaller along every axis
    ((16, 16, 16), (8, 8, 8), {"overlap": 0.0}),                # windows meet at faces, edges and corners
]


@pytest.mark.parametrize("backend", ["builtin", "auto"])          # auto = MONAI when installed
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("size,patch,step", CASES)
def test_pointwise_model_is_reproduced_exactly(size, patch, step, mode, backend):
    model = ConvNet(kernel=1)
    model.train()
    vol = rand_volume((3, *size))
    probs = sliding_window_probs(model, vol, patch, mode=mode, batch_size=3, backend=backend, **step)
    assert model.training and model.bn.training           # the caller's mode is restored
    assert probs.shape == (4, *size) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, full_softmax(model, vol), rtol=0, atol=2e-6)


def test_tensor_in_tensor_out_and_labels():
    model = ConvNet(kernel=1)
    vol = rand_volume((3, 11, 9, 10))
    probs = sliding_window_probs(model, torch.from_numpy(vol), (8, 8, 8), backend="builtin")
    assert isinstance(probs, torch.Tensor) and probs.shape == (4, 11, 9, 10)
    labels = predict_volume(model, vol, (8, 8, 8), backend="builtin")
    assert labels.dtype == np.int64 and labels.shape == (11, 9, 10)
    np.testing.assert_array_equal(labels, full_softmax(model, vol).argmax(0))


# ---------------------------------------------------------------- weights and window positions

def test_gaussian_weights_positive_everywhere():
    for patch in [(16, 16, 16), (112, 112, 80), (7, 8, 9)]:
        w = importance_map(patch, "gaussian", 0.125)
        assert w.shape == patch and torch.all(w > 0)
        assert w.min().item() == pytest.approx(1e-3)       # corners: exp(-24)-ish clamped to MONAI's floor
        assert w.max().item() <= 1.0
        for ax in range(3):                                # symmetric about the centre
            assert torch.allclose(w, w.flip(ax))
    w = importance_map((9, 9, 9), "gaussian", 0.125)
    assert w[4, 4, 4].item() == 1.0 and w[4, 4, 0].item() == pytest.approx(math.exp(-16 / (2 * 1.125 ** 2)))
    assert torch.equal(importance_map((4, 5, 6), "constant"), torch.ones(4, 5, 6))


def test_window_starts_match_uamt_formula():
    """UA-MT test_util: n = ceil((S - P) / stride) + 1 windows at min(stride·k, S - P)."""
    for size in range(80, 200, 7):
        for patch, stride in [(112, 18), (80, 4), (64, 32)]:
            if size < patch:
                continue
            n = math.ceil((size - patch) / stride) + 1
            assert window_starts(size, patch, stride) == [min(stride * k, size - patch) for k in range(n)]
    assert window_starts(120, 112, 18) == [0, 8]
    assert window_starts(90, 80, 4) == [0, 4, 8, 10]
    assert window_starts(112, 112, 18) == [0]


def test_argument_errors():
    model, vol = ConvNet(), rand_volume((3, 8, 8, 8))
    with pytest.raises(ValueError, match="either overlap or stride"):
        sliding_window_probs(model, vol, (8, 8, 8), overlap=0.5, stride=4)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_probs(model, vol, (8, 8, 8), stride=(9, 4, 4))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_probs(model, vol, (8, 8, 8), overlap=1.0)
    with pytest.raises(ValueError, match="mode"):
        sliding_window_probs(model, vol, (8, 8, 8), mode="linear")
    with pytest.raises(ValueError, match="one per spatial axis"):
        sliding_window_probs(model, vol, (8, 8))


# ---------------------------------------------------------------- naive reference (UA-MT-style loops)

def naive(model: nn.Module, vol: np.ndarray, patch, interval, weights: str) -> np.ndarray:
    """Pad (half before), loop over every window, accumulate w·softmax in numpy, divide, crop."""
    c, *size = vol.shape
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(size, patch)]
    v = np.pad(vol, [(0, 0)] + pads)
    big = v.shape[1:]
    if weights == "gaussian":
        axes = [np.exp(-((np.arange(p) - (p - 1) / 2) ** 2) / (2 * (p / 8) ** 2)) for p in patch]
        w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        w = np.maximum(w, max(w.min(), 1e-3))
    else:
        w = np.ones(patch)
    acc, cnt = None, np.zeros(big)
    starts = []
    for s, p, i in zip(big, patch, interval):
        n = math.ceil((s - p) / i) + 1
        starts.append([min(i * k, s - p) for k in range(n)])
    model.eval()
    for a in starts[0]:
        for b in starts[1]:
            for d in starts[2]:
                crop = v[:, a:a + patch[0], b:b + patch[1], d:d + patch[2]]
                with torch.no_grad():
                    prob = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(crop))[None]).logits, 1)
                prob = prob[0].double().numpy()
                if acc is None:
                    acc = np.zeros((prob.shape[0], *big))
                acc[:, a:a + patch[0], b:b + patch[1], d:d + patch[2]] += w * prob
                cnt[a:a + patch[0], b:b + patch[1], d:d + patch[2]] += w
    out = acc / cnt
    return out[:, pads[0][0]:pads[0][0] + size[0], pads[1][0]:pads[1][0] + size[1], pads[2][0]:pads[2][0] + size[2]]


@pytest.mark.parametrize("size,patch,kw,interval,mode", [
    ((21, 17, 14), (8, 8, 6), {"overlap": 0.5}, (4, 4, 3), "gaussian"),
    ((21, 17, 14), (7, 8, 5), {"overlap": (0.5, 0.3, 0.5)}, (3, 5, 2), "gaussian"),   # int(P·(1 − o)) floors
    ((21, 17, 14), (8, 8, 6), {"stride": (6, 5, 2)}, (6, 5, 2), "constant"),   # the LA protocol's shape of call
    ((21, 17, 14), (8, 8, 6), {"stride": (6, 5, 2)}, (6, 5, 2), "gaussian"),
    ((5, 17, 3), (8, 8, 8), {"overlap": 0.25}, (6, 6, 6), "gaussian"),         # padded (odd) along axes 0 and 2
])
def test_agrees_with_naive_reference(size, patch, kw, interval, mode):
    model = ConvNet(kernel=3)
    vol = rand_volume((3, *size), seed=2)
    got = sliding_window_probs(model, vol, patch, mode=mode, batch_size=4, backend="builtin", **kw)
    ref = naive(model, vol, patch, interval, mode)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert np.abs(got - full_softmax(model, vol)).max() > 1e-3     # borders of windows do matter here


def test_la_protocol_is_expressible():
    assert LA_UAMT == {"patch": (112, 112, 80), "stride": (18, 18, 4), "mode": "constant"}
    # A scaled-down copy of the protocol on a real (tiny) VNet: stride 18/4 windows of 32×32×16.
    torch.manual_seed(0)
    model = VNet(1, 2, widths=(2, 4, 8, 8, 8))
    vol = rand_volume((1, 41, 37, 21), seed=3)
    got = sliding_window_probs(model, vol, (32, 32, 16), stride=(9, 9, 4), mode="constant", backend="builtin")
    ref = naive(model, vol, (32, 32, 16), (9, 9, 4), "constant")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)


# ---------------------------------------------------------------- MONAI cross-check

@pytest.mark.parametrize("size,patch,kw,mode", [
    ((21, 17, 14), (8, 8, 6), {"overlap": 0.5}, "gaussian"),
    ((21, 17, 14), (8, 8, 6), {"overlap": (0.25, 0.5, 0.0)}, "gaussian"),
    ((21, 17, 14), (8, 8, 6), {"stride": (6, 5, 2)}, "constant"),
    ((21, 17, 14), (8, 8, 6), {"stride": (3, 7, 6)}, "gaussian"),
    ((6, 17, 5), (8, 8, 8), {"overlap": 0.25}, "gaussian"),
    ((130, 121, 88), (112, 112, 80), {"stride": (18, 18, 4)}, "constant"),   # the LA protocol, pointwise model
])
def test_agrees_with_monai(size, patch, kw, mode):
    pytest.importorskip("monai")
    model = ConvNet(cin=1, k_out=2, kernel=1 if size[0] > 100 else 3)
    vol = rand_volume((1, *size), seed=4)
    ours = sliding_window_probs(model, vol, patch, mode=mode, backend="builtin", **kw)
    theirs = sliding_window_probs(model, vol, patch, mode=mode, backend="monai", **kw)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
