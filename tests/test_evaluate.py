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
    assert "| prior |" in md and "| prior per-T |" in md
    # Only 3 of NIH's 8 boxed classes have a test box: the mean is over those 3, and the paper's
    # 8-class rows are not shown beside it (issue 25); the note says so.
    assert "'mean' = mean over the 3 boxed classes that have a test box: Atelectasis, Cardiomegaly, Mass." in md
    assert "paper ours" not in md and "Paper rows not shown" in md and "(NIH's 8)" not in md
    assert result["averaged_classes"] == ["Atelectasis", "Cardiomegaly", "Mass"] and "paper_table1" not in result
    csv = pd.read_csv(out / "results.csv")
    assert not (csv.method == "paper ours").any()

    # The grid geometry (P = 8; boxes rasterised as the public Li et al. code does), worked by hand.
    # Fold 0, Atelectasis (whole-image region, 64 patches): box [0, .5]^2 -> rows/cols 0..4, 25
    # patches: IoU 25/64; box [0, .25]^2 -> 0..2, 9 patches: 9/64 (>= 0.1, unlike its exact 1/16);
    # box [.5, 1]^2 -> 4..8 cut at the border, 16 patches: 16/64 (as exact). Accuracy at
    # T = .1/.3/.5: 3/3, 1/3, 0 (exact: 2/3, 0, 0).
    g0 = per_fold[0]["grid"]
    assert g0["model"]["iou"]["Atelectasis"] == pytest.approx([1, 1 / 3, 0])
    assert g0["model"]["ior"]["Atelectasis"] == pytest.approx([1, 1 / 3, 0])  # region = whole image: IoR = IoU
    # Mass (whole image) box [.1, .2]^2 -> 0.8 -> 1, 1.6 -> 2: 4 patches, IoU 4/64 < 0.1.
    assert g0["model"]["iou"]["Mass"] == pytest.approx([0, 0, 0])
    # The prior's Atelectasis region [0, .5]^2 (rows/cols 0..3, 16 patches) against the same boxes:
    # 16/25, 9/16 (the 9 grid patches lie inside it), 1/(16 + 16 - 1) = 1/31.
    row = per_image[(per_image.fold == 0) & (per_image.image_id == "b") & (per_image.box_index == 0)].iloc[0]
    assert row["iou_grid"] == pytest.approx(9 / 64) and row["correct_iou_grid@0.1"] == 1
    assert row["prior_iou_grid"] == pytest.approx(9 / 16)
    assert g0["prior"]["iou"]["Atelectasis"] == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    sg = result["summary"]["grid"]["model"]["iou"]
    assert sg["per_class_mean"]["Atelectasis"][0] == pytest.approx(1.0)  # fold 1: box [0, .5]^2, 25/64 >= .1
    assert "## IOU accuracy (grid geometry, as published tables)" in md
    grid_rows = csv[(csv.method == "model") & (csv.metric == "iou") & (csv["class"] == "Atelectasis")]
    assert sorted(grid_rows.geometry.unique()) == ["exact", "grid"]


def test_cli_evaluate_and_errors(run_dir: Path) -> None:
    from typer.testing import CliRunner

    from cxrloc.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(run_dir), "--metric", "iou", "--t", "0.1", "--fold", "1"])
    assert res.exit_code == 0, res.output
    # One fold of two: its own folder, never the one of the evaluation over every fold (issue 25).
    data = json.loads((run_dir / "eval_fold1" / "results.json").read_text())
    assert data["folds"] == [1] and data["ts"] == [0.1] and data["metrics"] == ["iou"]

    from cxrloc.evaluation.evaluate import evaluate
    from cxrloc.utils import CxrlocError

    with pytest.raises(CxrlocError, match="metric"):
        evaluate(run_dir, metrics=("dice",), progress=False)
    with pytest.raises(CxrlocError, match="fold_7"):
        evaluate(run_dir, fold=7, progress=False)
    with pytest.raises(CxrlocError, match="run.json"):
        evaluate(run_dir.parent / "prepared", progress=False)


