"""Tests of the Figure-1 style overlays and of the NIH box list reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import NIH_DIR, REAL_FIXTURES, needs_shared
from PIL import Image

from cxrloc.classes import CLASSES
from cxrloc.inference.overlay import (
    FILL_ALPHA,
    HALO,
    NO_FINDING,
    PALETTE,
    LabelPlacer,
    color_of,
    gt_boxes_by_image,
    gt_boxes_of,
    percent,
    render_overlay,
    save_overlay,
)


def test_real_box_list() -> None:
    csv_path = needs_shared(NIH_DIR / "BBox_List_2017.csv")
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


def _fill(grey: float | np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """A light fill worked by hand: grey * (1 - a) + colour * a."""
    return np.asarray(grey, float)[..., None] * (1 - FILL_ALPHA) + np.array(color, float) * FILL_ALPHA


def test_overlay_fill_outline_gt_box_and_legend_panel() -> None:
    width, height = 200, 120  # non-square
    img = np.full((height, width), 0.5, np.float32)
    z = np.zeros((14, 4, 4), np.float32)
    z[2, 2:4, 2:4] = 0.9  # Effusion: the bottom-right quarter
    z[5, 0, 3] = 0.9  # Nodule, not present: must not be drawn
    gt = [("Mass", 0.05, 0.6, 0.3, 0.9)]
    probs = np.full(14, 0.01)
    probs[2], probs[5] = 0.83, 0.2
    thresholds = [0.4] * 14
    out = render_overlay(img, z, [2], gt_boxes=gt, min_side=0, probabilities=probs, thresholds=thresholds)
    assert out.size[0] > width and out.size[1] >= height and out.mode == "RGB"  # the legend is beside the X-ray
    arr = np.asarray(out).astype(float)
    grey = 0.5 * 255
    # Deep inside the region: the light fill of the first palette colour (the only, most probable, class).
    np.testing.assert_allclose(arr[100, 170], _fill(grey, color_of(0)), atol=1.0)
    # Its outline: the colour itself on the region's edge (x = 100 .. 100 + line width), a dark halo on both sides.
    np.testing.assert_allclose(arr[100, 100], color_of(0), atol=1.0)
    np.testing.assert_allclose(arr[100, 99], HALO, atol=1.0)
    # The non-present class's patch (top-right) is left grey; so is a point away from everything.
    np.testing.assert_allclose(arr[10, 190], [grey] * 3, atol=1.0)
    np.testing.assert_allclose(arr[40, 120], [grey] * 3, atol=1.0)
    # Ground-truth rectangle of Mass (not drawn as a region: the next colour): left edge x = 10, rows 72..108.
    np.testing.assert_allclose(arr[95, 10], color_of(1), atol=1.0)
    assert out.info["Description"] == (
        "cxrloc overlay; Present (p >= threshold); Effusion  83%  (>= 40%); Not present; Nodule  20%; "
        "Atelectasis  1%; Cardiomegaly  1%; Infiltration  1%; Mass  1%; + 8 more, each <= 1%")


def test_overlapping_regions_never_mix_colours_and_the_most_probable_is_on_top() -> None:
    img = np.full((160, 160), 0.3, np.float32)
    z = np.zeros((14, 8, 8), np.float32)
    z[0, 2:6, 2:6] = 0.9  # Atelectasis: rows / columns 40..120
    z[4, 4:8, 4:8] = 0.9  # Mass: 80..160, overlapping Atelectasis on 80..120
    probs = np.zeros(14)
    probs[0], probs[4] = 0.6, 0.9  # Mass the more probable: first colour, owns the overlap, outline on top
    arr = np.asarray(render_overlay(img, z, [0, 4], probabilities=probs, min_side=0)).astype(float)
    grey = 0.3 * 255
    mass, atel = color_of(0), color_of(1)
    np.testing.assert_allclose(arr[100, 100], _fill(grey, mass), atol=1.0)  # overlap: Mass's fill only
    np.testing.assert_allclose(arr[140, 140], _fill(grey, mass), atol=1.0)
    np.testing.assert_allclose(arr[60, 60], _fill(grey, atel), atol=1.0)
    # Mass's outline crosses Atelectasis's region at x = 80 (rows 80..120): drawn over it in Mass's colour.
    np.testing.assert_allclose(arr[100, 80], mass, atol=1.0)
    # Every pixel of the X-ray is grey, one fill, one outline colour or the halo: never a blend of two fills.
    allowed = np.array([[grey] * 3, _fill(grey, mass), _fill(grey, atel), mass, atel, HALO], float)
    pic = arr[:, :160].reshape(-1, 3)
    nearest = np.abs(pic[:, None, :] - allowed[None]).max(axis=-1).min(axis=1)
    labels = np.zeros((160, 160), bool)  # the probability labels sit on dark boxes: leave them out
    labels[np.all(arr[:, :160] < 60, axis=-1)] = True
    assert nearest.reshape(160, 160)[~_grow(labels, 20)].max() <= 1.0


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    from cxrloc.inference.overlay import _dilate

    return _dilate(mask, r)


def test_labels_are_placed_where_they_overlap_no_other_label() -> None:
    placer = LabelPlacer(200, 100)
    anchor = (50.0, 40.0, 90.0, 60.0)
    first = placer.place(anchor, 30, 10)
    assert first == (50.0, 28.0, 80.0, 38.0)  # above the box's top-left corner, 2 px gap
    second = placer.place(anchor, 30, 10)
    assert second == (50.0, 62.0, 80.0, 72.0)  # below it
    more = [placer.place(anchor, 30, 10) for _ in range(10)]
    rects = [first, second, *more]
    for i, a in enumerate(rects):
        assert 0 <= a[0] and 0 <= a[1] and a[2] <= 200 and a[3] <= 100
        for b in rects[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    # Four ground-truth boxes of neighbouring findings: four labels, none over another.
    img = np.full((200, 200), 0.5, np.float32)
    gt = [("Mass", 0.30, 0.30, 0.50, 0.50), ("Nodule", 0.32, 0.31, 0.45, 0.45), ("Effusion", 0.31, 0.29, 0.5, 0.6),
          ("Atelectasis", 0.3, 0.32, 0.55, 0.55)]
    out = np.asarray(render_overlay(img, np.zeros((14, 4, 4), np.float32), [], gt_boxes=gt, min_side=0)).astype(float)
    dark = np.all(out[:, :200] < 5, axis=-1)  # label backgrounds (black at 190/255 over grey) are not pure black
    assert dark.sum() < 0.2 * dark.size


def test_small_image_is_enlarged_before_drawing() -> None:
    img = np.full((100, 150), 0.5, np.float32)
    z = np.zeros((14, 4, 4), np.float32)
    z[2, 2:4, 2:4] = 0.9  # bottom-right quarter
    out = render_overlay(img, z, [2], min_side=300)
    assert out.size[1] == 300 and out.info["Image-Width"] == "450"  # shorter side 100 -> 300, aspect kept
    arr = np.asarray(out).astype(float)
    np.testing.assert_allclose(arr[270, 400], _fill(0.5 * 255, color_of(0)), atol=1.0)  # inside the scaled quarter
    np.testing.assert_allclose(arr[100, 300], [0.5 * 255] * 3, atol=1.0)  # outside it


def test_predicted_overlay_file(tmp_path: Path) -> None:
    import torch

    from cxrloc.checkpoint import make_meta, save_checkpoint
    from cxrloc.config import make_config
    from cxrloc.inference.predict import predict_files
    from cxrloc.model.net import build_model

    src = REAL_FIXTURES / "rgb_nonsquare.jpg"
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
    assert drawn.size[1] == 885 and drawn.size[0] > 1036 and drawn.text["Image-Width"] == "1036"
    plain = np.asarray(Image.open(src).convert("L"), dtype=float)
    arr = np.asarray(drawn.convert("RGB"), dtype=float)
    # Away from the outline and the label every pixel has Cardiomegaly's light fill (the first colour).
    region = (slice(400, 800), slice(300, 1000))
    np.testing.assert_allclose(arr[region], _fill(plain[region], color_of(0)), atol=2.5)
    assert np.abs(arr[region][..., 2] - plain[region]).mean() > 10


# --------------------------------------------------------------------------- colours and "no finding"


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of 8-bit sRGB colours (..., 3), written from the standards' formulas."""
    c = np.asarray(rgb, float) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference (Sharma, Wu and Dalal 2005), kL = kC = kH = 1."""
    l1, a1, b1 = np.moveaxis(np.asarray(lab1, float), -1, 0)
    l2, a2, b2 = np.moveaxis(np.asarray(lab2, float), -1, 0)
    cbar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(cbar**7 / (cbar**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p, h2p = np.degrees(np.arctan2(b1, a1p)) % 360, np.degrees(np.arctan2(b2, a2p)) % 360
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0, dh)
    d_l, d_c = l2 - l1, c2p - c1p
    d_h = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    lbar, cbarp = (l1 + l2) / 2, (c1p + c2p) / 2
    hsum = h1p + h2p
    hbar = np.where(np.abs(h1p - h2p) > 180, np.where(hsum < 360, (hsum + 360) / 2, (hsum - 360) / 2), hsum / 2)
    hbar = np.where(c1p * c2p == 0, hsum, hbar)
    t = (1 - 0.17 * np.cos(np.radians(hbar - 30)) + 0.24 * np.cos(np.radians(2 * hbar))
         + 0.32 * np.cos(np.radians(3 * hbar + 6)) - 0.20 * np.cos(np.radians(4 * hbar - 63)))
    s_l = 1 + 0.015 * (lbar - 50) ** 2 / np.sqrt(20 + (lbar - 50) ** 2)
    s_c, s_h = 1 + 0.045 * cbarp, 1 + 0.015 * cbarp * t
    r_t = -np.sin(np.radians(60 * np.exp(-(((hbar - 275) / 25) ** 2)))) * 2 * np.sqrt(cbarp**7 / (cbarp**7 + 25.0**7))
    return np.sqrt((d_l / s_l) ** 2 + (d_c / s_c) ** 2 + (d_h / s_h) ** 2 + r_t * (d_c / s_c) * (d_h / s_h))


def test_ciede2000_of_the_test_matches_sharmas_table() -> None:
    pairs = [  # Sharma et al. 2005, Table 1: pairs 1, 7, 17, 25, 32
        ((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425),
        ((50, 0, 0), (50, -1, 2), 2.3669),
        ((50, 2.5, 0), (73, 25, -18), 27.1492),
        ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
        ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ]
    for lab1, lab2, expected in pairs:
        assert _ciede2000(np.array(lab1), np.array(lab2)) == pytest.approx(expected, abs=1e-4)
    np.testing.assert_allclose(_srgb_to_lab(np.array([255, 0, 0])), [53.2408, 80.0925, 67.2032], atol=1e-3)


def test_palette_is_okabe_ito_and_its_colours_stay_apart() -> None:
    assert PALETTE[:3] == ((230, 159, 0), (86, 180, 233), (0, 158, 115))  # Okabe and Ito 2008, without black
    colours = np.array(PALETTE, float)
    lab = _srgb_to_lab(colours)
    i, j = np.triu_indices(len(PALETTE), k=1)
    assert _ciede2000(lab[i], lab[j]).min() >= 10.0
    own_grey = np.stack([lab[:, 0], np.zeros(len(lab)), np.zeros(len(lab))], -1)
    assert _ciede2000(lab, own_grey).min() >= 20.0  # every colour far from the grey of a radiograph
    assert color_of(len(PALETTE)) == PALETTE[0]  # cycled (with a dashed outline) beyond the palette


def test_percent_never_rounds_to_a_false_certainty() -> None:
    assert [percent(p) for p in (0.0, 0.004, 0.006, 0.5, 0.834, 0.994, 0.996, 1.0)] == [
        "<1%", "<1%", "1%", "50%", "83%", "99%", ">99%", ">99%"]


def test_overlay_without_a_present_class_says_so(tmp_path: Path) -> None:

    img = np.full((512, 600), 0.5, np.float32)
    z = np.zeros((len(CLASSES), 4, 4), np.float32)
    z[2] = 0.9  # Effusion everywhere in z, but not called present: nothing may be drawn for it
    out = render_overlay(img, z, [], probabilities=np.full(len(CLASSES), 0.2))
    arr = np.asarray(out).astype(float)
    grey = 0.5 * 255
    # Nothing drawn on the X-ray: all of it is the plain grey image; the legend is in the panel beside it.
    assert out.size[0] > 600
    np.testing.assert_allclose(arr[:, :600], grey, atol=1.0)
    assert np.all(arr[:40, 600:] > 240, axis=-1).sum() > 100  # white text in the panel
    saved = save_overlay(out, tmp_path / "none.png")
    text = Image.open(saved).text["Description"]
    assert text.startswith(f"cxrloc overlay; Present (p >= threshold); {NO_FINDING}; Not present; Atelectasis  20%")
    # With a class called present, it is listed under "Present" and the message is gone.
    shown = render_overlay(img, z, [2], probabilities=np.full(len(CLASSES), 0.834))
    assert shown.info["Description"].startswith("cxrloc overlay; Present (p >= threshold); Effusion  83%; Not present")


def _cardiomegaly_run(root: Path, calibration: dict | None) -> Path:
    """A model with Cardiomegaly (z ~ 1) everywhere and nothing else, optionally with a calibration file."""
    import json

    import torch

    from cxrloc.checkpoint import make_meta, save_checkpoint
    from cxrloc.config import make_config
    from cxrloc.model.net import build_model

    cfg = make_config("tiny", ["crf=false"])
    model = build_model(cfg)
    with torch.no_grad():
        model.unary.head.conv2.bias.fill_(-8.0)
        model.unary.head.conv2.bias[1] = 8.0
    save_checkpoint(root / "fold_0" / "checkpoints" / "best.pt",
                    {"config": cfg.to_dict(), "model": model.state_dict(), "meta": make_meta(cfg)})
    if calibration is not None:
        (root / "fold_0" / "calibration.json").write_text(json.dumps(calibration))
    return root


def test_predicted_overlay_shows_present_classes_only_or_all(tmp_path: Path) -> None:
    from cxrloc.calibration import Calibration, ClassCalibration
    from cxrloc.inference.predict import predict_files

    src = REAL_FIXTURES / "rgb_nonsquare.jpg"
    # Every class: p = sigmoid(log(1 + 1'z) - 3); Cardiomegaly (1'z = 64: p = 65 / (65 + e^3) = 0.764) is
    # present only if its threshold is below that.
    def calibration(card_threshold: float | None) -> dict:
        per = [ClassCalibration(a=1.0, b=-3.0, threshold=card_threshold if k == 1 else None, source="val")
               for k in range(len(CLASSES))]
        return Calibration(list(CLASSES), per).to_json()

    plain = np.asarray(Image.open(src).convert("L"), dtype=float)
    region = (slice(400, 800), slice(300, 1000))

    none = _cardiomegaly_run(tmp_path / "none", calibration(0.9))
    rec = predict_files([str(src)], none, overlay=tmp_path / "none.png", json_path=tmp_path / "n.json",
                        progress=False).records[0]
    assert rec["present"] == [] and rec["classes"][1]["probability"] == pytest.approx(65 / (65 + np.exp(3)), abs=1e-4)
    drawn = Image.open(tmp_path / "none.png")
    assert "No finding called present (Youden's J on validation)" in drawn.text["Description"]
    drawn_rgb = np.asarray(drawn.convert("RGB"), float)[region]
    np.testing.assert_allclose(drawn_rgb, np.repeat(plain[region][..., None], 3, axis=-1), atol=2.5)

    predict_files([str(src)], none, overlay=tmp_path / "all.png", json_path=tmp_path / "a.json",
                  overlay_classes="all", progress=False)
    text = Image.open(tmp_path / "all.png").text["Description"]
    assert "Cardiomegaly  76%;" in text and text.count("%") == len(CLASSES)
    arr = np.asarray(Image.open(tmp_path / "all.png").convert("RGB"), float)
    np.testing.assert_allclose(arr[region], _fill(plain[region], color_of(0)), atol=2.5)

    present = _cardiomegaly_run(tmp_path / "present", calibration(0.5))
    rec = predict_files([str(src)], present, overlay=tmp_path / "p.png", json_path=tmp_path / "p.json",
                        progress=False).records[0]
    assert rec["present"] == ["Cardiomegaly"]
    text = Image.open(tmp_path / "p.png").text["Description"]
    assert text.startswith("cxrloc overlay; Present (p >= threshold); Cardiomegaly  76%  (>= 50%); Not present; ")
    assert text.endswith("; + 8 more, each <= 5%") and text.count("  5%") == 5  # the 5 most probable others


def test_gt_boxes_of_tables_and_coco_by_path_below_the_data_folder(tmp_path: Path) -> None:
    import json

    from cxrloc.utils import CxrlocError

    # A boxes table (pixels of each file): two images named scan0.png in two patient folders.
    table = tmp_path / "boxes.csv"
    table.write_text("image,label,x,y,w,h,reader\n"
                     "p1/scan0.png,Cavity,10,20,30,40,a\n"
                     "p2/scan0.png,Miliary,0,0,5,5,a\n"
                     "p2/scan0.png,Miliary,90,50,20,20,b\n"  # past the right edge of a 100 x 60 image: clipped
                     "p3/other.png,Cavity,1,x,2,2,a\n")  # non-numeric: not drawn
    gt = gt_boxes_by_image(table)
    got = gt_boxes_of(gt, tmp_path / "data" / "p1" / "scan0.png", (100, 60))
    assert got == [("Cavity", pytest.approx(0.1), pytest.approx(20 / 60), pytest.approx(0.4), pytest.approx(1.0))]
    got = gt_boxes_of(gt, "/elsewhere/p2/scan0.png", (100, 60))
    assert [b[0] for b in got] == ["Miliary", "Miliary"]
    assert got[1][1:] == pytest.approx((0.9, 50 / 60, 1.0, 1.0))
    assert gt_boxes_of(gt, "/x/scan0.png", (100, 60)) == []  # two images end in scan0.png: neither is guessed
    assert gt_boxes_of(gt, "/x/other.png", (100, 60)) == []

    # COCO: width / height of the entry are the frame; an entry without them uses the file's size.
    coco = tmp_path / "ann.json"
    coco.write_text(json.dumps({
        "categories": [{"id": 7, "name": "Cavity"}],
        "images": [{"id": 1, "file_name": "p1/scan0.png", "width": 200, "height": 100},
                   {"id": 2, "file_name": "p2/scan0.png"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [20, 10, 40, 30]},
                        {"id": 2, "image_id": 2, "category_id": 7, "bbox": [5, 5, 10, 10]}],
    }))
    gt = gt_boxes_by_image(coco)
    assert gt_boxes_of(gt, "/d/p1/scan0.png", (50, 25)) == [("Cavity", 0.1, 0.1, 0.3, 0.4)]
    assert gt_boxes_of(gt, "/d/p2/scan0.png", (50, 25)) == [("Cavity", 0.1, 0.2, 0.3, 0.6)]
    assert gt_boxes_of(gt, "/d/p2/scan0.png") == []  # pixel boxes need the image's size

    other = tmp_path / "other.csv"
    other.write_text("file,finding\na.png,Cavity\n")
    with pytest.raises(CxrlocError, match="neither NIH's box list"):
        gt_boxes_by_image(other)
