"""The two geometries of a box against a detected region: exact areas, and the patch grid of the
public Li et al. code (corners rounded to grid lines, last row and column included).

Every expected value is worked out by hand in the comments.
"""

from __future__ import annotations

import numpy as np
import pytest

from cxrloc.evaluation.metrics import accuracy_from_rows, box_rows, localization_table
from cxrloc.geometry import (
    grid_box_mask,
    grid_region_box_iou_ior,
    region_box_iou_ior,
    region_box_scores,
)


def _region(p: int, rows: slice, cols: slice) -> np.ndarray:
    r = np.zeros((p, p), dtype=bool)
    r[rows, cols] = True
    return r


def test_box_on_grid_lines_at_the_border_scores_the_same_in_both_geometries() -> None:
    # P = 4; box [0.5, 0.5, 1, 1] = patches rows 2..3, cols 2..3 exactly. Rounded corners 2 and 4;
    # the slice [2:5] stops at 4, so the grid box is the same 4 patches.
    p, box = 4, (0.5, 0.5, 1.0, 1.0)
    assert grid_box_mask(box, p).sum() == 4
    for region in (_region(p, slice(2, 4), slice(2, 4)), _region(p, slice(1, 4), slice(2, 4)),
                   _region(p, slice(0, 1), slice(0, 1))):
        assert region_box_scores(region, box, "grid") == pytest.approx(region_box_scores(region, box, "exact"))
    # region rows 1..3 x cols 2..3 (6 patches), box 4 patches inside it: IoU 4/6, IoR 4/6.
    assert grid_region_box_iou_ior(_region(p, slice(1, 4), slice(2, 4)), box) == pytest.approx((4 / 6, 4 / 6))


def test_box_on_inner_grid_lines_gains_the_row_and_column_past_its_max_corner() -> None:
    # P = 4; box [0.25, 0.25, 0.5, 0.5] is exactly patch (1, 1). The public code marks
    # mask[1:2+1, 1:2+1]: patches (1..2, 1..2), 4 patches. A region = patch (1, 1):
    # exact IoU 1; grid IoU 1/4, IoR 1 in both.
    p, box = 4, (0.25, 0.25, 0.5, 0.5)
    expected = np.zeros((p, p), bool)
    expected[1:3, 1:3] = True
    np.testing.assert_array_equal(grid_box_mask(box, p), expected)
    region = _region(p, slice(1, 2), slice(1, 2))
    assert region_box_iou_ior(region, box) == pytest.approx((1.0, 1.0))
    assert grid_region_box_iou_ior(region, box) == pytest.approx((0.25, 1.0))


def test_rounding_enlarges_a_box_worked_by_hand() -> None:
    # P = 10; box x in [0.16, 0.33], y in [0.41, 0.58]. Corners * 10: 1.6 -> 2, 3.3 -> 3, 4.1 -> 4,
    # 5.8 -> 6: mask[4:7, 2:4] = rows 4..6 x cols 2..3, 6 patches = 0.06 of the image, against the
    # box's 0.17 * 0.17 = 0.0289. Region = rows 4..6 x cols 2..3 (the grid box itself): grid IoU 1.
    # Exact: the region [0.2, 0.4] x [0.4, 0.7] meets the box on [0.2, 0.33] x [0.41, 0.58]
    # = 0.13 * 0.17 = 0.0221; union = 0.06 + 0.0289 - 0.0221 = 0.0668; IoU = 0.0221 / 0.0668;
    # IoR = 0.0221 / 0.06.
    p, box = 10, (0.16, 0.41, 0.33, 0.58)
    mask = grid_box_mask(box, p)
    assert mask.sum() == 6 and mask[4:7, 2:4].all()
    region = _region(p, slice(4, 7), slice(2, 4))
    assert grid_region_box_iou_ior(region, box) == pytest.approx((1.0, 1.0))
    iou, ior = region_box_iou_ior(region, box)
    assert iou == pytest.approx(0.0221 / 0.0668)
    assert ior == pytest.approx(0.0221 / 0.06)
    # One patch of the region outside the true box but inside the rounded one (row 6 x col 2,
    # y in [0.6, 0.7] > 0.58): the grid still counts it as a hit.
    one = _region(p, slice(6, 7), slice(2, 3))
    assert region_box_iou_ior(one, box) == (0.0, 0.0)
    assert grid_region_box_iou_ior(one, box) == pytest.approx((1 / 6, 1.0))


