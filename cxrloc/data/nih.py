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
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrloc.classes import CLASS_INDEX, CLASSES, NO_FINDING, canonical_label
from cxrloc.utils import CxrlocError

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

Box = tuple[int, float, float, float, float]
"""``(class_index, x0, y0, x1, y1)``, coordinates as fractions of the image side in [0, 1]."""

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
    if not path.is_file():
        raise CxrlocError(f"{path}: Data_Entry file not found; pass --data-entry PATH")
    try:
        with open_text(path) as fh:
            # All columns as text; index_col=False because data rows have one field fewer than the
            # header's trailing comma announces.
            raw = pd.read_csv(fh, dtype=str, index_col=False, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, EOFError) as exc:
        raise CxrlocError(f"{path}: cannot read as a CSV table ({exc})") from exc
    raw.columns = [str(c).strip() for c in raw.columns]
    raw = raw.loc[:, [c for c in raw.columns if c and not c.startswith("Unnamed:")]]
    for col in ("Image Index", "Finding Labels", "Patient ID"):
        if col not in raw.columns:
            raise CxrlocError(
                f"{path}: column {col!r} missing (found {list(raw.columns)[:8]}); is this NIH's Data_Entry_2017.csv?"
            )
    if len(raw) == 0:
        raise CxrlocError(f"{path}: no rows")

    ids = raw["Image Index"].str.strip()
    for i, name in enumerate(ids):
        # Fast path: the usual NIH name needs no detailed check.
        if not (len(name) == 16 and name[8] == "_" and name.endswith(".png")):
            validate_image_id(name, f"{path} row {i + 2}: ")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise CxrlocError(f"{path}: image {dup.iloc[0]!r} is listed more than once ({len(dup)} duplicates)")

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

    labels = raw["Finding Labels"].str.strip().str.get_dummies(sep="|")
    out = pd.DataFrame(
        {
            "image_id": ids.to_numpy(),
            "patient_id": patient.to_numpy().astype(np.int64),
            "follow_up": follow.to_numpy().astype(np.int64),
            "view_position": view.to_numpy(),
        }
    )
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
    for k, name in enumerate(CLASSES):
        out[name] = onehot[:, k]
    return out


@dataclass
class BoxProblem:
    """One row of the box list that was not used as written (skipped, dropped or clipped)."""

    kind: str
    """``malformed``, ``extra_columns``, ``unknown_label``, ``non_numeric``, ``no_area``,
    ``outside``, ``duplicate`` (all skipped) or ``clipped`` (kept, clipped to the image)."""
    line: int
    """Line number in the file (1 = the header)."""
    image: str
    """The row's image name ("" when the row has none)."""
    detail: str
    """One line saying what was wrong, with the file name and line."""


@dataclass
class BoxList:
    """The parsed box list.

    Attributes:
        boxes: image id -> boxes in file order (several per image and per class are kept).
        lines: image id -> the line number of each of its boxes (parallel to ``boxes``).
        rows: number of data rows read.
        clipped: one message per box that reached outside the image and was clipped (kept).
        skipped: one message per row that was not used (zero area, unknown label, bad row,
            exact duplicate of an earlier row).
        problems: the same rows as ``clipped`` and ``skipped``, with their kind and line.
    """

    boxes: dict[str, list[Box]] = field(default_factory=dict)
    lines: dict[str, list[int]] = field(default_factory=dict)
    rows: int = 0
    clipped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[BoxProblem] = field(default_factory=list)

    @property
    def num_boxes(self) -> int:
        return sum(len(b) for b in self.boxes.values())

    def add_problem(self, kind: str, line: int, image: str, detail: str) -> None:
        self.problems.append(BoxProblem(kind, line, image, detail))
        (self.clipped if kind == "clipped" else self.skipped).append(detail)


BoxKey = tuple[str, int, float, float, float, float]
"""``(image, class index, x, y, w, h)``: what makes two box rows the same box."""


def add_box(
    result: BoxList,
    seen: dict[BoxKey, int],
    *,
    line: int,
    where: str,
    image_id: str,
    k: int,
    label: str,
    xywh: tuple[float, float, float, float],
    frame: tuple[float, float],
) -> None:
    """Check one box row's geometry, then add it to ``result`` normalised by its pixel frame.

    The one rule of every box reader (NIH's list, a plain box table, COCO): a box without area
    (also a non-finite coordinate) is skipped, an exact repeat of an earlier row is dropped, a box
    entirely outside the image is skipped, one reaching past an edge is clipped to it (kept); each
    case is recorded in ``result.problems`` with its kind and line.

    Args:
        result: the box list being filled.
        seen: earlier rows by :data:`BoxKey` (their line), to find exact repeats.
        line: the row's line (or entry) number, for the report.
        where: "FILE line N", the start of every message.
        image_id, k, label: the row's image, class index and label as written.
        xywh: the box as written: left, top, width and height in pixels of ``frame``.
        frame: ``(width, height)`` of the pixel frame of the coordinates (NIH: 1024 x 1024 whatever
            the file's size; a table: the image file's size; COCO: the entry's width and height);
            x is divided by the width and y by the height.
    """
    x, y, w, h = xywh
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        result.add_problem("no_area", line, image_id,
                           f"{where}: {image_id}: box {label} [{x}, {y}, {w}, {h}] has no area")
        return
    key = (image_id, k, x, y, w, h)
    if key in seen:
        result.add_problem("duplicate", line, image_id,
                        f"{where}: {image_id}: box {label} [{x}, {y}, {w}, {h}] repeats line {seen[key]}")
        return
    seen[key] = line
    fw, fh = frame
    x0, y0, x1, y1 = x / fw, y / fh, (x + w) / fw, (y + h) / fh
    c0, c1 = min(max(x0, 0.0), 1.0), min(max(x1, 0.0), 1.0)
    r0, r1 = min(max(y0, 0.0), 1.0), min(max(y1, 0.0), 1.0)
    if c1 <= c0 or r1 <= r0:
        result.add_problem("outside", line, image_id,
                        f"{where}: {image_id}: box {label} [{x}, {y}, {w}, {h}] lies outside the image")
        return
    if (c0, r0, c1, r1) != (x0, y0, x1, y1):
        result.add_problem("clipped", line, image_id,
                        f"{where}: {image_id}: box {label} [{x}, {y}, {w}, {h}] clipped to the image")
    result.boxes.setdefault(image_id, []).append((k, c0, r0, c1, r1))
    result.lines.setdefault(image_id, []).append(line)


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
    return result
