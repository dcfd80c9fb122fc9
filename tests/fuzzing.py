"""Property-based fuzzing of every input cxrloc parses (issue 22): strategies and targets.

The property, for every target: the call succeeds, or it raises ONE :class:`CxrlocError` whose
message is a single non-empty line; any other exception (a traceback for the user) fails. The
``prepare`` targets also check that a refused call leaves no output folder behind (nothing
half-written), and a successful one a complete prepared folder.

Used by ``tests/test_fuzz.py`` (a small example budget in the test suite) and by
``bench/fuzz_long.py`` (the long run whose figures are in docs/bad_input.md).

Targets:
    nih: ``prepare`` of an NIH folder whose ``Data_Entry_2017.csv`` and ``BBox_List_2017.csv`` are fuzzed.
    table: ``prepare --format table`` with a fuzzed labels table and boxes table.
    coco: ``prepare --format coco`` with a fuzzed COCO file.
    image: ``read_image`` and ``image_size`` of PNG, JPEG and DICOM files with fuzzed headers.
    set: ``make_config("tiny", ["KEY=VALUE"])`` with fuzzed ``--set`` values.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from cxrloc.classes import CLASSES
from cxrloc.utils import CxrlocError

OUTCOMES: Counter[str] = Counter()
"""``"TARGET ok"`` / ``"TARGET refused"`` counts of every case run in this process (the long run reports them)."""

IMAGE_NAMES = [f"{p:08d}_{f:03d}.png" for p in (1, 2, 3) for f in (0, 1)]
"""The images on disk in the fuzzed datasets: three patients, two images each."""


def check(target: str, call: Callable[[], Any]) -> str:
    """Run ``call``; return ``"ok"`` or ``"refused"`` (one clear CxrlocError); anything else propagates."""
    try:
        call()
    except CxrlocError as exc:
        message = str(exc).strip()
        assert message, "an empty error message"
        assert "\n" not in message, f"a message of several lines: {message!r}"
        assert "Traceback" not in message, message
        OUTCOMES[f"{target} refused"] += 1
        return "refused"
    OUTCOMES[f"{target} ok"] += 1
    return "ok"


# --------------------------------------------------------------------------- text pieces

_JUNK = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_NUMBER_TEXT = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "", " ", "0x10", "1,5", "-0", "1e-320"]),
    _JUNK,
)
_IMAGE = st.one_of(
    st.sampled_from(IMAGE_NAMES),
    st.sampled_from(["../x.png", "a/b.png", "C:\\x.png", "", " 00000001_000.png", "00000001_000.PNG", ".png"]),
    _JUNK,
)
_LABEL = st.one_of(st.sampled_from([*CLASSES, "Infiltrate", "No Finding", "", "mass", "Mass "]), _JUNK)
_LABELS = st.lists(_LABEL, max_size=3).map("|".join)


def _csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    import csv

    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow(row)
    return buf.getvalue()


def _maybe_binary(text: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """A table as text (mostly), or raw bytes (a binary file, a bad encoding), or empty."""
    return st.one_of(
        text.map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.binary(max_size=200),
        st.sampled_from([b"", b"\n", b"\xef\xbb\xbf", b"\x00\x00"]),
    )


ENTRY_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""]


def _rarely(valid: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], one_in: int = 8) -> st.SearchStrategy[Any]:
    """``valid`` mostly, ``bad`` about once in ``one_in`` draws: cases stay near valid files."""
    return st.integers(0, one_in - 1).flatmap(lambda n: bad if n == 0 else valid)


_PATIENT = st.sampled_from(["1", "2", "3"])


@st.composite
def data_entry(draw: st.DrawFn) -> bytes:
    header = list(ENTRY_HEADER)
    if draw(st.integers(0, 9)) == 0:
        header = draw(st.permutations(header)) if draw(st.booleans()) else header[: draw(st.integers(0, 12))]
    rows = [header]
    names = draw(_rarely(st.lists(st.sampled_from(IMAGE_NAMES), min_size=4, max_size=6, unique=True),
                         st.lists(_IMAGE, max_size=8), 10))
    for name in names:
        row = [name, draw(_rarely(st.lists(st.sampled_from([*CLASSES, "No Finding"]), min_size=1, max_size=2)
                                  .map("|".join), _LABELS, 12)),
               draw(_rarely(st.sampled_from(["0", "1"]), _NUMBER_TEXT, 12)),
               draw(_rarely(st.just(name[7]) if name in IMAGE_NAMES else _PATIENT, _NUMBER_TEXT, 12)),
               "50", "M", draw(st.sampled_from(["PA", "AP", ""])), "2500", "2048", "0.14", "0.14"]
        if draw(st.integers(0, 11)) == 0:
            row = row[: draw(st.integers(0, len(row)))] + draw(st.lists(_JUNK, max_size=2))
        rows.append(row)
    return draw(_rarely(st.just(_csv(rows).encode("utf-8", "surrogatepass")), _maybe_binary(st.just(_csv(rows))),
                        10))


@st.composite
def box_rows(draw: st.DrawFn, header: list[str], labels: list[str] | None = None, side: int = 1024) -> str:
    """A box table: ``header``, then rows image, label, x, y, w, h (pixels of a ``side`` frame), some broken."""
    coord = _rarely(st.integers(0, side * 3 // 4).map(str), _NUMBER_TEXT, 6)
    rows = [header]
    for _ in range(draw(_rarely(st.integers(3, 8), st.integers(0, 2), 8))):
        label = draw(_rarely(st.sampled_from(labels or list(CLASSES)), _LABEL, 8))
        row = [draw(_rarely(st.sampled_from(IMAGE_NAMES), _IMAGE, 8)), label, *(draw(coord) for _ in range(4))]
        if draw(st.integers(0, 9)) == 0:
            row = row[: draw(st.integers(0, len(row)))] + draw(st.lists(_JUNK, max_size=2))
        rows.append(row)
    return _csv(rows)


def bbox_list() -> st.SearchStrategy[bytes]:
    return _rarely(box_rows(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]).map(str.encode),
                   _maybe_binary(box_rows(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])), 10)


OWN = ["Cavity", "Miliary"]


@st.composite
def labels_table(draw: st.DrawFn) -> bytes:
    header = draw(_rarely(st.just(["image", "patient", "labels"]),
                          st.sampled_from([["image", "labels"], ["img", "labels"], []]), 8))
    rows = [header]
    for name in draw(_rarely(st.lists(st.sampled_from(IMAGE_NAMES), min_size=4, max_size=6, unique=True),
                             st.lists(_IMAGE, max_size=8), 10)):
        rows.append([name, draw(_rarely(_PATIENT, st.one_of(st.just(""), _JUNK), 12)),
                     draw(_rarely(st.lists(st.sampled_from(OWN), max_size=2).map("|".join), _LABELS, 12))
                     ][: len(header) or 3])
    return draw(_rarely(st.just(_csv(rows).encode("utf-8", "surrogatepass")), _maybe_binary(st.just(_csv(rows))),
                        10))


def box_table() -> st.SearchStrategy[bytes]:
    rows = box_rows(["image", "label", "x", "y", "w", "h"], labels=OWN, side=32)
    return _rarely(rows.map(str.encode), _maybe_binary(rows), 10)


_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=False), _JUNK)
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(_JUNK, inner, max_size=3)), max_leaves=8)


@st.composite
def coco_file(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 5)) == 0:
        return draw(_maybe_binary(_JSON.map(json.dumps)))
    number = _rarely(st.integers(1, 200), st.one_of(st.integers(-5, 0), st.floats(allow_nan=False), _JUNK,
                                                     st.none()), 8)
    ids = _rarely(st.integers(0, 6), _JSON_LEAF, 10)
    images = [{"id": n if draw(st.integers(0, 9)) else draw(ids), "file_name": draw(_rarely(st.just(name), _IMAGE, 10)),
               "width": draw(_rarely(st.just(32), number, 4)), "height": draw(_rarely(st.just(32), number, 4))}
              for n, name in enumerate(draw(st.lists(st.sampled_from(IMAGE_NAMES), min_size=4, max_size=6,
                                                     unique=True)))]
    categories = [{"id": n if draw(st.integers(0, 9)) else draw(ids), "name": draw(_rarely(st.just(c), _LABEL, 10))}
                  for n, c in enumerate(draw(st.lists(st.sampled_from(OWN), min_size=1, max_size=2, unique=True)))]
    coord = _rarely(st.integers(0, 24), st.one_of(number, st.floats(), _JUNK), 6)
    image_ids = _rarely(st.integers(0, max(len(images) - 1, 0)), ids, 10)
    annotations = [{"id": n, "image_id": draw(image_ids), "category_id": draw(_rarely(st.integers(0, 1), ids, 10)),
                    "bbox": draw(_rarely(st.lists(coord, min_size=4, max_size=4), st.one_of(st.lists(coord), _JSON),
                                         10))}
                   for n in range(draw(_rarely(st.integers(3, 8), st.integers(0, 2), 8)))]
    data: dict[str, Any] = {"images": images, "categories": categories, "annotations": annotations}
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.sampled_from(["images", "categories", "annotations"]))] = draw(_JSON)  # a part of the wrong kind
    return json.dumps(data).encode()


# --------------------------------------------------------------------------- images


def _png_bytes(shape: tuple[int, int] = (24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(shape[0] * shape[1]) % 251).astype(np.uint8).reshape(shape)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(24 * 20) % 251).astype(np.uint8).reshape(24, 20)).save(buf, "JPEG")
    return buf.getvalue()


def _dicom_bytes() -> bytes:
    """A 24 x 20 CR, 12 bits stored in 16, MONOCHROME2, written by the tests' one DICOM writer."""
    from conftest import write_dicom

    pixels = (np.arange(24 * 20) % 4096).reshape(24, 20)
    with tempfile.TemporaryDirectory() as tmp:
        return write_dicom(Path(tmp) / "seed.dcm", pixels, "MONOCHROME2", 12).read_bytes()


