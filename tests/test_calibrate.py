"""``cxrloc calibrate`` on a run made by ``cxrloc train``; the calibration through the checkpoint, the ONNX
file and ``predict``; stale and missing calibrations."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from conftest import NIH_DIR, needs_shared
from typer.testing import CliRunner

from cxrloc.calibration import Calibration, ClassCalibration
from cxrloc.checkpoint import load_checkpoint, load_model, model_fingerprint
from cxrloc.classes import CLASSES
from cxrloc.config import make_config
from cxrloc.inference.predict import predict_files
from cxrloc.utils import CxrlocError

NIH_IMAGE = NIH_DIR / "images" / "00013118_008.png"


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prepared_writer: Callable[..., Path]) -> Path:
    """A run folder written by ``train`` (tiny network, two steps), with a large validation part."""
    from cxrloc.training.loop import train

    root = tmp_path_factory.mktemp("cal")
    prep = prepared_writer(root / "prepared")
    cfg = make_config("tiny", ["epochs=1", "max_steps_per_epoch=2", "device=cpu", "workers=0", "val_fraction=0.4"])
    train(prep, root / "run", fold=0, cfg=cfg, progress=False)
    return root / "run"


@pytest.fixture()
def run_copy(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run (tests write calibration files into it)."""
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def test_calibrate_cli_on_a_trained_run(run_copy: Path) -> None:
    from cxrloc.cli import app

    fold = run_copy / "fold_0"
    result = CliRunner().invoke(app, ["calibrate", str(run_copy), "--fold", "0", "--rule", "youden"])
    assert result.exit_code == 0, result.output
    assert f"Results saved to {fold / 'calibration.json'}" in result.output.replace("\n", "")
    data = json.loads((fold / "calibration.json").read_text())
    cal = Calibration.from_json(data)
    assert cal.classes == list(CLASSES) and cal.rule == "youden"
    weights = load_checkpoint(fold / "checkpoints" / "best.pt")["model"]
    assert cal.info["model_fingerprint"] == model_fingerprint(weights)

    # Counts of the validation images, read independently from run.json and the manifest.
    run = json.loads((fold / "run.json").read_text())
    manifest = pd.read_csv(Path(run["prepared_dir"]) / "manifest.csv").set_index("image_id")
    val = manifest.loc[run["val_ids"]]
    train = manifest.loc[run["train_ids"]]
    assert cal.info["validation_images"] == len(run["val_ids"]) >= 8
    for name, c in zip(cal.classes, cal.per_class, strict=True):
        pos = int(val[name].sum())
        if c.source == "val":
            assert (c.positives, c.negatives) == (pos, len(val) - pos) and min(pos, len(val) - pos) >= 3
        elif c.source == "val+train":
            assert c.positives == pos + int(train[name].sum())
        else:  # never a positive in validation or training images
            assert c.positives == 0 and c.threshold is None and pos + int(train[name].sum()) == 0
    assert {c.source for c in cal.per_class} >= {"val", "prior"}

    # A target sensitivity of 1: every class with an operating point reaches it on its images.
    result = CliRunner().invoke(app, ["calibrate", str(fold), "--sensitivity", "1.0"])
    assert result.exit_code == 0, result.output
    cal = Calibration.load(fold / "calibration.json")
    assert cal.rule == "sensitivity" and cal.target_sensitivity == 1.0
    assert all(c.fit_sensitivity == 1.0 for c in cal.per_class if c.threshold is not None)
    result = CliRunner().invoke(app, ["calibrate", str(run_copy), "--sensitivity", "1.5"])
    assert isinstance(result.exception, CxrlocError) and "--sensitivity" in str(result.exception)
    result = CliRunner().invoke(app, ["calibrate", str(run_copy), "--rule", "youden", "--sensitivity", "0.9"])
    assert isinstance(result.exception, CxrlocError) and "drop --rule youden or --sensitivity" in str(result.exception)

    # The default rule: count-matched, never below the minimum probability.
    from cxrloc.calibration import MIN_PROBABILITY

    result = CliRunner().invoke(app, ["calibrate", str(fold)])
    assert result.exit_code == 0, result.output
    assert "never called present" in result.output.replace("\n", " ")
    cal = Calibration.load(fold / "calibration.json")
    assert cal.rule == "matched" and "count-matched" in cal.describe()
    assert all(c.threshold >= MIN_PROBABILITY for c in cal.per_class if c.threshold is not None)


