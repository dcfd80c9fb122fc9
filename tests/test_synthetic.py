"""Tests of the synthetic NIH-format generator: layout, CSV quirks, boxes where the lesions are."""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import NIH_DIR, needs_shared
from PIL import Image

from cxrloc.classes import BOXED_CLASSES, CLASSES
from cxrloc.data.synthetic import generate_synthetic_nih, plan_dataset, render
from cxrloc.utils import CxrlocError

REAL_NIH = NIH_DIR

N_PATIENTS, PER_PATIENT, SIZE, BOX_FRACTION = 30, 4, 64, 0.5


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    return generate_synthetic_nih(
        out, n_patients=N_PATIENTS, images_per_patient=PER_PATIENT, size=SIZE, box_fraction=BOX_FRACTION,
        seed=7, progress=False,
    )


def _first_line(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.readline()


def _entries(root: Path) -> list[list[str]]:
    with open(root / "Data_Entry_2017.csv", newline="") as fh:
        return list(csv.reader(fh))[1:]


def _boxes(root: Path) -> list[tuple[str, str, float, float, float, float]]:
    with open(root / "BBox_List_2017.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    return [(r[0], r[1], *map(float, r[2:6])) for r in rows]


def _image(root: Path, image_id: str) -> np.ndarray:
    (path,) = list(root.glob(f"images_*/images/{image_id}"))
    return np.asarray(Image.open(path), dtype=np.float64) / 255.0


def test_header_lines_are_nih_bytes(synth: Path) -> None:
    entry = _first_line(synth / "Data_Entry_2017.csv")
    bbox = _first_line(synth / "BBox_List_2017.csv")
    # Independent of the real files: the quirks spelled out.
    assert entry.endswith(b"OriginalImagePixelSpacing[x,y],\r\n")
    assert bbox == b"Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
    needs_shared(REAL_NIH, "byte comparison with the real NIH CSVs skipped")
    assert entry == _first_line(REAL_NIH / "Data_Entry_2017.csv")
    assert bbox == _first_line(REAL_NIH / "BBox_List_2017.csv")


def test_rows_have_nih_shape(synth: Path) -> None:
    raw = (synth / "Data_Entry_2017.csv").read_bytes()
    lines = raw.split(b"\r\n")
    assert lines[-1] == b"" and b"\n" not in b"".join(lines)  # CRLF everywhere, like the original
    assert len(lines[0].split(b",")) == 12  # the trailing comma announces one field too many
    rows = _entries(synth)
    assert len(rows) == N_PATIENTS * PER_PATIENT
    for r in rows:
        assert len(r) == 11
        assert re.fullmatch(r"\d{8}_\d{3}\.png", r[0])
        assert int(r[0][:8]) == int(r[3]) and int(r[0][9:12]) == int(r[2])
        assert r[6] in {"PA", "AP"} and r[5] in {"M", "F"}
        labels = r[1].split("|")
        assert labels == ["No Finding"] or all(lab in CLASSES for lab in labels)
    for r in _boxes(synth):
        assert r[1] in {*BOXED_CLASSES, "Infiltrate"} and r[1] != "Infiltration"
    assert "Infiltrate" in {r[1] for r in _boxes(synth)}
    assert "Infiltrate" not in (synth / "Data_Entry_2017.csv").read_text()


def test_images_in_nih_layout(synth: Path) -> None:
    files = sorted(synth.glob("images_*/images/*.png"))
    assert {p.parent.parent.name for p in files} == {"images_001", "images_002"}
    assert sorted(p.name for p in files) == sorted(r[0] for r in _entries(synth))
    # Like the official download: the first folder holds the lower image indices.
    first = [p.name for p in files if p.parent.parent.name == "images_001"]
    second = [p.name for p in files if p.parent.parent.name == "images_002"]
    assert max(first) < min(second)
    with Image.open(files[0]) as im:
        assert im.mode == "L" and im.size == (SIZE, SIZE) and im.format == "PNG"


def test_labels_patients_and_box_share(synth: Path) -> None:
    rows = _entries(synth)
    per_patient = Counter(int(r[3]) for r in rows)
    assert len(per_patient) == N_PATIENTS and set(per_patient.values()) == {PER_PATIENT}
    found = Counter(lab for r in rows for lab in r[1].split("|"))
    assert set(CLASSES) <= set(found) and found["No Finding"] > 0
    labels = {r[0]: set(r[1].split("|")) for r in rows}
    boxes = _boxes(synth)
    boxed_images = {b[0] for b in boxes}
    assert len(boxed_images) == round(BOX_FRACTION * len(rows))
    for image_id, label, *_ in boxes:
        assert {"Infiltrate": "Infiltration"}.get(label, label) in labels[image_id]
    per_image = Counter(b[0] for b in boxes)
    assert max(per_image.values()) >= 2  # several boxes on some images
    assert {("Infiltration" if b[1] == "Infiltrate" else b[1]) for b in boxes} == set(BOXED_CLASSES)


def test_boxes_in_1024_frame_whatever_the_size(synth: Path, tmp_path: Path) -> None:
    for _, _, x, y, w, h in _boxes(synth):
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 1024 and y + h <= 1024
    # The same seed at another image size: the same boxes in the 1024 frame, the same table.
    big = generate_synthetic_nih(
        tmp_path / "big", n_patients=N_PATIENTS, images_per_patient=PER_PATIENT, size=128,
        box_fraction=BOX_FRACTION, seed=7, progress=False,
    )
    assert (big / "BBox_List_2017.csv").read_bytes() == (synth / "BBox_List_2017.csv").read_bytes()
    assert (big / "Data_Entry_2017.csv").read_bytes() == (synth / "Data_Entry_2017.csv").read_bytes()
    assert max(x + w for _, _, x, _, w, _ in _boxes(synth)) > SIZE * 4  # not in the file's pixel frame


def _box_slice(x: float, y: float, w: float, h: float, size: int) -> tuple[slice, slice]:
    s = size / 1024
    c0, r0 = int(x * s), int(y * s)
    c1, r1 = max(int(np.ceil((x + w) * s)), c0 + 1), max(int(np.ceil((y + h) * s)), r0 + 1)
    return slice(r0, r1), slice(c0, c1)


def _sign(label: str) -> float:
    return -1.0 if label == "Pneumothorax" else 1.0  # air is dark, everything else is denser


def test_box_regions_differ_from_healthy_images(synth: Path) -> None:
    """On average over a class, its box regions differ from the same regions of the healthy images."""
    rows = _entries(synth)
    healthy = [r[0] for r in rows if r[1] == "No Finding"]
    assert len(healthy) >= 5
    healthy_mean = np.mean([_image(synth, i) for i in healthy], axis=0)
    diffs: dict[str, list[float]] = defaultdict(list)
    for image_id, label, x, y, w, h in _boxes(synth):
        region = _box_slice(x, y, w, h, SIZE)
        diffs[label].append(float(_image(synth, image_id)[region].mean() - healthy_mean[region].mean()))
    for label, d in diffs.items():
        signed = _sign(label) * np.array(d)
        assert signed.mean() > 0.03, f"{label}: box regions vs healthy {signed.round(3)}"
        assert (signed > 0).mean() >= 0.8, f"{label}: box regions vs healthy {signed.round(3)}"


def test_lesions_lie_inside_their_boxes(synth: Path) -> None:
    """The written image minus the same chest drawn without its boxed lesions: changed inside the boxes only."""
    plan = {im.image_index: im for im in plan_dataset(
        n_patients=N_PATIENTS, images_per_patient=PER_PATIENT, box_fraction=BOX_FRACTION, seed=7)}
    by_image: dict[str, list[tuple[str, float, float, float, float]]] = defaultdict(list)
    for image_id, label, x, y, w, h in _boxes(synth):
        by_image[image_id].append((label, x, y, w, h))
    for image_id, boxes in by_image.items():
        spec = plan[image_id].spec
        without = replace(spec, findings=tuple(f for f in spec.findings if not f.boxed))
        diff = _image(synth, image_id) - render(without, SIZE)
        inside = np.zeros((SIZE, SIZE), dtype=bool)
        for label, x, y, w, h in boxes:
            region = _box_slice(x, y, w, h, SIZE)
            inside[region] = True
            assert _sign(label) * diff[region].mean() > 0.02, f"{image_id} {label}: no lesion in its box"
        changed = np.abs(diff) > 0.08
        assert changed[inside].sum() > 0, image_id
        assert changed[~inside].sum() <= 0.05 * changed.sum() + 2, f"{image_id}: lesion pixels outside its boxes"


def test_deterministic_by_seed(synth: Path, tmp_path: Path) -> None:
    again = generate_synthetic_nih(
        tmp_path / "again", n_patients=N_PATIENTS, images_per_patient=PER_PATIENT, size=SIZE,
        box_fraction=BOX_FRACTION, seed=7, progress=False,
    )
    files = sorted(p.relative_to(synth) for p in synth.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (synth / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = generate_synthetic_nih(
        tmp_path / "other", n_patients=N_PATIENTS, images_per_patient=PER_PATIENT, size=SIZE,
        box_fraction=BOX_FRACTION, seed=8, progress=False,
    )
    assert (other / "Data_Entry_2017.csv").read_bytes() != (synth / "Data_Entry_2017.csv").read_bytes()


def test_nih_readers_accept_the_files(synth: Path) -> None:
    from cxrloc.data.nih import read_bbox_list, read_data_entry

    table = read_data_entry(synth / "Data_Entry_2017.csv")
    rows = _entries(synth)
    assert len(table) == len(rows)
    for r, (_, t) in zip(rows, table.iterrows(), strict=True):
        assert t["image_id"] == r[0] and t["patient_id"] == int(r[3]) and t["follow_up"] == int(r[2])
        expected = set(r[1].split("|")) - {"No Finding"}
        assert {c for c in CLASSES if t[c] == 1} == expected
    parsed = read_bbox_list(synth / "BBox_List_2017.csv")
    raw = _boxes(synth)
    assert parsed.skipped == [] and parsed.clipped == [] and parsed.num_boxes == len(raw)
    first_id, first_label, x, y, w, h = raw[0]
    k = CLASSES.index("Infiltration" if first_label == "Infiltrate" else first_label)
    assert parsed.boxes[first_id][0] == pytest.approx((k, x / 1024, y / 1024, (x + w) / 1024, (y + h) / 1024))


@pytest.mark.parametrize(
    "kwargs",
    [{"n_patients": 0}, {"images_per_patient": 1001}, {"size": 8}, {"box_fraction": 1.5}],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(CxrlocError):
        generate_synthetic_nih(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()
