"""Boxes, written once: their types, the one rule that checks, normalises and clips a box row, and
what a box file gives (``prepare`` and ``predict --boxes``).

A box is ``(class_index, x0, y0, x1, y1)`` with coordinates as fractions of the image's width
(x) and height (y), in [0, 1]; every reader (:mod:`cxrloc.data.formats`) gives its rows to
:func:`add_box` with the pixel frame of its coordinates, so every format normalises, clips and
reports bad rows the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Box = tuple[int, float, float, float, float]
"""``(class_index, x0, y0, x1, y1)``, coordinates as fractions of the image side in [0, 1]."""

PixelBox = tuple[str, float, float, float, float]
"""``(label, x, y, w, h)`` in pixels of the image file itself (normalised once its size is known)."""


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

    The one rule of every box reader (NIH's list, a plain box table, COCO): a box with a
    non-finite coordinate (``non_numeric``) or without area is skipped, an exact repeat of an
    earlier row is dropped, a box entirely outside the image is skipped, one reaching past an edge
    is clipped to it (kept); each case is recorded in ``result.problems`` with its kind and line.

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
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        result.add_problem("non_numeric", line, image_id,
                           f"{where}: {image_id}: box {label} [{x}, {y}, {w}, {h}] has a coordinate that is not a "
                           "finite number (NaN or infinity)")
        return
    if w <= 0 or h <= 0:
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



@dataclass
class RawBox:
    """One box row of a table or COCO file, checked field by field but not yet normalised."""

    line: int
    where: str
    image_id: str
    label: str
    k: int
    """Class index (-1 until the class list is known)."""
    xywh: tuple[float, float, float, float]



@dataclass
class BoxFile:
    """What a box file gives ``predict --boxes``: its classes, the boxes it could normalise (their
    frame is in the file) and the boxes in pixels of each image file, by image name."""

    classes: list[str]
    parsed: BoxList
    pixels: dict[str, list[PixelBox]] = field(default_factory=dict)
