"""Ground-truth boxes for the overlays of ``predict --boxes``: read once per box file, found per image.

The box file is read by the readers of ``prepare`` (:func:`cxrloc.data.formats.read_box_file`);
this module keeps its boxes by image name and finds those of one image file
(:func:`gt_boxes_of`), normalised to fractions of the image side.
"""

from __future__ import annotations

import os
from pathlib import Path

from cxrloc.data.boxes import PixelBox
from cxrloc.data.formats import read_box_file
from cxrloc.utils import console

GtBox = tuple[str, float, float, float, float]
"""``(class name, x0, y0, x1, y1)`` with coordinates as fractions of the image side."""


class GtBoxes(dict[str, list[GtBox]]):
    """Ground-truth boxes per image name (a path below the data folder, or a file name), normalised.

    ``pixels`` holds the boxes whose frame is the image file itself (a plain boxes table, a COCO
    entry without width and height): ``(class name, x, y, w, h)`` in pixels, normalised by
    :func:`gt_boxes_of` once the image's size is known.
    """

    def __init__(self, boxes: dict[str, list[GtBox]] | None = None,
                 pixels: dict[str, list[PixelBox]] | None = None) -> None:
        super().__init__(boxes or {})
        self.pixels = dict(pixels or {})


def gt_boxes_by_image(path: str | os.PathLike[str]) -> GtBoxes:
    """Ground-truth boxes per image, for drawing; find an image's with :func:`gt_boxes_of`.

    Three kinds of file: NIH's ``BBox_List_2017.csv`` (its header starts with ``Image Index``), read
    by :func:`cxrloc.data.nih.read_bbox_list` (its quirks, label spellings, 1024-pixel frame and
    clipping); a COCO annotation file (``.json``), read by :mod:`cxrloc.data.coco` (its categories'
    names, each image's width and height as the frame, else the file's own size; images named by
    their ``file_name``, a path below the data folder); a plain boxes table with the columns
    ``image, label, x, y, w, h`` (``prepare --format table``'s default names), in pixels of each
    image file. The readers are those of ``prepare`` (:func:`cxrloc.data.formats.read_box_file`).
    Rows that cannot be used are left out with one note naming the first of them.

    Raises:
        CxrlocError: the file cannot be read, or is none of the three.
    """
    found = read_box_file(path)
    classes, parsed, pixels = found.classes, found.parsed, found.pixels
    if parsed.skipped:
        console.print(f"[yellow]Note:[/] {len(parsed.skipped)} row(s) of {path} not drawn; first: {parsed.skipped[0]}")
    out: dict[str, list[GtBox]] = {}
    for name, boxes in parsed.boxes.items():
        out.setdefault(name, []).extend((classes[k], x0, y0, x1, y1) for k, x0, y0, x1, y1 in boxes)
    return GtBoxes(out, pixels)


def gt_boxes_of(
    gt_boxes: dict[str, list[GtBox]], path: str | os.PathLike[str], size: tuple[int, int] | None = None
) -> list[GtBox]:
    """The ground-truth boxes of the image file ``path`` in :func:`gt_boxes_by_image`'s table.

    A box list names an image by its path below the data folder (COCO's ``file_name`` or a boxes
    table's ``image``, e.g. ``pat01/scan0.dcm``) or by its file name (NIH). The longest trailing
    part of ``path`` that the list names wins, so ``/data/pat01/scan0.dcm`` gets the boxes of
    ``pat01/scan0.dcm``, never those of ``pat02/scan0.dcm``; a bare file name is used only when one
    entry of the list ends in it. Boxes in the file's own pixels are divided by ``size`` (width,
    height of the image read) and clipped to it; without ``size`` they are left out.
    """
    pixels = getattr(gt_boxes, "pixels", {})
    names = set(gt_boxes) | set(pixels)
    parts = Path(path).parts
    key = None
    for n in range(len(parts), 0, -1):
        if "/".join(parts[-n:]) in names:
            key = "/".join(parts[-n:])
            break
    if key is None:
        matches = [k for k in names if parts and k.rpartition("/")[2] == parts[-1]]
        if len(matches) != 1:
            return []
        key = matches[0]
    out = list(gt_boxes.get(key, []))
    if size is not None:
        width, height = float(size[0]), float(size[1])
        for name, x, y, w, h in pixels.get(key, []):
            x0, y0 = max(x / width, 0.0), max(y / height, 0.0)
            x1, y1 = min((x + w) / width, 1.0), min((y + h) / height, 1.0)
            if x1 > x0 and y1 > y0:
                out.append((name, x0, y0, x1, y1))
    return out
