"""Precision and memory format per machine: channels_last on CPU; bf16 only where the CPU computes it natively."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None        # autocast dtype, None = fp32
    channels_last: bool
    reason: str

    @property
    def label(self) -> str:
        name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return name + (" + channels_last" if self.channels_last else "")

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(amp: str, channels_last: str, device: torch.device, spatial_dims: int = 2) -> Precision:
    # channels_last pays on CPU in 2D; in 3D fp32 on CPU, channels_last_3d was slower (UNet3D F+B, 2 threads,
    # benchmarks/precision_modes.py --3d), so auto keeps 3D contiguous
    cl = channels_last == "on" or (channels_last == "auto" and device.type == "cpu" and spatial_dims == 2)
    if amp == "off":
        return Precision(None, cl, "train.amp=off")
    if amp in ("bf16", "fp16"):
        return Precision(torch.bfloat16 if amp == "bf16" else torch.float16, cl, f"train.amp={amp}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, cl, "auto: CUDA with bf16")
        return Precision(torch.float16, cl, "auto: CUDA without bf16")
    if spatial_dims == 3:
        # torch 2.13 CPU: bf16 autocast through VNet gave sporadic gradients of 1e32 (same input, differing runs)
        return Precision(None, cl, "auto: 3D on CPU -> fp32 (bf16 3D backward found unreliable)")
    if cpu_has_native_bf16():
        return Precision(torch.bfloat16, cl, "auto: CPU computes bf16 natively (oneDNN)")
    return Precision(None, cl, "auto: CPU without native bf16 -> fp32")
