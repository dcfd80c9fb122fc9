"""Threshold fitting on hand-made predictions with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrloc.classes import NUM_CLASSES
from cxrloc.decision import best_cut
from cxrloc.evaluation.fit_thresholds import box_fractions, fit_thresholds_from_predictions
from cxrloc.thresholds import RHO_BOUNDS, TAU_BOUNDS, TAU_HAT_MIN, Thresholds

P = 8


def test_best_cut_in_the_known_gap() -> None:
    rng = np.random.default_rng(0)
    pos = rng.uniform(8, 12, size=30)
    neg = rng.uniform(0, 4, size=50)
    pos[0], neg[0] = 8.0, 4.0  # the gap is exactly (4, 8]
    cut, _, _, bal = best_cut(np.r_[pos, neg], np.r_[np.ones(30), np.zeros(50)])
    assert 4.0 < cut <= 8.0
    assert bal == pytest.approx(1.0)


def test_best_cut_with_overlap_by_hand() -> None:
    # pos {3, 5, 6}, neg {1, 2, 4}. Cut 4.5: TPR 2/3, TNR 1 -> 5/6; cut 2.5: TPR 1, TNR 2/3 -> 5/6;
    # cut 3.5: TPR 2/3, TNR 2/3. The first best (2.5) wins.
    cut, _, _, bal = best_cut(np.array([3, 5, 6, 1, 2, 4.0]), np.array([1, 1, 1, 0, 0, 0]))
    assert cut == pytest.approx(2.5)
    assert bal == pytest.approx(5 / 6)


def test_best_cut_none_without_both_classes_or_signal() -> None:
    assert best_cut(np.array([1.0, 2.0]), np.array([1, 1])) is None
    assert best_cut(np.zeros(6), np.array([1, 0, 1, 0, 1, 0])) is None
    # Scores anti-correlated with labels: no cut of the form "score >= c" beats chance.
    assert best_cut(np.array([1.0, 2.0]), np.array([1, 0])) is None


def test_box_fractions_by_hand() -> None:
    z = np.zeros((P, P))
    z[:2, :2] = 1.0  # the box's 4 patches fully on
    z[7, 7] = 0.6  # one outside patch at 0.6
    inside, outside = box_fractions(z, [(0.0, 0.0, 0.25, 0.25)])
    assert inside == pytest.approx(1.0)
    assert outside == pytest.approx(0.6 / 60)


def _current() -> Thresholds:
    return Thresholds.initial(P)


def test_fit_finds_the_known_tau_hat() -> None:
    # Class 2: 10 positives with 1'z in [8, 12], 10 negatives with 1'z in [0, 4].
    n = 20
    z = np.zeros((n, NUM_CLASSES, P, P), dtype=np.float32)
    labels = np.zeros((n, NUM_CLASSES), dtype=np.float32)
    counts = np.r_[np.linspace(8, 12, 10), np.linspace(0, 4, 10)]
    for i, c in enumerate(counts):
        flat = np.zeros(P * P)
        flat[: int(c)] = 1.0
        flat[int(c)] = c - int(c) if int(c) < P * P else 0.0
        z[i, 2] = flat.reshape(P, P)
    labels[:10, 2] = 1
    th = fit_thresholds_from_predictions(z, labels, [[] for _ in range(n)], _current())
    assert 4.0 < th.tau_hat[2] <= 8.0
    assert th.rho_hat[2] == pytest.approx(0.5 * th.tau_hat[2])
    assert th.info["per_class"]["Effusion"]["tau_hat_from"] == "fitted"
    # Class 0 had no positive: kept at the current value.
    assert th.tau_hat[0] == pytest.approx(_current().tau_hat[0])


def test_tau_rho_are_quantiles_of_achieved_fractions() -> None:
    # Class 1 on 4 annotated images, box = [0, 0.5]^2 (16 patches of 64). In-box value v_i and
    # outside value w_i per image: in-fractions = v, out-fractions = w.
    v = np.array([0.4, 0.6, 0.8, 1.0])
    w = np.array([0.0, 0.02, 0.04, 0.1])
    z = np.zeros((4, NUM_CLASSES, P, P), dtype=np.float32)
    for i in range(4):
        z[i, 1] = w[i]
        z[i, 1, :4, :4] = v[i]
    labels = np.zeros((4, NUM_CLASSES))
    labels[:, 1] = 1
    boxes = [[(1, 0.0, 0.0, 0.5, 0.5)] for _ in range(4)]
    th = fit_thresholds_from_predictions(z, labels, boxes, _current())
    assert th.tau[1] == pytest.approx(np.quantile(v, 0.25))  # 0.55, worked: 0.4 + 0.75 * 0.2
    assert th.tau[1] == pytest.approx(0.55)
    assert th.rho[1] == pytest.approx(0.055)  # 0.04 + 0.25 * 0.06


def test_all_zero_predictions_never_give_degenerate_thresholds() -> None:
    n = 12
    z = np.zeros((n, NUM_CLASSES, P, P), dtype=np.float32)
    labels = np.zeros((n, NUM_CLASSES))
    labels[::2] = 1
    boxes = [[(k, 0.1, 0.1, 0.6, 0.6) for k in range(8)] for _ in range(n)]
    th = fit_thresholds_from_predictions(z, labels, boxes, _current())
    assert np.all(th.tau >= TAU_BOUNDS[0]) and np.all(th.tau[:8] == pytest.approx(TAU_BOUNDS[0]))
    assert np.all(th.rho <= RHO_BOUNDS[1])
    assert np.all(th.tau_hat >= TAU_HAT_MIN)
    assert np.all(th.rho_hat <= th.tau_hat)
    assert np.all(th.rho_hat <= 0.25 * P * P)
    # No separating cut: tau_hat and rho_hat stay where they were.
    np.testing.assert_allclose(th.tau_hat, _current().tau_hat)


def test_saturated_predictions_are_clipped() -> None:
    # z = 1 everywhere: in-box 1, outside 1 (degenerate rho = 1) -> clipped to 0.3.
    n = 4
    z = np.ones((n, NUM_CLASSES, P, P), dtype=np.float32)
    labels = np.zeros((n, NUM_CLASSES))
    labels[:2] = 1
    th = fit_thresholds_from_predictions(z, labels, [[(0, 0.0, 0.0, 0.5, 0.5)]] * n, _current())
    assert th.tau[0] == pytest.approx(1.0)
    assert th.rho[0] == pytest.approx(RHO_BOUNDS[1])


def test_fit_thresholds_end_to_end(run_dir: Path) -> None:
    from cxrloc.evaluation.fit_thresholds import fit_thresholds
    from cxrloc.thresholds import RHO_BOUNDS, TAU_BOUNDS, Thresholds

    th = fit_thresholds(run_dir / "fold_0", progress=False)
    saved = Thresholds.load(run_dir / "fold_0" / "thresholds.json")
    np.testing.assert_allclose(saved.tau, th.tau)
    # Class 0 detects everything: in-box fraction 1 -> tau 1; outside fraction 1 -> clipped rho.
    assert th.tau[0] == pytest.approx(1.0, abs=1e-6)
    assert th.rho[0] == pytest.approx(RHO_BOUNDS[1])
    # Class 1 detects nothing: tau clipped up to its lower bound, rho 0.
    assert th.tau[1] == pytest.approx(TAU_BOUNDS[0])
    assert th.rho[1] == pytest.approx(0.0, abs=1e-6)
    info = saved.info
    assert info["images"] == 3 and info["round"] == 1 and info["which"] == "best"
    assert info["per_class"]["Atelectasis"]["annotated_images"] == 2  # c and d (f is validation)
    again = fit_thresholds(run_dir / "fold_0", progress=False)
    assert again.info["round"] == 2