SEEDS: dict[str, bytes] = {}


def _seed(kind: str) -> bytes:
    if kind not in SEEDS:
        SEEDS[kind] = {"png": _png_bytes, "jpeg": _jpeg_bytes, "dicom": _dicom_bytes}[kind]()
    return SEEDS[kind]


def _png_with_size(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR (right CRC) announcing ``width`` x ``height``, then the seed's data."""
    seed = _seed("png")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return seed[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + seed[33:]


@st.composite
def image_file(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, bytes): a PNG, JPEG or DICOM seed with its header mutated, truncated or extended."""
    kind = draw(st.sampled_from(["png", "jpeg", "dicom"]))
    data = bytearray(_seed(kind))
    how = draw(st.sampled_from(["flip", "truncate", "insert", "size", "splice"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, min(len(data), 400) - 1))
            data[pos] = draw(st.integers(0, 255))
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "insert":
        pos = draw(st.integers(0, min(len(data), 400)))
        data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
    elif how == "size" and kind == "png":
        data = bytearray(_png_with_size(draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1))))
    elif how == "size" and kind == "dicom":
        # Rows (0028,0010) and Columns (0028,0011): explicit VR little endian, "US", 2 bytes each.
        for tag in (b"\x28\x00\x10\x00US\x02\x00", b"\x28\x00\x11\x00US\x02\x00"):
            pos = bytes(data).find(tag)
            if pos >= 0:
                data[pos + 8:pos + 10] = struct.pack("<H", draw(st.integers(0, 65535)))
    else:
        other = _seed(draw(st.sampled_from(["png", "jpeg", "dicom"])))
        cut = draw(st.integers(0, min(len(data), len(other))))
        data = data[:cut] + bytearray(other[cut:])
    suffix = draw(st.sampled_from([{"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}[kind], ".png", ".dcm", ""]))
    return suffix, bytes(data)


# --------------------------------------------------------------------------- --set values

_SET_KEYS = st.sampled_from([
    "lr", "epochs", "image_size", "patch_grid", "width", "lambda_ann", "val_fraction", "aug_scale", "crf_window",
    "batch_size", "accum_steps", "loss", "arch", "classes", "init_prob", "sigmoid_temperature", "seed", "amp",
    "crf", "deterministic", "eval_threshold", "annotated_per_batch", "thresholds_file", "nonexistent", "",
])
SET_VALUES = st.one_of(
    _NUMBER_TEXT,
    st.sampled_from(["true", "false", "yes", "[]", "[1, 2]", '["a", "a"]', "{}", "null", "1e308", "9" * 30,
                     "resnet18", "threshold", "-1", "0", "0.5"]),
)


@st.composite
def set_item(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 6)) == 0:
        return draw(_JUNK)  # no "=" at all, or several
    return f"{draw(_SET_KEYS)}={draw(SET_VALUES)}"


# --------------------------------------------------------------------------- targets


def _images_folder(root: Path) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in IMAGE_NAMES:
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(images / name)
    return images


def _prepare_case(target: str, files: dict[str, bytes], **options: Any) -> str:
    """Write ``files`` beside a folder of six real PNGs, run ``prepare`` into a fresh ``out``, check the property."""
    from cxrloc.data.prepare import prepare

    root = Path(tempfile.mkdtemp(prefix="cxrloc-fuzz-"))
    try:
        images = _images_folder(root / "data")
        for name, data in files.items():
            (root / "data" / name).write_bytes(data)
        out = root / "out"
        paths = {k: root / "data" / v for k, v in options.pop("paths", {}).items()}
        outcome = check(target, lambda: prepare(images.parent if target == "nih" else images, out, size=16,
                                                folds=2, progress=False, **paths, **options))
        if outcome == "refused":
            assert not out.exists(), f"a refused prepare left {sorted(p.name for p in out.iterdir())}"
        else:
            for name in ("manifest.csv", "fingerprint.json", "splits.json", "cache.json", "classes.json"):
                assert (out / name).is_file(), f"prepare succeeded without {name}"
        return outcome
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_nih(entry: bytes, boxes: bytes) -> str:
    return _prepare_case("nih", {"Data_Entry_2017.csv": entry, "BBox_List_2017.csv": boxes})


def run_table(labels: bytes, boxes: bytes) -> str:
    return _prepare_case("table", {"labels.csv": labels, "boxes.csv": boxes}, data_format="table",
                         paths={"labels": "labels.csv", "boxes": "boxes.csv"})


def run_coco(coco: bytes) -> str:
    return _prepare_case("coco", {"coco.json": coco}, data_format="coco", paths={"boxes": "coco.json"})


def run_image(suffix: str, data: bytes) -> str:
    from cxrloc.data.imageio import image_size, read_image

    root = Path(tempfile.mkdtemp(prefix="cxrloc-fuzz-"))
    try:
        path = root / f"x{suffix}"
        path.write_bytes(data)
        first = check("image", lambda: read_image(path))
        check("image", lambda: image_size(path))
        return first
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_set(items: list[str]) -> str:
    from cxrloc.config import make_config

    return check("set", lambda: make_config("tiny", items))
