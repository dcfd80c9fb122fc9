"""``cxrloc calibrate``: fit a fold's probabilities and operating points on its validation images.

For each fold: ``z`` of the fold's validation images (``run.json`` ``val_ids``, carved out of the
training patients by ``cxrloc train``; never a test image) -> soft counts ``1'z`` -> per class a
Platt map and an operating point (:func:`cxrloc.calibration.fit_calibration`). A class with too
few validation positives or negatives falls back to validation + training images (``train_ids``;
their forward pass runs only when some class needs them). The result is written to
``fold_K/calibration.json`` with the weights' fingerprint, so ``predict``, ``evaluate`` and
``export`` pick it up for these weights only.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

from cxrloc.calibration import DEFAULT_RULE, MIN_POSITIVES, RULES, Calibration, fit_calibration
from cxrloc.checkpoint import model_fingerprint
from cxrloc.decision import image_scores
from cxrloc.rundir import FoldDir, RunDir
from cxrloc.utils import CxrlocError, console


def check_options(sensitivity: float | None, min_positives: int, rule: str | None = None) -> None:
    """Refuse bad options before any forward pass."""
    if rule is not None and rule not in RULES:
        raise CxrlocError(f"--rule {rule!r}: use {', '.join(RULES)}.")
    if rule is not None and rule != "sensitivity" and sensitivity is not None:
        raise CxrlocError(f"--sensitivity sets the sensitivity rule; drop --rule {rule} or --sensitivity.")
    if rule == "sensitivity" and sensitivity is None:
        raise CxrlocError("--rule sensitivity needs the target: --sensitivity 0.9, for example.")
    if sensitivity is not None and not 0.0 < sensitivity <= 1.0:
        raise CxrlocError(f"--sensitivity must be in (0, 1], got {sensitivity}.")
    if min_positives < 1:
        raise CxrlocError(f"--min-positives must be at least 1, got {min_positives}.")


def calibrate_fold(
    fold_dir: str | Path | FoldDir,
    *,
    sensitivity: float | None = None,
    min_positives: int = MIN_POSITIVES,
    device: str = "cpu",
    which: str = "best",
    batch_size: int = 16,
    progress: bool = True,
    rule: str | None = None,
) -> Calibration:
    """Fit one fold's calibration and write ``fold_dir/calibration.json``.

    Args:
        fold_dir: ``RUN_DIR/fold_K``.
        sensitivity: the target sensitivity in (0, 1] of the ``sensitivity`` rule (given alone, it chooses
            that rule).
        rule: ``matched`` (default; :data:`cxrloc.calibration.MIN_PROBABILITY`), ``youden`` or ``sensitivity``.
        min_positives: validation positives (and negatives) a class needs to be fitted on
            validation images alone.
        device: torch device.
        which: checkpoint, ``best`` or ``last`` (the calibration holds for these weights only).
        batch_size: images per forward pass.
        progress: progress bars.
    """
    from cxrloc.evaluation.trained_fold import TrainedFold
    from cxrloc.inference.batch import predict_prepared
    from cxrloc.precision import inference_options

    check_options(sensitivity, min_positives, rule)
    rule = rule or (DEFAULT_RULE if sensitivity is None else "sensitivity")
    tf = TrainedFold.open(fold_dir, device=device, which=which)
    classes = list(tf.cfg.classes)
    val_ids, train_ids = tf.ids("val_ids"), tf.ids("train_ids")
    if not val_ids and not train_ids:
        raise CxrlocError(f"{tf.fold_dir.run_json} lists no validation or training image to calibrate on.")

    def scores_of(ids: list[str], what: str) -> tuple[np.ndarray, np.ndarray]:
        if not ids:
            return np.zeros((0, len(classes))), np.zeros((0, len(classes)))
        z = predict_prepared(tf.model, tf.prepared, ids, image_size=tf.cfg.image_size, device=device,
                             batch_size=batch_size, progress=progress,
                             description=f"Calibrating {tf.fold_dir.name} ({what})",
                             **inference_options(tf.cfg, device))
        return image_scores(z), tf.prepared.label_matrix(ids)

    val_scores, val_labels = scores_of(val_ids, "validation")
    positives = (val_labels > 0.5).sum(axis=0)
    negatives = val_labels.shape[0] - positives
    needs_train = bool(np.any((positives < min_positives) | (negatives < min_positives)))
    train_scores, train_labels = scores_of(train_ids, "training") if needs_train else (None, None)
    cal = fit_calibration(val_scores, val_labels, classes, train_scores=train_scores, train_labels=train_labels,
                          rule=rule, sensitivity=sensitivity, min_positives=min_positives)
    cal.info.update({
        "fold": tf.run.get("fold"),
        "checkpoint": str(tf.checkpoint),
        "which": which,
        "model_fingerprint": model_fingerprint(tf.model.state_dict()),
        "data": "run.json val_ids (validation images carved out of the training patients); train_ids only "
                "for classes with too few validation positives or negatives",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    cal.save(tf.fold_dir.calibration_json)
    return cal


def calibrate_run(
    run_dir: str | Path,
    *,
    fold: int | str | None = None,
    sensitivity: float | None = None,
    min_positives: int = MIN_POSITIVES,
    device: str = "cpu",
    which: str = "best",
    batch_size: int = 16,
    progress: bool = True,
    rule: str | None = None,
) -> list[Path]:
    """:func:`calibrate_fold` for one or every fold of a run; returns the ``calibration.json`` paths."""
    check_options(sensitivity, min_positives, rule)
    paths = []
    for fd in RunDir(Path(run_dir)).folds(fold):
        cal = calibrate_fold(fd, sensitivity=sensitivity, min_positives=min_positives, device=device, which=which,
                             batch_size=batch_size, progress=progress, rule=rule)
        src = cal.info["sources"]
        never = sum(c.threshold is None for c in cal.per_class)  # also fitted classes without a useful cut
        console.print(
            f"{fd.name}: {len(cal.classes)} classes calibrated ({src['val']} on {cal.info['validation_images']} "
            f"validation images, {src['val+train']} with training images too, {src['prior']} without positives "
            f"or negatives); {never} never called present; operating point: {cal.describe()}"
        )
        paths.append(fd.calibration_json)
    return paths