def test_rounding_halves_to_even_as_numpy_does() -> None:
    # P = 4: x0 = 0.125 -> 0.5 -> 0 (half to even), x1 = 0.375 -> 1.5 -> 2: cols 0..2;
    # y0 = 0.625 -> 2.5 -> 2, y1 = 0.875 -> 3.5 -> 4: rows 2..3 (slice stops at 4).
    mask = grid_box_mask((0.125, 0.625, 0.375, 0.875), 4)
    expected = np.zeros((4, 4), bool)
    expected[2:4, 0:3] = True
    np.testing.assert_array_equal(mask, expected)


def test_box_touching_the_image_border() -> None:
    # P = 8; box [0, 0.8, 0.3, 1.0]: x 0 -> 0, 0.3 * 8 = 2.4 -> 2; y 6.4 -> 6, 8 -> 8: mask[6:9, 0:3]
    # = rows 6..7 x cols 0..2 (6 patches; nothing past the border).
    mask = grid_box_mask((0.0, 0.8, 0.3, 1.0), 8)
    expected = np.zeros((8, 8), bool)
    expected[6:8, 0:3] = True
    np.testing.assert_array_equal(mask, expected)
    # The whole image: every patch, once.
    assert grid_box_mask((0.0, 0.0, 1.0, 1.0), 8).all()
    # A thin box within half a patch of the right border: x0 = 0.95 * 8 = 7.6 -> 8, so mask[.., 8:9]
    # is empty: the public code gives such a box no patch, and it can only score 0.
    thin = (0.95, 0.1, 1.0, 0.5)
    assert not grid_box_mask(thin, 8).any()
    assert grid_region_box_iou_ior(np.ones((8, 8), bool), thin) == (0.0, 0.0)


def test_a_box_smaller_than_half_a_patch_gets_one_patch() -> None:
    # P = 4; box [0.3, 0.3, 0.4, 0.4]: 1.2 -> 1 and 1.6 -> 2: rows / cols 1..2 (4 patches)
    assert grid_box_mask((0.3, 0.3, 0.4, 0.4), 4).sum() == 4
    # box [0.3, 0.3, 0.32, 0.32]: 1.2 -> 1 and 1.28 -> 1: patch (1, 1) alone
    only = grid_box_mask((0.3, 0.3, 0.32, 0.32), 4)
    assert only.sum() == 1 and only[1, 1]


def test_a_region_with_no_patch_scores_zero_in_both_geometries() -> None:
    empty = np.zeros((4, 4), bool)
    for geometry in ("exact", "grid"):
        assert region_box_scores(empty, (0.25, 0.25, 0.75, 0.75), geometry) == (0.0, 0.0)


def test_unknown_geometry_is_refused() -> None:
    with pytest.raises(ValueError, match="geometry"):
        region_box_scores(np.ones((2, 2), bool), (0, 0, 1, 1), "touch")


def test_rows_and_tables_carry_both_geometries() -> None:
    # One image, K = 1, P = 4, region = patch (1, 1); box = patch (1, 1) exactly:
    # exact IoU 1 (correct at T = 0.5); grid IoU 1/4 (wrong at 0.5, right at 0.1).
    z = np.zeros((1, 1, 4, 4), np.float32)
    z[0, 0, 1, 1] = 1.0
    boxes = [[(0, 0.25, 0.25, 0.5, 0.5)]]
    rows = box_rows(z, boxes, classes=["a"])
    assert rows[0]["iou"] == pytest.approx(1.0) and rows[0]["iou_grid"] == pytest.approx(0.25)
    assert rows[0]["ior_grid"] == pytest.approx(1.0)
    table = localization_table(z, boxes, [0.1, 0.5], classes=["a"])
    np.testing.assert_allclose(table["accuracy"]["iou"], [[1.0, 1.0]])
    np.testing.assert_allclose(table["grid"]["accuracy"]["iou"], [[1.0, 0.0]])
    np.testing.assert_allclose(accuracy_from_rows(rows, [0.5], 1, geometry="grid")["accuracy"]["ior"], [[1.0]])
