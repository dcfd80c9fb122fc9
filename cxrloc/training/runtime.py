"""Where and how training runs: device, mixed precision, distributed processes, random state.

Nothing here knows about the model or the data; :mod:`cxrloc.training.loop` uses these pieces.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cxrloc.config import Config
from cxrloc.precision import autocast_dtype, use_channels_last
from cxrloc.utils import CxrlocError


@dataclass
class DistInfo:
    """This process's place in a ``torchrun`` job (a single process by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False
    """Whether :func:`setup_distributed` created the process group (and must destroy it)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device_kind: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (no-op otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created=True)


def resolve_device(cfg: Config, local_rank: int = 0) -> torch.device:
    """``cfg.device`` as a torch device: ``auto`` is CUDA when available, else the CPU."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CxrlocError("device=cuda was asked for but CUDA is not available; use --set device=cpu.")
    return torch.device("cuda", local_rank)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of training: ``cfg.amp`` on ``device`` (:func:`cxrloc.precision.autocast_dtype`:
    ``auto`` = bf16 on CUDA when supported, fp16 otherwise; bf16 on a CPU with native bf16; else off)."""
    return autocast_dtype(cfg.amp, device)


def channels_last(cfg: Config, device: torch.device) -> bool:
    """Whether training runs in the channels-last format (:func:`cxrloc.precision.use_channels_last`)."""
    return use_channels_last(cfg.channels_last, device)


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run with the global RNGs saved and restored, so training leaves no global side effect."""
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), [int(v) for v in keys], int(pos), int(has_gauss), float(cached)],
        "python": [int(version), [int(v) for v in internal], gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the duration of training only."""
    before = torch.are_deterministic_algorithms_enabled()
    bench = torch.backends.cudnn.benchmark
    if enabled:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.benchmark = bench


def fused_ok(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused Adam/AdamW kernel can update ``params``: floating point, all on one CPU or CUDA
    device. It updates every tensor in one pass instead of about ten per tensor; on a CPU core it takes the
    optimizer step of the ``cpu`` preset from 15 ms to 5 ms (about 2 % of a 128 px unary training step,
    measured) and agrees with the per-tensor loop to float32 rounding (docs/results.md, "Fused AdamW")."""
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(p.is_floating_point() for p in params)
    )
