"""One's own data end to end: a plain table dataset and a COCO dataset (written by the test, tiny
images, a class list that is not NIH's), prepared, trained for one epoch, thresholds fitted,
evaluated, predicted with an overlay and exported to ONNX, then run with onnxruntime.

What is checked against the data the test wrote (not against cxrloc's own readers): the class
list and its order everywhere (prepared folder, run config, checkpoint, evaluation, prediction
JSON, overlay legend, ONNX metadata and output width), the number of test boxes per class from
the written records and the folds, and the prediction's scores as sums of onnxruntime's maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import OWN_CLASSES, run_cli, write_own_coco, write_own_dataset, write_own_tables
from PIL import Image

from cxrloc.checkpoint import load_checkpoint
from cxrloc.classes import CLASSES

TRAIN = ["--preset", "tiny", "--epochs", "1", "--set", "device=cpu", "--set", "workers=0", "--set", "batch_size=4",
         "--quiet"]


def _cli(*args: object) -> str:
    code, text = run_cli(*args)
    assert code == 0, f"cxrloc {args[0]} failed:\n{text}"
    return text


@pytest.mark.parametrize("data_format", ["table", "coco"])
def test_own_dataset_prepare_train_evaluate_predict_export(tmp_path: Path, data_format: str) -> None:
    data = write_own_dataset(tmp_path)
    records = data["records"]
    if data_format == "table":
        labels, boxes = write_own_tables(tmp_path, records)
        source = ["--format", "table", "--labels", labels, "--boxes", boxes]
        want_classes = sorted(OWN_CLASSES)  # the labels the tables use, by name
    else:
        boxes = write_own_coco(tmp_path, records)
        source = ["--format", "coco", "--boxes", boxes]
        want_classes = ["Cavity", "Miliary", "Calcification"]  # categories by id: 10, 20, 30
    assert want_classes != list(CLASSES[:3])
    prep, run = tmp_path / "prep", tmp_path / "run"

    _cli("prepare", data["images"], *source, "--out", prep, "--size", "64", "--folds", "2",
         "--unannotated-fraction", "1")
    assert json.loads((prep / "classes.json").read_text())["classes"] == want_classes

    _cli("train", prep, "--out", run, "--fold", "0", *TRAIN)
    fold = run / "fold_0"
    assert json.loads((fold / "config.json").read_text())["classes"] == want_classes
    ckpt = load_checkpoint(fold / "checkpoints" / "best.pt")
    assert ckpt["meta"]["classes"] == want_classes
    assert ckpt["model"]["unary.head.conv2.bias"].shape == (len(want_classes),)

    _cli("fit-thresholds", run)
    thresholds = json.loads((fold / "thresholds.json").read_text())
    assert list(thresholds["classes"]) == want_classes

    _cli("evaluate", run)
    result = json.loads((run / "eval" / "results.json").read_text())
    assert result["classes"] == want_classes and "paper_table1" not in result
    # Test boxes per class, counted from what the test wrote and fold 0's test images.
    test_ids = set(json.loads((prep / "splits.json").read_text())["folds"][0]["test"])
    want_boxes = {c: sum(1 for r in records if r["box"] and r["image"] in test_ids and r["box"][0] == c)
                  for c in want_classes}
    assert sum(want_boxes.values()) > 0
    assert result["summary"]["boxes"] == want_boxes
    # Every class with a box is boxed (the mean is over them), whatever its name.
    assert result["boxed_classes"] == want_classes
    assert set(result["summary"]["model"]["iou"]["per_class_mean"]) == set(want_classes)
    md = (run / "eval" / "results.md").read_text()
    assert "Cavity" in md and "Atelectasis" not in md and "paper" not in md

    # predict on a boxed image, with the overlay of its ground-truth classes, from the boxes table or the
    # COCO file; other patients' images have the same file name (scan1.png) and other classes.
    record = next(r for r in records if r["box"] and r["image"].endswith(".png"))
    image = data["images"] / record["image"]
    overlay, pred = tmp_path / "overlay.png", tmp_path / "pred.json"
    _cli("predict", image, "--model", run, "--overlay", overlay, "--json", pred, "--boxes", boxes,
         "--overlay-classes", "gt")
    torch_record = json.loads(pred.read_text())
    assert [c["name"] for c in torch_record["classes"]] == want_classes
    legend = Image.open(overlay).info["Description"]
    # The legend lists every class (present / not present); the ground-truth class alone is drawn.
    assert Image.open(overlay).info["Drawn"] == record["box"][0], legend
    assert all(name in legend for name in want_classes) and not any(c in legend for c in CLASSES)
    _cli("predict", image, "--model", run, "--overlay", overlay, "--json", pred, "--overlay-classes", "all")
    legend = Image.open(overlay).info["Description"]
    assert all(name in legend for name in want_classes), legend

    _cli("export", run, "--check-image", image)
    onnx_path = run / "export" / "model.onnx"
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_path)).metadata_props}
    assert meta["classes"] == want_classes
    assert list(meta["thresholds"]["classes"]) == want_classes

    # onnxruntime's own run: one map per class, and predict's scores are their sums (1'z).
    from cxrloc.data.imageio import read_image
    from cxrloc.inference.inputs import preprocess

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = preprocess(read_image(image), meta["image_size"])[None].astype(np.float32)
    z = session.run(["z"], {session.get_inputs()[0].name: x})[0]
    assert z.shape == (1, len(want_classes), meta["patch_grid"], meta["patch_grid"])
    _cli("predict", image, "--model", onnx_path, "--json", tmp_path / "pred_onnx.json")
    onnx_record = json.loads((tmp_path / "pred_onnx.json").read_text())
    assert onnx_record["backend"] == "onnx"
    assert [c["name"] for c in onnx_record["classes"]] == want_classes
    sums = z[0].reshape(len(want_classes), -1).sum(axis=1)
    assert [c["score"] for c in onnx_record["classes"]] == pytest.approx(sums.tolist(), abs=1e-5)
    assert [c["score"] for c in onnx_record["classes"]] == pytest.approx(
        [c["score"] for c in torch_record["classes"]], abs=1e-4)
