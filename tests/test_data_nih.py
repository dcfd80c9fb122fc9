"""NIH tables: the real CSVs and hand-made files with the published quirks."""

from __future__ import annotations

import csv
import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import NIH_DIR, needs_shared

from cxrloc.classes import BOXED_CLASSES, CLASS_INDEX, CLASSES
from cxrloc.data.nih import read_bbox_list, read_data_entry, validate_image_id
from cxrloc.utils import CxrlocError

NIH = NIH_DIR


def test_real_data_entry() -> None:
    path = needs_shared(NIH / "Data_Entry_2017.csv")
    df = read_data_entry(path)
    assert len(df) == 112_120
    assert list(df.columns[4:]) == list(CLASSES) and len(CLASSES) == 14
    # Independent count with the csv module.
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    counts = {c: sum(c in r[1].split("|") for r in rows) for c in ("Hernia", "Infiltration", "Pleural_Thickening")}
    for c, n in counts.items():
        assert int(df[c].sum()) == n
    no_finding = sum(r[1] == "No Finding" for r in rows)
    assert int((df[list(CLASSES)].sum(axis=1) == 0).sum()) == no_finding
    first = df.iloc[1]
    assert (first.image_id, first.patient_id, first.follow_up, first.view_position) == ("00000001_001.png", 1, 1, "PA")
    assert first["Cardiomegaly"] == 1 and first["Emphysema"] == 1 and first["Effusion"] == 0
    assert df["Cardiomegaly"].dtype == np.uint8


def test_real_bbox_list() -> None:
    boxes = read_bbox_list(needs_shared(NIH / "BBox_List_2017.csv"))
    assert len(boxes.boxes) == 704 and boxes.num_boxes == 781 and boxes.rows == 781
    assert not boxes.skipped and not boxes.clipped
    classes = {CLASSES[b[0]] for bs in boxes.boxes.values() for b in bs}
    assert classes == set(BOXED_CLASSES) and len(classes) == 8
    n_infiltrate = sum(b[0] == CLASS_INDEX["Infiltration"] for bs in boxes.boxes.values() for b in bs)
    assert n_infiltrate == 95  # rows labelled "Infiltrate" in the file
    assert sum(len(bs) > 1 for bs in boxes.boxes.values()) > 0
    # First data row: 00013118_008.png,Atelectasis,225.0847...,547.0192...,86.7796...,79.1864...
    k, x0, y0, x1, y1 = boxes.boxes["00013118_008.png"][0]
    assert k == CLASS_INDEX["Atelectasis"]
    assert np.allclose(
        [x0, y0, x1, y1],
        [
            225.084745762712 / 1024,
            547.019216763771 / 1024,
            (225.084745762712 + 86.7796610169491) / 1024,
            (547.019216763771 + 79.1864406779661) / 1024,
        ],
    )


def test_bbox_quirks(tmp_path: Path) -> None:
    p = tmp_path / "BBox_List_2017.csv"
    p.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "a_000.png,Infiltrate,0,0,512,256\n"
        "a_000.png,Mass,100,100,10,10\n"
        "a_000.png,Mass,500,500,20,40\n"
        "b_000.png,Nodule,1000,-24,48,48\n"  # outside -> clipped
        "c_000.png,Mass,10,10,0,20\n"  # zero area
        "d_000.png,Lung Opacity,10,10,20,20\n"  # unknown label
        "e_000.png,Mass,2000,2000,20,20\n"  # entirely outside
        "f_000.png,Mass,10,10\n"  # short row
        "a_000.png,Mass,100,100,10,10\n"  # exact duplicate of line 3: dropped, not kept twice
        "g_000.png,Mass,1O,10,20,20\n"  # letter O for a zero
        "h_000.png,Mass,10,10,20,20,7\n"  # extra column
        "i_000.png,Mass,10,10,-20,20\n"  # negative width
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # problems are reported by the caller, never as a raw warning
        res = read_bbox_list(p)
    assert res.boxes["a_000.png"] == [
        (3, 0.0, 0.0, 0.5, 0.25),
        (4, 100 / 1024, 100 / 1024, 110 / 1024, 110 / 1024),
        (4, 500 / 1024, 500 / 1024, 520 / 1024, 540 / 1024),
    ]
    assert res.lines["a_000.png"] == [2, 3, 4]
    assert res.boxes["b_000.png"] == [(5, 1000 / 1024, 0.0, 1.0, 24 / 1024)]
    assert set(res.boxes) == {"a_000.png", "b_000.png"}
    assert len(res.clipped) == 1 and len(res.skipped) == 8
    joined = "\n".join(res.skipped)
    for name in ("c_000.png", "d_000.png", "e_000.png"):
        assert name in joined
    kinds = [(pr.kind, pr.line, pr.image) for pr in res.problems]
    assert kinds == [
        ("clipped", 5, "b_000.png"), ("no_area", 6, "c_000.png"), ("unknown_label", 7, "d_000.png"),
        ("outside", 8, "e_000.png"), ("malformed", 9, "f_000.png"), ("duplicate", 10, "a_000.png"),
        ("non_numeric", 11, "g_000.png"), ("extra_columns", 12, "h_000.png"), ("no_area", 13, "i_000.png"),
    ]
    assert "repeats line 3" in res.problems[5].detail
    # gzip by content
    gz = tmp_path / "boxes.csv.gz"
    gz.write_bytes(gzip.compress(b"Image Index,Finding Label,Bbox [x,y,w,h],,,\nz_001.png,Mass,1,2,3,4\n"))
    assert read_bbox_list(gz).boxes == {"z_001.png": [(4, 1 / 1024, 2 / 1024, 4 / 1024, 6 / 1024)]}


