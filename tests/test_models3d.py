"""VNet and the 3D U-Net: shapes, feature taps, perturbation slot, parameter counts, dropout, checkpoints."""

from __future__ import annotations

import pytest
import torch

from ssmis.config.schema import ModelConfig
from ssmis.models import SegOutput, build_model, model_from_args
from ssmis.models.unet3d import UNet3D
from ssmis.models.vnet import VNet
from ssmis.registry import MODELS

TINY = [4, 8, 16, 32, 64]
SHAPE = (16, 32, 16)   # non-cubic, so an axis mix-up shows; bottleneck 1×2×1 (instance norm needs > 1 voxel)



def make(name: str, dropout=None, in_channels: int = 2, num_classes: int = 3):
    cls = MODELS.get(name)
    kw = {} if dropout is None else {"dropout": dropout}
    return cls(in_channels=in_channels, num_classes=num_classes, widths=TINY, **kw)


@pytest.mark.parametrize("name", ["vnet", "unet3d"])
def test_shapes_and_features(name):
    torch.manual_seed(0)
    model = make(name)
    assert model.spatial_dims == 3 and "features" in model.supports
    x = torch.randn(2, 2, *SHAPE)
    last_stage_input = []
    if name == "vnet":
        model.dec[-1].register_forward_pre_hook(lambda m, args: last_stage_input.append(args[0].clone()))
    out = model(x, need_features=True)
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 3, *SHAPE)
    assert len(out.features) == 5
    for i, (f, w) in enumerate(zip(out.features, TINY)):          # shallow -> deep
        assert f.shape == (2, w, *(s >> i for s in SHAPE))
    if name == "vnet":                                            # M3HL's VNet_HL taps
        assert torch.equal(out.aux["high"], torch.nn.functional.max_pool3d(out.features[-1], (1, 2, 1), stride=2))
        assert out.aux["high"].shape == (2, TINY[-1], 1, 1, 1)
        assert torch.equal(out.aux["low"], last_stage_input[0])      # x8_up = up(x7) + x1
    else:
        assert out.aux["high"] is out.features[-1]
    assert out.aux["low"].shape == (2, TINY[0], *SHAPE)
    plain = model(x)
    assert plain.features is None and plain.aux == {}
    plain.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["vnet", "unet3d"])
@pytest.mark.parametrize("shape", [(15, 16, 16), (16, 16, 24), (8, 16, 16)])
def test_sizes_not_multiple_of_16_are_rejected(name, shape):
    model = make(name).eval()
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.randn(1, 2, *shape))


@pytest.mark.parametrize("name", ["vnet", "unet3d"])
def test_perturb_features_is_applied(name):
    torch.manual_seed(0)
    model = make(name).eval()
    x = torch.randn(1, 2, *SHAPE)
    seen = []

    def perturb(feats):
        seen.append([f.shape for f in feats])
        return [f * 0.5 + 0.1 for f in feats]

    with torch.no_grad():
        ref = model(x).logits
        out = model(x, need_features=True, perturb_features=perturb)
        manual = model.decode(perturb(model.encode(x))).logits
    assert len(seen) == 2 and len(seen[0]) == 5
    assert torch.allclose(out.logits, manual, atol=1e-6)
    assert not torch.allclose(out.logits, ref, atol=1e-3)
    assert torch.allclose(out.features[0], model.encode(x)[0] * 0.5 + 0.1, atol=1e-6)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    assert count(VNet(1, 2)) == 9_448_866          # methods.md: ≈ 9.45 M
    assert count(VNet(1, 4)) == 9_448_866 + 2 * 17
    assert count(UNet3D(1, 2)) == 25_884_546       # methods.md (M&N): ~26 M


def test_vnet_dropout_mapping():
    assert VNet(1, 2, widths=TINY).has_dropout                            # default (0.5,)
    assert VNet(1, 2, widths=TINY, dropout=[0.05, 0.1, 0.2, 0.3, 0.5]).dropout.p == 0.5   # config default
    assert VNet(1, 2, widths=TINY, dropout=0.3).dropout.p == 0.3
    for off in ([0, 0, 0, 0, 0], [], 0.0):
        m = VNet(1, 2, widths=TINY, dropout=off)
        assert not m.has_dropout and not any(isinstance(x, torch.nn.Dropout3d) for x in m.modules())
    assert sum(isinstance(x, torch.nn.Dropout3d) for x in VNet(1, 2, widths=TINY).modules()) == 1


