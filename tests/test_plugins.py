"""Plug-in slots (design.md 3.4): every host passes through each slot it declares, with the inputs it declares;
empty slots and identity plug-ins change nothing; plug-ins fold in config order; mismatches are user errors before
training; state lives in buffers, changes only at step end, and resumes with the run."""

from __future__ import annotations

import pytest
import torch

from conftest import random_batches, small_config, small_overrides, straight_and_resumed, tiny_method
from ssmis.config import load_config
from ssmis.errors import UserError
from ssmis.methods.bcp import BCP
from ssmis.methods.cps import CPS
from ssmis.methods.fixmatch import FixMatch
from ssmis.methods.mean_teacher import MeanTeacher
from ssmis.methods.ua_mt import UAMT
from ssmis.methods.unimatch import UniMatch
from ssmis.plugins import Plugin, PluginConfig, PluginSet, SlotInputs, build_plugins
from ssmis.registry import PLUGINS


class Probe(Plugin):
    """A test plug-in: applies `fn(value, inp)` (identity by default) and remembers what it was given."""

    Config = PluginConfig

    def __init__(self, fn=None):
        super().__init__(PluginConfig(name=f"probe_{self.slot}"), 4, 2)
        self.fn = fn or (lambda v, inp: v)
        self.calls: list[tuple[object, SlotInputs]] = []

    def forward(self, value, inp):
        self.calls.append((value, inp))
        return self.fn(value, inp)


def probe(slot: str, fn=None, needs=frozenset()) -> Probe:
    cls = type(f"Probe_{slot}", (Probe,), {"slot": slot, "needs": frozenset(needs)})
    return cls(fn)


S = 32        # image side: BCP's half-batches of one image still give BatchNorm more than one value at the bottom

HOSTS = {   # name -> (class, config, needs the selftrain stage)
    "mean_teacher": (MeanTeacher, {}, False),
    "ua_mt": (UAMT, {"passes": 2}, False),
    "fixmatch-ce": (FixMatch, {"unsup_loss": "ce", "threshold": 0.3}, False),
    "fixmatch-dice": (FixMatch, {"threshold": 0.3}, False),
    "unimatch": (UniMatch, {"unsup_loss": "ce", "threshold": 0.3}, False),
    "cps": (CPS, {}, False),
    "bcp": (BCP, {"lcc": False}, True),
}


def host(name: str, plugins: PluginSet | None = None, **extra):
    cls, cfg, selftrain = HOSTS[name]
    m, _ = tiny_method(cls, total=100, plugins=plugins, **{**cfg, **extra})
    if selftrain:
        m.on_stage_start("selftrain", False)
    return m


def step_loss(m, step: int = 90) -> torch.Tensor:
    lb, ub = random_batches(nl=2, nu=2, size=S)
    torch.manual_seed(7)
    return m.train_step(lb, ub, step).loss.detach()


@pytest.mark.parametrize("name", list(HOSTS))
def test_identity_plugins_change_nothing_and_every_declared_slot_is_wired(name):
    plain = host(name)
    slots = plain.slots()
    assert slots, f"{name} offers no slot"
    probes = {s: probe(s) for s in slots}
    with_probes = host(name, PluginSet(list(probes.values())))
    torch.testing.assert_close(step_loss(with_probes), step_loss(plain), rtol=1e-5, atol=1e-7)
    for s, p in probes.items():
        assert p.calls, f"{name}: slot {s!r} is declared but never used"
        for _, inp in p.calls:     # the host passes every input it declares for that slot
            assert slots[s] <= inp.keys(), f"{name}.{s}: declared {sorted(slots[s])}, passed {sorted(inp.keys())}"


@pytest.mark.parametrize("name,slot", [("mean_teacher", "mask"), ("mean_teacher", "unsup_loss"),
                                       ("ua_mt", "mask"), ("cps", "mask"), ("cps", "unsup_loss"),
                                       ("fixmatch-ce", "mask"), ("fixmatch-ce", "unsup_loss"),
                                       ("fixmatch-dice", "mask"), ("unimatch", "unsup_loss")])
