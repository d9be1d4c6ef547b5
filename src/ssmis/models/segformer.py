"""SegFormer through Hugging Face `transformers`, optionally adapted with LoRA through `peft`: M&N's 2D model
(methods.md "M&N"; [CODE pakheiyeung/M-N model.py `Segformer_segmentation`]). An optional extra: `pip install
'ssmis[mn]'`; both packages are imported only when the model is built, and a missing one is a UserError naming
the extra.

Forward: a grey image is repeated to 3 channels (no ImageNet normalisation); the SegFormer's decode head with its
classifier replaced by the identity gives `decoder_hidden_size` features (768 for B2) at 1/4 resolution; the input
subsampled by 4 (`x[:, :, ::4, ::4]`, 3 channels) is concatenated and a ConvTranspose2d(768 + 3 → classes,
kernel 4, stride 4) returns to full resolution (cropped to the input size when a side is not a multiple of 4).

Weights (`pretrained`; nothing is ever downloaded):
* None: random initialisation from a locally built SegformerConfig: B2 (depths 3/4/6/3, hidden sizes 64/128/320/512,
  heads 1/2/5/8, sr ratios 8/4/2/1, patch sizes 7/3/3/3, strides 4/2/2/2, decoder 768), `config` overriding keys;
* a directory in the Hugging Face layout (config.json + weights, e.g. a local copy of
  nvidia/segformer-b2-finetuned-ade-512-512): `from_pretrained(dir, local_files_only=True)`, `config` overriding
  keys of its config.json;
* a `.pt` file: a state dict of SegformerForSemanticSegmentation (key names of the installed transformers) for the
  B2 config + `config`; the classifier's keys are ignored.

Random initialisation: transformers' init leaves every bias at 0, so an all-zero slice (the zero padding of a volume
shorter than the patch, e.g. ACDC-3D's 6-18 slices in 16) reaches each encoder LayerNorm as an exactly zero vector,
whose backward multiplies the gradient by 1/√eps: after the ~40 LayerNorms of B2 it overflows and the first step's
gradients are NaN. [ours] The patch-embedding convs' biases are drawn as PyTorch's default conv init, U(±1/√fan_in),
so no LayerNorm input is constant (pretrained weights have non-zero biases and are left as they are).

LoRA (`lora`; auto = LoRA with pretrained weights, full fine-tuning from scratch, as the spec advises): rank 64,
alpha 64, dropout 0.1 on the encoder's query/key/value/attention-output/MLP linears (transformers 4.x: query, key,
value, dense, dense1, dense2; 5.x names the same layers q_proj, k_proj, v_proj, o_proj, fc1, fc2), bias="all",
every encoder LayerNorm as `modules_to_save` (a trainable copy); every other SegFormer weight is frozen, the ADE20K
decode-head MLPs and `linear_fuse` included. The new head is trained. The decode-head BatchNorm still updates its
running statistics in train mode. `widths` and `dropout` (which the run's model config passes to every model) are
ignored: the sizes come from the SegFormer config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssmis.errors import UserError
from ssmis.models.output import SegOutput
from ssmis.registry import MODELS

B2 = dict(num_channels=3, num_encoder_blocks=4, depths=[3, 4, 6, 3], sr_ratios=[8, 4, 2, 1],
          hidden_sizes=[64, 128, 320, 512], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
          num_attention_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=768)
LORA_LINEARS = frozenset({"query", "key", "value", "dense", "dense1", "dense2",     # transformers 4.x
                          "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"})    # transformers 5.x
EXTRA = "pip install 'ssmis[mn]'"


def resolve_lora(lora: bool | str, pretrained: str | None) -> bool:
    """lora = auto: LoRA when pretrained weights are given, full fine-tuning from scratch."""
    if lora == "auto":
        return pretrained is not None
    if not isinstance(lora, bool):
        raise UserError("method.model2d.args.lora", f"{lora!r} is not true, false or auto", "Give one of them.")
    return lora


def require(lora: bool, where: str = "method.model2d.name"):
    """(transformers, peft or None), or one UserError naming every missing package and the extra."""
    mods, missing = {}, []
    for name in ("transformers", "peft") if lora else ("transformers",):
        try:
            mods[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(where, f"SegFormer needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                        "not installed", f"Install the extra: {EXTRA} (or use the UNet-2D: model2d.name=unet2d).")
    return mods["transformers"], mods.get("peft")


def _base(transformers, pretrained: str | None, config: dict[str, Any]) -> nn.Module:
    cls = transformers.SegformerForSemanticSegmentation
    if pretrained is None:
        model = cls(transformers.SegformerConfig(**{**B2, **config}))
        with torch.no_grad():                     # see "Random initialisation" in the module docstring
            for stage in _patch_embedding_convs(model):
                bound = 1 / math.sqrt(stage.weight[0].numel())
                stage.bias.uniform_(-bound, bound)
        return model
    path = Path(pretrained)
    if path.is_dir():
        return cls.from_pretrained(str(path), local_files_only=True, **config)
    if path.is_file():
        model = cls(transformers.SegformerConfig(**{**B2, **config}))
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.decode_head.classifier = nn.Identity()
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("decode_head.classifier.")})
        return model
    raise UserError("method.model2d.args.pretrained", f"{pretrained} is neither a directory nor a file",
                    "Give a local Hugging Face model directory or a .pt state dict (nothing is downloaded).")


def _patch_embedding_convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for n, m in model.segformer.named_modules() if isinstance(m, nn.Conv2d) and "patch_embeddings" in n]


def _with_lora(peft, base: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """The PEFT wrapper: LoRA on the encoder linears, encoder LayerNorms as trainable copies, all biases trained,
    every other weight frozen (the original LayerNorms included)."""
    enc = base.segformer.named_modules()
    mods = [(f"segformer.{n}", m) for n, m in enc if n]
    targets = [n for n, m in mods if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in LORA_LINEARS]
    norms = [n for n, m in mods if isinstance(m, nn.LayerNorm)]
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                          modules_to_save=norms, bias="all")
    model = peft.get_peft_model(base, cfg)
    for name, p in model.named_parameters():
        if ".original_module." in name:          # bias="all" would mark the replaced LayerNorms' biases
            p.requires_grad_(False)
    return model


@MODELS.register("segformer")
class SegFormer2D(nn.Module):
    """SegFormer (B2 by default) + input-skip ConvTranspose head; LoRA optional. See the module docstring."""

    spatial_dims = 2
    supports = frozenset()

    def __init__(self, in_channels: int = 1, num_classes: int = 2, pretrained: str | None = None,
                 lora: bool | str = "auto", config: dict[str, Any] | None = None, rank: int = 64,
                 alpha: float = 64, lora_dropout: float = 0.1, widths=None, dropout=None):
        super().__init__()
        use_lora = resolve_lora(lora, pretrained)
        transformers, peft = require(use_lora)
        if in_channels not in (1, 3):
            raise UserError("data.channels", f"SegFormer takes 1 (repeated to 3) or 3 channels, not {in_channels}",
                            "Use the UNet-2D as M&N's 2D model.")
        self.init_args = {"in_channels": in_channels, "num_classes": num_classes, "pretrained": pretrained,
                          "lora": use_lora, "config": dict(config or {}), "rank": rank, "alpha": alpha,
                          "lora_dropout": lora_dropout}
        base = _base(transformers, pretrained, dict(config or {}))
        base.decode_head.classifier = nn.Identity()
        features = base.config.decoder_hidden_size
        self.lora = use_lora
        self.base = _with_lora(peft, base, rank, alpha, lora_dropout) if use_lora else base
        self.head = nn.ConvTranspose2d(features + 3, num_classes, kernel_size=4, stride=4)

    def forward(self, x: Tensor, need_features: bool = False) -> SegOutput:
        x3 = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        feats = self.base(pixel_values=x3).logits
        out = self.head(torch.cat([feats, x3[:, :, ::4, ::4]], dim=1))
        return SegOutput(out[..., : x.shape[-2], : x.shape[-1]])
