"""The data-free prior: the baseline every localization result must beat (``docs/evaluation.md``).

For each class k, the prior marks the patches covered by at least a fraction ``q_k`` of
that class's training boxes, whatever the image. Its "prediction" is 1.0 on those
patches and 0.0 elsewhere, so it goes through exactly the same metrics as a model.

Decisions (documented in ``docs/evaluation.md``):

- *Coverage* of a patch by a box: by default the patch's centre lies in the box
  (:func:`cxrloc.geometry.box_patch_mask`, the same rule that defines ``b_k`` in the
  losses). ``coverage="overlap"`` uses the exact share of the patch's area inside the
  box instead (a soft count).
- *q_k* is chosen per class on the TRAINING boxes only: among the distinct coverage
  levels of the class, the one whose region maximises the training IoU accuracy
  averaged over ``T in {0.1, 0.3, 0.5}``; ties go to the largest q (the smallest region).
- A class without training boxes gets an empty region (it detects nothing).
- The **per-T prior** (:func:`fit_prior_per_t`) chooses q separately for each T, the q that
  maximises the training IoU accuracy at that T: a larger region at T = 0.1, a tighter one at
  T = 0.5. It is the stronger floor at every T; reports show both, and claims are judged against
  the stronger of the two at each T.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrloc.classes import CLASSES, NUM_CLASSES
from cxrloc.evaluation.metrics import is_correct
from cxrloc.geometry import box_patch_mask, patch_box_overlap

PRIOR_TS: tuple[float, ...] = (0.1, 0.3, 0.5)
"""T values whose mean training IoU accuracy selects q."""

COVERAGE_MODES: tuple[str, ...] = ("centre", "overlap")

Box = Sequence[float]


@dataclass
class PriorModel:
    """A fitted prior: one fixed region per class.

    Attributes:
        masks: ``(K, P, P)`` bool, the region of each class.
        coverage: ``(K, P, P)`` float, share of the class's training boxes covering each patch.
        q: ``(K,)`` chosen coverage level (NaN for a class without training boxes).
        train_accuracy: ``(K,)`` mean training IoU accuracy over ``ts`` at the chosen q (NaN: no boxes).
        num_boxes: ``(K,)`` training boxes per class.
    """

    masks: np.ndarray
    coverage: np.ndarray
    q: np.ndarray
    train_accuracy: np.ndarray
    num_boxes: np.ndarray
    coverage_mode: str = "centre"
    ts: tuple[float, ...] = PRIOR_TS
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def patch_grid(self) -> int:
        return int(self.masks.shape[-1])

    def predict(self, n_images: int) -> np.ndarray:
        """The prior's ``z`` for ``n_images`` images: ``(N, K, P, P)`` float32, 1 inside, 0 outside."""
        z = self.masks.astype(np.float32)
        return np.broadcast_to(z, (n_images, *z.shape)).copy()

    def to_json(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        """Per-class summary (q, region size, training accuracy, boxes) for reports, keyed by the
        class names ``classes`` (default: NIH's for 14 classes, else the index as text)."""

        def num(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        k_all = self.masks.shape[0]
        if classes is None:
            classes = CLASSES if k_all == NUM_CLASSES else [str(k) for k in range(k_all)]
        return {
            "coverage_mode": self.coverage_mode,
            "selection": f"max mean training IoU accuracy over T in {list(self.ts)}; ties -> largest q",
            "patch_grid": self.patch_grid,
            "classes": {
                classes[k]: {
                    "q": num(self.q[k]),
                    "region_patches": int(self.masks[k].sum()),
                    "train_boxes": int(self.num_boxes[k]),
                    "train_mean_iou_accuracy": num(self.train_accuracy[k]),
                }
                for k in range(k_all)
            },
        }


def boxes_by_class(image_boxes: Iterable[Sequence[Sequence[float]]]) -> dict[int, list[tuple[float, ...]]]:
    """Group per-image box lists ``[(k, x0, y0, x1, y1), ...]`` into ``{k: [(x0, y0, x1, y1), ...]}``."""
    out: dict[int, list[tuple[float, ...]]] = {}
    for boxes in image_boxes:
        for k, x0, y0, x1, y1 in boxes:
            out.setdefault(int(k), []).append((float(x0), float(y0), float(x1), float(y1)))
    return out


def _coverage_map(boxes: Sequence[Box], patch_grid: int, mode: str) -> np.ndarray:
    if mode == "centre":
        cover = sum(box_patch_mask(b, patch_grid).astype(np.float64) for b in boxes)
    else:
        cover = sum(patch_box_overlap(b, patch_grid) for b in boxes)
    return np.asarray(cover, dtype=np.float64) / len(boxes)


def _iou_matrix(regions: np.ndarray, boxes: Sequence[Box], patch_grid: int) -> np.ndarray:
    """Exact IoU of each candidate region ``(C, P*P)`` bool with each box: ``(C, B)``.

    The same geometry as :func:`cxrloc.geometry.region_box_iou_ior`, vectorised over
    candidates because q is chosen among up to P^2 levels.
    """
    overlap = np.stack([patch_box_overlap(b, patch_grid).reshape(-1) for b in boxes])  # (B, P*P)
    patch_area = 1.0 / patch_grid**2
    inter = regions.astype(np.float64) @ overlap.T * patch_area
    region_area = regions.sum(axis=1, keepdims=True) * patch_area
    box_area = np.array([max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0) for b in boxes])[None, :]
    union = region_area + box_area - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def fit_prior(
    train_boxes_by_class: Mapping[int, Sequence[Box]],
    patch_grid: int,
    *,
    coverage: str = "centre",
    ts: Sequence[float] = PRIOR_TS,
    num_classes: int = NUM_CLASSES,
) -> PriorModel:
    """Fit the data-free prior on training boxes.

    Args:
        train_boxes_by_class: ``{class_index: [(x0, y0, x1, y1), ...]}`` normalised training boxes.
        patch_grid: P.
        coverage: ``"centre"`` (patch centre in box) or ``"overlap"`` (area share).
        ts: T values whose mean training IoU accuracy selects q.
        num_classes: K.

    Returns:
        The fitted :class:`PriorModel`.
    """
    if coverage not in COVERAGE_MODES:
        raise ValueError(f"coverage must be one of {COVERAGE_MODES}, got {coverage!r}")
    p = int(patch_grid)
    masks = np.zeros((num_classes, p, p), dtype=bool)
    cover = np.zeros((num_classes, p, p), dtype=np.float64)
    q = np.full(num_classes, np.nan)
    train_acc = np.full(num_classes, np.nan)
    counts = np.zeros(num_classes, dtype=np.int64)
    for k in range(num_classes):
        boxes = [tuple(float(v) for v in b) for b in train_boxes_by_class.get(k, [])]
        counts[k] = len(boxes)
        if not boxes:
            continue
        c = _coverage_map(boxes, p, coverage)
        cover[k] = c
        # Every distinct positive coverage level gives one candidate region {c >= level}.
        levels = np.unique(c[c > 0])[::-1]  # descending: ties resolved to the largest q by argmax
        regions = c.reshape(1, -1) >= levels[:, None] - 1e-12
        iou = _iou_matrix(regions, boxes, p)  # (C, B)
        score = np.mean([is_correct(iou, t).mean(axis=1) for t in ts], axis=0)  # (C,)
        best = int(np.argmax(score))
        q[k] = float(levels[best])
        train_acc[k] = float(score[best])
        masks[k] = regions[best].reshape(p, p)
    return PriorModel(
        masks=masks,
        coverage=cover,
        q=q,
        train_accuracy=train_acc,
        num_boxes=counts,
        coverage_mode=coverage,
        ts=tuple(float(t) for t in ts),
    )


def fit_prior_per_t(
    train_boxes_by_class: Mapping[int, Sequence[Box]],
    patch_grid: int,
    ts: Sequence[float],
    *,
    coverage: str = "centre",
    num_classes: int = NUM_CLASSES,
) -> dict[float, PriorModel]:
    """One prior per T, each with q chosen to maximise the training IoU accuracy at that T alone.

    Returns:
        ``{T: PriorModel}``; the region used when scoring at T is ``result[T].masks``.
    """
    return {
        float(t): fit_prior(
            train_boxes_by_class, patch_grid, coverage=coverage, ts=(float(t),), num_classes=num_classes
        )
        for t in ts
    }
