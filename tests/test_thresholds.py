"""Initial thresholds, bounds and the thresholds.json round trip."""

from __future__ import annotations

import numpy as np
import pytest

from cxrloc.thresholds import RHO_HAT_MAX_FRACTION, Thresholds
from cxrloc.utils import CxrlocError


def test_initial_thresholds_from_box_sizes():
    counts = {0: [4.0, 6.0, 10.0], 1: [20.0]}  # medians 6 and 20; all boxes: median of 4, 6, 10, 20 = 8
    th = Thresholds.initial(16, counts)
    assert th.tau_hat[0] == pytest.approx(3.0) and th.tau_hat[1] == pytest.approx(10.0)
    assert th.tau_hat[5] == pytest.approx(4.0)  # no boxes of class 5: half the overall median
    assert np.all(th.rho_hat == 1.0)  # default: one patch
    relaxed = Thresholds.initial(16, counts, rho_hat_box_fraction=1.0)
    assert relaxed.rho_hat[0] == pytest.approx(6.0) and relaxed.rho_hat[1] == pytest.approx(20.0)
    assert relaxed.rho_hat[7] == pytest.approx(8.0)
    # rho_hat is capped at a quarter of the grid (64 patches at P = 16).
    big = Thresholds.initial(16, {0: [200.0]}, rho_hat_box_fraction=1.0)
    assert big.rho_hat[0] == pytest.approx(RHO_HAT_MAX_FRACTION * 256)


def test_json_round_trip_and_errors(tmp_path):
    th = Thresholds.initial(8, {2: [3.0]}, rho_hat_box_fraction=0.5)
    th.save(tmp_path / "t.json")
    back = Thresholds.load(tmp_path / "t.json")
    for name in ("tau", "rho", "tau_hat", "rho_hat"):
        np.testing.assert_allclose(getattr(back, name), getattr(th, name))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CxrlocError, match="not valid JSON"):
        Thresholds.load(tmp_path / "bad.json")
    with pytest.raises(CxrlocError, match="not found"):
        Thresholds.load(tmp_path / "missing.json")
    with pytest.raises(CxrlocError, match="14 values"):
        Thresholds(tau=np.zeros(3), rho=np.zeros(14), tau_hat=np.zeros(14), rho_hat=np.zeros(14), patch_grid=8)
