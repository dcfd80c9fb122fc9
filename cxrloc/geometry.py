"""Geometry of boxes and patch grids, in normalised image coordinates.

Coordinates are fractions of the image side: ``(x0, y0, x1, y1)`` with
``0 <= x0 < x1 <= 1``. Patch ``(r, c)`` of a P x P grid is the square
``[c/P, (c+1)/P] x [r/P, (r+1)/P]`` (row ``r`` is y, column ``c`` is x).

Two ways to score a detected region (a union of patches) against a box (:data:`GEOMETRIES`):

- ``exact`` (:func:`region_box_iou_ior`): exact rectangle areas, a box cut by patch borders counts
  only its covered part. cxrloc's default.
- ``grid`` (:func:`grid_region_box_iou_ior`): the box is first rasterised onto the patch grid as in
  the public reimplementation of Li et al. 2018 (:func:`grid_box_mask`), then IoU and IoR are
  counted in patches. The geometry of the published tables, as far as public code shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

Box = tuple[float, float, float, float]

GEOMETRIES: tuple[str, ...] = ("exact", "grid")
"""How a box is scored against a region: exact rectangle areas, or in patches after rasterising the
box onto the grid (:func:`grid_box_mask`)."""


def patch_box_overlap(box: Sequence[float], patch_grid: int) -> np.ndarray:
    """Area of the intersection of ``box`` with every patch, as a fraction of the patch's area.

    Returns:
        ``(P, P)`` float64 array with values in [0, 1], indexed ``[row, col]``.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    edges = np.arange(patch_grid + 1, dtype=np.float64) / patch_grid
    # 1-D overlaps of the box's extent with each patch interval, in units of the patch side.
    ox = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0.0, None) * patch_grid
    oy = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0.0, None) * patch_grid
    return np.outer(oy, ox)


def box_patch_mask(box: Sequence[float], patch_grid: int) -> np.ndarray:
    """Patches that belong to a box, for the losses' ``b_k``.

    A patch belongs to the box when its centre lies inside the box. A box too small to
    contain any patch centre gets the single patch with the largest overlap, so that
    every box covers at least one patch (documented in ``docs/method.md``).

    Returns:
        ``(P, P)`` bool array.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    centres = (np.arange(patch_grid, dtype=np.float64) + 0.5) / patch_grid
    in_x = (centres >= x0) & (centres <= x1)
    in_y = (centres >= y0) & (centres <= y1)
    mask = np.outer(in_y, in_x)
    if not mask.any():
        overlap = patch_box_overlap(box, patch_grid)
        mask = np.zeros_like(mask)
        mask[np.unravel_index(int(np.argmax(overlap)), overlap.shape)] = True
    return mask


def union_patch_mask(boxes: Iterable[Sequence[float]], patch_grid: int) -> np.ndarray:
    """Union of :func:`box_patch_mask` over several boxes (one class on one image)."""
    mask = np.zeros((patch_grid, patch_grid), dtype=bool)
    for box in boxes:
        mask |= box_patch_mask(box, patch_grid)
    return mask


def region_box_iou_ior(region: np.ndarray, box: Sequence[float]) -> tuple[float, float]:
    """Exact IoU and IoR of a detected region (a union of grid patches) and a box.

    Args:
        region: ``(P, P)`` bool array of positive patches.
        box: ``(x0, y0, x1, y1)`` normalised.

    Returns:
        ``(iou, ior)``; IoR is 0 for an empty region, IoU is 0 when both areas are 0.
    """
    region = np.asarray(region, dtype=bool)
    p = region.shape[0]
    if region.shape != (p, p):
        raise ValueError(f"region must be square (P, P), got {region.shape}")
    patch_area = 1.0 / (p * p)
    inter = float(patch_box_overlap(box, p)[region].sum()) * patch_area
    region_area = float(region.sum()) * patch_area
    x0, y0, x1, y1 = (float(v) for v in box)
    box_area = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    union = region_area + box_area - inter
    iou = inter / union if union > 0 else 0.0
    ior = inter / region_area if region_area > 0 else 0.0
    return iou, ior


def class_box_masks(
    box_lists: Iterable[Sequence[Sequence[float]]], patch_grid: int
) -> Iterator[tuple[int, np.ndarray]]:
    """``(k, b_k)`` for every (image, class) with boxes: the union of that image's class-k boxes as
    a ``(P, P)`` bool patch mask (:func:`union_patch_mask`, the losses' ``b_k``).

    Args:
        box_lists: for each image, its boxes ``(class_index, x0, y0, x1, y1)``.
        patch_grid: P.
    """
    for boxes in box_lists:
        by_class: dict[int, list[tuple[float, float, float, float]]] = {}
        for k, x0, y0, x1, y1 in boxes:
            by_class.setdefault(int(k), []).append((x0, y0, x1, y1))
        for k, rects in by_class.items():
            yield k, union_patch_mask(rects, patch_grid)


def grid_box_mask(box: Sequence[float], patch_grid: int) -> np.ndarray:
    """A box rasterised onto the patch grid as the public Li et al. 2018 reimplementation does.

    Source: ``romanovar/evaluation_MIL``, ``cnn/preprocessor/load_data.py``:
    ``translate_on_patches`` rounds each corner to the nearest grid line
    (``int(np.round(x / W * P))``), then ``make_label_matrix_localization_v2`` marks
    ``mask[y0:y1 + 1, x0:x1 + 1]``: the patches from the rounded min corner up to *and including*
    the row and column that start at the rounded max corner. So a box whose corners lie on grid
    lines gains one row and one column of patches past its max corner, unless that corner is on
    the image's right / bottom border (the slice stops at P); a box narrower than half a patch
    still gets one row / column; a box whose min corner rounds to P (within half a patch of the
    right or bottom border) gets no patch. ``np.round`` rounds halves to even, as there.

    Returns:
        ``(P, P)`` bool array.
    """
    p = int(patch_grid)
    x0, y0, x1, y1 = (int(np.round(float(v) * p)) for v in box)
    mask = np.zeros((p, p), dtype=bool)
    mask[max(y0, 0) : max(y1 + 1, 0), max(x0, 0) : max(x1 + 1, 0)] = True
    return mask


def grid_region_box_iou_ior(region: np.ndarray, box: Sequence[float]) -> tuple[float, float]:
    """IoU and IoR of a detected region and a box counted in patches, the box rasterised by
    :func:`grid_box_mask` (the ``grid`` geometry; the public Li et al. code's ``compute_IoU``).

    Returns:
        ``(iou, ior)``: ``|R & B| / |R | B|`` and ``|R & B| / |R|`` in patches; IoR is 0 for an empty
        region, IoU is 0 when both are empty.
    """
    region = np.asarray(region, dtype=bool)
    p = region.shape[0]
    if region.shape != (p, p):
        raise ValueError(f"region must be square (P, P), got {region.shape}")
    mask = grid_box_mask(box, p)
    inter = int((region & mask).sum())
    union = int(region.sum()) + int(mask.sum()) - inter
    iou = inter / union if union > 0 else 0.0
    ior = inter / int(region.sum()) if region.any() else 0.0
    return iou, ior


def region_box_scores(region: np.ndarray, box: Sequence[float], geometry: str = "exact") -> tuple[float, float]:
    """``(iou, ior)`` of a region and a box under ``geometry`` (one of :data:`GEOMETRIES`)."""
    if geometry == "exact":
        return region_box_iou_ior(region, box)
    if geometry == "grid":
        return grid_region_box_iou_ior(region, box)
    raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