def test_classification_at_the_operating_point_by_hand(run_dir: Path) -> None:
    """Sensitivity, specificity and calls per image at a hand-written calibration of the hand run.

    Every class: p = sigmoid(log(1 + 1'z) - 2), present when p >= 0.5, except Mass (never present).
    Classes 0 and 4 have 1'z = 64 (p = 65 / (65 + e^2) = 0.898), the others 1'z ~ 0 (p = 0.119), so only
    Atelectasis is called present, on every image. Labels: "a" = {Atelectasis, Cardiomegaly, Nodule},
    "b" = {Atelectasis, Mass}; fold 0 tests a and b, fold 1 tests a.
    """
    from cxrloc.calibration import Calibration, ClassCalibration
    from cxrloc.classes import CLASSES
    from cxrloc.evaluation.evaluate import evaluate

    per = [ClassCalibration(a=1.0, b=-2.0, threshold=None if c == "Mass" else 0.5, source="val") for c in CLASSES]
    for fold in (0, 1):
        Calibration(list(CLASSES), per).save(run_dir / f"fold_{fold}" / "calibration.json")
    result = evaluate(run_dir, ts=(0.1,), fold="all", progress=False)
    f0 = {f["fold"]: f for f in result["per_fold"]}[0]["classification"]
    assert f0["operating_point"]["rule"] == "youden" and f0["operating_point"]["calibrated"]
    assert f0["sensitivity"]["Atelectasis"] == 1.0 and f0["specificity"]["Atelectasis"] is None
    assert (f0["sensitivity"]["Cardiomegaly"], f0["specificity"]["Cardiomegaly"]) == (0.0, 1.0)
    assert (f0["sensitivity"]["Mass"], f0["specificity"]["Mass"]) == (0.0, 1.0)  # 1'z = 64 but never present
    assert (f0["sensitivity"]["Effusion"], f0["specificity"]["Effusion"]) == (None, 1.0)
    assert f0["positives"]["Atelectasis"] == 2 and f0["present_per_image"] == 1.0
    assert f0["labels_per_image"] == pytest.approx(2.5)
    s = result["summary"]["classification"]
    # Over folds: Cardiomegaly's specificity exists in fold 0 only (fold 1 tests "a", a positive).
    assert s["specificity"]["mean"]["Cardiomegaly"] == 1.0 and s["specificity"]["std"]["Cardiomegaly"] is None
    assert s["sensitivity"]["mean"]["Atelectasis"] == 1.0 and s["sensitivity"]["std"]["Atelectasis"] == 0.0
    # Pooled over the three test images: 1 call each; labels 3 + 2 + 3.
    assert s["present_per_image"] == 1.0 and s["labels_per_image"] == pytest.approx(8 / 3)
    assert s["operating_points"] == ["Youden's J on validation images"] * 2

    out = Path(result["out_dir"])
    p_hi, p_lo = 65 / (65 + math.exp(2)), 1 / (1 + math.exp(2))
    classes = pd.read_csv(out / "per_image_classes.csv")
    assert len(classes) == 3 * len(CLASSES)
    row = classes[(classes.fold == 0) & (classes.image_id == "b") & (classes["class"] == "Mass")].iloc[0]
    assert (row["label"], row["score"], row["present"]) == (1, pytest.approx(64.0, abs=1e-3), 0)
    assert row["probability"] == pytest.approx(p_hi, abs=1e-5)
    row = classes[(classes.fold == 1) & (classes["class"] == "Nodule")].iloc[0]
    assert (row["label"], row["present"]) == (1, 0) and row["probability"] == pytest.approx(p_lo, abs=1e-5)
    boxes = pd.read_csv(out / "per_image.csv")
    row = boxes[(boxes.fold == 0) & (boxes.image_id == "a") & (boxes["class"] == "Cardiomegaly")].iloc[0]
    assert row["present"] == 0 and row["probability"] == pytest.approx(p_lo, abs=1e-5)
    csv = pd.read_csv(out / "results.csv")
    sens = csv[(csv.metric == "sensitivity") & (csv["class"] == "Atelectasis")]["mean"].iloc[0]
    assert sens == 1.0
    assert csv[csv.metric == "labels_per_image"]["mean"].iloc[0] == pytest.approx(8 / 3, abs=1e-5)
    md = (out / "results.md").read_text()
    assert "| Cardiomegaly | 2 | 0.500" in md and "Classes called present per test image: 1.00" in md
    assert "labelled findings per image: 2.67" in md


