"""Read the NIH ChestX-ray14 tables: ``Data_Entry_2017.csv`` and ``BBox_List_2017.csv``.

Both files are read with their published quirks: Data_Entry's header ends in a trailing comma
(the ``_v2020`` re-release does not), plain or gzip-compressed; the box list's header
``Image Index,Finding Label,Bbox [x,y,w,h],,,`` splits one cell over four columns and adds three
empty ones, and spells ``Infiltration`` as ``Infiltrate``.

Boxes are stored normalised: NIH box coordinates are pixels of the released 1024 x 1024 PNGs,
whatever the size of the file at hand, so they are divided by :data:`NIH_SIDE`, never by the
size of the image on disk. A box is ``(class_index, x0, y0, x1, y1)`` with fractions of the side.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxrloc.classes import BOXED_CLASSES, CLASS_INDEX, CLASSES, NO_FINDING, canonical_label
from cxrloc.data.boxes import BoxKey, BoxList, add_box
from cxrloc.data.source import Source, file_input
from cxrloc.utils import CxrlocError, flat

NIH_SIDE: float = 1024.0
"""Side in pixels of the released NIH PNGs, the frame of ``BBox_List_2017.csv``."""

DATA_ENTRY_NAMES: tuple[str, ...] = (
    "Data_Entry_2017.csv",
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017.csv.gz",
    "Data_Entry_2017_v2020.csv.gz",
)
"""File names looked for in an NIH folder, in order of preference."""

BBOX_LIST_NAMES: tuple[str, ...] = ("BBox_List_2017.csv", "BBox_List_2017.csv.gz")

ENTRY_COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "follow_up", "view_position", *CLASSES)
"""Columns of :func:`read_data_entry`'s table, in order."""

_FOLLOW_UP_RE = re.compile(r"_(\d+)\.[A-Za-z0-9]+$")


def validate_image_id(name: str, where: str = "") -> str:
    """Return ``name`` if it is a plain file name, else raise :class:`CxrlocError`.

    Names come from CSV files and are joined to the data folder, so anything that could point
    elsewhere (path separators, ``.``/``..``, a drive colon, control characters) is refused.
    """
    bad = (
        not name
        or name != name.strip()
        or name in (".", "..")
        or any(c in name for c in "/\\:\0")
        or any(ord(c) < 32 for c in name)
    )
    if bad:
        raise CxrlocError(
            f"{where}invalid image file name {name!r}: must be a plain file name without folders "
            "(no '/', '\\', ':' or '..'); fix the CSV row"
        )
    return name


def validate_image_path(name: str, where: str = "") -> str:
    """Return ``name`` if it is a relative path of plain names (``tb/tb0005.png``), else raise.

    Tables of other datasets name an image by its path below the images folder. Each part
    separated by ``/`` must pass :func:`validate_image_id` (no ``..``, ``\\``, ``:``, control
    characters, empty parts), so the path cannot leave the folder; ``prepare`` still only compares
    it with the paths it found there.
    """
    parts = name.split("/")
    try:
        for part in parts:
            validate_image_id(part)
    except CxrlocError:
        raise CxrlocError(
            f"{where}invalid image name {name!r}: must be a file name or a relative path below the images folder "
            "(parts separated by '/', no '..', '\\' or ':'); fix the row"
        ) from None
    return name


def open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":  # gzip by content, whatever the extension
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def find_table(folder: str | os.PathLike[str], names: tuple[str, ...]) -> Path | None:
    """Return the first of ``names`` present directly in ``folder`` (or ``None``)."""
    for name in names:
        p = Path(folder) / name
        if p.is_file():
            return p
    return None


