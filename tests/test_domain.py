"""What a model was trained on, and the out-of-domain warnings of ``predict`` (real NIH images and the
real DICOM fixtures; the inverted MONOCHROME1 fixture must be flagged against NIH)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REAL_FIXTURES, SHARED_DATA, needs_shared

from cxrloc.classes import CLASSES
from cxrloc.data.domain import (
    SYNTHETIC_MARKER,
    check_image,
    intensity_features,
    synthetic_warning,
    training_domain,
)

NIH_IMAGES = SHARED_DATA / "nih" / "images"
DICOM1, DICOM2 = REAL_FIXTURES / "cr_monochrome1_jpeg.dcm", REAL_FIXTURES / "cr_monochrome2_jpeg.dcm"
SIZE = 64


def _u8(path: Path) -> np.ndarray:
    from cxrloc.data.imageio import read_image
    from cxrloc.inference.inputs import preprocess_u8

    return preprocess_u8(read_image(path), SIZE)


@pytest.fixture(scope="module")
def nih_prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A prepared folder (prepare's format) of 60 real NIH images at 64 px, and 20 other NIH images."""
    files = sorted(needs_shared(NIH_IMAGES).glob("*.png"))
    train, held_out = files[:60], files[60:80]
    root = tmp_path_factory.mktemp("nih") / "prepared"
    root.mkdir()
    np.stack([_u8(f) for f in train]).tofile(root / "images.u8")
    np.ones(len(train), np.uint8).tofile(root / "done.u8")
    (root / "cache.json").write_text(json.dumps({"version": 1, "size": SIZE, "count": len(train),
                                                 "file": "images.u8", "dtype": "uint8"}))
    rows = [{"image_id": f.name, "patient_id": i, "follow_up": 0, "view_position": "PA",
             **{c: 0 for c in CLASSES}, "annotated": 0, "cache_index": i, "boxes": "[]"} for i, f in enumerate(train)]
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    folds = [{"fold": 0, "test": [], "train_annotated": [], "train_unannotated": [f.name for f in train]}]
    (root / "splits.json").write_text(json.dumps({"version": 1, "seed": 0, "group_by": "patient", "folds": folds}))
    (root / "fingerprint.json").write_text(json.dumps({"inputs": {"image_folders": [str(NIH_IMAGES)]}}))
    return root, held_out


def test_intensity_features_by_hand() -> None:
    u8 = np.zeros((4, 4), np.uint8)
    u8[:, 2:] = 255  # half black, half white
    np.testing.assert_allclose(intensity_features(u8), [0.5, 0.5, 0.0, 0.0, 1.0])
    u8 = np.full((10, 10), 51, np.uint8)  # 0.2 everywhere
    np.testing.assert_allclose(intensity_features(u8), [0.2, 0.0, 0.2, 0.2, 0.2], atol=1e-12)


def test_real_nih_pass_and_inverted_images_are_flagged(nih_prepared: tuple[Path, list[Path]]) -> None:
    from cxrloc.data.prepared import Prepared

    root, held_out = nih_prepared
    prepared = Prepared.open(root)
    domain = training_domain(prepared, prepared.ids)
    assert domain["images"] == 60 and domain["format"] == "nih" and domain["synthetic"] is False
    assert domain["intensity"]["images_measured"] == 60 and len(domain["intensity"]["thumbnail"]) == 256
    assert synthetic_warning(domain) is None
    # 20 NIH images the statistics never saw, and the MONOCHROME2 DICOM: in domain.
    assert [check_image(_u8(f), domain) for f in held_out] == [None] * 20
    assert check_image(_u8(DICOM2), domain) is None
    # The MONOCHROME1 fixture (the negative of the one above) and inverted NIH images: flagged by their layout.
    warning = check_image(_u8(DICOM1), domain)
    assert warning is not None and "anti-correlated" in warning and "inverted" in warning
    assert all(check_image(255 - _u8(f), domain) for f in held_out)
    # A blank white picture: its grey levels are far outside.
    white = check_image(np.full((SIZE, SIZE), 250, np.uint8), domain)
    assert white is not None and "grey levels" in white and "p05 0.98 (training" in white


def test_checkpoint_onnx_and_predict_carry_the_training_data(
    nih_prepared: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cxrloc.checkpoint import make_meta, save_checkpoint
    from cxrloc.config import make_config
    from cxrloc.data.prepared import Prepared
    from cxrloc.inference.backends import load_predictor
    from cxrloc.inference.export import export_onnx
    from cxrloc.inference.predict import predict_files
    from cxrloc.model.net import build_model

    root, held_out = nih_prepared
    prepared = Prepared.open(root)
    # A prepared folder whose images came from a synthetic dataset: the marker beside them says so.
    synth = tmp_path / "synthetic"
    synth.mkdir()
    (synth / SYNTHETIC_MARKER).write_text("{}")
    (root / "fingerprint.json").write_text(json.dumps({"inputs": {"image_folders": [str(synth)]}}))
    try:
        domain = training_domain(prepared, prepared.ids)
    finally:
        (root / "fingerprint.json").write_text(json.dumps({"inputs": {"image_folders": [str(NIH_IMAGES)]}}))
    assert domain["synthetic"] is True
    cfg = make_config("tiny", ["crf=false", f"image_size={SIZE}", "patch_grid=4"])
    torch.manual_seed(0)
    model = build_model(cfg)
    run = tmp_path / "run"
    save_checkpoint(run / "fold_0" / "checkpoints" / "best.pt", {
        "config": cfg.to_dict(), "model": model.state_dict(), "meta": {**make_meta(cfg), "training_data": domain}})
    onnx = export_onnx(run, tmp_path / "m.onnx").path
    assert load_predictor(onnx).meta["training_data"] == domain  # the ONNX metadata carries it whole

    files = [str(held_out[0]), str(DICOM1)]
    capsys.readouterr()
    summary = predict_files(files, onnx, out_dir=tmp_path / "pred", overlays=False, progress=False)
    err = capsys.readouterr().err
    assert err.count("trained on 60 synthetic training images") == 1  # once per run
    assert err.count("out of domain") == 1 and "cr_monochrome1_jpeg.dcm" in err
    nih, dicom1 = summary.records
    assert len(nih["warnings"]) == 1 and "synthetic" in nih["warnings"][0]
    assert len(dicom1["warnings"]) == 2 and dicom1["warnings"][1].startswith("out of domain: its layout")
    saved = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert "synthetic" in saved["warning"] and saved["training_data"].startswith("60 synthetic training images")
    (written,) = (tmp_path / "pred").rglob("cr_monochrome1_jpeg.json")
    assert json.loads(written.read_text())["warnings"] == dicom1["warnings"]