@pytest.mark.parametrize("name,dropout", [("vnet", [0.5]), ("unet3d", [0.3] * 5)])
def test_dropout_only_in_train_mode(name, dropout):
    torch.manual_seed(0)
    x = torch.randn(2, 2, *SHAPE)
    model = make(name, dropout)
    quiet = make(name, [0.0] * len(dropout))
    quiet.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.train()
        a, b = model(x).logits, model(x).logits
        assert not torch.allclose(a, b, atol=1e-4)             # dropout masks differ between calls
        quiet.train()
        assert torch.allclose(quiet(x).logits, quiet(x).logits, atol=1e-6)
        quiet.load_state_dict(model.state_dict())              # same BN running statistics
        model.eval()
        quiet.eval()
        c, d = model(x).logits, model(x).logits
        assert torch.equal(c, d)
        assert torch.allclose(c, quiet(x).logits, atol=1e-6)   # eval = no dropout at all


@pytest.mark.parametrize("name", ["vnet", "unet3d"])
def test_round_trip_from_init_args(name):
    torch.manual_seed(0)
    model = make(name)
    with torch.no_grad():      # move BN running statistics away from their initial values
        model.train()
        model(torch.randn(2, 2, *SHAPE) * 3 + 1)
    model.eval()
    clone = model_from_args(name, model.init_args)
    assert clone.init_args == model.init_args
    clone.load_state_dict(model.state_dict())
    clone.eval()
    x = torch.randn(1, 2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(model(x).logits, clone(x).logits)


@pytest.mark.parametrize("name", ["vnet", "unet3d"])
def test_build_model_from_config(name):
    model = build_model(ModelConfig(name=name, widths=TINY, dropout=[0, 0, 0, 0, 0]), in_channels=1, num_classes=2)
    assert isinstance(model, MODELS.get(name)) and model.init_args["widths"] == TINY
    assert model(torch.randn(1, 1, 16, 16, 32)).logits.shape == (1, 2, 16, 16, 32)


def test_unet3d_layout_matches_mn():
    model = UNet3D(1, 2)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(c.kernel_size == (3, 3, 3) for c in convs)
    assert [b[0].out_channels for b in model.enc] == [32, 64, 128, 256, 512]
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.InstanceNorm3d) for m in model.modules()) == 5 * 2 + 4 * 3
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))   # M&N: no dropout
    assert model.dec[0].up[0].mode == "trilinear" and not model.dec[0].up[0].align_corners


def test_vnet_layout_matches_release():
    model = VNet(1, 2)
    assert [sum(isinstance(m, torch.nn.Conv3d) for m in s.modules()) for s in model.enc] == [1, 2, 3, 3, 3]
    assert [sum(isinstance(m, torch.nn.Conv3d) for m in s.modules()) for s in model.dec] == [3, 3, 2, 1]
    assert [d[0].stride for d in model.down] == [(2, 2, 2)] * 4
    assert all(isinstance(u[0], torch.nn.ConvTranspose3d) for u in model.up)
    assert model.head.kernel_size == (1, 1, 1)


def test_vnet_released_state_dict_names():
    """Keys of the released VNet (block_one … block_nine, *_dw, *_up, out_conv, DataParallel prefix) load."""
    model = VNet(1, 2, widths=TINY)
    names = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    released = {}
    for key, value in model.state_dict().items():
        part, idx, rest = (key.split(".", 2) + [""])[:3]
        if part == "head":
            new = f"out_conv.{idx}"
        else:
            i = int(idx)
            block = (names[i] if part == "enc" else names[5 + i] if part == "dec"
                     else names[i] + "_dw" if part == "down" else names[4 + i] + "_up")
            new = f"block_{block}.conv.{rest}"
        released["module." + new] = value + 1.0 if value.is_floating_point() else value
    converted = VNet.convert_released_state_dict(released)
    clone = VNet(1, 2, widths=TINY)
    clone.load_state_dict(converted, strict=True)
    assert torch.equal(clone.enc[2][3].weight, model.enc[2][3].weight + 1.0)
    assert torch.equal(clone.up[0][1].running_var, model.up[0][1].running_var + 1.0)
    with pytest.raises(KeyError):
        VNet.convert_released_state_dict({"projector.weight": torch.zeros(1)})
