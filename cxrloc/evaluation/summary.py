"""An evaluation's folds summarised: mean and standard deviation over folds (:func:`summarise`), the
report's boxed classes (:func:`boxed_class_names`) and the ``results.json`` content
(:func:`results_json`) that :mod:`cxrloc.evaluation.report` turns into every file and table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cxrloc.classes import BOXED_CLASSES, is_nih
from cxrloc.evaluation.metrics import METRICS
from cxrloc.evaluation.report import METHODS, PAPER_T, PAPER_TABLE1, nan_to_none
from cxrloc.geometry import GEOMETRIES


def _mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation (ddof=1) over axis 0, ignoring NaN (NaN std for one value)."""
    values = np.asarray(values, dtype=np.float64)
    n = np.sum(~np.isnan(values), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(values, axis=0) / np.maximum(n, 1), np.nan)
        sq = np.nansum((values - mean) ** 2, axis=0)
        std = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1)), np.nan)
    return mean, std


def _boxed_mean(acc: np.ndarray, count: np.ndarray, boxed: Sequence[int]) -> np.ndarray:
    """Mean over the boxed classes ``boxed`` that have at least one test box and an accuracy (a class
    the run does not know has boxes but no accuracy): ``(K, T) -> (T,)``."""
    idx = [k for k in boxed if count[k] > 0 and not np.all(np.isnan(acc[k]))]
    return acc[idx].mean(axis=0) if idx else np.full(acc.shape[1], np.nan)



def boxed_class_names(
    classes: Sequence[str], data_format: str, boxed: Sequence[str]
) -> list[str]:
    """The classes of the reports' columns and "mean", in ``classes`` order: NIH's 8 for NIH data
    (:data:`BOXED_CLASSES`), else those in ``boxed`` (classes with boxes, in ``classes.json``)."""
    if data_format == "nih" and is_nih(classes):
        return list(BOXED_CLASSES)
    return [c for c in classes if c in set(boxed)]



def summarise(folds: list[dict[str, Any]], ts: Sequence[float], boxed: Sequence[int]) -> dict[str, Any]:
    """Mean and std over folds of per-class accuracies, of the boxed-class means (``boxed``: class
    indices), of the AUROC and of the sensitivity and specificity at the operating point; classes called
    present and labelled findings per image pooled over every fold's images."""
    out: dict[str, Any] = {"grid": {}}
    for geometry in GEOMETRIES:
        where = out if geometry == "exact" else out["grid"]
        for method in METHODS:
            where[method] = {}
            for m in METRICS:
                accs = [f[method][m] if geometry == "exact" else f["grid"][method][m] for f in folds]
                per = np.stack(accs)  # (F, K, T)
                means = np.stack([_boxed_mean(a, f["count"], boxed) for a, f in zip(accs, folds, strict=True)])
                pc_mean, pc_std = _mean_std(per)
                b_mean, b_std = _mean_std(means)
                where[method][m] = {
                    "per_class_mean": pc_mean,
                    "per_class_std": pc_std,
                    "boxed_mean": b_mean,
                    "boxed_mean_std": b_std,
                    "per_fold_boxed_mean": means,
                }
    a_mean, a_std = _mean_std(np.stack([f["auroc"] for f in folds]))
    out["auroc"] = {"mean": a_mean, "std": a_std}
    for key in ("sensitivity", "specificity"):
        m, sd = _mean_std(np.stack([f["classification"][key] for f in folds]))
        out[key] = {"mean": m, "std": sd}
    images = sum(f["classification"]["images"] for f in folds)
    out["positives"] = np.sum([f["classification"]["positives"] for f in folds], axis=0)
    out["present_per_image"] = sum(f["classification"]["present_total"] for f in folds) / max(images, 1)
    out["labels_per_image"] = sum(f["classification"]["labels_total"] for f in folds) / max(images, 1)
    out["count"] = np.sum([f["count"] for f in folds], axis=0)
    return out




def results_json(
    summary: dict[str, Any],
    folds: list[dict[str, Any]],
    ts: Sequence[float],
    classes: Sequence[str],
    boxed: Sequence[int],
    paper: bool,
) -> dict[str, Any]:
    """The ``results.json`` content: per class (``classes``) and boxed-class mean (``boxed``), with the
    paper's Table 1 when ``paper`` (NIH results)."""
    fmt = _JsonArrays(list(classes))
    names = fmt.names
    averaged = [names[k] for k in boxed if any(int(f["count"][k]) > 0 and not np.all(np.isnan(f["model"]["iou"][k]))
                                              for f in folds)]
    out: dict[str, Any] = {
        "classes": names,
        "boxed_classes": [names[k] for k in boxed],
        "averaged_classes": averaged,
        "geometries": list(GEOMETRIES),
        "summary": _summary_json(summary, folds, fmt),
        "per_fold": [_fold_json(f, boxed, fmt) for f in folds],
    }
    if paper:
        out["paper_table1"] = paper_table1()
    return out


