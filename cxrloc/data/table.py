"""The plain table format of ``prepare --format table``: a labels table and a boxes table.

Labels table (CSV, plain or gzip), one row per image::

    image,patient,labels
    p001/scan1.dcm,p001,Nodule|Effusion
    p002/scan1.dcm,p002,
    p003/scan1.png,p003,No Finding

Boxes table, one row per box, in the pixels of that image file (x, y = left, top)::

    image,label,x,y,w,h
    p001/scan1.dcm,Nodule,812,430,96,88

Column names are options (``--column image=filename``, :data:`cxrloc.data.source.COLUMN_KEYS`);
other columns are ignored. The ``image`` of a row is a path below the images folder, or a file
name or stem found anywhere below it; it is only compared with the files found there, never joined
to a path. Without a ``patient`` column each image is its own patient.

The class list is ``--classes`` when given (then any other label is an error in the labels table
and a skipped row in the boxes table, as NIH's reader does), else every label the two tables use,
sorted by name.

The labels table is read whole or not at all (an unsafe or repeated image, an empty patient id, an
unknown label: one error naming the row). A box row that cannot be used is skipped and reported with
its line, as NIH's box list is (:mod:`cxrloc.data.nih`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxrloc.classes import check_class_names
from cxrloc.data.boxes import BoxList, RawBox
from cxrloc.data.nih import open_text, validate_image_path
from cxrloc.data.source import Columns, Source, file_input, make_entries, split_labels
from cxrloc.utils import CxrlocError, flat

BOX_TABLE_COLUMNS: tuple[str, ...] = ("image", "label", "x", "y", "w", "h")
"""The keys (and default names) of a boxes table's columns: what ``predict --boxes`` reads too."""