def read_data_entry(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``Data_Entry_2017.csv`` (original or ``_v2020``, plain or gzip).

    Returns:
        DataFrame with columns :data:`ENTRY_COLUMNS`: ``image_id`` (str), ``patient_id`` (int64),
        ``follow_up`` (int64), ``view_position`` (str, "" when absent) and the 14 class columns
        (uint8 0/1) named as in ``cxrloc.classes.CLASSES``. Row order is the file's.

    Raises:
        CxrlocError: missing file or column, unknown label, duplicate or unsafe image name,
            non-integer patient id.
    """
    path = Path(path)
    raw = _read_entry_table(path)
    ids = _entry_image_ids(raw, path)

    patient = pd.to_numeric(raw["Patient ID"].str.strip(), errors="coerce")
    if patient.isna().any():
        i = int(np.flatnonzero(patient.isna().to_numpy())[0])
        raise CxrlocError(f"{path} row {i + 2}: Patient ID {raw['Patient ID'].iloc[i]!r} is not an integer")
    if "Follow-up #" in raw.columns:
        follow = pd.to_numeric(raw["Follow-up #"].str.strip(), errors="coerce")
    else:  # derive from the NIH name pattern PPPPPPPP_FFF.png
        follow = pd.to_numeric(ids.str.extract(_FOLLOW_UP_RE, expand=False), errors="coerce")
    follow = follow.fillna(0)
    view = raw["View Position"].str.strip() if "View Position" in raw.columns else pd.Series("", index=raw.index)

    out = pd.DataFrame(
        {
            "image_id": ids.to_numpy(),
            "patient_id": patient.to_numpy().astype(np.int64),
            "follow_up": follow.to_numpy().astype(np.int64),
            "view_position": view.to_numpy(),
        }
    )
    onehot = _entry_label_matrix(raw, ids, path)
    for k, name in enumerate(CLASSES):
        out[name] = onehot[:, k]
    return out


def _read_entry_table(path: Path) -> pd.DataFrame:
    """The Data_Entry file as text columns, its trailing empty columns dropped; checks that it has rows
    and the columns ``Image Index``, ``Finding Labels`` and ``Patient ID``."""
    if not path.is_file():
        raise CxrlocError(f"{path}: Data_Entry file not found; pass --data-entry PATH")
    try:
        with open_text(path) as fh:
            # All columns as text; index_col=False because data rows have one field fewer than the
            # header's trailing comma announces.
            raw = pd.read_csv(fh, dtype=str, index_col=False, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise CxrlocError(
            f"{path}: the file is empty (no header, no rows); is this NIH's Data_Entry_2017.csv?"
        ) from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, EOFError) as exc:
        raise CxrlocError(f"{path}: cannot read as a CSV table ({flat(exc)})") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    raw = raw.loc[:, [c for c in raw.columns if c and not c.startswith("Unnamed:")]]
    for col in ("Image Index", "Finding Labels", "Patient ID"):
        if col not in raw.columns:
            raise CxrlocError(
                f"{path}: column {col!r} missing (found {list(raw.columns)[:8]}); is this NIH's Data_Entry_2017.csv?"
            )
    if len(raw) == 0:
        raise CxrlocError(f"{path}: no rows")
    return raw


def _entry_image_ids(raw: pd.DataFrame, path: Path) -> pd.Series:
    """The ``Image Index`` column, stripped; refuses an unsafe name or one listed twice."""
    ids = raw["Image Index"].str.strip()
    for i, name in enumerate(ids):
        # Fast path: the usual NIH name needs no detailed check.
        if not (len(name) == 16 and name[8] == "_" and name.endswith(".png")):
            validate_image_id(name, f"{path} row {i + 2}: ")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise CxrlocError(f"{path}: image {dup.iloc[0]!r} is listed more than once ({len(dup)} duplicates)")
    return ids


def _entry_label_matrix(raw: pd.DataFrame, ids: pd.Series, path: Path) -> np.ndarray:
    """``(rows, 14)`` uint8 0/1 labels from ``Finding Labels`` (``|``-separated, NIH's spellings, ``No
    Finding`` for none); refuses a label that is not one of NIH's classes."""
    labels = raw["Finding Labels"].str.strip().str.get_dummies(sep="|")
    onehot = np.zeros((len(raw), len(CLASSES)), dtype=np.uint8)
    unknown = []
    for name in labels.columns:
        stripped = name.strip()
        if stripped in (NO_FINDING, ""):
            continue
        canon = canonical_label(stripped)
        if canon is None:
            unknown.append(stripped)
            continue
        onehot[:, CLASS_INDEX[canon]] |= labels[name].to_numpy().astype(np.uint8)
    if unknown:
        cols = [c for c in labels.columns if c.strip() in unknown]
        rows = np.flatnonzero(labels[cols].to_numpy().any(axis=1))
        raise CxrlocError(
            f"{path}: unknown finding label(s) {sorted(unknown)[:5]} on {len(rows)} row(s), first at row "
            f"{int(rows[0]) + 2} ({ids.iloc[int(rows[0])]}); NIH's labels are {list(CLASSES)} and 'No Finding'. "
            "Fix or remove those rows (dropping only the label would make those images false negatives), or "
            "prepare the data with its own class list: --format table (docs/data.md)."
        )
    return onehot


def read_bbox_list(path: str | os.PathLike[str], *, side: float = NIH_SIDE) -> BoxList:
    """Read ``BBox_List_2017.csv`` into normalised boxes.

    Args:
        path: the box list (plain or gzip).
        side: the pixel frame of the coordinates (1024 for NIH, whatever the image files' size).

    Returns:
        A :class:`BoxList`. ``Infiltrate`` is mapped to ``Infiltration``. A box reaching outside
        ``[0, side]`` is clipped (reported in ``clipped``); a box with no area (also after
        clipping), a label outside the 14 classes, a malformed row (fewer than six fields, extra
        non-empty fields, a non-numeric coordinate) or an exact duplicate of an earlier row is
        reported in ``skipped`` and left out. Nothing is printed or warned: callers report.

    Raises:
        CxrlocError: the file is missing or an image name is unsafe.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrlocError(f"{path}: box list not found; pass --bbox-list PATH")
    result = BoxList()
    try:
        _read_bbox_rows(path, result, side)
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as exc:
        raise CxrlocError(f"{path}: cannot read the box list as a CSV table ({flat(exc)})") from None
    return result


def _read_bbox_rows(path: Path, result: BoxList, side: float) -> None:
    seen: dict[BoxKey, int] = {}
    with open_text(path) as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if lineno == 1 and row[0].strip() == "Image Index":
                continue  # the split header
            result.rows += 1
            where = f"{path.name} line {lineno}"
            first = row[0].strip()
            if len(row) < 6:
                result.add_problem("malformed", lineno, first,
                                   f"{where}: expected 6 fields (image, label, x, y, w, h), got {len(row)}: {row!r}")
                continue
            if any(c.strip() for c in row[6:]):
                result.add_problem("extra_columns", lineno, first, f"{where}: extra non-empty fields after x, y, w, "
                                   f"h (which field is which is unclear): {row!r}")
                continue
            image_id = validate_image_id(first, f"{path} line {lineno}: ")
            label = row[1].strip()
            k = CLASS_INDEX.get(canonical_label(label) or "", -1)
            if k < 0:
                result.add_problem("unknown_label", lineno, image_id,
                                f"{where}: {image_id}: label {label!r} is not one of the 14 classes")
                continue
            try:
                x, y, w, h = (float(v) for v in row[2:6])
            except ValueError:
                result.add_problem("non_numeric", lineno, image_id,
                                   f"{where}: {image_id}: non-numeric box {row[2:6]!r}")
                continue
            add_box(result, seen, line=lineno, where=where, image_id=image_id, k=k, label=label,
                    xywh=(x, y, w, h), frame=(side, side))


def nih_source(
    nih_dir: Path, data_entry: str | os.PathLike[str] | None, bbox_list: str | os.PathLike[str] | None
) -> Source:
    """NIH ChestX-ray14's two CSVs (looked up in ``nih_dir`` unless given)."""
    entry_path = Path(data_entry) if data_entry else find_table(nih_dir, DATA_ENTRY_NAMES)
    if entry_path is None:
        raise CxrlocError(f"{nih_dir}: no {DATA_ENTRY_NAMES[0]} (or _v2020 / .gz) found; pass --data-entry PATH")
    box_path = Path(bbox_list) if bbox_list else find_table(nih_dir, BBOX_LIST_NAMES)
    if box_path is None:
        raise CxrlocError(f"{nih_dir}: no {BBOX_LIST_NAMES[0]} found; pass --bbox-list PATH")
    entries = read_data_entry(entry_path)
    box_list = read_bbox_list(box_path, side=NIH_SIDE)
    return Source(
        data_format="nih",
        classes=list(CLASSES),
        entries=entries,
        entry_name=entry_path.name,
        box_name=box_path.name,
        inputs={"data_entry": file_input(entry_path, len(entries)), "bbox_list": file_input(box_path, box_list.rows)},
        fixed_boxed=BOXED_CLASSES,
        nih_boxes=box_list,
    )
