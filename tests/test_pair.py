"""Two-network methods (methods/pair.py): network 1 is what the checkpoint exports for eval and predict."""

import torch

from conftest import small_config
from ssmis.engine.checkpoint import load_checkpoint
from ssmis.engine.run import train
from ssmis.models import model_from_args

TINY_NET2 = 'method.net2_args={"widths": [4, 8, 8, 16, 16], "blocks": [1, 1, 1, 1]}'


def test_two_network_runs_export_network_1(tmp_path):
    cfg = small_config("medl", 4, "method.net2=resnet34_unet", TINY_NET2)
    train(cfg, out=tmp_path / "run", progress=False, test_at_end=False)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["model_name"] == cfg.model.name == "unet2d"
    net1 = ck["modules"]["net1"]
    assert set(ck["eval_weights"]) == set(net1)
    assert all(torch.equal(ck["eval_weights"][k], net1[k]) for k in net1)
    assert set(ck["modules"]["net2"]) != set(net1)                  # network 2 is the other architecture
    net = model_from_args(ck["model_name"], ck["model_args"])
    net.load_state_dict(ck["eval_weights"])                          # what `ssmis predict` rebuilds
