"""Cached uint8 images -> the network's input tensor: the one conversion training and inference share.

A model trained on a cache of side C with ``image_size = S`` must be evaluated, fitted and
calibrated on the same pixels it was trained on. Both the training set
(:class:`cxrloc.data.dataset.LocalizationDataset`) and batched inference
(:func:`cxrloc.inference.batch.iter_predictions`) call :func:`cache_to_input`:

- ``x = u8 / 127.5 - 1`` (:func:`cxrloc.data.prepared.to_network_range`);
- C > S: area filter (a box filter, the filter that made the cache);
- C < S: bilinear upsampling (``align_corners=False``; area "upsampling" would repeat pixels);
- C = S: the pixels as they are.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cxrloc.data.prepared import to_network_range


def resize_mode(cache_side: int, image_size: int) -> str | None:
    """The interpolation from a cache of side ``cache_side`` to ``image_size`` (``None``: no resize)."""
    if cache_side == image_size:
        return None
    return "area" if cache_side > image_size else "bilinear"


def cache_to_input(images: np.ndarray, image_size: int) -> torch.Tensor:
    """Cached uint8 images ``(B, C, C)`` (or one ``(C, C)``) -> float32 network input ``(B, 1, S, S)``.

    See the module docstring for the filter; one image gives a batch of one.
    """
    u8 = np.ascontiguousarray(images, dtype=np.uint8)
    if u8.ndim == 2:
        u8 = u8[None]
    if u8.ndim != 3 or u8.shape[-1] != u8.shape[-2]:
        raise ValueError(f"cached images must be (B, C, C) or (C, C), got shape {images.shape}")
    x = torch.from_numpy(to_network_range(u8)).unsqueeze(1)
    mode = resize_mode(u8.shape[-1], image_size)
    if mode is not None:
        x = F.interpolate(x, size=(image_size, image_size), mode=mode)
    return x
