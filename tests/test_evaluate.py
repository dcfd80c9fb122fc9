"""evaluate end to end on the tiny hand-written run of ``conftest.write_hand_run``.

The model's head is set so that z is known without running anything else: class 0 and
class 4 detect every patch (z ~ 1), all other classes detect none (z ~ 0). IoU and IoR of
a box with the whole-image region both equal the box's area (region and union are the whole
image), and an empty region scores 0, so every number is worked by hand.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest


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


def test_terminal_tables_fit_80_columns_and_name_one_fold(run_dir: Path) -> None:
    from rich.console import Console

    from cxrloc.evaluation.evaluate import evaluate
    from cxrloc.evaluation.report import LABELS, rich_tables

    one = evaluate(run_dir, fold=1, progress=False)
    both = evaluate(run_dir, progress=False)
    for result, title in ((one, "IOU accuracy (fold 1)"), (both, "IOU accuracy (mean over 2 folds)")):
        console = Console(width=80, record=True, file=io.StringIO())
        for table in rich_tables(result, 80):
            console.print(table)
        text = console.export_text()
        assert title in text and "mean over folds" not in text
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= 80
        # Every method label on one line, beside its numbers (no label folded onto a second line).
        for label in set(LABELS.values()) | {"paper ours", "paper Li2018"}:
            assert any(line.startswith(label + " ") for line in lines), label
        assert any(line.rstrip().endswith("mean") for line in lines)  # the last column is not cut
