"""Runs written by cxrloc 0.1.0 (tests/fixtures/v0_1_0, made before the package reorganisation)
still load, predict the same z, and evaluate to the same numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "v0_1_0"


@pytest.fixture()
def old_run(tmp_path: Path) -> Path:
    root = tmp_path / "v0_1_0"
    shutil.copytree(FIXTURE, root)
    run_json = root / "run" / "fold_0" / "run.json"
    data = json.loads(run_json.read_text())
    data["prepared_dir"] = str(root / "prepared")
    run_json.write_text(json.dumps(data))
    return root


def test_old_run_predicts_the_same_z(old_run: Path) -> None:
    from cxrloc.checkpoint import load_model
    from cxrloc.data.prepared import Prepared
    from cxrloc.inference.batch import predict_prepared

    expected = np.load(old_run / "expected.npz")
    model, meta, cfg = load_model(old_run / "run" / "fold_0")
    z = predict_prepared(model, Prepared.open(old_run / "prepared"), [str(i) for i in expected["ids"]],
                         image_size=cfg.image_size, progress=False)
    np.testing.assert_allclose(z, expected["z"], atol=1e-6)
    want = json.loads((old_run / "expected_eval.json").read_text())
    # The fitted thresholds.json beside the checkpoint wins over the checkpoint's own.
    assert meta["thresholds"] == want["thresholds"]


def test_old_run_evaluates_to_the_same_numbers(old_run: Path) -> None:
    from cxrloc.evaluation.evaluate import evaluate

    result = evaluate(old_run / "run", fold=0, progress=False, out_dir=old_run / "eval")
    want = json.loads((old_run / "expected_eval.json").read_text())
    got = result["per_fold"][0]
    assert got["model"] == want["per_fold_model"]
    assert got["prior"] == want["prior"]
