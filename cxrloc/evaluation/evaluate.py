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
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrloc.classes import BOXED_CLASSES, CLASSES
from cxrloc.evaluation.metrics import (
    METRICS,
    auroc_per_class,
    image_scores,
    localization_table,
    sensitivity_specificity,
)
from cxrloc.evaluation.prior import boxes_by_class, fit_prior, fit_prior_per_t
from cxrloc.evaluation.report import METHODS, PAPER_T, PAPER_TABLE1, nan_to_none, write_reports
from cxrloc.rundir import FoldDir, RunDir
from cxrloc.utils import CxrlocError, check_writable_dir

DEFAULT_TS: tuple[float, ...] = (0.1, 0.3, 0.5)
BOXED: tuple[int, ...] = tuple(range(len(BOXED_CLASSES)))
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


def _boxed_mean(acc: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Mean over the boxed classes that have at least one test box: ``(K, T) -> (T,)``."""
    idx = [k for k in BOXED if count[k] > 0]
    return acc[idx].mean(axis=0) if idx else np.full(acc.shape[1], np.nan)


def decisions(meta: dict[str, Any], scores: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """Probabilities, "present" decisions and the operating point of a model on image scores ``(N, K)``.

    With ``meta["calibration"]`` (``load_model``'s): calibrated probabilities and
    ``probability >= threshold``; without: no probabilities and ``1'z >= tau_hat``.

    Returns:
        ``(probabilities (N, K) or None, present (N, K) bool, operating point dict)``.
    """
    from cxrloc.calibration import Calibration
    from cxrloc.thresholds import Thresholds

    if meta.get("calibration"):
        cal = Calibration.from_json(meta["calibration"], "the model's calibration")
        probs = cal.probabilities(scores)
        return probs, cal.present(probs), {
            "rule": cal.rule, "target_sensitivity": cal.target_sensitivity, "calibrated": True,
            "description": cal.describe(), "source": meta.get("calibration_source", ""),
        }
    tau_hat = Thresholds.from_json(meta["thresholds"]).tau_hat
    note = meta.get("calibration_note") or "no calibration.json: run 'cxrloc calibrate RUN_DIR'"
    return None, scores >= tau_hat, {
        "rule": "tau_hat", "target_sensitivity": None, "calibrated": False,
        "description": "1'z >= tau_hat (uncalibrated)", "note": note,
    }


def classification(
    scores: np.ndarray, labels: np.ndarray, present: np.ndarray
) -> dict[str, Any]:
    """Per-class AUROC of ``1'z``, sensitivity and specificity of ``present``, and calls per image."""
    sens, spec = sensitivity_specificity(present, labels)
    y = np.asarray(labels) > 0.5
    return {
        "auroc": auroc_per_class(scores, labels),
        "sensitivity": sens,
        "specificity": spec,
        "positives": y.sum(axis=0).astype(np.int64),
        "negatives": (~y).sum(axis=0).astype(np.int64),
        "present_total": int(np.asarray(present).sum()),
        "labels_total": int(y.sum()),
        "images": int(y.shape[0]),
    }


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
) -> dict[str, Any]:
    """Evaluate the model and both priors on one fold's test (or validation) images.

    The priors are fitted on the fold's training boxes: ``train_ids`` + ``val_ids`` for the test
    split, ``train_ids`` alone for the validation split (never a box of the images scored).

    Returns:
        dict with ``fold``, ``checkpoint``, ``test_images``, ``count`` (K,), ``model``, ``prior`` and
        ``prior_t`` (each ``{"iou": (K, T), "ior": (K, T)}`` accuracy), ``auroc`` (K,), ``rows``
        (per-box dicts with ``image_id``, ``fold``, and the ``score``, ``probability`` and
        ``present`` of the box's class), ``prior_info``, ``prior_t_q``, ``classification``
        (:func:`classification`), ``operating_point`` and ``class_rows`` (one dict per image and
        class: ``label``, ``score``, ``probability``, ``present``).
    """
    from cxrloc.evaluation.trained_fold import TrainedFold
    from cxrloc.inference.batch import predict_prepared

    if split not in SPLITS:
        raise CxrlocError(f"Unknown split {split!r}: use {' or '.join(SPLITS)}.")
    tf = TrainedFold.open(fold_dir if isinstance(fold_dir, FoldDir) else FoldDir(Path(fold_dir)), device=device,
                          which=which)
    prepared = tf.prepared
    ids = tf.ids("test_ids" if split == "test" else "val_ids")
    if split == "val":
        ids = [i for i in ids if prepared.boxes(i)]
    if not ids:
        raise CxrlocError(f"{tf.fold_dir.run_json} lists no {'test' if split == 'test' else 'annotated validation'} "
                          "image.")
    z = predict_prepared(
        tf.model,
        prepared,
        ids,
        image_size=tf.cfg.image_size,
        device=device,
        batch_size=batch_size,
        progress=progress,
        description=f"Evaluating {tf.fold_dir.name}",
        tta=tta,
    )
    boxes = [prepared.boxes(i) for i in ids]
    labels = prepared.label_matrix(ids)
    table = localization_table(z, boxes, ts)

    # The priors see the same fold's training boxes (never a box of the images scored).
    train_ids = tf.ids("train_ids") + (tf.ids("val_ids") if split == "test" else [])
    train_boxes = boxes_by_class(prepared.boxes(i) for i in train_ids)
    prior = fit_prior(train_boxes, z.shape[-1])
    prior_table = localization_table(prior.predict(len(ids)), boxes, ts)
    prior_t = per_t_prior_accuracy(train_boxes, z.shape[-1], boxes, ts)

    scores = image_scores(z)
    probs, present, operating_point = decisions(tf.meta, scores)
    rows = []
    for row, prow in zip(table["rows"], prior_table["rows"], strict=True):
        row = dict(row)
        i, k = row["image_index"], row["class_index"]
        row["image_id"] = ids[i]
        row["fold"] = tf.fold
        row["prior_iou"], row["prior_ior"] = prow["iou"], prow["ior"]
        row["score"] = float(scores[i, k])
        row["probability"] = None if probs is None else float(probs[i, k])
        row["present"] = bool(present[i, k])
        rows.append(row)
    names = list(tf.meta.get("classes") or CLASSES)
    class_rows = [
        {"fold": tf.fold, "image_id": image_id, "class": name, "label": int(labels[i, k] > 0.5),
         "score": float(scores[i, k]), "probability": None if probs is None else float(probs[i, k]),
         "present": int(present[i, k])}
        for i, image_id in enumerate(ids) for k, name in enumerate(names)
    ]
    cls = classification(scores, labels, present)
    return {
        "fold": tf.fold,
        "fold_dir": str(tf.fold_dir.path),
        "checkpoint": str(tf.checkpoint),
        "test_images": len(ids),
        "count": table["count"],
        "model": table["accuracy"],
        "prior": prior_table["accuracy"],
        "prior_t": prior_t["accuracy"],
        "auroc": cls["auroc"],
        "rows": rows,
        "prior_info": prior.to_json(),
        "prior_t_q": prior_t["q"],
        "classification": cls,
        "operating_point": operating_point,
        "class_rows": class_rows,
    }


def per_t_prior_accuracy(
    train_boxes: dict[int, list[tuple[float, ...]]],
    patch_grid: int,
    boxes: Sequence[Sequence[tuple[int, float, float, float, float]]],
    ts: Sequence[float],
) -> dict[str, Any]:
    """Accuracy of the per-T prior (q chosen on the training boxes for each T) on ``boxes``.

    Returns:
        ``{"accuracy": {"iou": (K, T), "ior": (K, T)}, "q": {T: [q_k or None]}}``: column j of each
        array is the prior fitted for ``ts[j]``, scored at ``ts[j]``.
    """
    priors = fit_prior_per_t(train_boxes, patch_grid, ts)
    acc = {m: np.full((len(CLASSES), len(ts)), np.nan) for m in METRICS}
    for j, t in enumerate(ts):
        table = localization_table(priors[float(t)].predict(len(boxes)), boxes, [t])
        for m in METRICS:
            acc[m][:, j] = table["accuracy"][m][:, 0]
    q = {f"{t:g}": [nan_to_none(float(v)) for v in priors[float(t)].q] for t in ts}
    return {"accuracy": acc, "q": q}


def summarise(folds: list[dict[str, Any]], ts: Sequence[float]) -> dict[str, Any]:
    """Mean and std over folds of per-class accuracies, of the boxed-class means, of the AUROC and of the
    sensitivity and specificity at the operating point; classes called present and labelled findings per
    image pooled over every fold's images."""
    out: dict[str, Any] = {}
    for method in METHODS:
        out[method] = {}
        for m in METRICS:
            per = np.stack([f[method][m] for f in folds])  # (F, K, T)
            means = np.stack([_boxed_mean(f[method][m], f["count"]) for f in folds])  # (F, T)
            pc_mean, pc_std = _mean_std(per)
            b_mean, b_std = _mean_std(means)
            out[method][m] = {
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


def results_json(summary: dict[str, Any], folds: list[dict[str, Any]], ts: Sequence[float]) -> dict[str, Any]:
    def per_class(arr: np.ndarray) -> dict[str, list[float | None]]:
        return {CLASSES[k]: [nan_to_none(float(v)) for v in arr[k]] for k in range(arr.shape[0])}

    def vec(arr: np.ndarray) -> list[float | None]:
        return [nan_to_none(float(v)) for v in arr]

    summ: dict[str, Any] = {}
    for method in METHODS:
        summ[method] = {
            m: {
                "per_class_mean": per_class(summary[method][m]["per_class_mean"]),
                "per_class_std": per_class(summary[method][m]["per_class_std"]),
                "boxed_mean": vec(summary[method][m]["boxed_mean"]),
                "boxed_mean_std": vec(summary[method][m]["boxed_mean_std"]),
            }
            for m in summary[method]
        }
    summ["auroc"] = {
        "mean": dict(zip(CLASSES, vec(summary["auroc"]["mean"]), strict=True)),
        "std": dict(zip(CLASSES, vec(summary["auroc"]["std"]), strict=True)),
    }
    summ["classification"] = {
        "operating_points": [f["operating_point"]["description"] for f in folds],
        **{
            key: {
                "mean": dict(zip(CLASSES, vec(summary[key]["mean"]), strict=True)),
                "std": dict(zip(CLASSES, vec(summary[key]["std"]), strict=True)),
            }
            for key in ("sensitivity", "specificity")
        },
        "positives": dict(zip(CLASSES, [int(c) for c in summary["positives"]], strict=True)),
        "present_per_image": float(summary["present_per_image"]),
        "labels_per_image": float(summary["labels_per_image"]),
    }
    summ["boxes"] = dict(zip(CLASSES, [int(c) for c in summary["count"]], strict=True))
    per_fold = [
        {
            "fold": f["fold"],
            "checkpoint": f["checkpoint"],
            "test_images": f["test_images"],
            "boxes": dict(zip(CLASSES, [int(c) for c in f["count"]], strict=True)),
            "model": {m: per_class(f["model"][m]) for m in METRICS},
            "prior": {m: per_class(f["prior"][m]) for m in METRICS},
            "prior_t": {m: per_class(f["prior_t"][m]) for m in METRICS},
            "model_boxed_mean": {m: vec(_boxed_mean(f["model"][m], f["count"])) for m in METRICS},
            "prior_boxed_mean": {m: vec(_boxed_mean(f["prior"][m], f["count"])) for m in METRICS},
            "prior_t_boxed_mean": {m: vec(_boxed_mean(f["prior_t"][m], f["count"])) for m in METRICS},
            "auroc": dict(zip(CLASSES, vec(f["auroc"]), strict=True)),
            "classification": {
                "operating_point": f["operating_point"],
                "sensitivity": dict(zip(CLASSES, vec(f["classification"]["sensitivity"]), strict=True)),
                "specificity": dict(zip(CLASSES, vec(f["classification"]["specificity"]), strict=True)),
                "positives": dict(zip(CLASSES, [int(c) for c in f["classification"]["positives"]], strict=True)),
                "present_per_image": f["classification"]["present_total"] / max(f["classification"]["images"], 1),
                "labels_per_image": f["classification"]["labels_total"] / max(f["classification"]["images"], 1),
            },
            "prior_fit": f["prior_info"],
            "prior_t_q": f["prior_t_q"],
        }
        for f in folds
    ]
    return {
        "summary": summ,
        "per_fold": per_fold,
        "paper_table1": {
            "T": PAPER_T,
            "unannotated": 0.0,
            **{
                m: {label: dict(zip(BOXED_CLASSES, v, strict=True)) for label, v in rows.items()}
                for m, rows in PAPER_TABLE1.items()
            },
        },
    }


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
            with ``_ttaN`` appended for test-time augmentation).
        split: ``test`` (the fold's test images) or ``val`` (its validation images).
        tta: test-time views averaged (1 = none; :func:`cxrloc.inference.batch.forward_tta`).

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
    run = RunDir(Path(run_dir))
    fold_dirs = run.folds(fold)
    if out_dir is None:
        out = run.path / ("eval" if split == "test" else "eval_val")
        out = out.with_name(out.name + (f"_tta{tta}" if tta > 1 else ""))
    else:
        out = Path(out_dir)
    check_writable_dir(out, "evaluation folder")
    folds = [
        evaluate_fold(d, ts=ts, device=device, which=which, progress=progress, batch_size=batch_size, split=split,
                      tta=tta)
        for d in fold_dirs
    ]
    summary = summarise(folds, ts)
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info = (f"Run `{run.path}`, checkpoint `{which}`, {split} images, folds {[f['fold'] for f in folds]}, "
            f"T = {list(ts)}{f', {tta} test-time views' if tta > 1 else ''}, {date}.")
    result = {
        "run_dir": str(run.path),
        "which": which,
        "split": split,
        "tta": tta,
        "folds": [f["fold"] for f in folds],
        "ts": list(ts),
        "metrics": list(metrics),
        "date": date,
        "region_rule": "z >= 0.5",
        "std": "sample standard deviation over folds (ddof=1); null with one fold",
        **results_json(summary, folds, ts),
    }
    rows = [r for f in folds for r in f["rows"]]
    class_rows = [r for f in folds for r in f["class_rows"]]
    write_reports(result, rows, out, info, class_rows=class_rows)
    return {**result, "out_dir": str(out), "rows": rows}
