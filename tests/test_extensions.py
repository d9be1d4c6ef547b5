"""Third-party methods through the `ssmis.extensions` entry-point group: registered on first use, listed by
`ssmis methods`, trainable by name; a broken extension is a one-line error naming it."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint

import pytest

import ssmis.registry as registry
from ssmis.cli import main
from ssmis.errors import UserError

TOY = '''
from typing import Literal
from ssmis.losses import ce_dice_loss
from ssmis.methods.base import Method, MethodConfig, StepOutput
from ssmis.registry import METHODS


@METHODS.register("toy_labels_only")
class Toy(Method):
    """Toy: labels only, from an extension package."""

    class Config(MethodConfig):
        name: Literal["toy_labels_only"] = "toy_labels_only"

    uses_unlabeled = False

    def build(self, ctx):
        self.net = ctx.add("student", ctx.build_model(), trainable=True)

    def train_step(self, lb, ub, step):
        loss = ce_dice_loss(self.net(lb.image).logits, lb.label)
        return StepOutput(loss, {"sup": loss.detach()})

    def eval_model(self):
        return self.ctx.modules["student"]
'''


@pytest.fixture
def extension(tmp_path, monkeypatch):
    """A module on sys.path declared as an ssmis.extensions entry point; the registry state is restored after."""
    def install(source: str, module: str = "toy_ssmis_ext"):
        (tmp_path / f"{module}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        eps = [EntryPoint(name="toy", value=module, group=registry.EXTENSION_GROUP)]
        monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: eps if group == registry.EXTENSION_GROUP else [])
        monkeypatch.setattr(registry, "_extensions_loaded", False)
    yield install
    registry.METHODS._items.pop("toy_labels_only", None)
    sys.modules.pop("toy_ssmis_ext", None)
    sys.modules.pop("broken_ssmis_ext", None)


def test_an_extension_method_is_listed_and_trains(extension, tmp_path, capsys):
    from conftest import small_overrides

    extension(TOY)
    assert main(["methods"]) == 0
    assert "toy_labels_only" in capsys.readouterr().out
    args = ["train", "phantom", "--out", str(tmp_path / "run"), "--set", *small_overrides("toy_labels_only", 4)]
    assert main(args) == 0
    assert (tmp_path / "run" / "eval" / "test-best" / "summary.json").is_file()


def test_a_broken_extension_is_an_error_naming_it(extension):
    extension("raise RuntimeError('boom')\n", module="broken_ssmis_ext")
    with pytest.raises(UserError, match=r"extension 'toy' \(broken_ssmis_ext\).*RuntimeError: boom"):
        registry.METHODS.list()


def test_the_readme_example_method_trains(extension, tmp_path):
    from pathlib import Path

    from conftest import small_overrides

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Adding a method"):]
    code = section[section.index("```python\n") + 10:]
    code = code[:code.index("```")]
    extension(code)
    try:
        args = ["train", "phantom", "--out", str(tmp_path / "run"), "--set", *small_overrides("my_mt", 4)]
        assert main(args) == 0
    finally:
        registry.METHODS._items.pop("my_mt", None)
