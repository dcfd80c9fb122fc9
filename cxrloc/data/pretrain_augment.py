"""Random views of X-rays for self-supervised pretraining, drawn for a whole batch at once.

One view of an image = a random resized crop (area share ``min_scale``..1 of the image, aspect
ratio 3/4..4/3), a small rotation (``max_rotation`` degrees) and optionally a left-right flip, all
in one affine resampling (``grid_sample``, bilinear) to ``crop`` x ``crop`` pixels; then, each with
its own probability, a grey-level change (gamma, contrast, brightness: no colour, X-rays have
none) and a Gaussian blur. Every random number comes from the ``torch.Generator`` passed in, so a
(seed, epoch) pair gives the same views on every run (exact resume).

Input: ``(B, S, S)`` uint8 images (the cache's); output: ``(B, 1, crop, crop)`` float32 in
``[-1, 1]``, the network's input convention (``x = 2 g - 1``, see ``cxrloc.checkpoint.NORMALISATION``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewSpec:
    """How views are drawn (the ``cxrloc pretrain`` options of the same names)."""

    crop: int = 96
    """Side of a view in pixels."""
    min_scale: float = 0.3
    """Smallest share of the image's area a crop covers."""
    max_rotation: float = 10.0
    """Largest rotation, in degrees, either way."""
    hflip: bool = False
    """Flip half of the views left-right."""
    jitter_prob: float = 0.8
    """Probability of the grey-level change (gamma x 1/1.4..1.4, contrast 0.7..1.3, brightness +-0.2)."""
    blur_prob: float = 0.5
    """Probability of a Gaussian blur (sigma 0.1..1.5 pixels of the view)."""


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def crop_affines(n: int, spec: ViewSpec, g: torch.Generator) -> torch.Tensor:
    """``(n, 2, 3)`` affine matrices for ``F.affine_grid``: output coordinates -> input coordinates.

    In normalised coordinates ([-1, 1] over the image), a crop of width ``w`` and height ``h``
    (fractions of the side) centred at ``(cx, cy)`` and rotated by ``a`` maps the output point
    ``(u, v)`` to ``R(a) diag(w, h) (u, v) + (cx, cy)``; a flip negates ``u``.
    """
    area = _uniform(n, spec.min_scale, 1.0, g)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), g)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * _uniform(n, -1.0, 1.0, g)
    cy = (1 - h) * _uniform(n, -1.0, 1.0, g)
    angle = torch.deg2rad(_uniform(n, -spec.max_rotation, spec.max_rotation, g))
    flip = torch.rand(n, generator=g) < 0.5
    sign = torch.where(flip & spec.hflip, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * w * sign
    theta[:, 0, 1] = -sin * h
    theta[:, 1, 0] = sin * w * sign
    theta[:, 1, 1] = cos * h
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def grey_jitter(x: torch.Tensor, spec: ViewSpec, g: torch.Generator) -> torch.Tensor:
    """Gamma, then contrast about the image's mean, then brightness, on ``(B, 1, H, W)`` in [0, 1]."""
    n = x.shape[0]
    on = (torch.rand(n, generator=g) < spec.jitter_prob).float().view(n, 1, 1, 1)
    gamma = torch.exp(_uniform(n, -math.log(1.4), math.log(1.4), g)).view(n, 1, 1, 1)
    contrast = _uniform(n, 0.7, 1.3, g).view(n, 1, 1, 1)
    brightness = _uniform(n, -0.2, 0.2, g).view(n, 1, 1, 1)
    y = x.clamp(min=0.0, max=1.0).pow(gamma)
    mean = y.mean(dim=(2, 3), keepdim=True)
    y = ((y - mean) * contrast + mean + brightness).clamp(0.0, 1.0)
    return on * y + (1 - on) * x


def gaussian_blur(x: torch.Tensor, spec: ViewSpec, g: torch.Generator, radius: int = 3) -> torch.Tensor:
    """Blur each image of ``(B, 1, H, W)`` with its own sigma (0.1..1.5), with probability ``blur_prob``."""
    n = x.shape[0]
    on = torch.rand(n, generator=g) < spec.blur_prob
    sigma = _uniform(n, 0.1, 1.5, g)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).float().expand(n, -1)
    kernel = torch.where(on.view(-1, 1), kernel, identity)  # (B, K)
    # One grouped convolution per axis: the batch becomes the channels, one filter per image.
    y = x.transpose(0, 1)  # (1, B, H, W)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(y, kernel.view(n, 1, -1, 1), groups=n)
    return y.transpose(0, 1)


def make_views(images_u8: torch.Tensor, spec: ViewSpec, g: torch.Generator) -> torch.Tensor:
    """One random view of each image: ``(B, S, S)`` uint8 -> ``(B, 1, crop, crop)`` float32 in [-1, 1]."""
    x = images_u8.unsqueeze(1).float() / 255.0
    n = x.shape[0]
    grid = F.affine_grid(crop_affines(n, spec, g), [n, 1, spec.crop, spec.crop], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = grey_jitter(x, spec, g)
    x = gaussian_blur(x, spec, g)
    return x * 2.0 - 1.0
