"""Tests of the Figure-1 style overlays and of the NIH box list reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrloc.inference.overlay import BLOB_ALPHA, class_color, gt_boxes_by_image, render_overlay

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_real_box_list() -> None:
    csv_path = DATA / "nih" / "BBox_List_2017.csv"
    if not csv_path.is_file():
        pytest.skip("../shared/data/nih/BBox_List_2017.csv is absent")
    boxes = gt_boxes_by_image(csv_path)
    assert sum(len(v) for v in boxes.values()) == 781
    assert len(boxes) == 704
    # First data row: 00013118_008.png,Atelectasis,225.08,547.02,86.78,79.19 (1024 frame).
    (first,) = [b for b in boxes["00013118_008.png"] if b[0] == "Atelectasis"]
    assert first[1:] == pytest.approx((225.084745762712 / 1024, 547.019216763771 / 1024,
                                       (225.084745762712 + 86.7796610169491) / 1024,
                                       (547.019216763771 + 79.1864406779661) / 1024))
    labels = {b[0] for v in boxes.values() for b in v}
    assert "Infiltration" in labels and "Infiltrate" not in labels


def test_bad_box_row_is_named_and_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "b.csv"
    bad.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Mass,1,2,3,4\nb.png,Mass,oops,2,3,4\n")
    boxes = gt_boxes_by_image(bad)
    assert list(boxes) == ["a.png"] and boxes["a.png"][0][0] == "Mass"
    err = capsys.readouterr().err
    assert "line 3" in err and "b.png" in err


def test_overlay_size_blob_and_gt_box() -> None:
    width, height = 200, 120  # non-square
    img = np.full((height, width), 0.5, np.float32)
    z = np.zeros((14, 4, 4), np.float32)
    z[2, 2:4, 2:4] = 0.9  # Effusion: the bottom-right quarter
    z[5, 0, 3] = 0.9  # Nodule, not present: must not be drawn
    gt = [("Mass", 0.05, 0.6, 0.3, 0.9)]
    out = render_overlay(img, z, [2], gt_boxes=gt, min_side=0)
    assert out.size == (width, height) and out.mode == "RGB"
    arr = np.asarray(out).astype(float)
    grey = 0.5 * 255
    # Deep inside the blob (away from its soft edge): grey * (1 - a) + colour * a, worked by hand.
    expected = [grey * (1 - BLOB_ALPHA) + c * BLOB_ALPHA for c in class_color(2)]
    np.testing.assert_allclose(arr[105, 180], expected, atol=1.0)
    # The non-present class's patch (top-right) is left grey; so is a point away from everything.
    np.testing.assert_allclose(arr[10, 190], [grey] * 3, atol=1.0)
    np.testing.assert_allclose(arr[40, 120], [grey] * 3, atol=1.0)
    # Ground-truth rectangle of Mass: its left edge at x = 0.05 * 200 = 10, rows 72..108.
    np.testing.assert_allclose(arr[95, 10], class_color(4), atol=1.0)
    # Legend in the top-left corner: not plain grey.
    assert np.abs(arr[:15, :60] - grey).max() > 50


def test_small_image_is_enlarged_before_drawing() -> None:
    img = np.full((100, 150), 0.5, np.float32)
    z = np.zeros((14, 4, 4), np.float32)
    z[2, 2:4, 2:4] = 0.9  # bottom-right quarter
    out = render_overlay(img, z, [2], min_side=300)
    assert out.size == (450, 300)  # shorter side 100 -> 300, aspect kept
    arr = np.asarray(out).astype(float)
    expected = [0.5 * 255 * (1 - BLOB_ALPHA) + c * BLOB_ALPHA for c in class_color(2)]
    np.testing.assert_allclose(arr[270, 420], expected, atol=1.0)  # inside the scaled quarter
    np.testing.assert_allclose(arr[100, 300], [0.5 * 255] * 3, atol=1.0)  # outside it


def test_predicted_overlay_file(tmp_path: Path) -> None:
    import torch

    from cxrloc.checkpoint import make_meta, save_checkpoint
    from cxrloc.config import make_config
    from cxrloc.inference.predict import predict_files
    from cxrloc.model.net import build_model

    src = DATA / "fixtures" / "rgb_nonsquare.jpg"
    if not src.is_file():
        pytest.skip("../shared/data/fixtures/rgb_nonsquare.jpg is absent")
    cfg = make_config("tiny", ["crf=false"])
    model = build_model(cfg)
    with torch.no_grad():
        model.unary.head.conv2.bias.fill_(-8.0)
        model.unary.head.conv2.bias[1] = 8.0  # Cardiomegaly everywhere, nothing else
    save_checkpoint(tmp_path / "run" / "fold_0" / "checkpoints" / "best.pt",
                    {"config": cfg.to_dict(), "model": model.state_dict(), "meta": make_meta(cfg)})
    out = tmp_path / "o.png"
    summary = predict_files([str(src)], tmp_path / "run", overlay=out, progress=False)
    assert summary.records[0]["present"] == ["Cardiomegaly"]
    drawn = Image.open(out)
    assert drawn.size == (1036, 885)
    plain = np.asarray(Image.open(src).convert("L"), dtype=float)
    arr = np.asarray(drawn.convert("RGB"), dtype=float)
    # Outside the legend every pixel is tinted green (Cardiomegaly's colour), so the red and
    # blue channels fall below the plain grey and green rises above it where the X-ray is dark.
    region = (slice(400, 800), slice(300, 1000))
    col = np.array(class_color(1), float)
    expected = plain[region][..., None] * (1 - BLOB_ALPHA) + col * BLOB_ALPHA
    np.testing.assert_allclose(arr[region], expected, atol=2.5)
    assert np.abs(arr[region][..., 0] - plain[region]).mean() > 10
