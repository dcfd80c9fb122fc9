"""Reports of an evaluation: ``results.{json,csv,md}``, ``per_image.csv``, ``per_image_classes.csv``
and the terminal tables.

Every report is made from the ``results.json`` content that
:func:`cxrloc.evaluation.evaluate.evaluate` builds, so the files and the tables cannot disagree.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich import box
from rich.table import Table
from rich.text import Text

from cxrloc.classes import BOXED_CLASSES, CLASSES
from cxrloc.evaluation.metrics import METRICS, is_correct
from cxrloc.utils import write_texts_atomic

METHODS: tuple[str, ...] = ("model", "prior", "prior_t")
"""Rows of every report: the model, the prior (one q for all T) and the per-T prior (q chosen per T)."""

LABELS: dict[str, str] = {"model": "model", "prior": "prior", "prior_t": "prior per-T"}

PAPER_TABLE1: dict[str, dict[str, list[float]]] = {
    # Rozenberg et al. 2019, Table 1, T = 0.1, 0% unannotated; "ref." = Li et al. 2018.
    # Values in BOXED_CLASSES order.
    "iou": {
        "paper ours": [0.818, 1.0, 0.882, 0.927, 0.695, 0.404, 0.918, 0.726],
        "paper Li2018": [0.488, 0.989, 0.693, 0.842, 0.342, 0.081, 0.715, 0.437],
    },
    "ior": {
        "paper ours": [0.889, 1.0, 0.92, 0.95, 0.773, 0.58, 0.933, 0.767],
        "paper Li2018": [0.528, 1.0, 0.753, 0.875, 0.452, 0.111, 0.786, 0.473],
    },
}
PAPER_T: float = 0.1

SHORT: dict[str, str] = {
    **{c: c[:4] for c in CLASSES},
    # The paper's abbreviations; "Pneu" alone would not tell Pneumonia from Pneumothorax.
    "Pneumonia": "Pnia",
    "Pneumothorax": "Pnth",
    "Pleural_Thickening": "PlTh",
    "Consolidation": "Cons",
}
"""Column headers of NIH's classes."""

SHORT_LENGTH: int = 6
"""Other class names longer than this are cut to it in column headers (the full names are listed
under the tables), unless two would then look alike."""


def short_names(classes: Sequence[str]) -> dict[str, str]:
    """Column headers of ``classes``: NIH's abbreviations, else names cut to :data:`SHORT_LENGTH`
    characters; a cut that two classes would share keeps both names whole."""
    cut = {c: SHORT.get(c, c[:SHORT_LENGTH]) for c in classes}
    taken = [v for v in cut.values()]
    return {c: v if taken.count(v) == 1 else c for c, v in cut.items()}


