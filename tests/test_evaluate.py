"""evaluate and fit-thresholds end to end on a tiny run written by hand.

The model's head is set so that z is known without running anything else: class 0 and
class 4 detect every patch (z ~ 1), all other classes detect none (z ~ 0). IoU and IoR of
a box with the whole-image region both equal the box's area (region and union are the whole
image), and an empty region scores 0, so every number is worked by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrloc.checkpoint import make_meta, save_checkpoint
from cxrloc.classes import CLASSES
from cxrloc.config import make_config

S = 64
P = 8

# Boxes (class, x0, y0, x1, y1) per image; images "a", "b" are the test set of fold 0.
BOXES: dict[str, list[tuple[int, float, float, float, float]]] = {
    "a": [(0, 0.0, 0.0, 0.5, 0.5), (1, 0.25, 0.25, 0.75, 0.75)],
    "b": [(0, 0.0, 0.0, 0.25, 0.25), (0, 0.5, 0.5, 1.0, 1.0), (4, 0.1, 0.1, 0.2, 0.2)],
    "c": [(0, 0.0, 0.0, 0.5, 0.5), (1, 0.25, 0.25, 0.75, 0.75)],
    "d": [(0, 0.0, 0.0, 0.5, 0.5)],
    "e": [(4, 0.5, 0.5, 0.75, 0.75)],
    "f": [(0, 0.0, 0.0, 0.5, 0.5)],
}
EXTRA_LABELS = {"a": [5], "c": [5]}  # Nodule label without a box


def _write_prepared(root: Path) -> None:
    ids = list(BOXES)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(ids), S, S), dtype=np.uint8)
    root.mkdir(parents=True)
    images.tofile(root / "images.u8")
    np.ones(len(ids), dtype=np.uint8).tofile(root / "done.u8")
    (root / "cache.json").write_text(
        json.dumps({"version": 1, "size": S, "count": len(ids), "file": "images.u8", "dtype": "uint8"})
    )
    rows = []
    for i, image_id in enumerate(ids):
        row = {"image_id": image_id, "patient_id": i, "follow_up": 0, "view_position": "PA"}
        present = {b[0] for b in BOXES[image_id]} | set(EXTRA_LABELS.get(image_id, []))
        row.update({c: int(k in present) for k, c in enumerate(CLASSES)})
        row.update({"annotated": 1, "cache_index": i, "boxes": json.dumps([list(b) for b in BOXES[image_id]])})
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    folds = [{"fold": 0, "test": ["a", "b"], "train_annotated": ["c", "d", "e", "f"], "train_unannotated": []}]
    (root / "splits.json").write_text(json.dumps({"version": 1, "seed": 0, "group_by": "patient", "folds": folds}))


def _write_fold(run: Path, fold: int, prepared: Path, test_ids: list[str]) -> None:
    from cxrloc.model.net import build_model

    cfg = make_config("tiny")
    cfg.crf = False  # z = sigmoid(logits): set exactly through the head's last bias
    model = build_model(cfg)
    conv = model.unary.head.conv2
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-20.0)
        conv.bias[0] = 20.0
        conv.bias[4] = 20.0
    fold_dir = run / f"fold_{fold}"
    save_checkpoint(
        fold_dir / "checkpoints" / "best.pt",
        {"config": cfg.to_dict(), "model": model.state_dict(), "meta": make_meta(cfg)},
    )
    (fold_dir / "run.json").write_text(
        json.dumps(
            {
                "prepared_dir": str(prepared),
                "fold": fold,
                "stage": "unary",
                "train_ids": ["c", "d", "e"],
                "val_ids": ["f"],
                "test_ids": test_ids,
            }
        )
    )


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    pytest.importorskip("cxrloc.model.net")
    pytest.importorskip("cxrloc.data.prepared")
    prepared = tmp_path / "prepared"
    _write_prepared(prepared)
    run = tmp_path / "run"
    _write_fold(run, 0, prepared, ["a", "b"])
    _write_fold(run, 1, prepared, ["a"])
    return run


def test_evaluate_end_to_end(run_dir: Path) -> None:
    from cxrloc.evaluation.evaluate import evaluate

    result = evaluate(run_dir, ts=(0.1, 0.3, 0.5), fold="all", progress=False)
    out = Path(result["out_dir"])
    assert out == run_dir / "eval"
    for name in ("results.json", "results.csv", "results.md", "per_image.csv"):
        assert (out / name).is_file()

    per_fold = {f["fold"]: f for f in result["per_fold"]}
    # Fold 0, class 0 (whole-image region): boxes of area 1/4, 1/16, 1/4 -> IoU = IoR = area.
    assert per_fold[0]["model"]["iou"]["Atelectasis"] == pytest.approx([2 / 3, 0, 0])
    assert per_fold[0]["model"]["ior"]["Atelectasis"] == pytest.approx([2 / 3, 0, 0])
    # Class 1 (empty region) -> 0; class 4 (box area 0.01) -> IoU = IoR = 0.01.
    assert per_fold[0]["model"]["iou"]["Cardiomegaly"] == pytest.approx([0, 0, 0])
    assert per_fold[0]["model"]["ior"]["Cardiomegaly"] == pytest.approx([0, 0, 0])
    assert per_fold[0]["model"]["iou"]["Mass"] == pytest.approx([0, 0, 0])
    assert per_fold[0]["model"]["ior"]["Mass"] == pytest.approx([0, 0, 0])
    # Mean over the boxed classes present (0, 1, 4).
    assert per_fold[0]["model_boxed_mean"]["iou"] == pytest.approx([2 / 9, 0, 0])
    # Fold 1 tests image "a" only: class 0 box of area 1/4 -> 1 at T=0.1.
    assert per_fold[1]["model"]["iou"]["Atelectasis"] == pytest.approx([1, 0, 0])

    # Prior from training boxes c, d, e, f (never the test boxes): class 0 = [0, .5]^2 exactly,
    # class 1 = [.25, .75]^2, class 4 = [.5, .75]^2. Fold 0 test IoUs, class 0: 1, 1/4, 0.
    assert per_fold[0]["prior"]["iou"]["Atelectasis"] == pytest.approx([2 / 3, 1 / 3, 1 / 3])
    assert per_fold[0]["prior"]["iou"]["Cardiomegaly"] == pytest.approx([1, 1, 1])
    assert per_fold[0]["prior"]["iou"]["Mass"] == pytest.approx([0, 0, 0])
    # The per-T prior: each class's training boxes give one coverage level, so the same regions.
    assert per_fold[0]["prior_t"]["iou"]["Atelectasis"] == pytest.approx([2 / 3, 1 / 3, 1 / 3])
    assert per_fold[0]["prior_t_q"]["0.1"][0] == pytest.approx(1.0)

    # Over folds: class 0 IoU at T=0.1 is mean(2/3, 1) with sample std |1 - 2/3| / sqrt(2).
    s = result["summary"]["model"]["iou"]
    assert s["per_class_mean"]["Atelectasis"][0] == pytest.approx(5 / 6)
    assert s["per_class_std"]["Atelectasis"][0] == pytest.approx((1 / 3) / math.sqrt(2))
    # Mass has no test box in fold 1: its mean is over fold 0 alone, without a std.
    assert s["per_class_mean"]["Mass"] == pytest.approx([0, 0, 0])
    assert s["per_class_std"]["Mass"][0] is None
    assert s["per_class_mean"]["Effusion"][0] is None  # no box at all

    # AUROC of 1'z: Cardiomegaly positive on "a", negative on "b", scores constant -> 0.5;
    # Atelectasis is positive on every test image -> undefined.
    assert per_fold[0]["auroc"]["Cardiomegaly"] == pytest.approx(0.5)
    assert per_fold[0]["auroc"]["Atelectasis"] is None

    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == 5 + 2
    row = per_image[(per_image.fold == 0) & (per_image.image_id == "b") & (per_image.box_index == 0)].iloc[0]
    assert row["class"] == "Atelectasis"
    assert row["iou"] == pytest.approx(1 / 16)
    assert row["ior"] == pytest.approx(1 / 16)
    assert row["correct_iou@0.1"] == 0 and row["correct_ior@0.1"] == 0
    # Prior region [0, .5]^2 holds the box [0, .25]^2: IoU 1/4, IoR 1/4.
    assert row["prior_iou"] == pytest.approx(0.25)
    assert row["prior_ior"] == pytest.approx(0.25)
    row = per_image[(per_image.fold == 0) & (per_image.image_id == "a") & (per_image["class"] == "Atelectasis")]
    assert row.iloc[0]["correct_iou@0.1"] == 1 and row.iloc[0]["correct_ior@0.3"] == 0

    md = (out / "results.md").read_text()
    assert "paper ours" in md and "| prior |" in md and "| prior per-T |" in md
    csv = pd.read_csv(out / "results.csv")
    paper = csv[(csv.method == "paper ours") & (csv.metric == "iou") & (csv["class"] == "Nodule")]
    assert paper["mean"].iloc[0] == pytest.approx(0.404)


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


def test_cli_evaluate_and_errors(run_dir: Path) -> None:
    from typer.testing import CliRunner

    from cxrloc.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(run_dir), "--metric", "iou", "--t", "0.1", "--fold", "1"])
    assert res.exit_code == 0, res.output
    data = json.loads((run_dir / "eval" / "results.json").read_text())
    assert data["folds"] == [1] and data["ts"] == [0.1] and data["metrics"] == ["iou"]

    from cxrloc.evaluation.evaluate import evaluate
    from cxrloc.utils import CxrlocError

    with pytest.raises(CxrlocError, match="metric"):
        evaluate(run_dir, metrics=("dice",), progress=False)
    with pytest.raises(CxrlocError, match="fold_7"):
        evaluate(run_dir, fold=7, progress=False)
    with pytest.raises(CxrlocError, match="run.json"):
        evaluate(run_dir.parent / "prepared", progress=False)


def test_predict_prepared_scales_and_area_resizes() -> None:
    from cxrloc.inference.batch import predict_prepared

    class Echo(torch.nn.Module):
        """Returns its input as ``z`` so the preprocessing can be checked."""

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    class Cache:
        def __init__(self) -> None:
            rng = np.random.default_rng(3)
            self.data = {i: rng.integers(0, 256, (8, 8), dtype=np.uint8) for i in ("p", "q", "r")}

        def image(self, image_id: str) -> np.ndarray:
            return self.data[image_id]

    cache = Cache()
    z = predict_prepared(Echo(), cache, ["r", "p", "q"], image_size=4, batch_size=2, progress=False)
    assert z.shape == (3, 1, 4, 4) and z.dtype == np.float32
    for n, i in enumerate(["r", "p", "q"]):
        x = cache.data[i].astype(np.float64) / 127.5 - 1.0
        expected = x.reshape(4, 2, 4, 2).mean(axis=(1, 3))  # 2x2 box filter
        np.testing.assert_allclose(z[n, 0], expected, atol=1e-6)
