"""One fold's evaluation (:func:`evaluate_fold`): the model and both priors on the fold's test (or
validation) images, or on every boxed image of an external test set, with the classes matched by name.

Also the pieces every evaluation shares: the "present" decisions at the model's operating point
(:func:`decisions`), the classification metrics (:func:`classification`), the per-T prior
(:func:`per_t_prior_accuracy`) and the check of an external test set's cache (:func:`check_external`).
:mod:`cxrloc.evaluation.evaluate` averages the folds and writes the reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrloc.calibration import Calibration
from cxrloc.classes import NUM_CLASSES
from cxrloc.data.boxes import Box
from cxrloc.data.prepared import Prepared
from cxrloc.decision import image_scores, operating_point, presence
from cxrloc.evaluation.html_report import class_limits
from cxrloc.evaluation.metrics import (
    METRICS,
    auroc_per_class,
    localization_table,
    sensitivity_specificity,
)
from cxrloc.evaluation.prior import boxes_by_class, fit_prior, fit_prior_per_t
from cxrloc.evaluation.report import nan_to_none
from cxrloc.rundir import FoldDir
from cxrloc.thresholds import Thresholds
from cxrloc.utils import CxrlocError

if TYPE_CHECKING:
    from cxrloc.evaluation.trained_fold import TrainedFold

SPLITS: tuple[str, ...] = ("test", "val")
"""Images an evaluation reads: the fold's test images, or its validation images (carved out of the
training patients, for choosing settings without reading test folds)."""


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

    if split not in SPLITS:
        raise CxrlocError(f"Unknown split {split!r}: use {' or '.join(SPLITS)}.")
    tf = TrainedFold.open(fold_dir if isinstance(fold_dir, FoldDir) else FoldDir(Path(fold_dir)), device=device,
                          which=which)
    test, ids = _images_scored(tf, split, data)
    match = ClassMatch.of(tf, test, external=data is not None)
    truth = _TestTruth.of(test, ids, match)
    z = _predict(tf, test, ids, device=device, batch_size=batch_size, progress=progress, tta=tta)
    table = localization_table(z, truth.boxes, ts, classes=match.run_classes)
    prior, prior_table, prior_t = _priors(tf, split, z, truth.boxes, ts, match.run_classes)
    scores = image_scores(z)
    probs, present, op = decisions(tf.meta, scores)
    rows = _box_rows(table["rows"], prior_table["rows"], ids, tf.fold, scores, probs, present)
    class_rows = _class_rows(ids, match.run_classes, tf.fold, truth, scores, probs, present)
    cls = _classification_of_every_class(scores, present, truth, match)
    extra = len(match.not_in_run)
    return {
        "fold": tf.fold,
        "fold_dir": str(tf.fold_dir.path),
        "checkpoint": str(tf.checkpoint),
        "test_images": len(ids),
        "classes": match.classes,
        "data_format": test.data_format,
        "boxed_classes": sorted({*tf.prepared.class_list.boxed, *test.class_list.boxed}),
        "not_in_run": match.not_in_run,
        "not_in_data": match.not_in_data,
        "count": np.concatenate([table["count"], truth.extra_count]),
        **_accuracies(table, prior_table, prior_t, extra),
        "auroc": cls["auroc"],
        "rows": rows,
        "prior_info": prior.to_json(match.run_classes),
        "prior_t_q": prior_t["q"],
        "classification": cls,
        "operating_point": op,
        "class_rows": class_rows,
        # For report.html's gallery only (not in results.json):
        "z": z, "ids": ids, "data": test, "run_classes": match.run_classes, "scores": scores, "probs": probs,
        "present": present, "limits": class_limits(tf.meta, len(match.run_classes)),
    }


def _images_scored(tf: TrainedFold, split: str, data: Prepared | None) -> tuple[Prepared, list[str]]:
    """The prepared folder and the image ids a fold's evaluation scores: the fold's test images, its
    annotated validation images, or every boxed image of the external test set ``data``.

    Raises:
        CxrlocError: no image to score, or ``data`` cached at another size (:func:`check_external`).
    """
    if data is None:
        test = tf.prepared
        ids = tf.ids("test_ids" if split == "test" else "val_ids")
        if split == "val":
            ids = [i for i in ids if test.boxes(i)]
        if not ids:
            what = "test" if split == "test" else "annotated validation"
            raise CxrlocError(f"{tf.fold_dir.run_json} lists no {what} image.")
        return test, ids
    check_external(tf.prepared, data, tf.fold_dir.path.parent)
    ids = [i for i in data.ids if data.is_annotated(i)]
    if not ids:
        raise CxrlocError(f"{data.root} holds no image with a box; nothing to evaluate.")
    return data, ids


@dataclass
class ClassMatch:
    """The test data's classes matched to the run's by name."""

    run_classes: list[str]
    """The model's outputs, in order."""
    data_classes: list[str]
    """The test data's classes, in its order."""
    not_in_run: list[str]
    """Test-data classes the run does not know (appended after the run's in every array)."""
    not_in_data: list[str]
    """Run classes the test data does not label."""
    to_run: dict[int, int]
    """Test-data class index -> run class index, for the classes both have."""

    @property
    def classes(self) -> list[str]:
        """The K classes of every array of the evaluation: the run's, then :attr:`not_in_run`."""
        return self.run_classes + self.not_in_run

    @classmethod
    def of(cls, tf: TrainedFold, test: Prepared, *, external: bool) -> ClassMatch:
        """Match ``test``'s classes to ``tf``'s run.

        Raises:
            CxrlocError: an external test set shares no class name with the run.
        """
        run_classes = list(tf.cfg.classes)
        data_classes = list(test.classes)
        match = cls(
            run_classes=run_classes,
            data_classes=data_classes,
            not_in_run=[c for c in data_classes if c not in run_classes],
            not_in_data=[c for c in run_classes if c not in data_classes],
            to_run={k: run_classes.index(c) for k, c in enumerate(data_classes) if c in run_classes},
        )
        if external and not match.to_run:
            raise CxrlocError(
                f"{test.root} has no class in common with {tf.fold_dir.path.parent} (test data: "
                f"{', '.join(data_classes[:8])}{', ...' if len(data_classes) > 8 else ''}; the run's: "
                f"{', '.join(run_classes[:8])}{', ...' if len(run_classes) > 8 else ''}); classes are matched by "
                "name, so nothing could be scored: prepare the test data with the run's class names"
            )
        return match


