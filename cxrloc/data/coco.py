"""COCO annotation files for ``prepare --format coco`` (e.g. TBX11K's ``TBX11K_train.json``).

- ``categories`` become the class list, in the order of their ``id``.
- ``images``: each ``file_name`` is the image's path below the images folder (only compared with
  the files found there); ``width`` and ``height`` are the frame of the image's boxes, like NIH's
  1024-pixel frame: a box stays right when the file was resized after annotation. An entry without
  them gets the file's own size (read from its header).
- ``annotations``: ``bbox = [x, y, w, h]`` in that frame. A bad annotation is skipped and reported
  like a row of NIH's box list; its "line" is its position in the ``annotations`` list (1 = the
  first), and the message gives its ``id``.

COCO has no image-level labels and no patients. Without a labels table, an image with boxes is
positive for the classes of its boxes and **every image without an annotation is negative for
every class** (COCO's convention: an image listed without annotations shows none of the
categories); each image is its own patient. A labels table (``--labels``, the format of
:mod:`cxrloc.data.table`, its ``image`` being the COCO ``file_name``) gives the labels and patients
of the images it lists, and adds the images it lists that the COCO file does not (as unboxed
images). ``fingerprint.json`` records which rule applied (``notes``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cxrloc.classes import check_class_names
from cxrloc.data.boxes import BoxList, RawBox
from cxrloc.data.nih import validate_image_path
from cxrloc.data.source import Columns, Source, file_input, make_entries
from cxrloc.data.table import read_labels_table
from cxrloc.utils import CxrlocError


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CxrlocError(f"{path}: COCO annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CxrlocError(f"{path}: cannot read as JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise CxrlocError(f"{path}: not a COCO annotation file (it needs the lists 'images' and 'categories')")
    if not isinstance(data.get("annotations", []), list):
        raise CxrlocError(f"{path}: 'annotations' is not a list")
    return data


def _number(value: Any) -> float | None:
    """A JSON number as float (``None`` for anything else, booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def read_categories(data: dict[str, Any], path: Path) -> tuple[list[str], dict[Any, int]]:
    """The class list (categories in the order of their id) and category id -> class index."""
    cats = []
    for n, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
            raise CxrlocError(f"{path}: category #{n + 1} needs an 'id' and a 'name': {cat!r}")
        cats.append((cat["id"], cat["name"]))
    ids = [c[0] for c in cats]
    if len(set(map(repr, ids))) != len(ids):
        raise CxrlocError(f"{path}: two categories share an id ({sorted(map(repr, ids))})")
    try:
        cats.sort(key=lambda c: c[0])
    except TypeError:
        raise CxrlocError(f"{path}: category ids {ids} cannot be ordered; use numbers") from None
    names = check_class_names([c[1] for c in cats], f"{path} categories")
    return names, {cid: k for k, (cid, _) in enumerate(cats)}


def read_images(data: dict[str, Any], path: Path) -> tuple[list[str], dict[Any, str], dict[str, tuple[float, float]]]:
    """File names in file order, COCO image id -> file name, and each image's (width, height) frame."""
    names: list[str] = []
    by_id: dict[Any, str] = {}
    frames: dict[str, tuple[float, float]] = {}
    seen: set[str] = set()
    for n, image in enumerate(data["images"]):
        where = f"{path} image #{n + 1}: "
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise CxrlocError(f"{where}needs an 'id' and a 'file_name': {image!r}")
        name = validate_image_path(image["file_name"].strip(), where)
        key = image["id"]
        if not isinstance(key, int | str) or isinstance(key, bool):
            raise CxrlocError(f"{where}its id {key!r} is not a number")
        if key in by_id:
            raise CxrlocError(f"{where}id {key!r} is used by {by_id[key]!r} too")
        if name in seen:
            raise CxrlocError(f"{where}file_name {name!r} is listed twice")
        seen.add(name)
        by_id[key] = name
        names.append(name)
        width, height = _number(image.get("width")), _number(image.get("height"))
        if width is not None and height is not None and width > 0 and height > 0:
            frames[name] = (width, height)
    return names, by_id, frames


def read_annotations(
    data: dict[str, Any], path: Path, by_id: dict[Any, str], category: dict[Any, int], classes: list[str]
) -> tuple[list[RawBox], BoxList]:
    """The annotations as box rows; those that cannot be used are recorded in the returned BoxList."""
    rows: list[RawBox] = []
    parsed = BoxList()
    for n, ann in enumerate(data.get("annotations", [])):
        line = n + 1
        parsed.rows += 1
        ident = ann.get("id", "?") if isinstance(ann, dict) else "?"
        where = f"{path.name} annotation #{line} (id {ident})"
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann or "bbox" not in ann:
            parsed.add_problem("malformed", line, "", f"{where}: needs image_id, category_id and bbox: {ann!r}")
            continue
        key = ann["image_id"]
        image = by_id.get(key) if isinstance(key, int | str) and not isinstance(key, bool) else None
        if image is None:
            parsed.add_problem("not_in_data_entry", line, f"image id {key!r}",
                               f"{where}: image_id {key!r} is not in the file's 'images'")
            continue
        cat = ann["category_id"]
        k = category.get(cat) if isinstance(cat, int | str) and not isinstance(cat, bool) else None
        if k is None:
            parsed.add_problem("unknown_label", line, image, f"{where}: {image}: category_id {cat!r} is not in "
                               "'categories'")
            continue
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            parsed.add_problem("malformed", line, image, f"{where}: {image}: bbox {bbox!r} is not [x, y, w, h]")
            continue
        values = [_number(v) for v in bbox]
        if any(v is None or not math.isfinite(v) for v in values):
            parsed.add_problem("non_numeric", line, image, f"{where}: {image}: non-numeric bbox {bbox!r}")
            continue
        rows.append(RawBox(line, where, image, classes[k], k, tuple(values)))  # type: ignore[arg-type]
    return rows, parsed


def read_coco(path: Path) -> tuple[list[str], list[str], dict[str, tuple[float, float]], list[RawBox], BoxList]:
    """A COCO file read: its classes, file names (in file order), image frames, box rows and the rows
    it could not use (with the number of annotations)."""
    data = _load(path)
    classes, category = read_categories(data, path)
    names, by_id, frames = read_images(data, path)
    rows, parsed = read_annotations(data, path, by_id, category, classes)
    return classes, names, frames, rows, parsed


def coco_source(annotations: Path, labels: Path | None, columns: Columns) -> Source:
    """A COCO file (and an optional labels table) as a :class:`~cxrloc.data.source.Source`."""
    classes, names, frames, rows, parsed = read_coco(annotations)
    ids, patients, image_labels = list(names), [None] * len(names), [[] for _ in names]
    inputs: dict[str, Any] = {"labels": None, "boxes": file_input(annotations, parsed.rows)}
    if labels is None:
        notes = [
            f"{annotations.name} has no image-level labels and no --labels table was given: every image without "
            "a box is taken as negative for every class, and each image is its own patient"
        ]
    else:
        table = read_labels_table(labels, columns, classes, what=f"the categories of {annotations.name}")
        position = {name: n for n, name in enumerate(ids)}
        for image, patient, found in zip(table.ids, table.patients, table.labels, strict=True):
            if image not in position:
                position[image] = len(ids)
                ids.append(image)
                patients.append(None)
                image_labels.append([])
            patients[position[image]] = patient
            image_labels[position[image]] = found
        inputs["labels"] = file_input(labels, len(table.ids))
        notes = [
            f"labels and patients of the images {labels.name} lists are its own; an image it does not list is "
            "positive for the classes of its boxes only (negative for every class without a box) and is its "
            "own patient"
        ]
    return Source(
        data_format="coco",
        classes=classes,
        entries=make_entries(ids, patients, image_labels, classes),
        entry_name=annotations.name if labels is None else f"{annotations.name} / {labels.name}",
        box_name=annotations.name,
        inputs=inputs,
        notes=notes,
        parsed=parsed,
        raw_boxes=rows,
        frames=frames,
    )
