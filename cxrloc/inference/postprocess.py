"""From the network's maps ``z`` to what a user reads: per-class scores, decisions and region boxes.

For every class the record holds the raw image-level score ``1'z`` (soft patch count, paper
eq. 12), the calibrated probability and the decision "present" at the class's operating point
(:mod:`cxrloc.calibration`; without a calibration: no probability and ``1'z >= tau_hat``); for each
present class the detected region (patches with ``z >= 0.5``, ``docs/method.md``) is split into
4-connected components, each reported as a box in the ORIGINAL image's pixel frame with the mean
``z`` of its patches as its score.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrloc.classes import CLASSES
from cxrloc.decision import REGION_THRESHOLD, detected_regions, image_scores, presence

if TYPE_CHECKING:
    from cxrloc.calibration import Calibration


def connected_components(mask: np.ndarray) -> np.ndarray:
    """Label the 4-connected components of a boolean grid.

    Args:
        mask: 2-D boolean array.

    Returns:
        int32 array of the same shape: 0 for background, 1..n for the components, numbered in
        the raster order (row by row) of their first cell.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"connected_components expects a 2-D grid, got shape {mask.shape}")
    rows, cols = mask.shape
    labels = np.zeros((rows, cols), dtype=np.int32)
    current = 0
    for r0 in range(rows):
        for c0 in range(cols):
            if not mask[r0, c0] or labels[r0, c0]:
                continue
            current += 1
            labels[r0, c0] = current
            queue = deque([(r0, c0)])
            while queue:
                r, c = queue.popleft()
                for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= rr < rows and 0 <= cc < cols and mask[rr, cc] and not labels[rr, cc]:
                        labels[rr, cc] = current
                        queue.append((rr, cc))
    return labels


@dataclass
class Region:
    """One connected component of positive patches of one class."""

    box: tuple[float, float, float, float]
    """``(x0, y0, x1, y1)`` in pixels of the original image (x = column, y = row)."""
    box_normalised: tuple[float, float, float, float]
    """The same box as fractions of the image's width and height."""
    score: float
    """Mean ``z`` over the component's patches."""
    patches: int
    """Number of patches in the component."""

    def to_json(self) -> dict[str, Any]:
        return {
            "box": [round(v, 2) for v in self.box],
            "box_normalised": [round(v, 6) for v in self.box_normalised],
            "score": round(self.score, 6),
            "patches": self.patches,
        }


def regions_from_map(
    zk: np.ndarray, width: int, height: int, threshold: float = REGION_THRESHOLD
) -> list[Region]:
    """Connected components of ``zk >= threshold`` as boxes in an image of ``width`` x ``height``.

    Patch ``(r, c)`` of a P x P grid covers columns ``[c W/P, (c+1) W/P)`` and rows
    ``[r H/P, (r+1) H/P)`` of the original image: x and y are scaled separately, because
    a non-square image was stretched (not padded) to the square network input.
    """
    p_rows, p_cols = zk.shape
    labels = connected_components(detected_regions(zk, threshold))
    regions: list[Region] = []
    for lab in range(1, int(labels.max()) + 1):
        rr, cc = np.nonzero(labels == lab)
        nx0, nx1 = cc.min() / p_cols, (cc.max() + 1) / p_cols
        ny0, ny1 = rr.min() / p_rows, (rr.max() + 1) / p_rows
        regions.append(
            Region(
                box=(nx0 * width, ny0 * height, nx1 * width, ny1 * height),
                box_normalised=(nx0, ny0, nx1, ny1),
                score=float(zk[rr, cc].mean()),
                patches=int(rr.size),
            )
        )
    return regions


def make_record(
    z: np.ndarray,
    tau_hat: np.ndarray,
    *,
    width: int,
    height: int,
    classes: Sequence[str] = CLASSES,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """The per-image JSON content from one output map ``z`` (K, P, P).

    Args:
        z: the network's output for one image.
        tau_hat: per-class thresholds on ``1'z``, used for "present" only without a calibration.
        width, height: the original image's size (region boxes are in its pixels).
        classes: class names in output order.
        calibration: probabilities and operating points (``None``: uncalibrated model).

    Returns:
        ``{"width", "height", "present": [names], "classes": [{"name", "probability", "threshold",
        "present", "score", "tau_hat", "regions"}]}``: ``probability`` and ``threshold`` (the
        probability at or above which the class is present) are ``None`` without a calibration (and
        ``threshold`` is ``None`` for a class never called present); ``score`` is the raw ``1'z``;
        ``regions`` is filled for present classes only.
    """
    z = np.asarray(z)
    scores = image_scores(z)
    probs, present = presence(scores, calibration=calibration, tau_hat=tau_hat)
    thresholds = None if calibration is None else calibration.thresholds()
    out: list[dict[str, Any]] = []
    for k, name in enumerate(classes):
        regions = [r.to_json() for r in regions_from_map(z[k], width, height)] if present[k] else []
        threshold = None if thresholds is None or not np.isfinite(thresholds[k]) else float(thresholds[k])
        out.append({
            "name": name,
            "probability": None if probs is None else round(float(probs[k]), 6),
            "threshold": threshold,
            "present": bool(present[k]),
            "score": round(float(scores[k]), 6),
            "tau_hat": float(tau_hat[k]),
            "regions": regions,
        })
    return {
        "width": int(width),
        "height": int(height),
        "present": [c["name"] for c in out if c["present"]],
        "classes": out,
    }