@dataclass
class _TestTruth:
    """The test images' boxes and labels in the run's class indices."""

    boxes: list[list[Box]]
    """Per image, its boxes of the classes the run knows (class index of the run)."""
    extra_count: np.ndarray
    """Boxes per class the run does not know (:attr:`ClassMatch.not_in_run` order)."""
    data_labels: np.ndarray
    """``(N, K_data)`` labels in the test data's classes."""
    known: np.ndarray
    """``(K_run,)`` bool: the run classes the test data labels."""
    labels: np.ndarray
    """``(N, K_run)`` labels in the run's classes (0 where unknown)."""

    @classmethod
    def of(cls, test: Prepared, ids: Sequence[str], match: ClassMatch) -> _TestTruth:
        data_boxes = [test.boxes(i) for i in ids]
        boxes = [[(match.to_run[b[0]], *b[1:]) for b in bs if b[0] in match.to_run] for bs in data_boxes]
        extra_count = np.zeros(len(match.not_in_run), dtype=np.int64)
        for bs in data_boxes:
            for b in bs:
                if b[0] not in match.to_run:
                    extra_count[match.not_in_run.index(match.data_classes[b[0]])] += 1
        data_labels = test.label_matrix(ids)
        known = np.array([c in match.data_classes for c in match.run_classes])
        labels = np.zeros((len(ids), len(match.run_classes)))
        for k, kr in match.to_run.items():
            labels[:, kr] = data_labels[:, k]
        return cls(boxes, extra_count, data_labels, known, labels)


