"""The named presets of :class:`cxrloc.config.Config` (field overrides on its defaults, the paper's)
and which one ``cxrloc train`` uses when none is given. ``cxrloc.config`` re-exports both names;
:func:`cxrloc.config.make_config` builds a preset's config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {
        # A from-scratch recipe for 2 CPU cores: one fold of the 704 annotated NIH images in about
        # 5 minutes (docs/results.md). Differs from the paper where a from-scratch CPU run needs it:
        # a narrow ResNet-18 at 128 px, AdamW with light weight decay (Adam's coupled L2 of 0.01
        # swamps the small gradients of an untrained head), a larger learning rate and smaller
        # batches (more steps), CoordConv channels and a position bias started from the training
        # boxes in the head, rho_hat = the median box size, and output stride 16 so that the 128 px
        # input ends on an 8 x 8 map rather than 4 x 4 (docs/results.md says why).
        "arch": "resnet18",
        "width": 32,
        "output_stride": 16,
        "init": "scratch",
        "image_size": 128,
        "patch_grid": 16,
        "head_channels": 128,
        "head_coords": True,
        "position_bias": True,
        "rho_hat_box_fraction": 1.0,
        "crf_window": 9,
        "crf_iterations": 3,
        "batch_size": 8,
        "epochs": 16,
        "optimizer": "adamw",
        "lr": 3e-3,
        "lr_decay": 0.9,
        "weight_decay": 1e-4,
        "workers": 1,
    },
    "tiny": {
        # For tests: a narrow network on 64 px images, a few steps.
        "arch": "resnet18",
        "width": 8,
        "init": "scratch",
        "image_size": 64,
        "patch_grid": 8,
        "head_channels": 16,
        "crf_window": 5,
        "crf_iterations": 2,
        "crf_feature_dim": 4,
        "crf_branch_channels": 8,
        "batch_size": 8,
        "epochs": 2,
        "crf_epochs": 1,
        "joint_epochs": 1,
        "workers": 0,
        "amp": "off",
    },
}
"""Named presets: field overrides applied to the ``Config`` defaults."""


def default_preset(overrides: Sequence[str] = ()) -> tuple[str, str]:
    """``train``'s preset when none is given: ``paper`` (ResNet-50, ImageNet weights) on a CUDA GPU, ``cpu``
    otherwise (a ``device=`` override decides; else whether torch sees CUDA). Returns ``(preset, why)``."""
    device = next((o.split("=", 1)[1].strip() for o in overrides if o.replace(" ", "").startswith("device=")), "auto")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return "paper", "a CUDA GPU is used"
    return "cpu", "no CUDA GPU is used; 'paper' (ResNet-50) is the default on one"
