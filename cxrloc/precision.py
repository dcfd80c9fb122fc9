"""Number format and memory layout of the network's computations: what ``amp`` and ``channels_last`` mean.

Shared by training (:mod:`cxrloc.training.runtime`), validation and the torch inference paths
(``evaluate``, ``fit-thresholds``, ``calibrate``, ``predict`` with a checkpoint). Nothing here knows
about the model; the ONNX path does not use it.

- ``amp=auto``: bfloat16 autocast on CUDA when the GPU supports it (float16 otherwise), and on a CPU
  that computes bfloat16 dot products natively (AVX-512 BF16 or AMX-BF16, :func:`cpu_has_native_bf16`);
  float32 on other CPUs, where bfloat16 is emulated and slower. The PAC-CRF's mean field and the
  losses stay float32 in every case.
- ``channels_last=auto``: the channels-last memory format on CUDA and on CPUs whose convolutions run on
  oneDNN (x86 builds of torch); ``on`` / ``off`` force it.

On a CPU, inference follows the training settings (bfloat16 where ``amp`` resolves to it, channels-last);
on CUDA it stays float32 as before.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from cxrloc.utils import CxrlocError, console


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (x86 AVX-512 BF16 or AMX-BF16).

    Read from torch's own CPU feature detection (the flags ``avx512_bf16`` / ``amx_bf16`` of
    ``/proc/cpuinfo``); ``False`` where torch cannot say, or has no oneDNN to use them.
    """
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):  # an older or a non-x86 build of torch
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16")) and torch.backends.mkldnn.is_available()


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (``auto``, ``bf16``, ``fp16``, ``off``) on ``device``; ``None``: float32.

    Raises:
        CxrlocError: ``fp16`` on a CPU.
    """
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    if amp == "fp16" and device.type != "cuda":
        raise CxrlocError("amp=fp16 needs CUDA; on CPU use amp=bf16 or amp=off.")
    if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        _warn_emulated_bf16()
    return torch.bfloat16 if amp == "bf16" else torch.float16


@functools.cache
def _warn_emulated_bf16() -> None:
    """Once per process: forced bf16 on a CPU that emulates it is many times slower than float32."""
    console.print(
        "[yellow]Warning:[/yellow] amp=bf16 on a CPU without native bfloat16 (no AVX-512 BF16 or AMX): "
        "bfloat16 is emulated here, about 12x slower than float32 on an AVX2 CPU (docs/training.md, "
        '"Mixed precision"). Use --set amp=auto (float32 on this CPU) unless you mean to test bf16.'
    )


def use_channels_last(setting: str, device: torch.device) -> bool:
    """Whether ``channels_last`` (``auto``, ``on``, ``off``) puts the network in the channels-last format."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available())


def inference_options(cfg: Any, device: str | torch.device) -> dict[str, Any]:
    """``amp`` and ``channels_last`` for :func:`cxrloc.inference.batch.iter_predictions` from a run's config.

    On a CPU, those of training (``cfg.amp``, ``cfg.channels_last``; an invalid ``fp16`` is float32);
    elsewhere float32 in the default layout, as before these settings applied to inference.
    """
    device = torch.device(device)
    if device.type != "cpu":
        return {"amp": None, "channels_last": False}
    amp = None if cfg.amp == "fp16" else autocast_dtype(cfg.amp, device)
    return {"amp": amp, "channels_last": use_channels_last(cfg.channels_last, device)}
