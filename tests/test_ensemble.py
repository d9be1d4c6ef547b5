"""The two-network average (C3S3's published inference, MEDL's paper) as a predictor: `SoftmaxAverage`,
`ssmis eval --ensemble` and `ssmis predict --ensemble` on a two-network run, and the refusal on a one-network run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY_RESNET_UNET, FixedLogits, small_config
from ssmis.cli import main
from ssmis.models.ensemble import SoftmaxAverage


def test_softmax_average_predicts_the_argmax_of_the_mean_softmax():
    """Pixel 0: net 1 says 1, net 2 says 2, the mean softmax says 1 (the mean of the logits would say 2). Pixel 1:
    net 1 says 0, net 2 says 1, the mean softmax says 2. The returned logits are log-probabilities of the mean."""
    z1 = torch.tensor([[0.0, 6.0, 0.0], [math.log(0.45), math.log(0.15), math.log(0.40)]]).T.reshape(1, 3, 1, 2)
    z2 = torch.tensor([[3.0, -10.0, 3.2], [math.log(0.15), math.log(0.45), math.log(0.40)]]).T.reshape(1, 3, 1, 2)
    avg = SoftmaxAverage([FixedLogits(z1), FixedLogits(z2)])
    out = avg(torch.zeros(1, 1, 1, 2)).logits
    expected = (z1.softmax(1) + z2.softmax(1)) / 2
    torch.testing.assert_close(out.softmax(1), expected)
    torch.testing.assert_close(out.exp(), expected)
    assert out.argmax(1).flatten().tolist() == [1, 2]
    assert ((z1 + z2) / 2).argmax(1).flatten().tolist()[0] == 2
    assert avg.init_args == {"in_channels": 1, "num_classes": 3}


def test_softmax_average_refuses_networks_of_different_classes():
    with pytest.raises(ValueError, match="share channels and classes"):
        SoftmaxAverage([FixedLogits(torch.zeros(1, 3, 1, 1)), FixedLogits(torch.zeros(1, 4, 1, 1))])


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """A 4-step C3S3 run on the tiny phantom, net 2 a tiny resnet34_unet."""
    from ssmis.engine.run import train

    out = tmp_path_factory.mktemp("ensemble") / "c3s3"
    n = torch.get_num_threads()
    train(small_config("c3s3", 4, "method.net2=resnet34_unet", f"method.net2_args={TINY_RESNET_UNET}"), out=out,
          progress=False, test_at_end=False)
    torch.set_num_threads(n)
    return out


def test_the_ensemble_model_is_the_mean_of_both_checkpointed_networks(pair_run):
    from ssmis.engine.checkpoint import load_checkpoint
    from ssmis.models import model_from_args
    from ssmis.predict import load_trained_model

    state = load_checkpoint(pair_run / "checkpoints" / "last.pt")
    assert [m["module"] for m in state["ensemble"]] == ["net1", "net2"]
    assert [m["model_name"] for m in state["ensemble"]] == ["unet2d", "resnet34_unet"]
    net2 = model_from_args("resnet34_unet", state["ensemble"][1]["model_args"])
    net2.load_state_dict(state["modules"]["net2"])
    one = load_trained_model(pair_run, "last", device="cpu")
    both = load_trained_model(pair_run, "last", device="cpu", ensemble=True)
    assert (one.members, one.averaged, both.averaged) == (["net1", "net2"], False, True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        p1 = one.net(x).logits.softmax(1)
        p2 = net2.eval()(x).logits.softmax(1)
        got = both.net(x).logits.softmax(1)
    assert not torch.allclose(p1, p2, atol=1e-3)          # two different networks, so the average is not either
    torch.testing.assert_close(got, (p1 + p2) / 2)


def test_eval_ensemble_writes_its_own_report_and_says_which_prediction(pair_run, capsys):
    assert main(["eval", "--run", str(pair_run), "--checkpoint", "last"]) == 0
    assert main(["eval", "--run", str(pair_run), "--checkpoint", "last", "--ensemble"]) == 0
    assert "softmax average of net1 + net2" in capsys.readouterr().out
    single = json.loads((pair_run / "eval" / "test-last" / "summary.json").read_text())
    avg = json.loads((pair_run / "eval" / "test-last-ensemble" / "summary.json").read_text())
    assert single["conventions"]["network"].startswith("net1 (network 1")
    assert avg["conventions"]["network"] == "softmax average of net1 + net2"
    assert avg["counts"]["cases"] == single["counts"]["cases"] == 2


def test_predict_ensemble_writes_masks_of_the_average(pair_run, tmp_path):
    import h5py

    from ssmis.predict import load_trained_model

    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    with h5py.File(tmp_path / "case.h5", "w") as f:
        f["image"] = image
    assert main(["predict", "--run", str(pair_run), "--checkpoint", "last", "--ensemble", str(tmp_path / "case.h5"),
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    with h5py.File(tmp_path / "out" / "case.h5") as f:
        written = np.asarray(f["label"])
    expected = load_trained_model(pair_run, "last", device="cpu", ensemble=True).predict(image[None])
    network1 = load_trained_model(pair_run, "last", device="cpu").predict(image[None])
    assert (expected != network1).any()                   # so the mask tells which prediction was written
    np.testing.assert_array_equal(written.squeeze(), expected.squeeze())


def test_ensemble_of_a_one_network_run_is_a_clear_error(cli_run, capsys):
    out, rc, _ = cli_run
    assert rc == 0
    assert main(["eval", "--run", str(out), "--checkpoint", "last", "--ensemble"]) == 2
    err = capsys.readouterr().err
    assert "no ensemble in this checkpoint: mean_teacher" in err and "Drop --ensemble" in err
    assert not (out / "eval" / "test-last-ensemble").exists()


def test_a_checkpoint_without_the_ensemble_entry_rebuilds_network_2_from_the_config(pair_run, tmp_path):
    """Runs trained before checkpoints listed their ensemble: network 2 comes from method.net2 / net2_args."""
    from ssmis.engine.checkpoint import load_checkpoint
    from ssmis.predict import load_trained_model

    state = load_checkpoint(pair_run / "checkpoints" / "last.pt")
    state.pop("ensemble")
    torch.save(state, tmp_path / "old.pt")
    old = load_trained_model(tmp_path / "old.pt", device="cpu", ensemble=True)
    new = load_trained_model(pair_run, "last", device="cpu", ensemble=True)
    assert old.members == ["net1", "net2"]
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(old.net(x).logits, new.net(x).logits, rtol=0, atol=0)