@dataclass
class LabelsTable:
    """A labels table, read: per image (in file order) its patient id (``None``: none given) and findings."""

    path: Path
    ids: list[str]
    patients: list[str | None]
    labels: list[list[str]]

    @property
    def names(self) -> set[str]:
        """Every finding the table uses."""
        return {name for row in self.labels for name in row}


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise CxrlocError(f"{path}: {what} not found")
    try:
        with open_text(path) as fh:
            df = pd.read_csv(fh, dtype=str, keep_default_na=False, index_col=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, EOFError) as exc:
        raise CxrlocError(f"{path}: cannot read the {what} as a CSV table ({flat(exc)})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _column(df: pd.DataFrame, path: Path, columns: Columns, key: str, what: str) -> str:
    name = columns[key]
    if name not in df.columns:
        raise CxrlocError(
            f"{path}: no column {name!r} ({what}; found {list(df.columns)[:8]}); name it with --column {key}=NAME"
        )
    return name


def read_labels_table(path: Path, columns: Columns, classes: Sequence[str] | None, *, what: str) -> LabelsTable:
    """Read a labels table (image, optional patient, ``|``-separated labels).

    Args:
        path: the CSV file (plain or gzip).
        columns: the column names.
        classes: the allowed labels; ``None``: any label.
        what: what the class list is, for the message of an unknown label (e.g. "--classes").

    Raises:
        CxrlocError: a missing column, no rows, an unsafe or repeated image, an empty patient id,
            a label outside ``classes``; the message names the row.
    """
    df = _read_csv(path, "labels table")
    image_col = _column(df, path, columns, "image", "the image")
    label_col = _column(df, path, columns, "labels", "the findings")
    patient_col = columns["patient"] if columns["patient"] in df.columns else None
    if "patient" in dict(columns.names) and patient_col is None:
        _column(df, path, columns, "patient", "the patient id")  # named explicitly: it must be there
    if len(df) == 0:
        raise CxrlocError(f"{path}: no rows")
    allowed = None if classes is None else set(classes)
    ids, patients, labels = [], [], []
    seen: dict[str, int] = {}
    for n, (image, text) in enumerate(zip(df[image_col], df[label_col], strict=True)):
        row = n + 2  # line 1 is the header
        image = validate_image_path(str(image).strip(), f"{path} line {row}: ")
        if image in seen:
            raise CxrlocError(f"{path} line {row}: image {image!r} is listed again (first on line {seen[image]})")
        seen[image] = row
        patient: str | None = None
        if patient_col is not None:
            patient = str(df[patient_col].iat[n]).strip()
            if not patient:
                raise CxrlocError(f"{path} line {row}: image {image!r} has no patient id; fill it in (or drop the "
                                  f"column {patient_col!r}: each image is then its own patient)")
        names = split_labels(text)
        unknown = [x for x in names if allowed is not None and x not in allowed]
        if unknown:
            raise CxrlocError(f"{path} line {row}: label {unknown[0]!r} is not one of the classes ({what}: "
                              f"{sorted(allowed or ())}); fix the row or the class list")
        ids.append(image)
        patients.append(patient)
        labels.append(names)
    return LabelsTable(path, ids, patients, labels)


def read_box_table(path: Path, columns: Columns) -> tuple[list[RawBox], BoxList]:
    """Read a boxes table's rows (image, label, x, y, w, h) without their classes or frames yet.

    A row with an empty or missing field is ``malformed``, one whose coordinate is not a number
    ``non_numeric``; both are skipped and recorded with their line in the returned
    :class:`BoxList` (which also counts the rows). An unsafe image name is an error.

    Returns:
        ``(rows, BoxList with rows and problems)``.
    """
    if not path.is_file():
        raise CxrlocError(f"{path}: boxes table not found")
    keys = BOX_TABLE_COLUMNS
    rows: list[RawBox] = []
    result = BoxList()
    try:
        with open_text(path) as fh:
            reader = csv.reader(fh)
            header = [c.strip() for c in next(reader, [])]
            missing = [columns[k] for k in keys if columns[k] not in header]
            if missing:
                raise CxrlocError(
                    f"{path}: no column {missing[0]!r} (found {header[:8]}); the boxes table needs "
                    f"{', '.join(columns[k] for k in keys)}, named with --column KEY=NAME"
                )
            index = {k: header.index(columns[k]) for k in keys}
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                result.rows += 1
                where = f"{path.name} line {line}"
                values = {k: row[i].strip() if i < len(row) else "" for k, i in index.items()}
                image = values["image"]
                empty = [columns[k] for k in keys if not values[k]]
                if empty:
                    result.add_problem("malformed", line, image, f"{where}: no value in column {empty[0]!r}: {row!r}")
                    continue
                image = validate_image_path(image, f"{path} line {line}: ")
                try:
                    xywh = tuple(float(values[k]) for k in ("x", "y", "w", "h"))
                except ValueError:
                    coords = [values[k] for k in ("x", "y", "w", "h")]
                    result.add_problem("non_numeric", line, image, f"{where}: {image}: non-numeric box {coords!r}")
                    continue
                rows.append(RawBox(line, where, image, values["label"], -1, xywh))  # type: ignore[arg-type]
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as exc:
        raise CxrlocError(f"{path}: cannot read the boxes table as CSV ({exc})") from None
    return rows, result


def assign_classes(rows: list[RawBox], parsed: BoxList, classes: Sequence[str]) -> list[RawBox]:
    """Give each row its class index; a row whose label is not a class is skipped (``unknown_label``)."""
    index = {c: k for k, c in enumerate(classes)}
    kept = []
    for raw in rows:
        k = index.get(raw.label)
        if k is None:
            parsed.add_problem("unknown_label", raw.line, raw.image_id,
                               f"{raw.where}: {raw.image_id}: label {raw.label!r} is not one of the classes")
            continue
        raw.k = k
        kept.append(raw)
    return kept


def table_source(labels: Path, boxes: Path, columns: Columns, classes: Sequence[str] | None) -> Source:
    """The plain table format (module docstring) as a :class:`~cxrloc.data.source.Source`."""
    given = check_class_names(list(classes), "--classes") if classes else None
    table = read_labels_table(labels, columns, given, what="--classes")
    rows, parsed = read_box_table(boxes, columns)
    names = given or check_class_names(sorted(table.names | {r.label for r in rows}), f"{labels} and {boxes}")
    rows = assign_classes(rows, parsed, names)
    return Source(
        data_format="table",
        classes=names,
        entries=make_entries(table.ids, table.patients, table.labels, names),
        entry_name=labels.name,
        box_name=boxes.name,
        inputs={"labels": file_input(labels, len(table.ids)), "boxes": file_input(boxes, parsed.rows)},
        notes=[] if any(p is not None for p in table.patients) else [
            f"{labels.name} has no patient column: each image is its own patient (images of one patient can "
            "then fall into different folds)"],
        parsed=parsed,
        raw_boxes=rows,
    )