def test_uncalibrated_run_reports_the_tau_hat_operating_point(run_dir: Path) -> None:
    from cxrloc.evaluation.evaluate import evaluate

    result = evaluate(run_dir, ts=(0.1,), fold=0, progress=False)
    c = result["per_fold"][0]["classification"]
    assert c["operating_point"]["rule"] == "tau_hat" and "cxrloc calibrate" in c["operating_point"]["note"]
    # tau_hat from the checkpoint: 1'z = 64 calls Atelectasis and Mass present on both test images.
    assert c["present_per_image"] == 2.0 and c["sensitivity"]["Mass"] == 1.0 and c["specificity"]["Mass"] == 0.0
    classes = pd.read_csv(Path(result["out_dir"]) / "per_image_classes.csv")
    assert classes["probability"].isna().all()


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
        for label in set(LABELS.values()):
            assert any(line.startswith(label + " ") for line in lines), label
        assert any(line.rstrip().endswith("mean") for line in lines)  # the last column is not cut
        assert "paper ours" not in text  # never beside the exact tables
        # As if every NIH class had a test box: the paper's rows come beside the grid tables only,
        # each label on one line beside its numbers, in 80 columns.
        shown = {**result, "paper_table1": {"T": 0.1}}
        shown.pop("paper_table1_omitted", None)
        console = Console(width=80, record=True, file=io.StringIO())
        for table in rich_tables(shown, 80, geometries=("exact", "grid")):
            console.print(table)
        text = console.export_text()
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= 80
        exact_part, grid_part = text.split("IOU accuracy (grid geometry", 1)
        assert "paper ours" not in exact_part and "beside the grid tables only" in " ".join(grid_part.split())
        for label in set(LABELS.values()) | {"paper ours", "paper Li2018"}:
            assert any(line.startswith(label + " ") for line in grid_part.splitlines()), label


def test_cli_geometry_chooses_the_tables_and_both_are_saved(run_dir: Path) -> None:
    from conftest import one_line, run_cli

    code, text = run_cli("evaluate", run_dir, "--t", "0.1")
    assert code == 0, text
    assert "exact geometry" not in text and "grid geometry" not in text  # the default: today's exact tables
    saved = json.loads((run_dir / "eval" / "results.json").read_text())
    assert "grid" in saved["summary"] and saved["geometries"] == ["exact", "grid"]
    code, text = run_cli("evaluate", run_dir, "--t", "0.1", "--geometry", "both")
    assert code == 0, text
    flat = one_line(text)
    assert flat.index("IOU accuracy (exact geometry") < flat.index("IOU accuracy (grid geometry, as published tables")
    assert flat.count("prior per-T") >= 4  # model and both priors in each of the 4 tables
    code, text = run_cli("evaluate", run_dir, "--t", "0.1", "--geometry", "grid")
    assert code == 0 and "exact geometry" not in text and "IOU accuracy (grid geometry" in one_line(text)
    code, text = run_cli("evaluate", run_dir, "--geometry", "touch")
    assert code == 2 and "--geometry must be exact, grid or both" in one_line(text)


def test_eval_dir_one_folder_per_options(tmp_path: Path) -> None:
    """RunDir.eval_dir is the one place that names an evaluation's folder; every option that
    changes the numbers gives another name, in a fixed order (split/data, fold, checkpoint, views)."""
    from cxrloc.rundir import RunDir
    from cxrloc.utils import CxrlocError

    run = RunDir(tmp_path)
    assert run.eval_dir() == tmp_path / "eval"
    assert run.eval_dir("val") == tmp_path / "eval_val"
    assert run.eval_dir(data_name="ext") == tmp_path / "eval_on_ext"
    assert run.eval_dir(fold=0) == tmp_path / "eval_fold0"  # fold 0 is a fold, not "no fold"
    assert run.eval_dir(which="last") == tmp_path / "eval_last"
    assert run.eval_dir("val", fold=2, which="last", tta=5) == tmp_path / "eval_val_fold2_last_tta5"
    assert run.eval_dir(data_name="ext", fold=1, tta=1) == tmp_path / "eval_on_ext_fold1"
    names = {run.eval_dir(s, data_name=d, fold=f, which=w, tta=t)
             for s in ("test", "val") for d in (None, "ext") for f in (None, 1) for w in ("best", "last")
             for t in (1, 3) if not (d and s == "val")}
    assert len(names) == 2 * 2 * 2 * 3  # (test, val, ext) x fold x checkpoint x views: all distinct
    with pytest.raises(CxrlocError, match="Unknown checkpoint"):
        run.eval_dir(which="final")