def test_zeroing_mask_or_loss_removes_the_unlabelled_term(name, slot):
    m = host(name, PluginSet([probe(slot, lambda v, inp: v * 0)]))
    lb, ub = random_batches(nl=2, nu=2, size=S)
    out = m.train_step(lb, ub, 90)
    unsup = {k: float(v) for k, v in out.logs.items() if k.startswith(("cons", "cps", "unsup"))}
    assert unsup and all(v == 0.0 for v in unsup.values()), unsup


def test_targets_slot_reaches_the_loss():
    # Mean Teacher: targets replaced by the student's own probabilities -> zero consistency
    m = host("mean_teacher", PluginSet([probe("targets", lambda v, inp: inp.student_probs)]))
    lb, ub = random_batches(nl=2, nu=2, size=S)
    assert float(m.train_step(lb, ub, 90).logs["cons"]) == pytest.approx(0.0, abs=1e-12)
    # CPS: a targets plug-in that makes every pseudo-label class 0 gives CE(z, 0) per direction
    m = host("cps", PluginSet([probe("targets", lambda v, inp: torch.eye(4)[0].view(1, 4, 1, 1).expand_as(v))]))
    x = torch.cat([lb.image, ub.image])
    torch.manual_seed(3)                              # the same dropout draws as inside the step
    z1, z2 = m.net1(x).logits, m.net2(x).logits
    torch.manual_seed(3)
    out = m.train_step(lb, ub, 90)
    ref = torch.nn.functional.cross_entropy(z1[2:].float(), torch.zeros(2, S, S, dtype=torch.long))
    torch.testing.assert_close(out.logs["cps1"], ref.detach(), rtol=1e-5, atol=1e-6)


def test_inputs_and_features_slots_see_the_unlabelled_part_only():
    seen = {}

    def keep(slot):
        def fn(v, inp):
            seen[slot] = [t.shape for t in v] if isinstance(v, list) else v.shape
            return v
        return fn
    m = host("mean_teacher", PluginSet([probe("inputs", keep("inputs")), probe("features", keep("features"))]))
    lb, ub = random_batches(nl=3, nu=2, size=S)
    m.train_step(lb, ub, 90)
    assert seen["inputs"] == ub.image.shape
    assert all(s[0] == 2 for s in seen["features"]) and len(seen["features"]) == 5   # 5 encoder levels, 2 images


def test_plugins_fold_in_config_order():
    add1, double = probe("targets", lambda v, inp: v + 1), probe("targets", lambda v, inp: v * 2)
    x = torch.full((1, 2, 1, 1), 3.0)
    assert PluginSet([add1, double]).apply("targets", x, SlotInputs()).flatten().tolist() == [8.0, 8.0]
    assert PluginSet([double, add1]).apply("targets", x, SlotInputs()).flatten().tolist() == [7.0, 7.0]
    assert PluginSet([]).apply("targets", x, SlotInputs()) is x


def test_host_checks_name_the_plugin_slot_and_missing_input():
    with pytest.raises(UserError, match=r"plugins.0 \(threshold\).*'abd' has no 'mask' slot"):
        build_plugins([{"name": "threshold"}], 4, 2).check_host("abd", {})
    needy = PluginSet([probe("mask", needs={"labels"})])
    with pytest.raises(UserError, match=r"needs labels in slot 'mask'.*'mean_teacher'"):
        needy.check_host("mean_teacher", MeanTeacher.provides)
    # FixMatch's Dice term has no per-pixel loss: the slot exists only with unsup_loss=ce
    assert "unsup_loss" not in host("fixmatch-dice").slots() and "unsup_loss" in host("fixmatch-ce").slots()


