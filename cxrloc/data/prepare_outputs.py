"""``prepare``'s outputs once the cache is written: the usable images, ``manifest.csv`` (labels,
boxes, cache positions), the class list and ``fingerprint.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrloc.data.boxes import Box
from cxrloc.data.prepare_report import PROBLEM_KINDS
from cxrloc.data.prepare_tables import Tables
from cxrloc.data.prepared import ClassList, manifest_columns
from cxrloc.data.splits import split_image_ids


def _boxes_json(boxes: list[Box]) -> str:
    return json.dumps([list(b) for b in boxes], separators=(",", ":"))


@dataclass
class Usable:
    """The images left after decoding: cache position of each, annotated and unannotated ones."""

    cached: dict[str, int]
    annotated: dict[str, int]
    unannotated: dict[str, int]

    @classmethod
    def of(cls, tables: Tables, cache_ids: list[str], failed_ids: dict[str, str]) -> Usable:
        cached = {i: n for n, i in enumerate(cache_ids) if i not in failed_ids}
        return cls(
            cached,
            {i: tables.patient_of[i] for i in sorted(tables.annotated_ids) if i in cached},
            {i: tables.patient_of[i] for i in tables.unannotated_ids if i not in failed_ids},
        )


def build_manifest(tables: Tables, usable: Usable, failed_ids: dict[str, str], *,
              labels_from_boxes: bool) -> tuple[pd.DataFrame, ClassList, dict[str, np.ndarray]]:
    """The manifest (labels: the tables', plus with ``labels_from_boxes`` the class of every box, a
    box being a positive finding), the class list, and the per-class counts ``added`` and ``boxed``."""
    entries, present, boxes_of = tables.source.entries, tables.present, tables.boxes_of
    class_names = list(tables.source.classes)
    label_matrix = entries.loc[present, class_names].to_numpy(dtype=np.uint8).copy()
    row_of = {i: n for n, i in enumerate(tables.ids[present])}
    added_per_class = np.zeros(len(class_names), dtype=np.int64)
    for image_id, bs in boxes_of.items():
        if image_id in row_of and image_id not in failed_ids:
            for k in sorted({int(b[0]) for b in bs}):
                if label_matrix[row_of[image_id], k] == 0:
                    added_per_class[k] += 1
                    if labels_from_boxes:
                        label_matrix[row_of[image_id], k] = 1
    manifest = entries.loc[present, ["image_id", "patient_id", "follow_up", "view_position"]].copy()
    manifest[class_names] = label_matrix
    manifest["annotated"] = [int(i in boxes_of) for i in manifest["image_id"]]
    manifest["cache_index"] = [usable.cached.get(i, -1) for i in manifest["image_id"]]
    manifest["boxes"] = [_boxes_json(boxes_of.get(i, [])) for i in manifest["image_id"]]
    extra = ["patient"] if "patient" in entries.columns else []
    for column in extra:
        manifest[column] = entries.loc[present, column].to_numpy()
    manifest = manifest[~manifest["image_id"].isin(failed_ids)]
    manifest = manifest.loc[:, [*manifest_columns(class_names), *extra]]
    boxed_counts = np.zeros(len(class_names), dtype=np.int64)
    for image_id in usable.annotated:
        for k, *_ in boxes_of[image_id]:
            boxed_counts[k] += 1
    class_list = ClassList(
        tables.source.data_format,
        tuple(class_names),
        tables.source.fixed_boxed or tuple(c for c, n in zip(class_names, boxed_counts, strict=True) if n > 0),
    )
    return manifest, class_list, {"added": added_per_class, "boxed": boxed_counts}


def build_fingerprint(tables: Tables, usable: Usable, splits: dict[str, Any], manifest: pd.DataFrame,
                 class_list: ClassList, counts: dict[str, np.ndarray], failed_ids: dict[str, str],
                 image_roots: list[Path], parameters: dict[str, Any]) -> dict[str, Any]:
    """``fingerprint.json``: the inputs, parameters, classes, counts and every problem."""
    source, box_list, problems = tables.source, tables.box_list, tables.problems
    class_names = list(source.classes)
    added_per_class, labels_from_boxes = counts["added"], parameters["labels_from_boxes"]
    per_class = {c: int(n) for c, n in zip(class_names, added_per_class, strict=True) if n}
    return {
        "version": 1,
        "inputs": {"format": source.data_format, **source.inputs, "image_folders": [str(r) for r in image_roots]},
        "parameters": parameters,
        "classes": {"names": class_names, "boxed": list(class_list.boxed),
                    "boxes": dict(zip(class_names, [int(n) for n in counts["boxed"]], strict=True))},
        "notes": source.notes,
        "counts": {
            "listed": len(source.entries),
            "found": len(tables.found) + len(tables.no_size),
            "missing": len(tables.missing_ids),
            "unlisted_image_files": tables.unlisted,
            "duplicate_file_names": len(tables.duplicates),
            "usable": len(manifest),
            "annotated": len(usable.annotated),
            "unannotated": len(usable.unannotated),
            "unannotated_pool": len(split_image_ids(splits) - set(usable.annotated)),
            "cached": len(usable.cached),
            "skipped": len(failed_ids) + len(tables.no_size),
            "boxes": sum(len(tables.boxes_of[i]) for i in usable.annotated),
            "boxes_clipped": len(box_list.clipped),
            "box_rows_skipped": len(tables.box_skipped),
            "labels_added_from_boxes": int(added_per_class.sum()) if labels_from_boxes else 0,
            "labels_added_from_boxes_per_class": per_class if labels_from_boxes else {},
            "labels_missing_for_boxes": {} if labels_from_boxes else per_class,
            "problems": {k: n for k in PROBLEM_KINDS if (n := sum(p.kind == k for p in problems))},
        },
        "skipped": [{"image_id": i, "reason": reason}
                    for i, reason in sorted({**failed_ids, **tables.no_size}.items())],
        "box_problems": {"clipped": box_list.clipped, "skipped": tables.box_skipped},
        "duplicate_file_names": tables.duplicates,
        "problems": [p.to_json() for p in problems],
        "missing": {"reason": f"listed in {source.entry_name} but not found below the images folder",
                    "images": tables.missing_ids},
    }

