"""Batched inference of a trained model on images of a prepared folder.

Used by threshold fitting and evaluation: both need the CRF output ``z`` of many
cached images, never a gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from cxrloc.classes import CLASSES
from cxrloc.data.network_input import cache_to_input
from cxrloc.utils import CxrlocError, progress_bar

TTA_TRANSFORMS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (1.0, 0.05, 0.0),
    (1.0, -0.05, 0.0),
    (1.0, 0.0, 0.05),
    (1.0, 0.0, -0.05),
    (0.92, 0.0, 0.0),
    (1.08, 0.0, 0.0),
    (1.0, 0.05, 0.05),
    (1.0, -0.05, -0.05),
)
"""Test-time views ``(s, tx, ty)``: the network sees the image at ``s * u + t`` for every output
position ``u`` (normalised coordinates in [-1, 1]); the first is the identity. Shifts of 2.5 % of
the side and zooms of 8 %, inside the training augmentation's range."""


def _affine(theta: tuple[float, float, float], batch: int, size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    s, tx, ty = theta
    mat = torch.tensor([[s, 0.0, tx], [0.0, s, ty]], dtype=like.dtype, device=like.device)
    return F.affine_grid(mat.expand(batch, 2, 3), [batch, 1, *size], align_corners=False)


def forward_tta(
    model: torch.nn.Module, x: torch.Tensor, views: int | Sequence[tuple[float, float, float]]
) -> torch.Tensor:
    """``z`` averaged over the first ``views`` of :data:`TTA_TRANSFORMS` (1: plain forward), or
    over the given ``(s, tx, ty)`` views.

    Each view resamples the input (bilinear, border pixels repeated), runs the model, and maps its
    ``z`` back to the original frame on the P x P grid (bilinear); patches that a view does not
    see are left out of that view's average.
    """
    if isinstance(views, int):
        if not 1 <= views <= len(TTA_TRANSFORMS):
            raise CxrlocError(f"tta must be between 1 and {len(TTA_TRANSFORMS)}, got {views}.")
        views = TTA_TRANSFORMS[:views]
    total: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    for theta in views:
        if theta == (1.0, 0.0, 0.0):
            xv = x
        else:
            xv = F.grid_sample(x, _affine(theta, x.shape[0], x.shape[-2:], x), mode="bilinear",
                               padding_mode="border", align_corners=False)
        out = model(xv)
        z = (out[0] if isinstance(out, (tuple, list)) else out).float()
        if theta == (1.0, 0.0, 0.0):
            back, seen = z, torch.ones_like(z[:, :1])
        else:
            s, tx, ty = theta
            grid = _affine((1.0 / s, -tx / s, -ty / s), z.shape[0], z.shape[-2:], z)
            back = F.grid_sample(z, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            seen = F.grid_sample(torch.ones_like(z[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)
        total = back if total is None else total + back
        weight = seen if weight is None else weight + seen
    assert total is not None and weight is not None
    return total / weight.clamp_min(1e-6)


class PreparedImages(Protocol):
    """What batched inference reads of a prepared folder (:class:`cxrloc.data.prepared.Prepared`)."""

    def image(self, image_id: str) -> np.ndarray: ...


def iter_predictions(
    model: torch.nn.Module,
    prepared: PreparedImages,
    image_ids: Sequence[str],
    *,
    image_size: int,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    progress: bool = True,
    description: str = "Predicting",
    tta: int = 1,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield ``(ids, z)`` batch by batch, so callers can reduce without holding every ``z``.

    Arguments as :func:`predict_prepared`; ``z`` of each batch is ``(B, 14, P, P)`` float32.
    """
    if batch_size < 1:
        raise CxrlocError(f"batch_size must be at least 1, got {batch_size}.")
    ids = list(image_ids)
    device = torch.device(device)
    model.eval()
    if channels_last:
        # The network, in place, as training does: the one-channel input is the same tensor in either
        # layout, so the weights decide (a network left in NCHW ran every layer in NCHW, 1.4x slower on a CPU).
        model.to(memory_format=torch.channels_last)
    with progress_bar(enabled=progress and len(ids) > 0, transient=True) as bar, torch.inference_mode():
        task = bar.add_task(description, total=len(ids))
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            images = np.stack([np.asarray(prepared.image(i)) for i in chunk])
            x = cache_to_input(images, image_size).to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                z = forward_tta(model, x, tta).float()
            yield chunk, z.cpu().numpy()
            bar.advance(task, len(chunk))


def predict_prepared(
    model: torch.nn.Module,
    prepared: PreparedImages,
    image_ids: Sequence[str],
    *,
    image_size: int,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    progress: bool = True,
    description: str = "Predicting",
    tta: int = 1,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Run ``model`` on cached images and return its output probabilities ``z``.

    Args:
        model: a ``CXRLocNet`` (its first output is ``z``); put in eval mode here.
        prepared: an opened prepared folder (``cxrloc.data.prepared.Prepared``); only
            ``.image(image_id) -> uint8 (S, S)`` is used.
        image_ids: images to run, in the order of the result.
        image_size: the model's input side (``cfg.image_size``).
        device: torch device.
        batch_size: images per forward pass.
        progress: show a progress bar on stderr.
        description: label of the progress bar.
        tta: test-time views averaged (:func:`forward_tta`; 1 = none).
        amp: autocast dtype of the network (``None``: float32); ``z`` is float32 in any case.
            :func:`cxrloc.precision.inference_options` gives this and ``channels_last`` from a run's config.
        channels_last: run the network in the channels-last memory format (``model`` is converted in
            place, as training converts it).

    Returns:
        ``(N, 14, P, P)`` float32 array of ``z``.
    """
    outputs = [
        z
        for _, z in iter_predictions(
            model,
            prepared,
            image_ids,
            image_size=image_size,
            device=device,
            batch_size=batch_size,
            progress=progress,
            description=description,
            tta=tta,
            amp=amp,
            channels_last=channels_last,
        )
    ]
    if not outputs:
        # No image to run: an empty array with the model's grid, so callers can still index it.
        p = int(getattr(getattr(model, "thresholds", None), "patch_grid", 0))
        return np.zeros((0, len(getattr(model, "classes", CLASSES)), p, p), dtype=np.float32)
    return np.concatenate(outputs, axis=0).astype(np.float32, copy=False)