def _predict(
    tf: TrainedFold, test: Prepared, ids: Sequence[str], *, device: str, batch_size: int, progress: bool, tta: int
) -> np.ndarray:
    """The fold's model's ``z`` ``(N, K, P, P)`` on the images ``ids`` of ``test``."""
    from cxrloc.inference.batch import predict_prepared
    from cxrloc.precision import inference_options

    return predict_prepared(
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


def _priors(
    tf: TrainedFold, split: str, z: np.ndarray, boxes: Sequence[Sequence[Box]], ts: Sequence[float],
    run_classes: Sequence[str],
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Both priors fitted on the fold's training boxes (never a box of the images scored) and scored on
    ``boxes``: ``(prior, its localization table, per_t_prior_accuracy)``."""
    train_ids = tf.ids("train_ids") + (tf.ids("val_ids") if split == "test" else [])
    train_boxes = boxes_by_class(tf.prepared.boxes(i) for i in train_ids)
    prior = fit_prior(train_boxes, z.shape[-1], num_classes=len(run_classes))
    prior_table = localization_table(prior.predict(len(boxes)), boxes, ts, classes=run_classes)
    prior_t = per_t_prior_accuracy(train_boxes, z.shape[-1], boxes, ts, num_classes=len(run_classes))
    return prior, prior_table, prior_t


def _box_rows(
    model_rows: Sequence[dict[str, Any]], prior_rows: Sequence[dict[str, Any]], ids: Sequence[str], fold: Any,
    scores: np.ndarray, probs: np.ndarray | None, present: np.ndarray,
) -> list[dict[str, Any]]:
    """One dict per test box: the model's row with the image id, the fold, the prior's IoU / IoR in both
    geometries and the score, probability and decision of the box's class."""
    rows = []
    for row, prow in zip(model_rows, prior_rows, strict=True):
        row = dict(row)
        i, k = row["image_index"], row["class_index"]
        row["image_id"] = ids[i]
        row["fold"] = fold
        row["prior_iou"], row["prior_ior"] = prow["iou"], prow["ior"]
        row["prior_iou_grid"], row["prior_ior_grid"] = prow["iou_grid"], prow["ior_grid"]
        row["score"] = float(scores[i, k])
        row["probability"] = None if probs is None else float(probs[i, k])
        row["present"] = bool(present[i, k])
        rows.append(row)
    return rows


def _class_rows(
    ids: Sequence[str], run_classes: Sequence[str], fold: Any, truth: _TestTruth, scores: np.ndarray,
    probs: np.ndarray | None, present: np.ndarray,
) -> list[dict[str, Any]]:
    """One dict per test image and run class: label (None where the test data does not label the
    class), score, probability and decision."""
    labels, known = truth.labels, truth.known
    return [
        {"fold": fold, "image_id": image_id, "class": name,
         "label": int(labels[i, k] > 0.5) if known[k] else None,
         "score": float(scores[i, k]), "probability": None if probs is None else float(probs[i, k]),
         "present": int(present[i, k])}
        for i, image_id in enumerate(ids) for k, name in enumerate(run_classes)
    ]


def _classification_of_every_class(
    scores: np.ndarray, present: np.ndarray, truth: _TestTruth, match: ClassMatch
) -> dict[str, Any]:
    """:func:`classification` of the run's classes, then the classes the run does not know (NaN metrics,
    their positives counted, no negatives)."""
    cls = classification(scores, truth.labels, present, truth.known)
    extra = len(match.not_in_run)
    extra_positives = [int((truth.data_labels[:, match.data_classes.index(c)] > 0.5).sum())
                       for c in match.not_in_run]
    return {
        **cls,
        **{key: _extend(cls[key], extra) for key in ("auroc", "sensitivity", "specificity")},
        "positives": np.concatenate([cls["positives"], np.asarray(extra_positives, dtype=np.int64)]),
        "negatives": _extend(cls["negatives"], extra, 0).astype(np.int64),
    }


def _accuracies(
    table: dict[str, Any], prior_table: dict[str, Any], prior_t: dict[str, Any], extra: int
) -> dict[str, Any]:
    """``model``, ``prior``, ``prior_t`` and ``grid`` accuracies, each ``(K, T)`` with ``extra`` NaN rows
    for the classes the run does not know."""
    return {
        "model": {m: _extend(v, extra) for m, v in table["accuracy"].items()},
        "prior": {m: _extend(v, extra) for m, v in prior_table["accuracy"].items()},
        "prior_t": {m: _extend(v, extra) for m, v in prior_t["accuracy"].items()},
        "grid": {
            "model": {m: _extend(v, extra) for m, v in table["grid"]["accuracy"].items()},
            "prior": {m: _extend(v, extra) for m, v in prior_table["grid"]["accuracy"].items()},
            "prior_t": {m: _extend(v, extra) for m, v in prior_t["grid"].items()},
        },
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