class _JsonArrays:
    """Arrays over the K classes ``names`` as JSON values (NaN -> null)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def per_class(self, arr: np.ndarray) -> dict[str, list[float | None]]:
        """``(K, T)`` -> ``{class: [value at each T]}``."""
        return {self.names[k]: [nan_to_none(float(v)) for v in arr[k]] for k in range(arr.shape[0])}

    @staticmethod
    def vec(arr: np.ndarray) -> list[float | None]:
        return [nan_to_none(float(v)) for v in arr]

    def by_class(self, arr: np.ndarray) -> dict[str, Any]:
        """``(K,)`` -> ``{class: value}``."""
        return dict(zip(self.names, self.vec(arr), strict=True))

    def counts(self, arr: np.ndarray) -> dict[str, int]:
        """``(K,)`` counts -> ``{class: int}``."""
        return dict(zip(self.names, [int(c) for c in arr], strict=True))

    def methods(self, source: dict[str, Any]) -> dict[str, Any]:
        """Each method's per-class and boxed-mean accuracies (mean and std over folds) of one geometry."""
        return {
            method: {
                m: {
                    "per_class_mean": self.per_class(source[method][m]["per_class_mean"]),
                    "per_class_std": self.per_class(source[method][m]["per_class_std"]),
                    "boxed_mean": self.vec(source[method][m]["boxed_mean"]),
                    "boxed_mean_std": self.vec(source[method][m]["boxed_mean_std"]),
                }
                for m in source[method]
            }
            for method in METHODS
        }


def _summary_json(summary: dict[str, Any], folds: list[dict[str, Any]], fmt: _JsonArrays) -> dict[str, Any]:
    """``results.json``'s ``summary``: :func:`summarise`'s means and stds over folds."""
    summ: dict[str, Any] = fmt.methods(summary)  # the exact geometry, at the top level as before
    summ["grid"] = fmt.methods(summary["grid"])
    summ["auroc"] = {"mean": fmt.by_class(summary["auroc"]["mean"]), "std": fmt.by_class(summary["auroc"]["std"])}
    summ["classification"] = {
        "operating_points": [f["operating_point"]["description"] for f in folds],
        **{key: {"mean": fmt.by_class(summary[key]["mean"]), "std": fmt.by_class(summary[key]["std"])}
           for key in ("sensitivity", "specificity")},
        "positives": fmt.counts(summary["positives"]),
        "present_per_image": float(summary["present_per_image"]),
        "labels_per_image": float(summary["labels_per_image"]),
    }
    summ["boxes"] = fmt.counts(summary["count"])
    return summ


def _fold_json(f: dict[str, Any], boxed: Sequence[int], fmt: _JsonArrays) -> dict[str, Any]:
    """One entry of ``results.json``'s ``per_fold``: a fold's accuracies, boxed means and classification."""
    per_class, vec, by_class, counts = fmt.per_class, fmt.vec, fmt.by_class, fmt.counts
    return {
        "fold": f["fold"],
        "checkpoint": f["checkpoint"],
        "test_images": f["test_images"],
        "boxes": counts(f["count"]),
        "model": {m: per_class(f["model"][m]) for m in METRICS},
        "prior": {m: per_class(f["prior"][m]) for m in METRICS},
        "prior_t": {m: per_class(f["prior_t"][m]) for m in METRICS},
        "model_boxed_mean": {m: vec(_boxed_mean(f["model"][m], f["count"], boxed)) for m in METRICS},
        "prior_boxed_mean": {m: vec(_boxed_mean(f["prior"][m], f["count"], boxed)) for m in METRICS},
        "prior_t_boxed_mean": {m: vec(_boxed_mean(f["prior_t"][m], f["count"], boxed)) for m in METRICS},
        "grid": {
            **{method: {m: per_class(f["grid"][method][m]) for m in METRICS} for method in METHODS},
            **{f"{method}_boxed_mean": {m: vec(_boxed_mean(f["grid"][method][m], f["count"], boxed))
                                        for m in METRICS} for method in METHODS},
        },
        "auroc": by_class(f["auroc"]),
        "classification": {
            "operating_point": f["operating_point"],
            "sensitivity": by_class(f["classification"]["sensitivity"]),
            "specificity": by_class(f["classification"]["specificity"]),
            "positives": counts(f["classification"]["positives"]),
            "present_per_image": f["classification"]["present_total"] / max(f["classification"]["images"], 1),
            "labels_per_image": f["classification"]["labels_total"] / max(f["classification"]["images"], 1),
        },
        "prior_fit": f["prior_info"],
        "prior_t_q": f["prior_t_q"],
    }


def paper_table1() -> dict[str, Any]:
    """``results.json``'s ``paper_table1``: the paper's Table 1 (NIH's 8 boxed classes) at its T."""
    return {
        "T": PAPER_T,
        "unannotated": 0.0,
        **{
            m: {label: dict(zip(BOXED_CLASSES, v, strict=True)) for label, v in rows.items()}
            for m, rows in PAPER_TABLE1.items()
        },
    }