def test_unsafe_names_rejected(tmp_path: Path) -> None:
    for bad in ("../etc/passwd", "images/a.png", "..", "C:x.png", "a\\b.png", ""):
        with pytest.raises(CxrlocError):
            validate_image_id(bad)
    assert validate_image_id("00000001_000.png") == "00000001_000.png"
    p = tmp_path / "BBox_List_2017.csv"
    p.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n../../x.png,Mass,1,2,3,4\n")
    with pytest.raises(CxrlocError, match="plain file name"):
        read_bbox_list(p)
    d = tmp_path / "Data_Entry_2017.csv"
    d.write_text("Image Index,Finding Labels,Follow-up #,Patient ID,View Position,\n../a_000.png,Mass,0,1,PA\n")
    with pytest.raises(CxrlocError, match="plain file name"):
        read_data_entry(d)


def test_v2020_gzip_and_errors(tmp_path: Path) -> None:
    text = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
        "00000007_000.png,Infiltration|Mass,0,7,20,F,AP,2048,2048,0.14,0.14\n"
        "00000007_003.png,No Finding,3,7,21,F,PA,2048,2048,0.14,0.14\n"
    )
    p = tmp_path / "Data_Entry_2017_v2020.csv.gz"
    p.write_bytes(gzip.compress(text.encode()))
    df = read_data_entry(p)
    assert df["follow_up"].tolist() == [0, 3] and df["view_position"].tolist() == ["AP", "PA"]
    assert df.loc[0, "Infiltration"] == 1 and df.loc[0, "Mass"] == 1 and df.loc[1, list(CLASSES)].sum() == 0
    bad = tmp_path / "bad.csv"
    bad.write_text(text.replace("No Finding,3", "Tumour,3"))
    want = r"'Tumour'\] on 1 row\(s\), first at row 3 \(00000007_003.png\).*--format table"
    with pytest.raises(CxrlocError, match=want):
        read_data_entry(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text(text.replace("00000007_003.png", "00000007_000.png"))
    with pytest.raises(CxrlocError, match="more than once"):
        read_data_entry(dup)
    with pytest.raises(CxrlocError, match="not found"):
        read_data_entry(tmp_path / "absent.csv")


# --------------------------------------------------------------------------- issue 22 (defects 4, 11)


def test_empty_tables_are_one_message(tmp_path: Path) -> None:
    for content in (b"", b"\n", b"\n\n"):
        path = tmp_path / "Data_Entry_2017.csv"
        path.write_bytes(content)
        with pytest.raises(CxrlocError, match="the file is empty"):
            read_data_entry(path)
    boxes = tmp_path / "BBox_List_2017.csv"
    boxes.write_bytes(b"\xff\xfe\x00bad utf-8 \xc3\x28")
    with pytest.raises(CxrlocError, match="cannot read the box list"):
        read_bbox_list(boxes)


def test_non_finite_box_coordinates_are_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                    "00000001_000.png,Mass,nan,10,20,20\n00000001_000.png,Mass,10,inf,20,20\n"
                    "00000001_000.png,Mass,10,10,0,20\n")
    result = read_bbox_list(path)
    kinds = [(p.kind, p.line) for p in result.problems]
    assert kinds == [("non_numeric", 2), ("non_numeric", 3), ("no_area", 4)]
    assert "not a finite number" in result.problems[0].detail and "no area" not in result.problems[0].detail
