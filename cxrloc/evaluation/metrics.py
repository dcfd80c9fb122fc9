"""The paper's localization metrics (IoU / IoR accuracy) and the image-level classification metrics.

Protocol (``docs/evaluation.md``; the paper's protocol as restated in its METHOD.md):

- the detected region of class k is the union of the patches with ``z[k] >= 0.5``
  (:func:`cxrloc.decision.detected_regions`);
- for every ground-truth box of class k, IoU and IoR of that region and the box are
  computed with exact rectangle geometry in normalised image coordinates
  (:func:`cxrloc.geometry.region_box_iou_ior`); IoR is 0 for an empty region;
- a box is correctly localized at T when IoU >= T (IoU accuracy) or IoR >= T (IoR accuracy);
- per-class accuracy = correct boxes / boxes of that class. An image with two boxes of one
  class contributes two boxes, each compared with the same region.

Every box is also scored under the ``grid`` geometry (:func:`cxrloc.geometry.grid_region_box_iou_ior`:
the box rasterised onto the patch grid as in the public Li et al. code, IoU / IoR counted in
patches), the geometry of the published tables; rows carry both (``iou``, ``ior`` exact;
``iou_grid``, ``ior_grid``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cxrloc.classes import CLASSES, NUM_CLASSES
from cxrloc.data.boxes import Box
from cxrloc.decision import detected_regions
from cxrloc.geometry import GEOMETRIES, grid_region_box_iou_ior, region_box_iou_ior

METRICS: tuple[str, ...] = ("iou", "ior")

_EPS: float = 1e-9
"""Slack in ``value >= T`` so a ratio that equals T exactly is not lost to rounding."""



def box_rows(
    z: np.ndarray, boxes: Sequence[Sequence[Box]], classes: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """IoU and IoR of every ground-truth box against the detected region of its class.

    Args:
        z: ``(N, K, P, P)`` probabilities.
        boxes: for each of the N images, its boxes ``(class_index, x0, y0, x1, y1)``.
        classes: the K class names (default: NIH's for K = 14, else the index as text).

    Returns:
        One dict per box: ``image_index``, ``box_index`` (within the image), ``class_index``,
        ``class``, ``x0``, ``y0``, ``x1``, ``y1``, ``iou``, ``ior`` (exact geometry), ``iou_grid``,
        ``ior_grid`` (grid geometry), ``region_patches``.
    """
    z = np.asarray(z)
    if z.ndim != 4 or z.shape[2] != z.shape[3]:
        raise ValueError(f"z must be (N, K, P, P), got {z.shape}")
    if len(boxes) != z.shape[0]:
        raise ValueError(f"{len(boxes)} box lists for {z.shape[0]} images")
    regions = detected_regions(z)
    names = _names(classes, z.shape[1])
    rows: list[dict[str, Any]] = []
    for i, image_boxes in enumerate(boxes):
        for b, (k, x0, y0, x1, y1) in enumerate(image_boxes):
            k = int(k)
            if not 0 <= k < z.shape[1]:
                raise ValueError(f"box class index {k} outside 0..{z.shape[1] - 1}")
            iou, ior = region_box_iou_ior(regions[i, k], (x0, y0, x1, y1))
            iou_grid, ior_grid = grid_region_box_iou_ior(regions[i, k], (x0, y0, x1, y1))
            rows.append(
                {
                    "image_index": i,
                    "box_index": b,
                    "class_index": k,
                    "class": names[k],
                    "x0": float(x0),
                    "y0": float(y0),
                    "x1": float(x1),
                    "y1": float(y1),
                    "iou": iou,
                    "ior": ior,
                    "iou_grid": iou_grid,
                    "ior_grid": ior_grid,
                    "region_patches": int(regions[i, k].sum()),
                }
            )
    return rows


def _names(classes: Sequence[str] | None, k_all: int) -> list[str]:
    if classes is not None:
        if len(classes) != k_all:
            raise ValueError(f"{len(classes)} class names for {k_all} classes")
        return list(classes)
    return list(CLASSES) if k_all == NUM_CLASSES else [str(k) for k in range(k_all)]


def is_correct(value: float | np.ndarray, t: float) -> bool | np.ndarray:
    """``value >= t`` with a rounding slack of 1e-9."""
    return np.asarray(value) >= t - _EPS


def row_key(metric: str, geometry: str = "exact") -> str:
    """The per-box row's column of ``metric`` under ``geometry``: ``iou`` / ``iou_grid``..."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    return metric if geometry == "exact" else f"{metric}_{geometry}"


def accuracy_from_rows(
    rows: Sequence[dict[str, Any]], ts: Sequence[float], num_classes: int = NUM_CLASSES, geometry: str = "exact"
) -> dict[str, Any]:
    """Per-class accuracy at each T from per-box rows (see :func:`box_rows`), under ``geometry``.

    Returns:
        ``{"ts": [...], "count": (K,) int, "accuracy": {"iou": (K, len(ts)), "ior": (K, len(ts))}}``
        with NaN accuracy for classes without any box.
    """
    ts = [float(t) for t in ts]
    count = np.zeros(num_classes, dtype=np.int64)
    correct = {m: np.zeros((num_classes, len(ts)), dtype=np.int64) for m in METRICS}
    for row in rows:
        k = int(row["class_index"])
        count[k] += 1
        for m in METRICS:
            value = row[row_key(m, geometry)]
            for j, t in enumerate(ts):
                correct[m][k, j] += bool(is_correct(value, t))
    denom = np.maximum(count[:, None], 1)
    accuracy = {m: np.where(count[:, None] > 0, correct[m] / denom, np.nan) for m in METRICS}
    return {"ts": ts, "count": count, "correct": correct, "accuracy": accuracy}


def localization_table(
    z: np.ndarray, boxes: Sequence[Sequence[Box]], ts: Sequence[float], classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """Localization accuracy of predictions ``z`` against ground-truth boxes.

    Args:
        z: ``(N, K, P, P)`` probabilities (CRF output).
        boxes: for each image, its list of ``(class_index, x0, y0, x1, y1)`` (normalised).
        ts: thresholds T.
        classes: the K class names of the rows (see :func:`box_rows`).

    Returns:
        dict with ``ts``; ``count`` ``(K,)`` boxes per class; ``correct`` and ``accuracy``:
        ``{"iou": (K, len(ts)), "ior": (K, len(ts))}`` (accuracy NaN for a class with no box);
        ``rows``: per-box dicts from :func:`box_rows`; ``grid``: ``count``, ``correct`` and ``accuracy``
        under the grid geometry.
    """
    rows = box_rows(z, boxes, classes)
    k_all = np.asarray(z).shape[1]
    table = accuracy_from_rows(rows, ts, num_classes=k_all)
    table["grid"] = accuracy_from_rows(rows, ts, num_classes=k_all, geometry="grid")
    table["rows"] = rows
    return table


def mean_localization_accuracy(
    table: dict[str, Any], metric: str = "iou", classes: Sequence[int] | None = None
) -> np.ndarray:
    """Mean over classes of the per-class accuracy, at each T.

    Args:
        table: output of :func:`localization_table`.
        metric: ``"iou"`` or ``"ior"``.
        classes: class indices to average; default all classes with at least one box.
            Classes in the list that have no box are skipped.

    Returns:
        ``(len(ts),)`` array (NaN when no class has a box).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    acc = np.asarray(table["accuracy"][metric], dtype=np.float64)
    count = np.asarray(table["count"])
    idx = np.arange(acc.shape[0]) if classes is None else np.asarray(list(classes), dtype=np.int64)
    idx = idx[count[idx] > 0]
    if idx.size == 0:
        return np.full(acc.shape[1], np.nan)
    return acc[idx].mean(axis=0)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # Boundaries of runs of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # mean of ranks s+1 .. e
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, rank based (Mann-Whitney U), ties counted as half.

    Returns NaN when there is no positive or no negative example.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores for {labels.shape[0]} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores hold a non-finite value")
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc_per_class(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each column of ``scores`` ``(N, K)`` against ``labels`` ``(N, K)``; NaN where undefined."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (N, K)")
    return np.array([auroc(scores[:, k], labels[:, k]) for k in range(scores.shape[1])])


def sensitivity_specificity(present: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sensitivity ``TP / (TP + FN)`` and specificity ``TN / (TN + FP)`` of decisions.

    Args:
        present: ``(N, K)`` boolean decisions.
        labels: ``(N, K)`` 0/1 image labels.

    Returns:
        Two ``(K,)`` arrays, NaN where a class has no positive (sensitivity) or no negative
        (specificity) image.
    """
    present = np.asarray(present).astype(bool)
    y = np.asarray(labels) > 0.5
    if present.shape != y.shape or present.ndim != 2:
        raise ValueError(f"decisions {present.shape} and labels {y.shape} must both be (N, K)")
    n_pos, n_neg = y.sum(axis=0), (~y).sum(axis=0)
    tp, tn = (present & y).sum(axis=0), (~present & ~y).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.where(n_pos > 0, tp / np.maximum(n_pos, 1), np.nan)
        spec = np.where(n_neg > 0, tn / np.maximum(n_neg, 1), np.nan)
    return sens.astype(np.float64), spec.astype(np.float64)