def _hand_calibration(fold: Path, scores: np.ndarray) -> Calibration:
    """a = 1, b = -2 for every class; even classes are present on the image of ``scores``, odd ones absent."""
    per_class = []
    for k, s in enumerate(scores):
        p = _sigmoid(math.log1p(s) - 2.0)
        threshold = p / 2 if k % 2 == 0 else p + (1 - p) / 2
        per_class.append(ClassCalibration(a=1.0, b=-2.0, threshold=threshold, source="val"))
    fingerprint = model_fingerprint(load_checkpoint(fold / "checkpoints" / "best.pt")["model"])
    cal = Calibration(list(CLASSES), per_class, info={"model_fingerprint": fingerprint})
    cal.save(fold / "calibration.json")
    return cal


def test_operating_point_round_trips_and_both_backends_agree(run_copy: Path, tmp_path: Path) -> None:
    from cxrloc.inference.backends import load_predictor
    from cxrloc.inference.export import export_onnx

    image = needs_shared(NIH_IMAGE)
    fold = run_copy / "fold_0"
    plain = predict_files([str(image)], run_copy, json_path=tmp_path / "plain.json", progress=False).records[0]
    cal = _hand_calibration(fold, np.array([c["score"] for c in plain["classes"]]))

    # Checkpoint: load_model reads the fold's file into meta.
    _, meta, _ = load_model(run_copy)
    assert meta["calibration"] == cal.to_json()
    assert meta["calibration_source"] == str(fold / "calibration.json")
    # ONNX: export writes it into the file's metadata, and the ONNX backend reads it back.
    report = export_onnx(run_copy, tmp_path / "m.onnx", check_image=image)
    props = {p.key: json.loads(p.value) for p in onnx.load(str(report.path)).metadata_props}
    assert props["calibration"] == cal.to_json()
    assert "Youden" in report.calibration
    assert load_predictor(report.path).calibration == cal
    assert load_predictor(run_copy).calibration == cal

    a = predict_files([str(image)], run_copy, json_path=tmp_path / "a.json", progress=False).records[0]
    b = predict_files([str(image)], report.path, json_path=tmp_path / "b.json", progress=False).records[0]
    assert (a["backend"], b["backend"]) == ("torch", "onnx")
    assert a["operating_point"]["rule"] == b["operating_point"]["rule"] == "youden"
    assert a["operating_point"]["calibrated"] and a["operating_point"]["source"] == str(fold / "calibration.json")
    assert a["present"] == b["present"] == [c for k, c in enumerate(CLASSES) if k % 2 == 0]
    for ca, cb in zip(a["classes"], b["classes"], strict=True):
        # The probability is the calibration applied to the raw score, worked here independently.
        assert ca["probability"] == pytest.approx(_sigmoid(math.log1p(ca["score"]) - 2.0), abs=1e-6)
        assert ca["probability"] == pytest.approx(cb["probability"], abs=1e-5)
        assert ca["threshold"] == pytest.approx(cb["threshold"], abs=1e-12)
        assert ca["present"] == cb["present"] == (ca["probability"] >= ca["threshold"])


def test_stale_or_missing_calibration_falls_back_with_a_note(run_copy: Path, tmp_path: Path) -> None:
    from cxrloc.cli import app

    image = needs_shared(NIH_IMAGE)
    fold = run_copy / "fold_0"
    # No calibration: today's decision 1'z >= tau_hat, no probability, and the JSON says why.
    rec = predict_files([str(image)], run_copy, json_path=tmp_path / "r.json", progress=False).records[0]
    op = rec["operating_point"]
    assert op["rule"] == "tau_hat" and not op["calibrated"] and "cxrloc calibrate" in op["note"]
    for c in rec["classes"]:
        assert c["probability"] is None and c["threshold"] is None
        assert c["present"] == (c["score"] >= c["tau_hat"])
    res = CliRunner().invoke(app, ["predict", str(image), "--model", str(run_copy), "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    assert "Operating point: 1'z >= tau_hat" in res.output.replace("\n", " ")

    # A calibration fitted for other weights is not used (the checkpoint changed since).
    cal = _hand_calibration(fold, np.ones(len(CLASSES)))
    res = CliRunner().invoke(app, ["predict", str(image), "--model", str(run_copy), "--json", str(tmp_path / "d.json")])
    assert "Operating point: Youden's J on validation images" in res.output.replace("\n", " ")
    cal.info["model_fingerprint"] = "0" * 32
    cal.save(fold / "calibration.json")
    _, meta, _ = load_model(run_copy)
    assert meta["calibration"] is None and "fitted for other weights" in meta["calibration_note"]
    rec = predict_files([str(image)], run_copy, json_path=tmp_path / "s.json", progress=False).records[0]
    assert rec["operating_point"]["rule"] == "tau_hat"
    assert "fitted for other weights" in rec["operating_point"]["note"]
    assert all(c["probability"] is None for c in rec["classes"])

    (fold / "calibration.json").write_text("{not json")
    with pytest.raises(CxrlocError, match="calibrate"):
        load_model(run_copy)
