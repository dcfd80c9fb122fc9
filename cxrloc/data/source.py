"""What ``prepare`` reads of a dataset, whatever its format: the image list, labels, patients, boxes.

A :class:`Source` is the common form of the three formats ``prepare`` reads (``--format``):

- ``nih``: NIH ChestX-ray14's ``Data_Entry_2017.csv`` and ``BBox_List_2017.csv``
  (:mod:`cxrloc.data.nih`; its 14 classes, boxes in its 1024-pixel frame);
- ``table``: a labels table and a boxes table with columns named by options
  (:mod:`cxrloc.data.table`; boxes in the pixels of each image file);
- ``coco``: a COCO annotation file, optionally with a labels table (:mod:`cxrloc.data.coco`;
  boxes in the frame of each ``images`` entry's width and height).

Box coordinates are only normalised once the images are found (:meth:`Source.box_list`): a plain
table's boxes need each image file's size, read from its header. Every box row goes through the
one rule of :func:`cxrloc.data.boxes.add_box`, so every format reports bad rows the same way. Which
reader reads which format: :mod:`cxrloc.data.formats`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrloc.classes import NO_FINDING
from cxrloc.data.boxes import BoxKey, BoxList, RawBox, add_box
from cxrloc.data.imageio import ImageReadError, image_size
from cxrloc.utils import CxrlocError, sha256_file

COLUMN_KEYS: dict[str, str] = {
    "image": "the image's path below the images folder, or its file name or stem (both tables)",
    "patient": "the patient id (labels table; optional: without it each image is its own patient)",
    "labels": "the image's findings separated by '|', empty or 'No Finding' for none (labels table)",
    "label": "the finding a box shows (boxes table)",
    "x": "left edge of the box, in pixels of the image file (boxes table)",
    "y": "top edge of the box, in pixels (boxes table)",
    "w": "width of the box, in pixels (boxes table)",
    "h": "height of the box, in pixels (boxes table)",
}
"""The columns of the plain tables, by key; ``--column KEY=NAME`` renames one (the default name is
the key)."""

LABEL_SEPARATOR: str = "|"

_INTEGER = re.compile(r"-?[0-9]{1,18}")


@dataclass(frozen=True)
class Columns:
    """Column names of the plain tables (``--column KEY=NAME``; see :data:`COLUMN_KEYS`)."""

    names: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, items: Sequence[str]) -> Columns:
        """``["image=Image Index", ...]`` -> Columns; an unknown key or a malformed item is an error."""
        out: dict[str, str] = {}
        for item in items:
            key, sep, name = item.partition("=")
            key, name = key.strip(), name.strip()
            if not sep or not name:
                raise CxrlocError(f"--column {item!r}: use KEY=NAME, e.g. --column image=filename")
            if key not in COLUMN_KEYS:
                raise CxrlocError(f"--column {item!r}: unknown key {key!r}; use one of {', '.join(COLUMN_KEYS)}")
            out[key] = name
        return cls(tuple(sorted(out.items())))

    def __getitem__(self, key: str) -> str:
        return dict(self.names).get(key, key)

    def options(self) -> list[str]:
        """The ``--column`` options that give these names (for the recorded command)."""
        return [f"--column={k}={v}" for k, v in self.names]


@dataclass
class Source:
    """One dataset's tables, read: what ``prepare`` needs before and after finding the images.

    Attributes:
        data_format: ``nih``, ``table`` or ``coco``.
        classes: the class list, in the order of the manifest's columns.
        entries: one row per listed image: ``image_id``, ``patient_id`` (int64), ``follow_up``,
            ``view_position``, one 0/1 column per class, and for other formats than NIH ``patient``
            (the patient id as the tables give it, or the image's own id).
        entry_name: the file that lists the images (for messages).
        box_name: the file of the boxes (for messages).
        inputs: the tables' names, hashes and rows (``fingerprint.json``).
        notes: what a user must know about the labels (e.g. COCO images without boxes).
        fixed_boxed: NIH's 8 boxed classes; ``None``: the classes that end up with boxes.
    """

    data_format: str
    classes: list[str]
    entries: pd.DataFrame
    entry_name: str
    box_name: str
    inputs: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    fixed_boxed: tuple[str, ...] | None = None
    nih_boxes: BoxList | None = None
    """NIH's box list, read whole (its frame does not depend on the files)."""
    parsed: BoxList = field(default_factory=BoxList)
    """Rows read and the rows' own problems (malformed, non-numeric, unknown label), other formats."""
    raw_boxes: list[RawBox] = field(default_factory=list)
    frames: dict[str, tuple[float, float]] = field(default_factory=dict)
    """COCO: each image's (width, height) from its ``images`` entry, the frame of its boxes."""

    def box_list(self, found: dict[str, Path]) -> tuple[BoxList, dict[str, str]]:
        """The boxes normalised by their frames, and the boxed images whose size could not be read.

        Rows of images not listed, or not found on disk, keep only their line (``BoxList.lines``):
        ``prepare`` reports them as such (:func:`cxrloc.data.prepare.table_problems`).

        Returns:
            ``(box list, image -> why its size is unknown)``.
        """
        if self.nih_boxes is not None:
            return self.nih_boxes, {}
        result = BoxList(rows=self.parsed.rows, problems=list(self.parsed.problems),
                         skipped=list(self.parsed.skipped))
        listed = set(self.entries["image_id"])
        seen: dict[BoxKey, int] = {}
        sizes: dict[str, tuple[float, float]] = {}
        unreadable: dict[str, str] = {}
        for raw in self.raw_boxes:
            image = raw.image_id
            frame = self.frames.get(image) or sizes.get(image)
            if frame is None and image in listed and image in found and image not in unreadable:
                try:
                    frame = sizes[image] = tuple(float(v) for v in image_size(found[image]))  # type: ignore[assignment]
                except ImageReadError as exc:
                    unreadable[image] = str(exc)
            if image not in listed or image not in found or frame is None:
                result.lines.setdefault(image, []).append(raw.line)
                continue
            add_box(result, seen, line=raw.line, where=raw.where, image_id=image, k=raw.k, label=raw.label,
                    xywh=raw.xywh, frame=frame)  # type: ignore[arg-type]
        result.problems.sort(key=lambda p: p.line)
        return result, unreadable


def split_labels(text: str) -> list[str]:
    """The findings of a labels cell: split at ``|``, stripped; empty parts and ``No Finding`` dropped."""
    parts = (p.strip() for p in str(text).split(LABEL_SEPARATOR))
    return [p for p in parts if p and p.lower() != NO_FINDING.lower()]


def make_entries(
    ids: Sequence[str], patients: Sequence[str | None], labels: Sequence[Sequence[str]], classes: Sequence[str]
) -> pd.DataFrame:
    """The ``entries`` table of a :class:`Source` from per-image ids, patient ids and findings.

    An image without a patient id is its own patient (its id stands for the patient). The
    manifest's ``patient_id`` is an integer: the patient id itself when every one is an integer,
    else a number given to each distinct id in sorted order (the text stays in ``patient``).
    """
    text = [str(p) if p not in (None, "") else str(i) for i, p in zip(ids, patients, strict=True)]
    if all(_INTEGER.fullmatch(t) for t in text):
        numbers = [int(t) for t in text]
    else:
        code = {t: n for n, t in enumerate(sorted(set(text)))}
        numbers = [code[t] for t in text]
    index = {c: k for k, c in enumerate(classes)}
    onehot = np.zeros((len(ids), len(classes)), dtype=np.uint8)
    for row, names in enumerate(labels):
        for name in names:
            onehot[row, index[name]] = 1
    out = pd.DataFrame({
        "image_id": list(ids),
        "patient_id": np.asarray(numbers, dtype=np.int64),
        "follow_up": np.zeros(len(ids), dtype=np.int64),
        "view_position": [""] * len(ids),
    })
    for k, name in enumerate(classes):
        out[name] = onehot[:, k]
    out["patient"] = text
    return out


def file_input(path: Path, rows: int) -> dict[str, Any]:
    """A table's entry in ``fingerprint.json``: its name, hash and number of rows."""
    return {"name": path.name, "sha256": sha256_file(path), "rows": rows}
