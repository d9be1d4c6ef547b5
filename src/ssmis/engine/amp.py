"""Precision and memory format per machine: channels_last for 2D convnets (CPU and CUDA), contiguous in 3D;
bf16 on CUDA where supported, and on CPU only where it computes bf16 natively."""

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


def memory_format(channels_last: str, device: torch.device, spatial_dims: int = 2) -> tuple[bool, str]:
    """(channels_last, why) for train.channels_last."""
    if channels_last != "auto":
        return channels_last == "on", f"train.channels_last={channels_last}"
    where = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if where is None:
        return False, f"memory format auto: {device.type} -> contiguous (not measured)"
    if spatial_dims == 2:
        # CPU: benchmarks/precision_modes.py; CUDA (issue 18, H200, ACDC 256x256, 12 + 12, bf16): the bare Mean
        # Teacher step 0.040 s contiguous, 0.023 s channels_last
        return True, f"memory format auto: 2D on {where} -> channels_last (measured faster)"
    if where == "CPU":
        # 3D fp32 on CPU: channels_last_3d was slower (UNet3D F+B, 2 threads, benchmarks/precision_modes.py --3d)
        return False, "memory format auto: 3D on CPU -> contiguous (channels_last_3d measured slower)"
    return False, "memory format auto: 3D on CUDA: contiguous until measured"


def resolve_precision(amp: str, channels_last: str, device: torch.device, spatial_dims: int = 2) -> Precision:
    cl, cl_why = memory_format(channels_last, device, spatial_dims)
    dtype, why = _dtype(amp, device, spatial_dims)
    return Precision(dtype, cl, f"{why}; {cl_why}")


def _dtype(amp: str, device: torch.device, spatial_dims: int) -> tuple[torch.dtype | None, str]:
    if amp == "off":
        return None, "train.amp=off"
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16, f"train.amp={amp}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: CUDA with bf16"
        return torch.float16, "auto: CUDA without bf16"
    if spatial_dims == 3:
        # torch 2.13 CPU: bf16 autocast through VNet gave sporadic gradients of 1e32 (same input, differing runs)
        return None, "auto: 3D on CPU -> fp32 (bf16 3D backward found unreliable)"
    if cpu_has_native_bf16():
        return torch.bfloat16, "auto: CPU computes bf16 natively (oneDNN)"
    return None, "auto: CPU without native bf16 -> fp32"
