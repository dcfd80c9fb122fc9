"""IoU / IoR accuracy and AUROC against values worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrloc.classes import NUM_CLASSES
from cxrloc.decision import image_scores
from cxrloc.evaluation.metrics import (
    auroc,
    auroc_per_class,
    box_rows,
    localization_table,
    mean_localization_accuracy,
)

P = 4  # patches are 0.25 x 0.25 squares of area 1/16


def _z(regions: dict[int, list[tuple[int, int]]], n: int = 1, value: float = 0.9) -> np.ndarray:
    """z with the given (row, col) patches of class k at ``value`` in image 0, 0.1 elsewhere."""
    z = np.full((n, NUM_CLASSES, P, P), 0.1, dtype=np.float32)
    for k, patches in regions.items():
        for r, c in patches:
            z[0, k, r, c] = value
    return z


def test_region_equal_to_box_is_perfect() -> None:
    z = _z({0: [(0, 0), (0, 1), (1, 0), (1, 1)]})
    (row,) = box_rows(z, [[(0, 0.0, 0.0, 0.5, 0.5)]])
    assert row["iou"] == pytest.approx(1.0)
    assert row["ior"] == pytest.approx(1.0)
    assert row["region_patches"] == 4


def test_empty_region_scores_zero() -> None:
    z = _z({})  # every patch at 0.1 < 0.5
    (row,) = box_rows(z, [[(2, 0.1, 0.1, 0.6, 0.6)]])
    assert row["iou"] == 0.0 and row["ior"] == 0.0 and row["region_patches"] == 0


def test_patch_at_exactly_half_is_positive() -> None:
    z = _z({1: [(3, 3)]}, value=0.5)
    (row,) = box_rows(z, [[(1, 0.75, 0.75, 1.0, 1.0)]])
    assert row["iou"] == pytest.approx(1.0)


def test_box_cut_by_patch_borders() -> None:
    # Box [0.1, 0.6] x [0.1, 0.35] (area 0.5 * 0.25 = 0.125); region = patch (0, 0) = [0, .25]^2.
    # Intersection [0.1, 0.25] x [0.1, 0.25] = 0.0225; union = 1/16 + 0.125 - 0.0225 = 0.165.
    z = _z({3: [(0, 0)]})
    (row,) = box_rows(z, [[(3, 0.1, 0.1, 0.6, 0.35)]])
    assert row["iou"] == pytest.approx(0.0225 / 0.165)
    assert row["ior"] == pytest.approx(0.0225 / 0.0625)


def test_region_partly_outside_box() -> None:
    # Region: patches (1,1),(1,2) = [0.25, 0.75] x [0.25, 0.5] (area 0.125).
    # Box [0.5, 1.0] x [0.25, 0.5] (area 0.125); intersection = patch (1,2) = 0.0625; union 0.1875.
    z = _z({4: [(1, 1), (1, 2)]})
    (row,) = box_rows(z, [[(4, 0.5, 0.25, 1.0, 0.5)]])
    assert row["iou"] == pytest.approx(1 / 3)
    assert row["ior"] == pytest.approx(0.5)


def test_several_boxes_of_one_class_on_one_image() -> None:
    # Region: the top-left quarter [0, 0.5]^2 (4 patches). Three boxes of class 0 on image 0:
    #   A = [0, 0.5]^2           -> IoU 1,         IoR 1
    #   B = [0, 0.25]^2          -> IoU 1/4,       IoR 1/4
    #   C = [0.5, 1] x [0.5, 1]  -> IoU 0,         IoR 0
    # and one box of class 0 on image 1 whose region is empty -> 0, 0.
    z = _z({0: [(0, 0), (0, 1), (1, 0), (1, 1)]}, n=2)
    boxes = [
        [(0, 0.0, 0.0, 0.5, 0.5), (0, 0.0, 0.0, 0.25, 0.25), (0, 0.5, 0.5, 1.0, 1.0), (5, 0.0, 0.0, 0.25, 0.25)],
        [(0, 0.2, 0.2, 0.4, 0.4)],
    ]
    table = localization_table(z, boxes, [0.1, 0.25, 0.5])
    assert table["count"][0] == 4 and table["count"][5] == 1
    np.testing.assert_allclose(table["accuracy"]["iou"][0], [2 / 4, 2 / 4, 1 / 4])  # IoU = 1/4 counts at T=0.25
    np.testing.assert_allclose(table["accuracy"]["ior"][0], [2 / 4, 2 / 4, 1 / 4])
    # Class 5: region empty on image 0 -> 0 at every T.
    np.testing.assert_allclose(table["accuracy"]["iou"][5], [0, 0, 0])
    assert np.all(np.isnan(table["accuracy"]["iou"][1]))  # no box of class 1
    rows = table["rows"]
    assert [(r["image_index"], r["box_index"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    # Mean over classes that have boxes (0 and 5): (0.5 + 0) / 2 at T = 0.1.
    np.testing.assert_allclose(mean_localization_accuracy(table, "iou"), [0.25, 0.25, 0.125])
    # Restricting to classes 0 and 1 skips the box-less class 1.
    np.testing.assert_allclose(mean_localization_accuracy(table, "iou", classes=[0, 1]), [0.5, 0.5, 0.25])


def test_image_scores_are_soft_counts() -> None:
    z = _z({2: [(0, 0), (3, 3)]})
    s = image_scores(z)
    assert s.shape == (1, NUM_CLASSES)
    assert s[0, 2] == pytest.approx(2 * 0.9 + 14 * 0.1, rel=1e-6)


def test_auroc_with_ties_by_hand() -> None:
    # Positives {0.8, 0.5, 0.5}, negatives {0.5, 0.2}. Pairs (pos > neg = 1, tie = 1/2):
    # 0.8: 1 + 1; 0.5: 0.5 + 1; 0.5: 0.5 + 1  -> 5 / 6.
    scores = np.array([0.8, 0.5, 0.5, 0.5, 0.2])
    labels = np.array([1, 1, 1, 0, 0])
    assert auroc(scores, labels) == pytest.approx(5 / 6)
    assert auroc(-scores, labels) == pytest.approx(1 / 6)
    assert auroc(np.ones(4), [0, 1, 0, 1]) == pytest.approx(0.5)


def test_auroc_undefined_without_both_classes() -> None:
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    per = auroc_per_class(np.array([[0.1, 0.3], [0.9, 0.4]]), np.array([[0, 1], [1, 1]]))
    assert per[0] == pytest.approx(1.0) and math.isnan(per[1])