def _classes(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(every class, the boxed classes of the columns) of a result (NIH's for older results)."""
    return list(result.get("classes", CLASSES)), list(result.get("boxed_classes", BOXED_CLASSES))


def _paper(result: dict[str, Any], metric: str) -> dict[str, list[float]]:
    """The paper's Table 1 rows of ``metric`` when the result is on NIH data, else none."""
    return PAPER_TABLE1[metric] if result.get("paper_table1") else {}


GEOMETRY_TITLES: dict[str, str] = {
    "exact": "exact geometry",
    "grid": "grid geometry, as published tables",
}


def _summary(result: dict[str, Any], geometry: str = "exact") -> dict[str, Any]:
    """The summary of one geometry (``exact``: the top level, as in every earlier results.json)."""
    return result["summary"] if geometry == "exact" else result["summary"]["grid"]


def geometries_of(result: dict[str, Any], wanted: Sequence[str] = ("exact", "grid")) -> list[str]:
    """The geometries of ``wanted`` the result holds (a results.json from before 0.x holds exact only)."""
    have = {"exact", *(["grid"] if "grid" in result.get("summary", {}) else [])}
    return [g for g in wanted if g in have]


def paper_note(result: dict[str, Any], geometries: Sequence[str]) -> str:
    """One line on the paper's Table 1 rows: where they are, and why only there (or why not shown)."""
    if result.get("paper_table1_omitted"):
        return f"Paper rows not shown: {result['paper_table1_omitted']}."
    if not result.get("paper_table1"):
        return ""
    if "grid" in geometries:
        return ("Paper rows: Rozenberg et al. 2019 Table 1 (T = 0.1, 0% unannotated), beside the grid tables only: "
                "published localization accuracies count IoU on the patch grid, with each box rounded onto it "
                "(docs/evaluation.md), not with exact areas.")
    return ("The paper's Table 1 rows are shown beside the grid tables only (--geometry grid or both): they count "
            "IoU on the patch grid, not with exact areas (docs/evaluation.md).")

WIDE_TERMINAL: int = 150
"""Terminal width from which the tables show "mean±std" cells (about 150 columns); narrower: means."""


def nan_to_none(x: Any) -> Any:
    """JSON has no NaN: ``None`` instead."""
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _fmt(v: float | None, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if std is None or math.isnan(std):
        return f"{v:.3f}"
    return f"{v:.3f}±{std:.3f}"


def accuracy_rows(
    result: dict[str, Any], metric: str, with_std: bool = True, geometry: str = "exact"
) -> list[tuple[str, str, list[str]]]:
    """``(method, T, cells for the boxed classes + mean)`` for one metric in one geometry; beside the
    ``grid`` rows on NIH data, the paper's rows at T = 0.1 (never beside the exact ones)."""
    summary = _summary(result, geometry)
    _, boxed = _classes(result)
    rows: list[tuple[str, str, list[str]]] = []
    for j, t in enumerate(result["ts"]):
        for method in METHODS:
            s = summary[method][metric]
            cells = [_fmt(s["per_class_mean"][c][j], s["per_class_std"][c][j] if with_std else None) for c in boxed]
            cells.append(_fmt(s["boxed_mean"][j], s["boxed_mean_std"][j] if with_std else None))
            rows.append((LABELS[method], f"{t:g}", cells))
        if abs(t - PAPER_T) < 1e-9 and geometry == "grid":
            for label, values in _paper(result, metric).items():
                rows.append((label, f"{t:g}", [f"{v:.3f}" for v in values] + [f"{np.mean(values):.3f}"]))
    return rows


def columns_note(result: dict[str, Any]) -> str:
    """What the "mean" column averages, the abbreviated class names, and the classes matched by name."""
    _, boxed = _classes(result)
    short = short_names(boxed)
    averaged = result.get("averaged_classes")
    if averaged is None:  # a results.json from before the averaged classes were recorded
        parts = [f"'mean' = mean over the {len(boxed)} boxed classes that have a test box"
                 + (" (NIH's 8)" if result.get("paper_table1") else "") + "."]
    else:
        parts = [f"'mean' = mean over the {len(averaged)} boxed classes that have a test box"
                 + (" (NIH's 8)" if len(averaged) == 8 and result.get("paper_table1") else
                    f": {', '.join(averaged) or 'none'}") + "."]
    unknown = set(result.get("not_in_run") or ())
    if unknown:  # an external test set: say which columns the mean can use
        boxes = result["summary"].get("boxes", {})
        used = [c for c in boxed if boxes.get(c, 0) > 0 and c not in unknown]
        parts[0] = (f"'mean' = mean over the boxed classes that have a test box and are known to the run: "
                    f"{', '.join(used) or 'none'}.")
    cut = [f"{v} = {c}" for c, v in short.items() if v != c and c not in SHORT]
    if cut:
        parts.append("Columns: " + ", ".join(cut) + ".")
    if result.get("not_in_run"):
        parts.append(f"Not known to the run (n/a): {', '.join(result['not_in_run'])}.")
    if result.get("not_in_data"):
        parts.append(f"Not in the test data (n/a): {', '.join(result['not_in_data'])}.")
    return " ".join(parts)


def markdown(result: dict[str, Any], info: str) -> str:
    """``results.md``: one table per metric, then the AUROC of every class."""
    n_folds = len(result["folds"])
    _, boxed = _classes(result)
    short = short_names(boxed)
    buf = io.StringIO()
    buf.write(f"# Evaluation\n\n{info}\n\nMean ± sample std over {n_folds} fold(s); {columns_note(result)} ")
    buf.write("'prior' chooses one coverage level q for all T, 'prior per-T' the best q for each ")
    buf.write("T (both on the training boxes, in the exact geometry).")
    geometries = geometries_of(result)
    note = paper_note(result, geometries)
    if note:
        buf.write(" " + note)
    buf.write("\n\n")
    head = ["method", "T", *[short[c] for c in boxed], "mean"]
    for geometry in geometries:
        for m in result["metrics"]:
            title = f"## {m.upper()} accuracy" + (f" ({GEOMETRY_TITLES[geometry]})" if len(geometries) > 1 else "")
            buf.write(f"{title}\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
            for method, t, cells in accuracy_rows(result, m, geometry=geometry):
                buf.write(f"| {method} | {t} | " + " | ".join(cells) + " |\n")
            buf.write("\n")
    buf.write("## Classification (model)\n\n")
    buf.write(classification_note(result) + "\n\n")
    buf.write("| class | positives | AUROC of 1'z | sensitivity | specificity |\n|---|---|---|---|---|\n")
    for c, positives, cells in classification_rows(result):
        buf.write(f"| {c} | {positives} | " + " | ".join(cells) + " |\n")
    buf.write("\n")
    return buf.getvalue()


def classification_rows(result: dict[str, Any], with_std: bool = True) -> list[tuple[str, str, list[str]]]:
    """``(class, test positives, [AUROC, sensitivity, specificity])`` cells of every class."""
    summary = result["summary"]
    cls = summary["classification"]
    unlabelled = set(result.get("not_in_data", []))
    rows = []
    for c in summary["auroc"]["mean"]:
        cells = [
            _fmt(summary["auroc"]["mean"][c], summary["auroc"]["std"][c] if with_std else None),
            _fmt(cls["sensitivity"]["mean"][c], cls["sensitivity"]["std"][c] if with_std else None),
            _fmt(cls["specificity"]["mean"][c], cls["specificity"]["std"][c] if with_std else None),
        ]
        rows.append((c, "n/a" if c in unlabelled else str(cls["positives"][c]), cells))
    return rows


def classification_note(result: dict[str, Any]) -> str:
    """The operating point and the classes called present per image against the labelled findings."""
    cls = result["summary"]["classification"]
    points = sorted(set(cls["operating_points"]))
    where = "validation" if result.get("split") == "val" else "test"
    note = (
        f"Operating point: {'; '.join(points)}. Classes called present per {where} image: "
        f"{cls['present_per_image']:.2f} (labelled findings per image: {cls['labels_per_image']:.2f}). "
        "AUROC is of the raw score 1'z (a calibrated probability ranks the images the same way); "
        "sensitivity and specificity are of the present/absent decisions; 'n/a' where a class has no "
        "positive (or no negative) image."
    )
    if result.get("split") == "val":
        note += " The operating point was chosen on these validation images: optimistic."
    return note


def rich_tables(
    result: dict[str, Any], width: int, geometries: Sequence[str] = ("exact",)
) -> list[Table | Text]:
    """The terminal tables of ``geometries`` (means only below :data:`WIDE_TERMINAL` columns; the paper's
    rows beside the grid tables only), then the notes and the operating point's line."""
    tables: list[Table | Text] = []
    folds = list(result.get("folds", []))
    with_std = width >= WIDE_TERMINAL and len(folds) > 1
    if len(folds) == 1:
        over = f"fold {folds[0]}"
    else:
        over = f"{'mean ± std' if with_std else 'mean'} over {len(folds)} folds"
    shown = geometries_of(result, geometries) or ["exact"]
    for geometry, m in [(g, m) for g in shown for m in result["metrics"]]:
        where = over if geometry == "exact" and "grid" not in geometries else f"{GEOMETRY_TITLES[geometry]}, {over}"
        t = Table(
            title=f"{m.upper()} accuracy ({where})",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            collapse_padding=True,
            show_edge=False,  # without the edge columns an 80-column terminal keeps method labels on one line
            pad_edge=False,
        )
        _, boxed = _classes(result)
        short = short_names(boxed)
        for col in ("method", "T", *[short[c] for c in boxed], "mean"):
            if col == "method":
                t.add_column(col, justify="left", no_wrap=True)
            else:  # numbers are never cut: an 80-column terminal fits them
                t.add_column(col, justify="right", no_wrap=True, min_width=3 if col == "T" else 5)
        for method, tt, cells in accuracy_rows(result, m, with_std, geometry=geometry):
            style = "bold" if method == "model" else ("dim" if method.startswith("paper") else None)
            t.add_row(method, tt, *cells, style=style)
        tables.append(t)
    a = Table(title=f"Classification ({over})")
    a.add_column("class", overflow="fold")
    for col in ("pos", "AUROC", "sens", "spec"):
        a.add_column(col, justify="right", no_wrap=True)
    for c, positives, cells in classification_rows(result, with_std):
        a.add_row(c, positives, *cells)
    tables.append(a)
    note = paper_note(result, shown)
    tables.append(Text(columns_note(result) + (" " + note if note else "") + " " + classification_note(result)))
    return tables


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def csv_text(result: dict[str, Any]) -> str:
    """``results.csv``: one row per (method, metric, T, class, geometry), long format; the localization
    rows in both geometries, the paper's rows as ``grid`` (the geometry they were counted in), the
    classification rows with an empty geometry."""
    summary, ts, n_folds = result["summary"], result["ts"], len(result["folds"])
    classes, boxed = _classes(result)
    boxes = summary["boxes"]
    records = []
    for geometry in geometries_of(result):
        for method in METHODS:
            for m in result["metrics"]:
                s = _summary(result, geometry)[method][m]
                for j, t in enumerate(ts):
                    for c in boxed:
                        records.append(
                            (method, m, t, c, _nan(s["per_class_mean"][c][j]), _nan(s["per_class_std"][c][j]),
                             n_folds, int(boxes[c]), geometry)
                        )
                    records.append(
                        (method, m, t, "mean", _nan(s["boxed_mean"][j]), _nan(s["boxed_mean_std"][j]), n_folds,
                         int(sum(boxes[c] for c in boxed)), geometry)
                    )
    for m in result["metrics"]:
        for label, values in _paper(result, m).items():
            for c, v in zip(BOXED_CLASSES, values, strict=True):
                records.append((label, m, PAPER_T, c, v, np.nan, np.nan, np.nan, "grid"))
            records.append((label, m, PAPER_T, "mean", float(np.mean(values)), np.nan, np.nan, np.nan, "grid"))
    auroc = summary["auroc"]
    for c in classes:
        records.append(("model", "auroc", np.nan, c, _nan(auroc["mean"][c]), _nan(auroc["std"][c]), n_folds, np.nan,
                        ""))
    cls = summary["classification"]
    for key in ("sensitivity", "specificity"):
        for c in classes:
            records.append(("model", key, np.nan, c, _nan(cls[key]["mean"][c]), _nan(cls[key]["std"][c]), n_folds,
                            np.nan, ""))
    records.append(("model", "present_per_image", np.nan, "all", cls["present_per_image"], np.nan, n_folds, np.nan,
                    ""))
    records.append(("labels", "labels_per_image", np.nan, "all", cls["labels_per_image"], np.nan, n_folds, np.nan,
                    ""))
    df = pd.DataFrame(records, columns=["method", "metric", "T", "class", "mean", "std", "folds", "boxes",
                                        "geometry"])
    return df.to_csv(index=False, float_format="%.6g")


def per_image_csv(rows: Sequence[dict[str, Any]], ts: Sequence[float]) -> str:
    """``per_image.csv``: one row per test box, with IoU, IoR, correctness at each T and the prior's, in the
    exact geometry then the grid one (``*_grid``), and the image's score, probability and present/absent
    decision for the box's class."""
    cols = ["fold", "image_id", "box_index", "class", "x0", "y0", "x1", "y1", "region_patches", "iou", "ior"]
    records = []
    for r in rows:
        rec = {c: r[c] for c in cols}
        for m in METRICS:
            for t in ts:
                rec[f"correct_{m}@{t:g}"] = int(bool(is_correct(r[m], t)))
        rec["prior_iou"], rec["prior_ior"] = r["prior_iou"], r["prior_ior"]
        if "iou_grid" in r:
            rec["iou_grid"], rec["ior_grid"] = r["iou_grid"], r["ior_grid"]
            for m in METRICS:
                for t in ts:
                    rec[f"correct_{m}_grid@{t:g}"] = int(bool(is_correct(r[f"{m}_grid"], t)))
            rec["prior_iou_grid"], rec["prior_ior_grid"] = r.get("prior_iou_grid"), r.get("prior_ior_grid")
        rec["score"], rec["probability"] = r.get("score"), r.get("probability")
        rec["present"] = int(r["present"]) if "present" in r else None
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    if df.empty:
        df = pd.DataFrame(columns=cols)
    return df.to_csv(index=False, float_format="%.6g")


CLASS_COLUMNS: tuple[str, ...] = ("fold", "image_id", "class", "label", "score", "probability", "present")
"""``per_image_classes.csv``: one row per scored image and class."""


def per_image_classes_csv(class_rows: Sequence[dict[str, Any]]) -> str:
    """``per_image_classes.csv``: label, raw score ``1'z``, probability (empty when uncalibrated) and decision."""
    df = pd.DataFrame.from_records(list(class_rows), columns=list(CLASS_COLUMNS))
    return df.to_csv(index=False, float_format="%.6g")


def write_reports(
    result: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    out: Path,
    info: str,
    class_rows: Sequence[dict[str, Any]] = (),
    extra: dict[Path, str] | None = None,
) -> list[Path]:
    """Write the report files into ``out`` (and ``extra`` files, e.g. ``report.html``) as one set (none
    replaced unless all are written) and return their paths."""
    return write_texts_atomic(
        {
            **(extra or {}),
            out / "results.json": json.dumps(result, indent=2) + "\n",
            out / "results.csv": csv_text(result),
            out / "results.md": markdown(result, info),
            out / "per_image.csv": per_image_csv(rows, result["ts"]),
            out / "per_image_classes.csv": per_image_classes_csv(class_rows),
        },
        what="evaluation report",
    )
