"""Patch head of Li et al. 2018: backbone features -> P x P grid -> K logits per patch."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PatchHead(nn.Module):
    """Resize the backbone's feature map to ``P x P``, then two convolutions to ``num_classes`` logits.

    - resize: bilinear interpolation (``align_corners=False``) of the feature map to ``P x P``
      (Li et al.'s "resize"; e.g. 512 px -> 16 x 16 features -> 20 x 20). Skipped when the map
      already is ``P x P``;
    - conv 3x3 (``in_channels -> hidden``, padding 1, no bias) + BatchNorm + ReLU;
    - conv 1x1 (``hidden -> num_classes``, with bias) -> per-patch logits.

    The last bias starts at ``logit(1 / P^2)``: one expected positive patch per class, i.e. an
    image-level probability ``1 - (1 - 1/P^2)^(P^2) ~ 0.63`` under Li et al.'s product, and a soft
    count ``1'z ~ 1`` under the threshold loss, so neither loss starts saturated.
    ``init_prob > 0`` sets another starting probability (the threshold loss's gradients through
    the sigmoid, ``z (1 - z)``, are 25x larger at 0.1 than at 1/256).

    ``coords=True`` appends each patch's centre coordinates as two input channels of the first
    convolution (CoordConv, Liu et al. 2018): findings have typical positions (the heart, the lung
    bases), which a convolutional head can otherwise only infer from image content.

    ``position_bias=True`` adds a learned logit offset per class and patch. Started from the
    training boxes (:func:`init_position_bias`), the network begins where the data-free
    prior is and has to learn from the image how to do better; neither is in the paper.
    """

    def __init__(
        self,
        in_channels: int,
        patch_grid: int,
        hidden: int = 512,
        num_classes: int = 14,
        init_prob: float = 0.0,
        coords: bool = False,
        position_bias: bool = False,
    ) -> None:
        super().__init__()
        self.patch_grid = patch_grid
        self.coords = coords
        if coords:
            # Two extra input channels: each patch's centre (x, y) in [-1, 1] (CoordConv).
            c = (torch.arange(patch_grid, dtype=torch.float32) + 0.5) / patch_grid * 2 - 1
            grid = torch.stack([c.view(1, -1).expand(patch_grid, -1), c.view(-1, 1).expand(-1, patch_grid)])
            self.register_buffer("coord_grid", grid.unsqueeze(0).contiguous(), persistent=False)
        self.conv1 = nn.Conv2d(in_channels + (2 if coords else 0), hidden, kernel_size=3, padding=1, bias=False)
        # A learned per-class, per-patch logit offset (K, P, P); training initialises it from the
        # training boxes (init_position_bias).
        self.position_bias = nn.Parameter(torch.zeros(num_classes, patch_grid, patch_grid)) if position_bias else None
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, num_classes, kernel_size=1)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.conv2.weight, std=0.01)
        prior = init_prob if init_prob > 0 else (1.0 / patch_grid**2 if patch_grid > 1 else 0.5)
        nn.init.constant_(self.conv2.bias, math.log(prior / (1.0 - prior)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        p = self.patch_grid
        if feats.shape[-2:] != (p, p):
            feats = F.interpolate(feats, size=(p, p), mode="bilinear", align_corners=False)
        if self.coords:
            grid = self.coord_grid.to(feats.dtype).expand(feats.shape[0], -1, -1, -1)
            feats = torch.cat([feats, grid], dim=1)
        hidden = self.relu(self.bn1(self.conv1(feats)))
        # The last 1x1 convolution in float32 under autocast (a few thousand FLOPs per patch): logits sit
        # near logit(1 / P^2) ~ -5.5, where a bfloat16 output would be rounded to steps of 0.03.
        with torch.autocast(hidden.device.type, enabled=False):
            logits = self.conv2(hidden.float())
        if self.position_bias is not None:
            logits = logits + self.position_bias
        return logits


POSITION_BIAS_CLIP: tuple[float, float] = (0.02, 0.98)
"""Box coverage is clipped into this range before its log-odds start the position bias, so a
patch no training box covers (or every box covers) starts at a finite logit of about -/+ 3.9."""


def init_position_bias(head: PatchHead, box_masks: Iterable[tuple[int, np.ndarray]]) -> int:
    """Start the head's position bias at the log-odds of each patch's coverage by the class's boxes.

    For class k, ``f_kj`` = the share of the training (image, class-k box union) masks that cover
    patch j (``cxrloc.geometry.class_box_masks``); the bias becomes
    ``logit(clip(f, *POSITION_BIAS_CLIP))`` and the last conv's bias is zeroed for those classes,
    so the untrained network's region ``z >= 0.5`` is the set of patches covered by at least half of
    the class's boxes. Classes without training boxes keep the default start.

    Returns:
        The number of classes initialised (0 when the head has no position bias).
    """
    if head.position_bias is None:
        return 0
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for k, mask in box_masks:
        sums[k] = sums.get(k, 0) + mask.astype(np.float64)
        counts[k] = counts.get(k, 0) + 1
    lo, hi = POSITION_BIAS_CLIP
    with torch.no_grad():
        for k, total in sums.items():
            f = np.clip(total / counts[k], lo, hi)
            head.position_bias[k] = torch.as_tensor(np.log(f / (1 - f)), dtype=head.position_bias.dtype)
            head.conv2.bias[k] = 0.0
    return len(sums)
