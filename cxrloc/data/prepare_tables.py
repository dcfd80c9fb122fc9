"""``prepare``'s first step: read a dataset's tables (:mod:`cxrloc.data.source`), find the listed
images below the image folders and place the boxes, listing what the tables lose; nothing is
decoded or written here. Image names from the tables are only compared with files found on disk,
never joined to a path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrloc.data.boxes import Box, BoxList
from cxrloc.data.image_discovery import find_images
from cxrloc.data.prepare_report import Problem, strict_error, table_problems
from cxrloc.data.source import Source
from cxrloc.utils import CxrlocError


@dataclass
class Tables:
    """What the tables say once their images are looked up on disk (before any decoding)."""

    source: Source
    where: str
    found: dict[str, Path]
    unlisted: int
    duplicates: list[str]
    box_list: BoxList
    no_size: dict[str, str]
    box_skipped: list[str]
    boxes_of: dict[str, list[Box]]
    problems: list[Problem]
    ids: np.ndarray
    present: np.ndarray
    missing_ids: list[str]
    patient_of: dict[str, int]
    annotated_ids: set[str]
    unannotated_ids: list[str]


def read_tables(source: Source, image_roots: list[Path], *, strict: bool) -> Tables:
    """Find the listed images, place the boxes, list what the tables lose (``--strict`` stops here)."""
    where = str(image_roots[0]) if len(image_roots) == 1 else ", ".join(str(r) for r in image_roots)
    entries = source.entries
    listed = set(entries["image_id"])
    found, unlisted, duplicates = find_images(image_roots, listed)
    if not found:
        raise CxrlocError(
            f"{where}: none of the {len(entries):,} images listed in {source.entry_name} was found below it; "
            "check the folder (images may sit in subfolders such as images_001/images/)"
        )
    box_list, no_size = source.box_list(found)
    box_skipped = list(box_list.skipped)
    boxes_of: dict[str, list[Box]] = {}
    for image_id, bs in box_list.boxes.items():
        if image_id in listed:
            boxes_of[image_id] = bs
        else:
            box_skipped.extend(f"{image_id}: box for an image not listed in {source.entry_name}" for _ in bs)
    problems = table_problems(box_list, Path(source.box_name), source.entry_name, listed, found)
    problems += [Problem("annotated_unreadable", i, 0, f"{reason} (its boxes need its size)")
                 for i, reason in sorted(no_size.items())]
    if strict and problems:
        raise strict_error(problems, "nothing was written")
    for image_id in no_size:
        del found[image_id]  # unusable: its boxes cannot be placed
    ids = entries["image_id"].to_numpy(dtype=object)
    patients = entries["patient_id"].to_numpy()
    present = np.array([i in found for i in ids], dtype=bool)
    patient_of = {str(i): int(p) for i, p in zip(ids[present], patients[present], strict=True)}
    annotated_ids = {i for i in patient_of if i in boxes_of}
    if not annotated_ids:
        raise CxrlocError(_no_annotated_message(where, source.box_name, box_list, box_skipped))
    return Tables(
        source, where, found, unlisted, duplicates, box_list, no_size, box_skipped, boxes_of, problems, ids,
        present, [str(i) for i in ids[~present] if i not in no_size], patient_of, annotated_ids,
        [i for i in patient_of if i not in boxes_of],
    )


def _no_annotated_message(where: str, box_name: str, box_list: BoxList, skipped: Sequence[str]) -> str:
    """Why no annotated image is left: no box row was usable (and the first reason), or none of the
    boxed images was found on disk."""
    tail = "folds are built over annotated images, so nothing usable can be prepared"
    if not box_list.boxes:
        first = box_list.problems[0].detail if box_list.problems else (skipped[0] if skipped else "")
        return (f"{box_name}: none of its {box_list.rows} box row(s) is usable"
                + (f" (first: {first})" if first else "") + f"; {tail}")
    return f"{where}: no image with a box in {box_name} was found on disk; {tail}"

