"""What ``cxrloc demo`` prints and the accuracy blocks of its ``summary.json`` (from ``evaluate``'s results)."""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.table import Table

from cxrloc.utils import console


def table_rows(results: dict[str, Any], method: str, metric: str) -> dict[str, Any]:
    """Per-class (boxed) and mean accuracies of one method/metric from ``evaluate``'s results."""
    block = results["summary"][method][metric]
    return {
        "per_class": {c: block["per_class_mean"][c] for c in results["boxed_classes"]},
        "mean": block["boxed_mean"],
    }


def summary_tables(summary: dict[str, Any]) -> list[Table]:
    """One table per metric: a row per boxed class and the mean; model, prior and per-T prior at each T.

    The unary model's accuracies are in ``summary.json`` only, to keep the tables 80 columns wide.
    """
    ts = summary["ts"]
    tables = []
    methods = {"model": "model", "prior": "prior", "prior_t": "per-T"}
    for metric in ("iou", "ior"):
        table = Table(
            title=f"{metric.upper()} accuracy at T, {summary['test_images']} synthetic test images (fold 0)",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
            collapse_padding=True,
        )
        table.add_column("class", no_wrap=True)
        for label in methods.values():
            for t in ts:
                table.add_column(f"{label}\n{t:g}", justify="right", no_wrap=True)
        for row, name in [(c, c) for c in summary["classes"]] + [(None, "mean")]:
            cells = []
            for method in methods:
                block = summary["accuracy"][method][metric]
                values = block["mean"] if row is None else block["per_class"][row]
                cells += [fmt(v) for v in values]
            table.add_row(name, *cells, style="bold" if row is None else None)
        tables.append(table)
    return tables


def classification_summary(results: dict[str, Any], operating_point: str) -> dict[str, Any]:
    """Per class AUROC, sensitivity, specificity and test positives, and calls per image, from ``evaluate``."""
    s = results["summary"]
    c = s["classification"]
    return {
        "operating_point": operating_point,
        "per_class": {
            name: {"positives": c["positives"][name], "auroc": s["auroc"]["mean"][name],
                   "sensitivity": c["sensitivity"]["mean"][name], "specificity": c["specificity"]["mean"][name]}
            for name in results["classes"]
        },
        "present_per_image": c["present_per_image"],
        "labels_per_image": c["labels_per_image"],
    }


def classification_table(summary: dict[str, Any]) -> Table:
    """Classes with a test positive: AUROC of 1'z, sensitivity and specificity at the operating point."""
    c = summary["classification"]
    table = Table(
        title=f"Classification at the operating point, {summary['test_images']} synthetic test images (fold 0)",
        box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True,
    )
    for col in ("class", "positives", "AUROC", "sensitivity", "specificity"):
        table.add_column(col, justify="left" if col == "class" else "right", no_wrap=True)
    for name, v in c["per_class"].items():
        if v["positives"]:
            table.add_row(name, str(v["positives"]), fmt(v["auroc"]), fmt(v["sensitivity"]), fmt(v["specificity"]))
    return table


def fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"




def print_outputs(summary: dict[str, Any]) -> None:
    t = summary["target"]
    verdict = "[green]met[/]" if t["met"] else "[red]NOT met[/]"
    console.print(
        f"Mean IoU accuracy at T={t['T']:g} over the {len(summary['classes'])} boxed classes: "
        f"model {fmt(t['model'])}, "
        f"stronger prior {fmt(t['prior'])} (target >= {t['required']:g}, above the prior: {verdict}). "
        f"Total time {summary['timings_s']['total']:.0f} s."
    )
    c = summary["classification"]
    console.print(
        f"Classes called present per test image: {fmt(c['present_per_image'])} (labelled findings per image: "
        f"{fmt(c['labels_per_image'])}); operating point: {c['operating_point']}."
    )
    o = summary["outputs"]
    for label, key in (
        (f"synthetic {summary['format'].upper()} data", "data"), ("prepared cache", "prepared"),
        ("unary run", "unary_run"),
        ("CRF run", "run"), ("thresholds", "thresholds"), ("calibration", "calibration"), ("evaluation", "eval"),
        ("ONNX model", "onnx"), ("overlays", "overlays"),
    ):
        console.print(f"  {label:<20} {o[key]}")
    console.print(f"Results saved to {o['summary']}")
