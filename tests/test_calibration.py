"""Platt scaling, operating points and their fallbacks, on hand-made scores with answers worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrloc.calibration import (
    Calibration,
    ClassCalibration,
    feature,
    fit_calibration,
    platt_fit,
    platt_targets,
)
from cxrloc.decision import best_cut
from cxrloc.utils import CxrlocError


def _operating_cut(
    x: np.ndarray, y: np.ndarray, criterion: str = "youden", **kwargs: object
) -> tuple[float, float, float] | None:
    """The operating-point search of ``cxrloc calibrate``: one cut below every value is a candidate."""
    cut = best_cut(x, y, criterion=criterion, below_all=True, **kwargs)  # type: ignore[arg-type]
    return None if cut is None else (cut.cut, cut.sensitivity, cut.specificity)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_platt_with_two_score_values_by_hand() -> None:
    # 2 negatives with 1'z = 0 (x = log 1 = 0) and 3 positives with 1'z = e - 1 (x = log e = 1).
    # Platt's targets: positives (3 + 1) / (3 + 2) = 4/5, negatives 1 / (2 + 2) = 1/4. With two
    # distinct x the fit passes through them: sigmoid(b) = 1/4 -> b = -log 3;
    # sigmoid(a + b) = 4/5 -> a + b = log 4 -> a = log 12.
    scores = np.array([0.0, 0.0, math.e - 1, math.e - 1, math.e - 1])
    labels = np.array([0, 0, 1, 1, 1])
    a, b = platt_fit(feature(scores), labels)
    assert a == pytest.approx(math.log(12), abs=1e-7)
    assert b == pytest.approx(-math.log(3), abs=1e-7)


def test_platt_with_mixed_labels_at_one_value_by_hand() -> None:
    # x = 0: labels 0, 0, 1; x = 1: labels 1, 1, 0. Targets 4/5 and 1/5 (3 of each), so the mean
    # target is 2/5 at x = 0 and 3/5 at x = 1: b = logit(2/5) = log(2/3), a = 2 log(3/2).
    x = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    labels = np.array([0, 0, 1, 1, 1, 0])
    np.testing.assert_allclose(platt_targets(labels), [0.2, 0.2, 0.8, 0.8, 0.8, 0.2])
    a, b = platt_fit(x, labels)
    assert b == pytest.approx(math.log(2 / 3), abs=1e-7)
    assert a == pytest.approx(2 * math.log(1.5), abs=1e-7)


def test_platt_is_the_minimum_of_its_loss() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    labels = (x + rng.normal(size=300)) > 0.3
    a, b = platt_fit(x, labels)
    t = platt_targets(labels)

    def loss(a_: float, b_: float) -> float:
        f = a_ * x + b_
        return float(np.sum(np.logaddexp(0.0, f) - t * f))

    # Central differences of the loss vanish at the fit, and every nearby point is worse.
    h = 1e-5
    assert abs(loss(a + h, b) - loss(a - h, b)) / (2 * h) < 1e-4
    assert abs(loss(a, b + h) - loss(a, b - h)) / (2 * h) < 1e-4
    assert all(loss(a + da, b + db) > loss(a, b) for da, db in ((0.01, 0), (-0.01, 0), (0, 0.01), (0, -0.01)))


def test_platt_separable_is_finite_and_anticorrelated_is_constant() -> None:
    x = np.array([0.0, 0.5, 1.0, 3.0, 3.5, 4.0])
    a, b = platt_fit(x, [0, 0, 0, 1, 1, 1])
    assert 0 < a < 50 and math.isfinite(b)
    # Targets are 4/5 and 1/5: a separable fit cannot be more confident than about them.
    assert _sigmoid(a * 4.0 + b) < 0.9 and _sigmoid(b) > 0.1
    # The score falls with the label: no slope, the mean target (here 1/2) everywhere.
    a, b = platt_fit(x, [1, 1, 1, 0, 0, 0])
    assert (a, b) == (0.0, pytest.approx(0.0))
    # No spread in x: the mean target, (3 * 4/5 + 1/3) / 4 = 41/60.
    assert platt_fit(np.ones(4), [0, 1, 1, 1]) == (0.0, pytest.approx(math.log(41 / 19)))
    with pytest.raises(ValueError, match="positive and one negative"):
        platt_fit(x, np.ones(6))


def test_youden_cut_on_a_small_table_by_hand() -> None:
    # x 1..6, labels 0 1 0 1 1 1. Cuts and (TPR, TNR): 1.5 (1, 1/2) J = .5; 2.5 (3/4, 1/2) J = .25;
    # 3.5 (3/4, 1) J = .75; 4.5 (1/2, 1) J = .5; 5.5 (1/4, 1) J = .25. Best: 3.5.
    cut, sens, spec = _operating_cut(np.arange(1.0, 7.0), np.array([0, 1, 0, 1, 1, 1]))
    assert (cut, sens, spec) == (3.5, 0.75, 1.0)
    # Ties: positives {3, 5, 6}, negatives {1, 2, 4}: 2.5 (1, 2/3) and 4.5 (2/3, 1) both J = 2/3;
    # the lower (more sensitive) cut wins.
    cut, sens, spec = _operating_cut(np.array([3, 5, 6, 1, 2, 4.0]), np.array([1, 1, 1, 0, 0, 0]))
    assert cut == 2.5 and sens == 1.0 and spec == pytest.approx(2 / 3)
    # Nothing beats chance: no operating point.
    assert _operating_cut(np.array([1.0, 2.0]), np.array([1, 0])) is None
    assert _operating_cut(np.array([1.0, 2.0]), np.array([1, 1])) is None


def test_sensitivity_cut_by_hand() -> None:
    # Positives {3, 5, 6, 7}, negatives {1, 2, 4, 8}.
    x = np.array([3, 5, 6, 7, 1, 2, 4, 8.0])
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    # >= 3 of 4 positives: the highest such cut is 4.5 (5, 6, 7 above; negatives 1, 2, 4 below).
    assert _operating_cut(x, y, criterion="sensitivity", target=0.75) == (4.5, 0.75, 0.75)
    # All positives: 2.5 (3 above; negatives 1, 2 below).
    assert _operating_cut(x, y, criterion="sensitivity", target=1.0) == (2.5, 1.0, 0.5)
    # Half: 5.5 keeps 6 and 7 (6.5 would keep one).
    assert _operating_cut(x, y, criterion="sensitivity", target=0.5) == (5.5, 0.5, 0.75)
    # The lowest score is a positive and the target is 1: everything is present.
    cut, sens, spec = _operating_cut(np.array([0.0, 1.0, 2.0]), np.array([1, 0, 1]), criterion="sensitivity",
                                    target=1.0)
    assert cut < 0.0 and (sens, spec) == (1.0, 0.0)
    with pytest.raises(CxrlocError, match="sensitivity"):
        _operating_cut(x, y, criterion="sensitivity", target=0.0)


def test_separable_validation_gives_the_expected_cut() -> None:
    classes = ["A", "B", "C"]
    # Class A: negatives 1'z in {0, 1, 2}, positives {5, 8, 11}: separable, Youden's cut is the midpoint
    # of log(1 + 2) and log(1 + 5) in x, i.e. 1'z = sqrt(3 * 6) - 1.
    scores = np.zeros((6, 3))
    labels = np.zeros((6, 3))
    scores[:, 0] = [0, 1, 2, 5, 8, 11]
    labels[3:, 0] = 1
    cal = fit_calibration(scores, labels, classes, rule="youden")
    a = cal.per_class[0]
    assert a.source == "val" and (a.positives, a.negatives) == (3, 3)
    assert a.score_cut == pytest.approx(math.sqrt(18) - 1)
    assert (a.fit_sensitivity, a.fit_specificity) == (1.0, 1.0)
    assert a.threshold == pytest.approx(_sigmoid(a.a * math.log(math.sqrt(18)) + a.b))
    p = cal.probabilities(scores)[:, 0]
    assert np.all(p[3:] >= a.threshold) and np.all(p[:3] < a.threshold)
    assert np.all(np.diff(p) > 0)  # increasing in 1'z
    np.testing.assert_array_equal(cal.present(cal.probabilities(scores))[:, 0], labels[:, 0] > 0)


def test_fallbacks_to_training_images_then_to_the_prevalence() -> None:
    classes = ["A", "B", "C"]
    rng = np.random.default_rng(1)
    val_s = rng.uniform(0, 10, size=(10, 3))
    val_y = np.zeros((10, 3))
    val_y[:5, 0] = 1  # A: 5 positives, 5 negatives -> validation alone
    val_y[0, 1] = 1  # B: one validation positive -> with training images
    train_s = rng.uniform(0, 10, size=(8, 3))
    train_y = np.zeros((8, 3))
    train_y[:4, 1] = 1
    val_s[:5, 0] += 20  # A separates well
    cal = fit_calibration(val_s, val_y, classes, train_scores=train_s, train_labels=train_y, rule="youden")
    a, b, c = cal.per_class
    assert a.source == "val" and (a.positives, a.negatives) == (5, 5)
    assert b.source == "val+train" and (b.positives, b.negatives) == (1 + 4, 9 + 4)
    # C has no positive anywhere: Laplace-smoothed prevalence (0 + 1) / (18 + 2), never present.
    assert c.source == "prior" and c.a == 0.0 and c.threshold is None
    assert _sigmoid(c.b) == pytest.approx(1 / 20)
    assert not cal.present(cal.probabilities(np.full((1, 3), 1e6)))[0, 2]
    assert cal.info["sources"] == {"val": 1, "val+train": 1, "prior": 1}
    assert "training images for 1 class" in cal.describe()
    # Without training images, B is fitted on its few validation images, and says so; C stays a prior
    # of its validation images, (0 + 1) / (10 + 2).
    no_train = fit_calibration(val_s, val_y, classes, rule="youden")
    assert no_train.per_class[1].source == "val" and no_train.per_class[1].positives == 1
    assert "only 1 positive(s) and 9 negative(s)" in no_train.per_class[1].note
    assert _sigmoid(no_train.per_class[2].b) == pytest.approx(1 / 12)


def test_json_round_trip_and_errors(tmp_path) -> None:
    cal = Calibration(
        ["A", "B"],
        [ClassCalibration(a=1.5, b=-2.0, threshold=0.3, source="val", positives=3, negatives=9, score_cut=2.0,
                          fit_sensitivity=1.0, fit_specificity=0.75),
         ClassCalibration(a=0.0, b=-3.0, threshold=None, source="prior", note="never")],
        rule="sensitivity", target_sensitivity=0.9, info={"fold": 0},
    )
    path = cal.save(tmp_path / "calibration.json")
    back = Calibration.load(path)
    assert back == cal
    assert back.describe() == "target sensitivity 0.9 on validation images"
    # The decision is probability >= threshold: 1'z = e^2 - 1 gives sigmoid(1.5 * 2 - 2) = 0.73 >= 0.3.
    p = back.probabilities(np.array([[math.e**2 - 1, 1e9]]))
    assert p[0, 0] == pytest.approx(_sigmoid(1.0))
    assert back.present(p).tolist() == [[True, False]]
    bad = cal.to_json()
    bad["classes"]["A"]["a"] = -1.0
    with pytest.raises(CxrlocError, match="calibrate"):
        Calibration.from_json(bad)
    with pytest.raises(CxrlocError, match="calibrate"):
        Calibration.from_json({"classes": {"A": {"b": 1.0}}})
    with pytest.raises(CxrlocError, match="rule"):
        fit_calibration(np.zeros((2, 1)), np.zeros((2, 1)), ["A"], rule="f1")


def test_matched_rule_calls_a_class_as_often_as_it_is_labelled_and_never_below_the_floor() -> None:
    from cxrloc.calibration import MIN_PROBABILITY

    # 2 positives among 10 images, scores overlapping: Youden would call 5 present (J = 1 + 5/8 - 1 = 0.625 at
    # the cut below 4), matched calls exactly 2: the two highest scores, 9 (+) and 8 (-), cut between 6 and 8.
    x = np.log1p(np.array([0, 1, 2, 3, 4, 5, 6, 8, 9, 7.0]))
    y = np.array([0, 0, 0, 0, 1, 0, 0, 0, 1, 0], bool)
    cut, sens, spec = _operating_cut(x, y, criterion="matched")
    assert cut == pytest.approx((math.log1p(7) + math.log1p(8)) / 2)
    assert int((x >= cut).sum()) == 2 and (sens, spec) == (0.5, 7 / 8)
    youden = _operating_cut(x, y, criterion="youden")
    assert int((x >= youden[0]).sum()) > 2
    # Through fit_calibration: the threshold is the Platt probability at the cut unless below the floor.
    scores = np.expm1(x)[:, None]
    cal = fit_calibration(scores, y[:, None].astype(float), ["A"], min_positives=2)
    c = cal.per_class[0]
    p = cal.probabilities(scores)[:, 0]
    assert cal.rule == "matched"
    if c.threshold > MIN_PROBABILITY:
        assert int(cal.present(p[:, None]).sum()) == 2
    else:  # raised to the floor: fewer calls, and the note says so
        assert c.threshold == MIN_PROBABILITY and "raised" in c.note and int((p >= MIN_PROBABILITY).sum()) <= 2
    # A weak class: positives at the bottom of the scores (any cut calls negatives): the floor holds.
    weak = fit_calibration(np.arange(20.0)[:, None], (np.arange(20) % 7 == 0).astype(float)[:, None], ["W"],
                           min_positives=2)
    w = weak.per_class[0]
    assert w.threshold is None or w.threshold >= MIN_PROBABILITY
    probs = weak.probabilities(np.arange(20.0)[:, None])
    assert not np.any(weak.present(probs) & (probs < MIN_PROBABILITY))
