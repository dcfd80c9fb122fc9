"""``prepare --format coco``: the real TBX11K fixture, a COCO file written by the test, bad annotations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    OWN_CLASSES,
    REAL_FIXTURES,
    SHARED_DATA,
    needs_shared,
    one_line,
    run_cli,
    write_own_coco,
    write_own_dataset,
)
from PIL import Image

from cxrloc.data.prepare import prepare
from cxrloc.data.prepared import Prepared
from cxrloc.utils import CxrlocError

TBX = SHARED_DATA / "fixtures" / "tbx11k"
"""The whole TBX11K sample (3 images, 1.1 MB): prepare needs two boxed images for its folds."""
TBX_ONE = REAL_FIXTURES / "tbx11k"
"""One of its images (tb/tb0007.png, two boxes) and its COCO file reduced to that image, in the repository."""


def test_tbx11k_one_image_in_the_repository_read_as_coco() -> None:
    # Runs in a plain clone: the real TBX11K COCO file (reduced to one image) read as `predict --boxes`
    # and `prepare` read it, against the JSON divided by the image's width and height here.
    from cxrloc.data.imageio import read_image
    from cxrloc.inference.overlay import gt_boxes_by_image, gt_boxes_of

    ann = TBX_ONE / "annotations" / "TBX11K_train.json"
    raw = json.loads(ann.read_text())
    (image,) = raw["images"]
    path = TBX_ONE / "imgs" / image["file_name"]
    assert Image.open(path).size == (image["width"], image["height"]) == (512, 512)
    assert read_image(path).shape == (512, 512)
    names = {c["id"]: c["name"] for c in raw["categories"]}
    want = [(names[a["category_id"]], a["bbox"][0] / 512, a["bbox"][1] / 512,
             (a["bbox"][0] + a["bbox"][2]) / 512, (a["bbox"][1] + a["bbox"][3]) / 512) for a in raw["annotations"]]
    assert len(want) == 2 and {w[0] for w in want} == {"ObsoletePulmonaryTuberculosis"}
    got = gt_boxes_of(gt_boxes_by_image(ann), path)
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        assert g[0] == w[0] and g[1:] == pytest.approx(w[1:], abs=1e-12)
    # The first box by hand: bbox [307.307..., 62.050..., 135.503..., 146.611...] in a 512 x 512 frame.
    assert got[0][1:] == pytest.approx((0.600210, 0.121192, 0.864865, 0.407542), abs=1e-6)


def test_tbx11k_fixture_prepared(tmp_path: Path) -> None:
    ann = needs_shared(TBX / "annotations" / "TBX11K_train.json")
    code, text = run_cli("prepare", TBX / "imgs", "--format", "coco", "--boxes", ann, "--out", tmp_path / "tbx",
                         "--size", "64", "--folds", "2", "--unannotated-fraction", "1")
    assert code == 0, text
    assert "negative for every class" in one_line(text)  # said, not only written down
    p = Prepared.open(tmp_path / "tbx")

    # Independently of cxrloc: the categories by id, and each bbox divided by its image's width and height.
    raw = json.loads(ann.read_text())
    assert p.classes == tuple(c["name"] for c in sorted(raw["categories"], key=lambda c: c["id"]))
    assert p.classes == ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis")
    images = {im["id"]: im for im in raw["images"]}
    want: dict[str, list[tuple]] = {}
    for a in raw["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        k = [c["id"] for c in sorted(raw["categories"], key=lambda c: c["id"])].index(a["category_id"])
        want.setdefault(im["file_name"], []).append(
            (k, x / im["width"], y / im["height"], (x + w) / im["width"], (y + h) / im["height"]))
    assert set(p.ids) == {im["file_name"] for im in raw["images"]}
    for image_id in p.ids:
        got = p.boxes(image_id)
        assert len(got) == len(want.get(image_id, []))
        for g, w in zip(got, want.get(image_id, []), strict=True):
            assert g[0] == w[0] and g[1:] == pytest.approx(w[1:], abs=1e-12)
    # The healthy image has no annotation: an unboxed image, negative for every class; two boxed images.
    assert not p.is_annotated("health/h0001.png") and p.labels("health/h0001.png").sum() == 0
    assert p.labels("tb/tb0007.png").tolist() == [0, 1, 0]
    assert p.class_list.boxed == ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis")
    fp = json.loads((tmp_path / "tbx" / "fingerprint.json").read_text())
    assert fp["inputs"]["format"] == "coco" and fp["inputs"]["labels"] is None and fp["notes"]
    assert fp["counts"]["boxes"] == len(raw["annotations"])
    # Each image its own patient.
    assert p.manifest["patient_id"].nunique() == 3


def test_own_coco_with_a_labels_table(tmp_path: Path) -> None:
    data = write_own_dataset(tmp_path, n_patients=6, boxed_patients=4)
    records = data["records"]
    ann = write_own_coco(tmp_path, records)
    # The labels table gives patients and labels of the unboxed images, and adds one image COCO lacks.
    extra = data["images"] / "extra" / "more.png"
    extra.parent.mkdir()
    extra.write_bytes((data["images"] / records[-1]["image"]).read_bytes())
    labels = tmp_path / "labels.csv"
    labels.write_text("image,patient,labels\n" + "".join(
        f"{r['image']},{r['patient']},{'|'.join(r['labels'])}\n" for r in records) + "extra/more.png,P05,Miliary\n")
    prepare(data["images"], tmp_path / "prep", data_format="coco", boxes=ann, labels=labels, size=32, folds=2,
            unannotated_fraction=1.0, progress=False)
    p = Prepared.open(tmp_path / "prep")
    assert p.classes == ("Cavity", "Miliary", "Calcification")  # categories by id: 10, 20, 30
    for r in records:
        assert {p.classes[k] for k in np.flatnonzero(p.labels(r["image"]))} == set(r["labels"])
        assert p.manifest.loc[r["image"], "patient"] == r["patient"]
    assert p.labels("extra/more.png").tolist() == [0, 1, 0] and p.manifest.loc["extra/more.png", "patient"] == "P05"
    assert p.manifest.loc["extra/more.png", "patient_id"] == p.manifest.loc[records[-1]["image"], "patient_id"]


def test_bad_annotations_are_reported_with_their_position(tmp_path: Path) -> None:
    data = write_own_dataset(tmp_path, n_patients=4, boxed_patients=3)
    ann = write_own_coco(tmp_path, data["records"])
    coco = json.loads(ann.read_text())
    n = len(coco["annotations"])
    first = coco["annotations"][0]
    bad = {
        "not_in_data_entry": {**first, "id": 901, "image_id": 999},
        "unknown_label": {**first, "id": 902, "category_id": 77},
        "malformed": {**first, "id": 903, "bbox": [1, 2, 3]},
        "non_numeric": {**first, "id": 904, "bbox": [1, "2", 3, 4]},
        "no_area": {**first, "id": 905, "bbox": [1, 2, -3, 4]},
        "duplicate": {**first, "id": 906},
    }
    coco["annotations"] += list(bad.values())
    ann.write_text(json.dumps(coco))
    code, text = run_cli("prepare", data["images"], "--format", "coco", "--boxes", ann, "--out", tmp_path / "p",
                         "--size", "32", "--folds", "2")
    assert code == 0, text
    fp = json.loads((tmp_path / "p" / "fingerprint.json").read_text())
    got = {p["kind"]: p for p in fp["problems"]}
    for j, (kind, entry) in enumerate(bad.items()):
        assert got[kind]["line"] == n + j + 1, kind
        assert f"(id {entry['id']})" in got[kind]["detail"], kind
    assert len(Prepared.open(tmp_path / "p").boxes(data["records"][0]["image"])) == 1

    code, text = run_cli("prepare", data["images"], "--format", "coco", "--boxes", ann, "--out", tmp_path / "s",
                         "--size", "32", "--folds", "2", "--strict")
    assert code == 2 and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["categories"].append({"id": 10, "name": "Other"}), "share an id"),
        (lambda c: c["categories"].append({"id": 40, "name": "Cavity"}), "listed twice"),
        (lambda c: c["images"].append({**c["images"][0], "id": 5000}), "listed twice"),
        (lambda c: c["images"][0].update(file_name="../../etc/passwd"), "invalid image name"),
        (lambda c: c.pop("images"), "not a COCO annotation file"),
    ],
)
def test_broken_coco_files_are_refused(tmp_path: Path, edit, message: str) -> None:
    data = write_own_dataset(tmp_path, n_patients=2, boxed_patients=1)
    ann = write_own_coco(tmp_path, data["records"])
    coco = json.loads(ann.read_text())
    edit(coco)
    ann.write_text(json.dumps(coco))
    with pytest.raises(CxrlocError, match=message):
        prepare(data["images"], tmp_path / "out", data_format="coco", boxes=ann, size=32, folds=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_coco_categories_may_not_be_set_by_option(tmp_path: Path) -> None:
    data = write_own_dataset(tmp_path, n_patients=2, boxed_patients=1)
    ann = write_own_coco(tmp_path, data["records"])
    with pytest.raises(CxrlocError, match="categories"):
        prepare(data["images"], tmp_path / "out", data_format="coco", boxes=ann, classes=list(OWN_CLASSES))


def test_coco_frames_that_drop_every_box_but_one_say_why_and_write_nothing(tmp_path: Path) -> None:
    # Issue 22, defect 9: width/height of 4 x 4 put the boxes outside their frame; the message used
    # to say "only 1 annotated patient(s) for 2 folds; use --folds 2 or fewer" and leave a folder.
    data = write_own_dataset(tmp_path, n_patients=3, boxed_patients=2)
    ann = write_own_coco(tmp_path, data["records"])
    coco = json.loads(ann.read_text())
    boxed = [a["image_id"] for a in coco["annotations"]]
    for image in coco["images"]:
        if image["id"] in boxed[1:]:  # all but the first boxed image: a frame of 4 x 4 pixels, boxes at (5, 5)
            image["width"] = image["height"] = 4
    for a in coco["annotations"]:
        if a["image_id"] in boxed[1:]:
            a["bbox"][:2] = [5, 5]
    ann.write_text(json.dumps(coco))
    out = tmp_path / "p"
    code, text = run_cli("prepare", data["images"], "--format", "coco", "--boxes", ann, "--out", out,
                         "--size", "32", "--folds", "2")
    flat = one_line(text)
    assert code == 2 and "Traceback" not in text, text
    assert "only 1 annotated patient(s)" in flat and "need at least 2" in flat and "--folds 2 or fewer" not in flat
    assert "lies outside the image" in flat and "nothing was written" in flat and not out.exists()
