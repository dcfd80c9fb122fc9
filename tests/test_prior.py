"""The data-free prior on hand-made boxes."""

from __future__ import annotations

import numpy as np
import pytest

from cxrloc.evaluation.prior import boxes_by_class, fit_prior, fit_prior_per_t


def test_prior_picks_level_by_hand() -> None:
    # P = 4 (patch centres at 0.125, 0.375, 0.625, 0.875). Class 0 boxes: A twice, B once.
    # A = [0, 0.5]^2 covers patches rows/cols {0, 1}; B = [0.25, 0.75]^2 covers rows/cols {1, 2}.
    # Coverage: (1,1) = 3/3; (0,0),(0,1),(1,0) = 2/3; (1,2),(2,1),(2,2) = 1/3.
    # Mean training IoU accuracy over T in {0.1, 0.3, 0.5}:
    #   q = 1   -> region (1,1): IoU with A, A, B = 1/4 each -> (1 + 0 + 0) / 3 = 1/3
    #   q = 2/3 -> region = A: IoU 1, 1, 1/7 -> (1 + 2/3 + 2/3) / 3 = 7/9
    #   q = 1/3 -> 7 patches (area 7/16): IoU A = 4/7, B = 4/7 -> 1
    a, b = (0.0, 0.0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)
    prior = fit_prior({0: [a, a, b]}, 4)
    expected = np.zeros((4, 4), dtype=bool)
    expected[:2, :2] = True
    expected[1:3, 1:3] = True
    np.testing.assert_array_equal(prior.masks[0], expected)
    assert prior.q[0] == pytest.approx(1 / 3)
    assert prior.train_accuracy[0] == pytest.approx(1.0)
    assert prior.num_boxes[0] == 3


def test_prior_prefers_core_when_boxes_disagree() -> None:
    # Four identical boxes [0, 0.5]^2 and one far away [0.75, 1]^2. Adding the far box's patch
    # drops the four boxes' IoU from 1 to 0.8 (still >= 0.5) but matches the far box at T = 0.1,
    # so the larger region wins. Worked values:
    #   q = 4/5 -> region A (4 patches): IoU 1,1,1,1,0 -> 4/5 at every T -> 0.8
    #   q = 1/5 -> region A + far patch (5 patches): IoU 4/5 x4, far box 1/5 -> T=.1: 1, .3: .8, .5: .8 -> 13/15
    a, far = (0.0, 0.0, 0.5, 0.5), (0.75, 0.75, 1.0, 1.0)
    prior = fit_prior({2: [a, a, a, a, far]}, 4)
    assert prior.masks[2].sum() == 5
    assert prior.masks[2][3, 3]
    assert prior.train_accuracy[2] == pytest.approx(13 / 15)


def test_prior_without_boxes_detects_nothing_and_predict_shape() -> None:
    prior = fit_prior({0: [(0.0, 0.0, 1.0, 1.0)]}, 4)
    z = prior.predict(3)
    assert z.shape == (3, 14, 4, 4) and z.dtype == np.float32
    assert np.all(z[:, 0] == 1.0)
    assert np.all(z[:, 1:] == 0.0)
    assert np.isnan(prior.q[1])


def test_overlap_coverage_counts_area_share() -> None:
    # One box [0, 0.375] x [0, 0.25] on P = 4: patch (0,0) fully covered, patch (0,1) half.
    # Centre rule: patch (0,1)'s centre x = 0.375 lies on the box's edge, which counts as inside.
    box = (0.0, 0.0, 0.375, 0.25)
    centre = fit_prior({0: [box]}, 4, coverage="centre")
    overlap = fit_prior({0: [box]}, 4, coverage="overlap")
    assert overlap.coverage[0, 0, 0] == pytest.approx(1.0)
    assert overlap.coverage[0, 0, 1] == pytest.approx(0.5)
    assert centre.coverage[0, 0, 1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fit_prior({0: [box]}, 4, coverage="bogus")


def test_boxes_by_class_groups_per_class() -> None:
    grouped = boxes_by_class([[(0, 0.1, 0.1, 0.2, 0.2), (3, 0, 0, 1, 1)], [], [(0, 0.5, 0.5, 0.6, 0.6)]])
    assert grouped == {0: [(0.1, 0.1, 0.2, 0.2), (0.5, 0.5, 0.6, 0.6)], 3: [(0.0, 0.0, 1.0, 1.0)]}


def test_per_t_prior_chooses_q_for_each_t_by_hand() -> None:
    # The boxes of the test above. Training IoU accuracy of the two candidate regions:
    #   q = 4/5 (A, 4 patches): IoU 1, 1, 1, 1, 0      -> 0.8 at every T
    #   q = 1/5 (A + far patch): IoU 0.8 x 4, far 0.2  -> T = 0.1: 1.0; T = 0.5: 0.8 (tie -> larger q)
    a, far = (0.0, 0.0, 0.5, 0.5), (0.75, 0.75, 1.0, 1.0)
    priors = fit_prior_per_t({2: [a, a, a, a, far]}, 4, (0.1, 0.5))
    assert set(priors) == {0.1, 0.5}
    assert priors[0.1].masks[2].sum() == 5 and priors[0.1].train_accuracy[2] == pytest.approx(1.0)
    assert priors[0.5].masks[2].sum() == 4 and priors[0.5].q[2] == pytest.approx(4 / 5)
    assert priors[0.5].train_accuracy[2] == pytest.approx(0.8)
    # Each per-T prior is at least as good on its training boxes at its T as the one-q prior.
    one = fit_prior({2: [a, a, a, a, far]}, 4)
    assert one.masks[2].sum() == 5
