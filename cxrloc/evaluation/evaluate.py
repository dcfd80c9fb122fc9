"""The paper's evaluation of a trained run, beside the data-free priors and the paper's Table 1.

For each fold: ``z`` of the fold's test images (``run.json`` ``test_ids``; or its validation
images with ``split="val"``), IoU / IoR accuracy at each T per class
(:mod:`cxrloc.evaluation.metrics`), both priors fitted on the same fold's training boxes and
evaluated the same way, the per-class AUROC of ``1'z`` and, at the model's operating point
(``calibration.json``, :mod:`cxrloc.calibration`; ``1'z >= tau_hat`` for an uncalibrated model),
per-class sensitivity and specificity and the number of classes called present per image against
the number of labelled findings. Then mean and standard deviation over folds. The reports
(``results.{json,csv,md}``, ``per_image.csv``, ``per_image_classes.csv`` and the terminal tables) are
made by :mod:`cxrloc.evaluation.report` from the ``results.json`` content built here.

**An external test set** (``data=PREPARED_DIR``): each fold's model (or the one fold asked for)
scores every boxed image of another prepared folder, whatever its folds (an external set is all
test), with the same metrics; the priors are still fitted on the run's own training boxes. Classes are matched
by name: the report's classes are the run's, then the test data's classes the run does not know;
a class the run does not know, or that has no box (no label) in the test data, is n/a.

The "mean" column averages the *boxed classes* that have a test box: NIH's 8 (the paper's) for NIH
data, else the classes that carry boxes in the run's or the test data (``classes.json``). The
paper's Table 1 is kept beside NIH results only when every fold's test boxes cover all of NIH's 8
classes (the set its means are over), and is shown beside the ``grid`` tables only.

**Two geometries** (:data:`cxrloc.geometry.GEOMETRIES`): every box is scored ``exact`` (today's
default) and ``grid`` (the box rasterised onto the patch grid as in the public Li et al. code, the
geometry of published tables); both are in every file. Threshold fitting and the priors' choice of
q stay on the exact geometry (they are cxrloc's, not the paper's).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrloc.calibration import Calibration
from cxrloc.classes import BOXED_CLASSES, NUM_CLASSES, is_nih
from cxrloc.data.prepared import Prepared
from cxrloc.decision import image_scores, operating_point, presence
from cxrloc.evaluation.html_report import class_limits, html_report
from cxrloc.evaluation.metrics import (
    METRICS,
    auroc_per_class,
    localization_table,
    sensitivity_specificity,
)
from cxrloc.evaluation.prior import boxes_by_class, fit_prior, fit_prior_per_t
from cxrloc.evaluation.report import METHODS, PAPER_T, PAPER_TABLE1, nan_to_none, write_reports
from cxrloc.geometry import GEOMETRIES
from cxrloc.rundir import FoldDir, RunDir
from cxrloc.thresholds import Thresholds
from cxrloc.utils import CxrlocError, check_writable_dir, read_json

DEFAULT_TS: tuple[float, ...] = (0.1, 0.3, 0.5)
SPLITS: tuple[str, ...] = ("test", "val")
"""Images an evaluation reads: the fold's test images, or its validation images (carved out of the
training patients, for choosing settings without reading test folds)."""


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


def decisions(meta: dict[str, Any], scores: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """Probabilities, "present" decisions and the operating point of a model on image scores ``(N, K)``.

    The rule is :func:`cxrloc.decision.presence`: with ``meta["calibration"]`` (``load_model``'s),
    calibrated probabilities and ``probability >= threshold``; without, ``1'z >= tau_hat``.

    Returns:
        ``(probabilities (N, K) or None, present (N, K) bool, operating point dict)``.
    """
    if meta.get("calibration"):
        cal = Calibration.from_json(meta["calibration"], "the model's calibration")
        probs, present = presence(scores, calibration=cal, tau_hat=None)
        return probs, present, operating_point(cal, source=meta.get("calibration_source", ""))
    tau_hat = Thresholds.from_json(meta["thresholds"], classes=meta.get("classes")).tau_hat
    note = meta.get("calibration_note") or "no calibration.json: run 'cxrloc calibrate RUN_DIR'"
    _, present = presence(scores, calibration=None, tau_hat=tau_hat)
    return None, present, operating_point(None, note=note)


def classification(
    scores: np.ndarray, labels: np.ndarray, present: np.ndarray, known: np.ndarray | None = None
) -> dict[str, Any]:
    """Per-class AUROC of ``1'z``, sensitivity and specificity of ``present``, and calls per image.

    ``known`` (K,) bool: the classes the test data labels (default all); the others are NaN and
    are left out of the calls and findings per image.
    """
    known = np.ones(np.asarray(labels).shape[1], bool) if known is None else np.asarray(known, bool)
    labels = np.where(known, np.nan_to_num(np.asarray(labels, dtype=np.float64)), 0.0)
    sens, spec = sensitivity_specificity(present, labels)
    y = labels > 0.5
    auroc = auroc_per_class(scores, labels)
    for arr in (auroc, sens, spec):
        arr[~known] = np.nan
    return {
        "auroc": auroc,
        "sensitivity": sens,
        "specificity": spec,
        "positives": y.sum(axis=0).astype(np.int64),
        "negatives": np.where(known, (~y).sum(axis=0), 0).astype(np.int64),
        "present_total": int(np.asarray(present)[:, known].sum()),
        "labels_total": int(y.sum()),
        "images": int(y.shape[0]),
    }


def boxed_class_names(
    classes: Sequence[str], data_format: str, boxed: Sequence[str]
) -> list[str]:
    """The classes of the reports' columns and "mean", in ``classes`` order: NIH's 8 for NIH data
    (:data:`BOXED_CLASSES`), else those in ``boxed`` (classes with boxes, in ``classes.json``)."""
    if data_format == "nih" and is_nih(classes):
        return list(BOXED_CLASSES)
    return [c for c in classes if c in set(boxed)]


def _extend(arr: np.ndarray, extra: int, fill: float = np.nan) -> np.ndarray:
    """``arr`` (K, ...) with ``extra`` rows of ``fill`` appended (classes the run does not know)."""
    arr = np.asarray(arr)
    if extra == 0:
        return arr
    pad = np.full((extra, *arr.shape[1:]), fill, dtype=np.result_type(arr.dtype, np.asarray(fill).dtype))
    return np.concatenate([arr.astype(pad.dtype), pad])


def evaluate_fold(
    fold_dir: Path | FoldDir,
    *,
    ts: Sequence[float],
    device: str = "cpu",
    which: str = "best",
    progress: bool = True,
    batch_size: int = 16,
    split: str = "test",
    tta: int = 1,
    data: Prepared | None = None,
) -> dict[str, Any]:
    """Evaluate the model and both priors on one fold's test (or validation) images.

    The priors are fitted on the fold's training boxes: ``train_ids`` + ``val_ids`` for the test
    split, ``train_ids`` alone for the validation split (never a box of the images scored).

    Args:
        data: an external test set (another prepared folder): every boxed image of it, whatever its
            folds. Its cache must have the image size of the run's. The priors stay those of the
            run's own training boxes.

    Returns:
        dict with ``fold``, ``checkpoint``, ``test_images``, ``classes`` (the K classes of every array:
        the run's, then the test data's classes the run does not know), ``not_in_run`` and
        ``not_in_data`` (class names), ``count`` (K,), ``model``, ``prior`` and ``prior_t`` (each
        ``{"iou": (K, T), "ior": (K, T)}`` accuracy in the exact geometry, NaN for a class without boxes or
        unknown to the run), ``grid`` (the same three under the grid geometry), ``auroc`` (K,), ``rows``
        (per-box dicts with ``image_id``, ``fold``, and the ``score``,
        ``probability`` and ``present`` of the box's class), ``prior_info``, ``prior_t_q``,
        ``classification`` (:func:`classification`), ``operating_point`` and ``class_rows`` (one dict
        per image and class: ``label``, ``score``, ``probability``, ``present``).
    """
    from cxrloc.evaluation.trained_fold import TrainedFold
    from cxrloc.inference.batch import predict_prepared
    from cxrloc.precision import inference_options

    if split not in SPLITS:
        raise CxrlocError(f"Unknown split {split!r}: use {' or '.join(SPLITS)}.")
    tf = TrainedFold.open(fold_dir if isinstance(fold_dir, FoldDir) else FoldDir(Path(fold_dir)), device=device,
                          which=which)
    run_classes = list(tf.cfg.classes)
    if data is None:
        test = tf.prepared
        ids = tf.ids("test_ids" if split == "test" else "val_ids")
        if split == "val":
            ids = [i for i in ids if test.boxes(i)]
        if not ids:
            what = "test" if split == "test" else "annotated validation"
            raise CxrlocError(f"{tf.fold_dir.run_json} lists no {what} image.")
    else:
        test = data
        check_external(tf.prepared, data, tf.fold_dir.path.parent)
        ids = [i for i in data.ids if data.is_annotated(i)]
        if not ids:
            raise CxrlocError(f"{data.root} holds no image with a box; nothing to evaluate.")
    # Classes by name: the run's (model outputs), then the test data's the run does not know.
    data_classes = list(test.classes)
    not_in_run = [c for c in data_classes if c not in run_classes]
    not_in_data = [c for c in run_classes if c not in data_classes]
    classes = run_classes + not_in_run
    to_run = {k: run_classes.index(c) for k, c in enumerate(data_classes) if c in run_classes}
    if data is not None and not to_run:
        raise CxrlocError(
            f"{data.root} has no class in common with {tf.fold_dir.path.parent} (test data: "
            f"{', '.join(data_classes[:8])}{', ...' if len(data_classes) > 8 else ''}; the run's: "
            f"{', '.join(run_classes[:8])}{', ...' if len(run_classes) > 8 else ''}); classes are matched by name, "
            "so nothing could be scored: prepare the test data with the run's class names"
        )
    data_boxes = [test.boxes(i) for i in ids]
    boxes = [[(to_run[b[0]], *b[1:]) for b in bs if b[0] in to_run] for bs in data_boxes]
    extra_count = np.zeros(len(not_in_run), dtype=np.int64)
    for bs in data_boxes:
        for b in bs:
            if b[0] not in to_run:
                extra_count[not_in_run.index(data_classes[b[0]])] += 1
    data_labels = test.label_matrix(ids)
    known = np.array([c in data_classes for c in run_classes])
    labels = np.zeros((len(ids), len(run_classes)))
    for k, kr in to_run.items():
        labels[:, kr] = data_labels[:, k]

    z = predict_prepared(
        tf.model,
        test,
        ids,
        image_size=tf.cfg.image_size,
        device=device,
        batch_size=batch_size,
        progress=progress,
        description=f"Evaluating {tf.fold_dir.name}",
        tta=tta,
        **inference_options(tf.cfg, device),
    )
    table = localization_table(z, boxes, ts, classes=run_classes)

    # The priors see the same fold's training boxes (never a box of the images scored).
    train_ids = tf.ids("train_ids") + (tf.ids("val_ids") if split == "test" else [])
    train_boxes = boxes_by_class(tf.prepared.boxes(i) for i in train_ids)
    prior = fit_prior(train_boxes, z.shape[-1], num_classes=len(run_classes))
    prior_table = localization_table(prior.predict(len(ids)), boxes, ts, classes=run_classes)
    prior_t = per_t_prior_accuracy(train_boxes, z.shape[-1], boxes, ts, num_classes=len(run_classes))

    scores = image_scores(z)
    probs, present, op = decisions(tf.meta, scores)
    rows = []
    for row, prow in zip(table["rows"], prior_table["rows"], strict=True):
        row = dict(row)
        i, k = row["image_index"], row["class_index"]
        row["image_id"] = ids[i]
        row["fold"] = tf.fold
        row["prior_iou"], row["prior_ior"] = prow["iou"], prow["ior"]
        row["prior_iou_grid"], row["prior_ior_grid"] = prow["iou_grid"], prow["ior_grid"]
        row["score"] = float(scores[i, k])
        row["probability"] = None if probs is None else float(probs[i, k])
        row["present"] = bool(present[i, k])
        rows.append(row)
    class_rows = [
        {"fold": tf.fold, "image_id": image_id, "class": name,
         "label": int(labels[i, k] > 0.5) if known[k] else None,
         "score": float(scores[i, k]), "probability": None if probs is None else float(probs[i, k]),
         "present": int(present[i, k])}
        for i, image_id in enumerate(ids) for k, name in enumerate(run_classes)
    ]
    cls = classification(scores, labels, present, known)
    extra = len(not_in_run)
    extra_positives = [int((data_labels[:, data_classes.index(c)] > 0.5).sum()) for c in not_in_run]
    cls = {
        **cls,
        **{key: _extend(cls[key], extra) for key in ("auroc", "sensitivity", "specificity")},
        "positives": np.concatenate([cls["positives"], np.asarray(extra_positives, dtype=np.int64)]),
        "negatives": _extend(cls["negatives"], extra, 0).astype(np.int64),
    }
    return {
        "fold": tf.fold,
        "fold_dir": str(tf.fold_dir.path),
        "checkpoint": str(tf.checkpoint),
        "test_images": len(ids),
        "classes": classes,
        "data_format": test.data_format,
        "boxed_classes": sorted({*tf.prepared.class_list.boxed, *test.class_list.boxed}),
        "not_in_run": not_in_run,
        "not_in_data": not_in_data,
        "count": np.concatenate([table["count"], extra_count]),
        "model": {m: _extend(v, extra) for m, v in table["accuracy"].items()},
        "prior": {m: _extend(v, extra) for m, v in prior_table["accuracy"].items()},
        "prior_t": {m: _extend(v, extra) for m, v in prior_t["accuracy"].items()},
        "grid": {
            "model": {m: _extend(v, extra) for m, v in table["grid"]["accuracy"].items()},
            "prior": {m: _extend(v, extra) for m, v in prior_table["grid"]["accuracy"].items()},
            "prior_t": {m: _extend(v, extra) for m, v in prior_t["grid"].items()},
        },
        "auroc": cls["auroc"],
        "rows": rows,
        "prior_info": prior.to_json(run_classes),
        "prior_t_q": prior_t["q"],
        "classification": cls,
        "operating_point": op,
        "class_rows": class_rows,
        # For report.html's gallery only (not in results.json):
        "z": z, "ids": ids, "data": test, "run_classes": run_classes, "scores": scores, "probs": probs,
        "present": present, "limits": class_limits(tf.meta, len(run_classes)),
    }


def check_external(own: Prepared, data: Prepared, run_dir: Path) -> None:
    """Refuse an external test set whose cache differs in image size from the run's own.

    The run's images went through ``prepare`` at the size of its own cache (then to the network's
    input size): a test cache of another size would be resized once more, a different picture.

    Raises:
        CxrlocError: the sizes differ; the message gives the ``prepare`` command that makes a
            matching cache.
    """
    if data.size == own.size:
        return
    from cxrloc.data.identity import prepare_command

    target = data.root.parent / f"{data.root.name}_{own.size}px"
    raise CxrlocError(
        f"{data.root} caches its images at {data.size} px, but {run_dir} was trained on a {own.size} px cache "
        f"({own.root}); prepare the test data at that size: {prepare_command(data.root, size=own.size, out=target)}"
    )


def per_t_prior_accuracy(
    train_boxes: dict[int, list[tuple[float, ...]]],
    patch_grid: int,
    boxes: Sequence[Sequence[tuple[int, float, float, float, float]]],
    ts: Sequence[float],
    num_classes: int = NUM_CLASSES,
) -> dict[str, Any]:
    """Accuracy of the per-T prior (q chosen on the training boxes for each T) on ``boxes``.

    Returns:
        ``{"accuracy": {"iou": (K, T), "ior": (K, T)}, "grid": {...the same in the grid geometry},
        "q": {T: [q_k or None]}}``: column j of each array is the prior fitted for ``ts[j]`` (q chosen
        in the exact geometry), scored at ``ts[j]``.
    """
    priors = fit_prior_per_t(train_boxes, patch_grid, ts, num_classes=num_classes)
    acc = {m: np.full((num_classes, len(ts)), np.nan) for m in METRICS}
    grid = {m: np.full((num_classes, len(ts)), np.nan) for m in METRICS}
    for j, t in enumerate(ts):
        table = localization_table(priors[float(t)].predict(len(boxes)), boxes, [t])
        for m in METRICS:
            acc[m][:, j] = table["accuracy"][m][:, 0]
            grid[m][:, j] = table["grid"]["accuracy"][m][:, 0]
    q = {f"{t:g}": [nan_to_none(float(v)) for v in priors[float(t)].q] for t in ts}
    return {"accuracy": acc, "grid": grid, "q": q}


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
    names = list(classes)

    def per_class(arr: np.ndarray) -> dict[str, list[float | None]]:
        return {names[k]: [nan_to_none(float(v)) for v in arr[k]] for k in range(arr.shape[0])}

    def vec(arr: np.ndarray) -> list[float | None]:
        return [nan_to_none(float(v)) for v in arr]

    def by_class(arr: np.ndarray) -> dict[str, Any]:
        return dict(zip(names, vec(arr), strict=True))

    def counts(arr: np.ndarray) -> dict[str, int]:
        return dict(zip(names, [int(c) for c in arr], strict=True))

    def methods(source: dict[str, Any]) -> dict[str, Any]:
        return {
            method: {
                m: {
                    "per_class_mean": per_class(source[method][m]["per_class_mean"]),
                    "per_class_std": per_class(source[method][m]["per_class_std"]),
                    "boxed_mean": vec(source[method][m]["boxed_mean"]),
                    "boxed_mean_std": vec(source[method][m]["boxed_mean_std"]),
                }
                for m in source[method]
            }
            for method in METHODS
        }

    summ: dict[str, Any] = methods(summary)  # the exact geometry, at the top level as before
    summ["grid"] = methods(summary["grid"])
    summ["auroc"] = {"mean": by_class(summary["auroc"]["mean"]), "std": by_class(summary["auroc"]["std"])}
    summ["classification"] = {
        "operating_points": [f["operating_point"]["description"] for f in folds],
        **{key: {"mean": by_class(summary[key]["mean"]), "std": by_class(summary[key]["std"])}
           for key in ("sensitivity", "specificity")},
        "positives": counts(summary["positives"]),
        "present_per_image": float(summary["present_per_image"]),
        "labels_per_image": float(summary["labels_per_image"]),
    }
    summ["boxes"] = counts(summary["count"])
    per_fold = [
        {
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
        for f in folds
    ]
    averaged = [names[k] for k in boxed if any(int(f["count"][k]) > 0 and not np.all(np.isnan(f["model"]["iou"][k]))
                                              for f in folds)]
    out: dict[str, Any] = {
        "classes": names,
        "boxed_classes": [names[k] for k in boxed],
        "averaged_classes": averaged,
        "geometries": list(GEOMETRIES),
        "summary": summ,
        "per_fold": per_fold,
    }
    if paper:
        out["paper_table1"] = {
            "T": PAPER_T,
            "unannotated": 0.0,
            **{
                m: {label: dict(zip(BOXED_CLASSES, v, strict=True)) for label, v in rows.items()}
                for m, rows in PAPER_TABLE1.items()
            },
        }
    return out


def evaluate(
    run_dir: str | Path,
    *,
    metrics: Sequence[str] = METRICS,
    ts: Sequence[float] = DEFAULT_TS,
    fold: int | str | None = None,
    device: str = "cpu",
    which: str = "best",
    progress: bool = True,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    split: str = "test",
    tta: int = 1,
    data: str | Path | None = None,
    html: bool = True,
) -> dict[str, Any]:
    """Evaluate a run (one or every fold) and write its reports.

    Args:
        run_dir: ``RUN_DIR`` (with ``fold_K/``) or a single fold folder.
        metrics: subset of ``("iou", "ior")`` shown in the tables (both are always computed).
        ts: thresholds T.
        fold: ``None`` or ``"all"`` (every fold found) or a fold index.
        device: torch device.
        which: checkpoint, ``best`` or ``last``.
        progress: progress bars.
        batch_size: images per forward pass.
        out_dir: where to write (default ``RUN_DIR/eval``, ``RUN_DIR/eval_val`` for ``split="val"``,
            ``RUN_DIR/eval_on_NAME`` for an external test set ``data`` named NAME; then ``_foldN`` when
            one fold of several is evaluated, ``_last`` for the last checkpoint, ``_ttaN`` for test-time
            augmentation, so evaluations with other options never share a folder). A folder that holds
            an evaluation made with other options (:data:`SETTINGS`) is never replaced:
            :func:`check_same_settings`.
        split: ``test`` (the fold's test images) or ``val`` (its validation images).
        tta: test-time views averaged (1 = none; :func:`cxrloc.inference.batch.forward_tta`).
        data: an external test set, a prepared folder: each fold's model (or fold ``fold``'s) on every
            boxed image of it, whatever its folds (see the module docstring).
        html: also write ``report.html`` (:mod:`cxrloc.evaluation.html_report`).

    Returns:
        The content of ``results.json`` plus ``"out_dir"`` and ``"rows"`` (per-box results).
    """
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise CxrlocError(f"Unknown metric {bad[0] if bad else '(none)'}: use iou, ior or both.")
    ts = tuple(float(t) for t in ts)
    if not ts or any(not 0.0 < t <= 1.0 for t in ts):
        raise CxrlocError(f"Every --t must be in (0, 1], got {list(ts)}.")
    if data is not None and split != "test":
        raise CxrlocError("--data scores the boxed images of another prepared folder; --split val is for the run's "
                          "own validation images: use one or the other.")
    run = RunDir(Path(run_dir))
    fold_dirs = run.folds(fold)
    test_data = Prepared.open(data) if data is not None else None
    if out_dir is None:
        data_name = None if test_data is None else _safe_name(test_data.root)
        subset = fold not in (None, "all") and len(run.folds("all")) > 1
        out = run.eval_dir(split, data_name=data_name, tta=tta,
                           fold=fold_dirs[0].read_run().get("fold") if subset else None, which=which)
    else:
        out = Path(out_dir)
    check_writable_dir(out, "evaluation folder")
    settings = {"split": split, "data": None if test_data is None else str(test_data.root.resolve()),
                "folds": [d.read_run().get("fold") for d in fold_dirs], "which": which, "tta": tta, "ts": list(ts)}
    check_same_settings(out, settings, explicit=out_dir is not None)
    folds = [
        evaluate_fold(d, ts=ts, device=device, which=which, progress=progress, batch_size=batch_size, split=split,
                      tta=tta, data=test_data)
        for d in fold_dirs
    ]
    classes = folds[0]["classes"]
    boxed_names = boxed_class_names(classes, folds[0]["data_format"], folds[0]["boxed_classes"])
    boxed = [classes.index(c) for c in boxed_names]
    nih = folds[0]["data_format"] == "nih" and is_nih(classes)
    # The paper's means are over NIH's 8 classes: its rows are comparable only where every fold's mean is too.
    short = sorted({classes[k] for k in boxed for f in folds
                    if int(f["count"][k]) == 0 or np.all(np.isnan(f["model"]["iou"][k]))}, key=classes.index)
    paper = nih and not short
    summary = summarise(folds, ts, boxed)
    if test_data is not None and len(folds) > 1:
        # Every fold's model scored the same images: their boxes and positives are counted once.
        summary["count"] = np.asarray(folds[0]["count"])
        summary["positives"] = np.asarray(folds[0]["classification"]["positives"])
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    images = f"{split} images" if test_data is None else f"external test set `{test_data.root}` (every boxed image)"
    info = (f"Run `{run.path}`, checkpoint `{which}`, {images}, folds {[f['fold'] for f in folds]}, "
            f"T = {list(ts)}{f', {tta} test-time views' if tta > 1 else ''}, {date}.")
    result = {
        "run_dir": str(run.path),
        "which": which,
        "split": split,
        "data": None if test_data is None else str(test_data.root),
        "not_in_run": folds[0]["not_in_run"],
        "not_in_data": folds[0]["not_in_data"],
        "tta": tta,
        "folds": [f["fold"] for f in folds],
        "ts": list(ts),
        "metrics": list(metrics),
        "date": date,
        "region_rule": "z >= 0.5",
        "geometry_rule": {
            "exact": "exact rectangle areas of the region (a union of patches) and the box",
            "grid": "the box rasterised as in the public Li et al. code (romanovar/evaluation_MIL, "
                    "translate_on_patches + make_label_matrix_localization_v2: corners rounded to the nearest "
                    "grid line, the row and column at the max corner included), IoU / IoR counted in patches",
            "fitting": "threshold fitting and the priors' q use the exact geometry",
        },
        "settings": settings,
        "std": "sample standard deviation over folds (ddof=1); null with one fold",
        **results_json(summary, folds, ts, classes, boxed, paper),
    }
    if nih and not paper:
        result["paper_table1_omitted"] = (
            f"the paper's Table 1 means are over NIH's 8 boxed classes; {', '.join(short)} "
            f"{'has' if len(short) == 1 else 'have'} no test box in {'this' if len(folds) == 1 else 'some'} "
            "fold, so its rows are not shown beside these means")
    rows = [r for f in folds for r in f["rows"]]
    class_rows = [r for f in folds for r in f["class_rows"]]
    page = {out / "report.html": html_report(result, rows, class_rows, folds, info)} if html else {}
    write_reports(result, rows, out, info, class_rows=class_rows, extra=page)
    return {**result, "out_dir": str(out), "rows": rows}


SETTINGS: tuple[str, ...] = ("split", "data", "folds", "which", "tta", "ts")
"""The options that change what an evaluation folder holds (``--metric`` and ``--geometry`` only
choose the tables shown: both metrics and both geometries are always saved)."""


def check_same_settings(out: Path, settings: dict[str, Any], *, explicit: bool = False) -> None:
    """Refuse to replace an evaluation in ``out`` that was made with other options (:data:`SETTINGS`).

    Running the same evaluation again replaces it (e.g. after more training). Another one (other
    folds, T, checkpoint, test-time views or test set) must not silently take its place.

    Raises:
        CxrlocError: the folder's ``results.json`` records other options; the message names them and
            says how to keep both (``--out``) or replace it (delete the folder).
    """
    path = out / "results.json"
    if not path.is_file():
        return
    try:
        old = read_json(path, "evaluation results")
    except CxrlocError:
        return  # not an evaluation we can read: write_reports replaces its files as a set
    if not isinstance(old, dict):
        return
    recorded = old.get("settings") or {
        "split": old.get("split", "test"), "data": old.get("data"), "folds": old.get("folds"),
        "which": old.get("which"), "tta": old.get("tta", 1), "ts": old.get("ts"),
    }
    if recorded.get("data") and settings.get("data") and "settings" not in old:
        recorded["data"] = settings["data"] if Path(recorded["data"]).resolve() == Path(settings["data"]) else \
            recorded["data"]
    diffs = [f"{k} {recorded.get(k)!r} -> {settings[k]!r}" for k in SETTINGS if recorded.get(k) != settings[k]]
    if diffs:
        hint = "choose another --out" if explicit else "pass --out DIR to keep both"
        raise CxrlocError(
            f"{out} holds an evaluation made with other options ({'; '.join(diffs)}); {hint}, or delete {out} "
            "to replace it."
        )


def _safe_name(root: Path) -> str:
    """A folder name for ``eval_on_NAME`` from a prepared folder's name (letters, digits, ``._-``)."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in root.resolve().name)
    return name.strip(".") or "data"
