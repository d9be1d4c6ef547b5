"""The ResNet34-encoder networks (resnet34_vnet 3D, resnet34_unet 2D): shapes, taps, layout, parameter counts,
initialisation, checkpoints, input checks, memory formats, dropout and a tiny learning check."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssmis.config.schema import ModelConfig
from ssmis.models import SegOutput, build_model, model_from_args
from ssmis.models.resnet import BasicBlock, ResNet34UNet, ResNet34VNet
from ssmis.models.unet import UpBlock
from ssmis.models.vnet import pooled_bottleneck
from ssmis.registry import MODELS

TINY = dict(widths=(4, 8, 8, 16, 16), blocks=(1, 1, 1, 1))
SHAPE = {3: (16, 32, 16), 2: (32, 48)}          # non-square, so an axis mix-up shows
NAME = {3: "resnet34_vnet", 2: "resnet34_unet"}
DIMS = [3, 2]


def make(dims: int, in_channels: int = 2, num_classes: int = 3, **kw):
    return MODELS.get(NAME[dims])(in_channels=in_channels, num_classes=num_classes, **{**TINY, **kw})


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("dims", DIMS)
def test_shapes_and_feature_taps(dims):
    torch.manual_seed(0)
    model = make(dims)
    assert model.spatial_dims == dims and "features" in model.supports
    shape, widths = SHAPE[dims], TINY["widths"]
    x = torch.randn(2, 2, *shape)
    before_classifier = []
    site = model.dropout if dims == 3 else model.head      # 2D: head = (Dropout2d, conv)
    site.register_forward_pre_hook(lambda m, args: before_classifier.append(args[0].clone()))
    last_stage_input = []
    model.dec[-1].register_forward_pre_hook(lambda m, args: last_stage_input.append(args[0].clone()))
    out = model(x, need_features=True)
    assert isinstance(out, SegOutput) and out.logits.shape == (2, 3, *shape)
    assert len(out.features) == 5
    for i, (f, w) in enumerate(zip(out.features, widths)):          # full, 1/2, 1/4, 1/8, 1/16
        assert f.shape == (2, w, *(s >> i for s in shape))
    assert torch.equal(out.aux["last"], before_classifier[0])       # before dropout / classifier
    assert out.aux["last"].shape == (2, widths[0], *shape)
    assert out.aux["low"].shape == (2, widths[0], *shape)
    if dims == 3:                                                   # VNet's taps
        assert torch.equal(out.aux["high"], pooled_bottleneck(out.features[-1]))
        assert out.aux["high"].shape == (2, widths[-1], 1, 1, 1)
        assert torch.equal(out.aux["low"], last_stage_input[0])       # x8_up = up(x7) + stem
    else:                                                           # UNet-2D's taps
        assert out.aux["high"] is out.features[-1]
        assert out.aux["low"] is out.aux["last"]
    plain = model(x)
    assert plain.features is None and plain.aux == {}
    plain.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_counts_at_the_default_size():
    m3 = ResNet34VNet(1, 2)
    assert count(m3) == 17_930_354 and count(m3.encoder) == 15_858_384
    assert count(ResNet34VNet(1, 4)) == 17_930_354 + 2 * 17
    m2 = ResNet34UNet(1, 4)
    assert count(m2) == 5_953_092 and count(m2.encoder) == 5_319_792
    assert count(ResNet34UNet(1, 5)) == 5_953_092 + 145
    # the C3S3 release's network B = this + its projector Conv(16,16,1), PReLU, Conv(16,64,1)
    projector = nn.Sequential(nn.Conv3d(16, 16, 1), nn.PReLU(), nn.Conv3d(16, 64, 1))
    assert count(m3) + count(projector) == 17_931_715


@pytest.mark.parametrize("dims", DIMS)
def test_resnet34_layout(dims):
    model = ResNet34VNet(1, 2) if dims == 3 else ResNet34UNet(1, 4)
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    enc = model.encoder
    assert [len(s) for s in enc.stages] == [3, 4, 6, 3]
    assert all(isinstance(b, BasicBlock) for s in enc.stages for b in s)
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 16
    stem = enc.stem[0]
    assert isinstance(stem, conv) and stem.kernel_size == (7,) * dims and stem.stride == (1,) * dims
    assert stem.out_channels == 16 and stem.bias is None
    assert [s[0].conv1.out_channels for s in enc.stages] == [32, 64, 128, 256]
    for stage in enc.stages:                     # stride 2 in the first block only, with a 1-wide conv shortcut
        first, rest = stage[0], list(stage)[1:]
        assert first.conv1.stride == (2,) * dims and first.conv2.stride == (1,) * dims
        short = first.downsample[0]
        assert short.kernel_size == (1,) * dims and short.stride == (2,) * dims and short.bias is None
        assert all(b.conv1.stride == (1,) * dims and b.downsample is None for b in rest)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d)) for m in model.modules())
    drop = nn.Dropout3d if dims == 3 else nn.Dropout2d
    assert [m.p for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Dropout3d))
            if m.p > 0] == [0.5]
    assert sum(isinstance(m, drop) for m in model.modules()) == 1
    if dims == 3:                                # VNet decoder
        assert [sum(isinstance(m, nn.Conv3d) for m in s.modules()) for s in model.dec] == [3, 3, 2, 1]
        assert all(isinstance(u[0], nn.ConvTranspose3d) and u[0].stride == (2, 2, 2) for u in model.up)
        assert model.head.kernel_size == (1, 1, 1)
    else:                                        # UNet-2D decoder
        assert all(isinstance(u, UpBlock) and u.up.mode == "bilinear" and u.up.align_corners for u in model.dec)
        assert [u.reduce.out_channels for u in model.dec] == [128, 64, 32, 16]
        assert isinstance(model.head[0], nn.Dropout2d) and model.head[1].kernel_size == (3, 3)


@pytest.mark.parametrize("dims", DIMS)
def test_initialisation_is_kaiming_normal_with_unit_bn(dims):
    torch.manual_seed(0)
    model = ResNet34VNet(1, 2) if dims == 3 else ResNet34UNet(1, 4)
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)     # no zero-γ trick
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d))]
    big = [c.weight for c in convs if c.weight.numel() >= 50_000]
    assert len(big) >= 10
    for w in big:
        fan_in = w.shape[1] * math.prod(w.shape[2:])
        assert abs(w.std().item() / math.sqrt(2.0 / fan_in) - 1) < 0.05
        assert abs(w.mean().item()) < 0.05 * math.sqrt(2.0 / fan_in)
    # and the default PyTorch init would be far smaller (uniform, std = 1/sqrt(3 fan_in))
    w = model.encoder.stages[3][1].conv2.weight
    assert w.std().item() > 2 * (1 / math.sqrt(3 * w.shape[1] * math.prod(w.shape[2:])))


@pytest.mark.parametrize("dims", DIMS)
def test_round_trip_from_init_args(dims):
    torch.manual_seed(0)
    model = make(dims)
    with torch.no_grad():      # move BN running statistics away from their initial values
        model.train()
        model(torch.randn(2, 2, *SHAPE[dims]) * 3 + 1)
    model.eval()
    assert model.init_args["blocks"] == [1, 1, 1, 1] and model.init_args["widths"] == list(TINY["widths"])
    clone = model_from_args(NAME[dims], model.init_args)
    assert type(clone) is type(model) and clone.init_args == model.init_args
    clone.load_state_dict(model.state_dict())
    clone.eval()
    x = torch.randn(1, 2, *SHAPE[dims])
    with torch.no_grad():
        assert torch.equal(model(x).logits, clone(x).logits)


@pytest.mark.parametrize("dims", DIMS)
def test_build_model_from_config(dims):
    widths = [4, 8, 8, 16, 16]
    model = build_model(ModelConfig(name=NAME[dims], widths=widths, dropout=[0.05, 0.1, 0.2, 0.3, 0.5]), 1, 2)
    assert isinstance(model, MODELS.get(NAME[dims])) and model.init_args["widths"] == widths
    assert model.init_args["blocks"] == [3, 4, 6, 3]
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 16
    drops = [m for m in model.modules() if isinstance(m, (nn.Dropout2d, nn.Dropout3d))]
    assert [d.p for d in drops] == [0.5]                                   # max of the config list


@pytest.mark.parametrize("dims,shape", [(3, (15, 16, 16)), (3, (16, 16, 24)), (3, (8, 16, 16)),
                                        (2, (30, 32)), (2, (32, 40)), (2, (8, 16))])
def test_sizes_not_multiple_of_16_are_rejected(dims, shape):
    model = make(dims).eval()
    with pytest.raises(ValueError, match=f"{NAME[dims]} needs every spatial size to be a multiple of 16"):
        model(torch.randn(1, 2, *shape))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="5 widths"):
        ResNet34VNet(1, 2, widths=(4, 8, 16, 32))
    with pytest.raises(ValueError, match="4 positive block counts"):
        ResNet34UNet(1, 2, blocks=(1, 1, 1))
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
        ResNet34UNet(1, 2, dropout=1.0)


@pytest.mark.parametrize("dims", DIMS)
def test_channels_last_input(dims):
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    model = make(dims).eval()
    x = torch.randn(2, 2, *SHAPE[dims])
    with torch.no_grad():
        ref = model(x).logits
        model = model.to(memory_format=fmt)
        out = model(x.contiguous(memory_format=fmt), need_features=True)
    assert torch.allclose(out.logits, ref, atol=1e-5)
    model.train()
    model(x.contiguous(memory_format=fmt)).logits.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dims", DIMS)
def test_dropout_only_in_train_mode(dims):
    torch.manual_seed(0)
    x = torch.randn(2, 2, *SHAPE[dims])
    model = make(dims)                                # default dropout (0.5,)
    quiet = make(dims, dropout=0.0)
    assert not any(isinstance(m, (nn.Dropout2d, nn.Dropout3d)) for m in quiet.modules())
    quiet.load_state_dict(model.state_dict())         # same keys with and without dropout
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(x).logits, model(x).logits, atol=1e-4)   # masks differ between calls
        quiet.load_state_dict(model.state_dict())     # same BN running statistics
        outs = [net.eval()(x).logits for net in (model, model, quiet)]
    assert torch.equal(outs[0], outs[1])                                        # eval is deterministic
    assert torch.allclose(outs[0], outs[2], atol=1e-6)                          # and has no dropout at all


def _learn(dims: int, steps: int = 30) -> tuple[float, float, float]:
    """Train a tiny network on one fixed disc / sphere image pair; (first loss, last loss, last accuracy)."""
    torch.manual_seed(0)
    shape = (32, 32) if dims == 2 else (16, 32, 32)
    grid = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) - s / 2 + 0.5 for s in shape), indexing="ij")
    r2 = sum((g / (s / 4)) ** 2 for g, s in zip(grid, shape))
    target = (r2 < 1.5).long().unsqueeze(0).repeat(2, *([1] * dims))
    x = (target.float() - 0.5).unsqueeze(1) + 0.3 * torch.randn(2, 1, *shape)
    model = MODELS.get(NAME[dims])(1, 2, widths=(4, 8, 8, 16, 16), blocks=(1, 1, 1, 1), dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        logits = model(x).logits
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    acc = (logits.argmax(1) == target).float().mean().item()
    return losses[0], sum(losses[-3:]) / 3, acc


@pytest.mark.parametrize("dims", DIMS)
def test_tiny_network_learns_a_disc(dims):
    first, last, acc = _learn(dims)
    assert last < 0.3 * first, (first, last)
    assert acc > 0.95