def test_engine_refuses_a_plugin_the_method_cannot_host(tmp_path):
    from ssmis.engine.run import train

    cfg = small_config("bcp", 4, "plugins=[{name: threshold}]")
    with pytest.raises(UserError, match="'bcp' has no 'mask' slot"):
        train(cfg, out=tmp_path / "run", progress=False, test_at_end=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_plugin_config_errors_and_overrides():
    with pytest.raises(UserError, match=r"plugins.0.name.*unknown plug-in 'thresold'.*Did you mean 'threshold'"):
        load_config("phantom", ["plugins=[{name: thresold}]"])
    with pytest.raises(UserError, match=r"plugins.0.tua.*unknown key.*Did you mean 'tau'"):
        load_config("phantom", ["plugins=[{name: threshold, tua: 0.9}]"])
    with pytest.raises(UserError, match=r"plugins.1.name.*missing"):
        load_config("phantom", ["plugins=[{name: threshold}, {tau: 0.9}]"])
    cfg = load_config("phantom", ["plugins=[{name: threshold}, {name: sharpen}]", "plugins.0.tau=0.8"])
    assert cfg.plugins == [{"name": "threshold", "tau": 0.8}, {"name": "sharpen", "temperature": 0.5}]


# ---- built-in plug-ins --------------------------------------------------------------------------------------

def _probs(conf_class1: list[float]) -> torch.Tensor:
    """Two-class probabilities 1×2×1×N whose class-1 confidence is the given list."""
    c = torch.tensor(conf_class1)
    return torch.stack([1 - c, c]).view(1, 2, 1, -1)


def test_class_threshold_follows_metassl_update_only_at_step_end():
    ps = build_plugins([{"name": "class_threshold"}], 2, 2)
    th = ps.items[0]
    probs = _probs([0.8, 0.6])
    mask = ps.apply("mask", torch.ones(1, 1, 2), SlotInputs(teacher_probs=probs))
    assert mask.flatten().tolist() == [0.0, 0.0]                 # 0.8 and 0.6 are not > 0.9
    assert th.tau.tolist() == pytest.approx([0.9, 0.9])          # unchanged until the step ends
    ps.step_end(ps.pending_stats())
    # methods.md MetaSSL "test it by" 2: m_1 = 1.4/3, τ_1 = 0.5·m_1 + 0.5·0.9; class 0 saw no pixel: m_0 = 0
    assert th.tau.tolist() == pytest.approx([0.45, 0.5 * 1.4 / 3 + 0.45], abs=1e-6)
    assert ps.pending_stats() == {}
    mask = ps.apply("mask", torch.ones(1, 1, 2), SlotInputs(teacher_probs=probs))
    assert mask.flatten().tolist() == [1.0, 0.0]                 # 0.8 > 0.6833 > 0.6
    ps.discard_stats()
    # two calls in one step add their statistics; the 3D cap holds
    capped = build_plugins([{"name": "class_threshold", "cap": 0.9}], 2, 3)
    for _ in range(2):
        capped.apply("mask", torch.ones(1, 1, 50), SlotInputs(teacher_probs=_probs([1.0] * 50)))
    stats = capped.pending_stats()
    assert stats["0.count"].tolist() == [0.0, 100.0] and stats["0.conf_sum"].tolist() == [0.0, 100.0]
    for _ in range(20):
        capped.step_end(stats)                  # the mean 100/101 would lift τ_1 above 0.9 without the cap
    assert capped.items[0].tau[1].item() == pytest.approx(0.9)
    # state round trip
    fresh = build_plugins([{"name": "class_threshold"}], 2, 2)
    fresh.load_state_dict(ps.state_dict())
    assert torch.equal(fresh.items[0].tau, th.tau)


def test_threshold_sharpen_noise_and_feature_dropout():
    ps = build_plugins([{"name": "threshold", "tau": 0.7}], 2, 2)
    assert ps.apply("mask", torch.full((1, 1, 3), 0.5), SlotInputs(teacher_probs=_probs([0.2, 0.7, 0.9]))
                    ).flatten().tolist() == [0.5, 0.5, 0.5]       # class-0 conf 0.8 ≥ 0.7; 0.7 ≥ 0.7; 0.9
    assert ps.apply("mask", torch.ones(1, 1, 1), SlotInputs(teacher_probs=_probs([0.4]))).item() == 0.0
    sharp = build_plugins([{"name": "sharpen", "temperature": 0.5}], 2, 2)
    out = sharp.apply("targets", _probs([0.4]), SlotInputs()).flatten()
    torch.testing.assert_close(out, torch.tensor([0.36 / 0.52, 0.16 / 0.52]))
    same = build_plugins([{"name": "sharpen", "temperature": 1.0}], 2, 2).apply("targets", _probs([0.3]), SlotInputs())
    torch.testing.assert_close(same, _probs([0.3]))
    x = torch.zeros(2, 1, 64, 64)
    noisy = build_plugins([{"name": "gaussian_noise", "sigma": 1.0, "clip": 0.2}], 2, 2).apply("inputs", x, SlotInputs())
    assert noisy.abs().max() <= 0.2 and noisy.std() > 0.1
    feats = [torch.ones(4, 8, 5, 5), torch.ones(4, 16, 3, 3)]
    torch.manual_seed(0)
    dropped = build_plugins([{"name": "feature_dropout", "p": 0.5}], 2, 2).apply("features", feats, SlotInputs())
    for f in dropped:                     # whole channels are either zero or scaled by 1/(1-p)
        per_channel = f.flatten(2)
        assert set(per_channel.unique().tolist()) <= {0.0, 2.0}
        assert (per_channel.amin(2) == per_channel.amax(2)).all()


def test_every_registered_plugin_names_a_real_slot():
    from ssmis.plugins import SLOTS

    assert {"threshold", "class_threshold", "sharpen", "gaussian_noise", "feature_dropout"} <= set(PLUGINS.list())
    for n in PLUGINS.list():
        assert PLUGINS.get(n).slot in SLOTS and set(PLUGINS.get(n).declared_slots()) <= set(SLOTS)


# ---- through the engine -----------------------------------------------------------------------------------

def test_plugin_state_is_checkpointed_and_resumes_exactly(tmp_path):
    over = small_overrides("mean_teacher", 6, "train.deterministic=true", "train.ckpt_every=3", "train.eval_every=3",
                           "plugins=[{name: class_threshold, init: 0.95}, {name: sharpen}]")
    a, b, mid = straight_and_resumed(load_config("phantom", over), tmp_path, 3)
    a, b, mid = a["modules"], b["modules"], mid["modules"]["plugins"]["items.0.tau"]
    assert not torch.allclose(a["plugins"]["items.0.tau"], torch.full((4,), 0.95))      # the thresholds moved
    assert not torch.equal(mid, a["plugins"]["items.0.tau"])                             # and kept moving
    assert torch.equal(a["plugins"]["items.0.tau"], b["plugins"]["items.0.tau"])
    for k, v in a["student"].items():
        assert torch.equal(v, b["student"][k]), k


def test_cli_lists_plugins_with_slot_and_hosts(capsys):
    from ssmis.cli import main

    assert main(["list", "plugins"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("class_threshold"))
    assert "mask" in line and "mean_teacher" in line and "fixmatch" in line and "abd" not in line
    assert main(["list", "plugins", "sharp*"]) == 0
    assert capsys.readouterr().out.startswith("sharpen")


def test_readme_slot_table_matches_the_hosts():
    import re
    from pathlib import Path

    from ssmis.methods import slot_hosts

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    hosts = slot_hosts()
    for slot in ("targets", "mask", "unsup_loss", "labeled_loss", "inputs", "features"):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{slot}` |"))
        listed = set(re.findall(r"`([a-z_]+)`", row.split("|")[3]))
        assert listed == set(hosts[slot]), (slot, listed, hosts[slot])
