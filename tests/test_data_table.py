"""``prepare --format table``: a labels table and a boxes table of one's own, images in any folders.

Boxes are checked against the pixel values the test wrote, divided by each image's own width and
height (a 72 x 60 PNG, a 64 x 56 DICOM); bad rows are reported like NIH's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import OWN_CLASSES, one_line, run_cli, write_own_dataset, write_own_tables

from cxrloc.data.prepare import PROBLEM_KINDS, StrictError, find_images, prepare
from cxrloc.data.prepared import Prepared
from cxrloc.utils import CxrlocError


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("own")
    data = write_own_dataset(root)
    data["labels"], data["boxes"] = write_own_tables(root, data["records"])
    data["prepared"] = prepare(data["images"], root / "prepared", data_format="table", labels=data["labels"],
                               boxes=data["boxes"], size=32, folds=2, progress=False)
    return data


def test_table_dataset_prepared_with_its_classes_boxes_and_patients(own: dict) -> None:
    p = Prepared.open(own["prepared"])
    assert p.classes == tuple(sorted(OWN_CLASSES)) and p.data_format == "table"  # no --classes: sorted labels
    assert json.loads((own["prepared"] / "classes.json").read_text())["boxed"] == sorted(OWN_CLASSES)
    records = {r["image"]: r for r in own["records"]}
    assert set(p.ids) == set(records)
    for image_id, r in records.items():
        want = set(r["labels"])
        got = {p.classes[k] for k in np.flatnonzero(p.labels(image_id))}
        assert got == want, image_id
        if r["box"] is None:
            assert p.boxes(image_id) == [] and not p.is_annotated(image_id)
            continue
        label, x, y, w, h = r["box"]
        (k, x0, y0, x1, y1), = p.boxes(image_id)
        assert p.classes[k] == label
        # Normalised by the file's own width and height (72 x 60, the DICOM 64 x 56), separately.
        assert (x0, y0, x1, y1) == pytest.approx((x / r["width"], y / r["height"], (x + w) / r["width"],
                                                  (y + h) / r["height"]))
    # The bright rectangle drawn at the box lies inside the box in the stretched 32 px cache.
    image_id = "pat00/scan0.dcm"
    _, x0, y0, x1, y1 = p.boxes(image_id)[0]
    inner = p.image(image_id)[int(np.ceil(y0 * 32)) + 1:int(y1 * 32) - 1, int(np.ceil(x0 * 32)) + 1:int(x1 * 32) - 1]
    assert inner.size and inner.min() > 200
    # Patient ids are text: numbered in sorted order, the text kept; a patient's two images share a fold.
    m = p.manifest
    assert m.loc["pat03/scan1.png", "patient"] == "P03" and m.loc["pat03/scan1.png", "patient_id"] == 3
    for f in p.splits["folds"]:
        test_patients = set(m.loc[f["test"], "patient"])
        assert not test_patients & set(m.loc[f["train_annotated"], "patient"])


def test_images_are_found_by_relative_path_and_stem(tmp_path: Path) -> None:
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for rel in ("a/x/scan0.png", "b/scan0.dcm", "a/scan0.jpg", "b/other.png"):
        (tmp_path / rel).write_bytes(b"")
    found, unlisted, dups = find_images([tmp_path], {"a/x/scan0.png", "b/scan0.png", "a/scan0.png", "zzz/scan0.png"})
    assert found == {"a/x/scan0.png": tmp_path / "a/x/scan0.png", "b/scan0.png": tmp_path / "b/scan0.dcm",
                     "a/scan0.png": tmp_path / "a/scan0.jpg"}
    assert unlisted == 1 and dups == []


def test_cli_table_with_renamed_columns_and_a_class_list(tmp_path: Path) -> None:
    data = write_own_dataset(tmp_path, n_patients=6, boxed_patients=4)
    records = data["records"]
    labels = tmp_path / "labels.csv"
    labels.write_text("File,Site,Findings\n" + "".join(
        f"{r['image']},S,{'|'.join(r['labels']) or 'No Finding'}\n" for r in records))
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("File,Finding,left,top,width,height,reader\n" + "".join(
        f"{r['image']},{','.join(map(str, r['box']))},dr-a\n" for r in records if r["box"]))
    code, text = run_cli(
        "prepare", data["images"], "--format", "table", "--labels", labels, "--boxes", boxes, "--out",
        tmp_path / "prep", "--size", "32", "--folds", "2", "--classes", "Miliary,Cavity,Calcification,Other",
        "--column", "image=File", "--column", "labels=Findings", "--column", "label=Finding", "--column", "x=left",
        "--column", "y=top", "--column", "w=width", "--column", "h=height",
    )
    assert code == 0, text
    p = Prepared.open(tmp_path / "prep")
    assert p.classes == ("Miliary", "Cavity", "Calcification", "Other")  # --classes: its order, a class without data
    assert p.class_list.boxed == ("Miliary", "Cavity", "Calcification")
    assert "4 classes (3 with boxes)" in one_line(text)
    # No patient column: every image is its own patient, and the command says so.
    assert p.manifest["patient_id"].nunique() == len(p.ids)
    assert "each image is its own patient" in one_line(text)
    assert "Results saved to" in text


def _bad_tables(root: Path) -> dict:
    data = write_own_dataset(root, n_patients=6, boxed_patients=4)
    records = data["records"]
    images = data["images"]
    (images / "pat05" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)  # a PNG without a header
    labels = root / "labels.csv"
    labels.write_text("image,patient,labels\n" + "".join(
        f"{r['image']},{r['patient']},{'|'.join(r['labels'])}\n" for r in records)
        + "pat05/broken.png,P05,Cavity\npat09/gone.png,P09,Cavity\n")
    good = [r for r in records if r["box"]]
    rows = [f"{r['image']},{','.join(map(str, r['box']))}" for r in good]
    a, b = good[0], good[1]
    bad = {
        "unknown_label": f"{a['image']},Tumour,1,1,5,5",
        "non_numeric": f"{a['image']},Cavity,1,one,5,5",
        "malformed": f"{a['image']},Cavity,1,1,,5",
        "no_area": f"{a['image']},Cavity,1,1,0,5",
        "duplicate": rows[1],
        "outside": f"{b['image']},Cavity,500,1,5,5",
        "clipped": f"{b['image']},Cavity,60,50,40,40",
        "not_in_data_entry": "pat07/scan0.png,Cavity,1,1,5,5",
        "annotated_missing": "pat09/gone.png,Cavity,1,1,5,5",
        "annotated_unreadable": "pat05/broken.png,Cavity,1,1,5,5",
    }
    lines = ["image,label,x,y,w,h", *rows, *bad.values()]
    boxes = root / "boxes.csv"
    boxes.write_text("\n".join(lines) + "\n")
    line = {kind: lines.index(row) + 1 for kind, row in bad.items()}
    line["duplicate"] = len(rows) + 1 + list(bad).index("duplicate") + 1
    return {"images": images, "labels": labels, "boxes": boxes, "line": line, "good": good}


def test_bad_box_rows_are_reported_like_nih_and_strict_fails(tmp_path: Path) -> None:
    t = _bad_tables(tmp_path)
    args = ("prepare", t["images"], "--format", "table", "--labels", t["labels"], "--boxes", t["boxes"],
            "--size", "32", "--folds", "2", "--classes", ",".join(OWN_CLASSES))
    code, text = run_cli(*args, "--out", tmp_path / "strict", "--strict")
    assert code == 2 and "--strict" in text and not (tmp_path / "strict").exists()

    code, text = run_cli(*args, "--out", tmp_path / "prep")
    assert code == 0, text
    fp = json.loads((tmp_path / "prep" / "fingerprint.json").read_text())
    by_kind: dict[str, list[dict]] = {}
    for p in fp["problems"]:
        by_kind.setdefault(p["kind"], []).append(p)
    flat = one_line(text)
    for kind, line in t["line"].items():
        assert kind in by_kind, kind
        assert PROBLEM_KINDS[kind] in flat, kind
        if kind not in ("annotated_missing", "annotated_unreadable"):
            assert [p["line"] for p in by_kind[kind]] == [line], kind
    assert "header" in by_kind["annotated_unreadable"][0]["detail"]
    p = Prepared.open(tmp_path / "prep")
    assert "pat05/broken.png" not in p.ids and "pat09/gone.png" not in p.ids
    # The clipped box is kept, cut at the image's right and bottom edges (72 x 60 px).
    b = t["good"][1]
    clipped = [box for box in p.boxes(b["image"]) if box[3] == 1.0]
    assert clipped and clipped[0][1:] == pytest.approx((60 / 72, 50 / 60, 1.0, 1.0))
    assert len(p.boxes(t["good"][0]["image"])) == 1  # every bad row of that image was left out


@pytest.mark.parametrize(
    ("labels_text", "message"),
    [
        ("image,patient,labels\npat00/scan0.dcm,P0,Cavity\npat00/scan0.dcm,P0,\n", "listed again"),
        ("image,patient,labels\n../escape.png,P0,Cavity\n", "invalid image name"),
        ("image,patient,labels\npat00/scan0.dcm,,Cavity\n", "no patient id"),
        ("image,patient,labels\npat00/scan0.dcm,P0,Tumour\n", "'Tumour' is not one of the classes"),
        ("file,patient,labels\npat00/scan0.dcm,P0,Cavity\n", "--column image=NAME"),
        ("image,patient,labels\npat00/scan0.dcm,P0,image_id\n", "column of manifest.csv"),
    ],
)
def test_labels_table_errors_name_the_row(tmp_path: Path, labels_text: str, message: str) -> None:
    data = write_own_dataset(tmp_path, n_patients=2, boxed_patients=1)
    _, boxes = write_own_tables(tmp_path, data["records"])
    labels = tmp_path / "bad.csv"
    labels.write_text(labels_text)
    classes = list(OWN_CLASSES) if "Tumour" in labels_text else None
    with pytest.raises(CxrlocError, match=message.replace("(", r"\(").replace("[", r"\[")):
        prepare(data["images"], tmp_path / "out", data_format="table", labels=labels, boxes=boxes, classes=classes,
                size=32, folds=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_format_options_are_checked(tmp_path: Path) -> None:
    data = write_own_dataset(tmp_path, n_patients=2, boxed_patients=1)
    labels, boxes = write_own_tables(tmp_path, data["records"])
    with pytest.raises(CxrlocError, match="needs --labels"):
        prepare(data["images"], tmp_path / "o", data_format="table", boxes=boxes, progress=False)
    with pytest.raises(CxrlocError, match="--data-entry and --bbox-list are NIH's"):
        prepare(data["images"], tmp_path / "o", data_format="table", labels=labels, boxes=boxes, data_entry=labels)
    with pytest.raises(CxrlocError, match="--labels is for --format table or coco"):
        prepare(data["images"], tmp_path / "o", labels=labels)
    with pytest.raises(CxrlocError, match="--column 'size=3'"):
        prepare(data["images"], tmp_path / "o", data_format="table", labels=labels, boxes=boxes, columns=["size=3"])
    with pytest.raises(CxrlocError, match="--format 'voc'"):
        prepare(data["images"], tmp_path / "o", data_format="voc")


def test_strict_error_type(tmp_path: Path) -> None:
    t = _bad_tables(tmp_path)
    with pytest.raises(StrictError) as info:
        prepare(t["images"], tmp_path / "o", data_format="table", labels=t["labels"], boxes=t["boxes"], size=32,
                folds=2, strict=True, progress=False)
    assert {p.kind for p in info.value.problems} >= {"no_area", "not_in_data_entry", "annotated_unreadable"}
