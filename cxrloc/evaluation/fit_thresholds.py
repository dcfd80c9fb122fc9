"""Fit the per-class thresholds tau, rho, tau_hat, rho_hat with the network frozen.

The paper alternates: train the network with thresholds fixed, then fix the network and
find "optimal" thresholds. It leaves the criterion open; the loss itself cannot be it
(it is minimised by tau, tau_hat -> 0, rho -> 1, rho_hat -> P^2). Our criterion, computed
on the fold's TRAINING images only (``run.json``'s ``train_ids``) and documented in
``docs/evaluation.md``:

- ``tau_k``: the ``tau_quantile`` (default 25th percentile) of the in-box fraction
  ``sum_{j in b} z_kj / |b|`` achieved on the annotated training images of class k;
- ``rho_k``: the ``rho_quantile`` (default 75th percentile) of the outside fraction
  ``sum_{j not in b} z_kj / |b_bar|`` on the same images.
  With these, the annotated constraint of eq. 12 is active for the quarter of the
  training boxes that the network localizes worst, so the next round works on them;
  as the network improves, the quantiles ratchet towards tau = 1, rho = 0.
- ``tau_hat_k``: the cut on ``1'z`` that maximises the balanced accuracy
  ``(TPR + TNR) / 2`` of ``1'z >= tau_hat`` against the image labels (midpoint between
  the two neighbouring scores of the best cut);
- ``rho_hat_k = rho_hat_fraction * tau_hat_k`` (default one half): negatives are pushed
  clearly below the decision cut, not just under it.

Everything is clipped into :meth:`Thresholds.clipped` bounds (tau >= 0.3, rho <= 0.3,
1 <= tau_hat <= P^2/2, rho_hat <= P^2/4), so no outcome is degenerate. A class without
annotated training images keeps its current tau and rho; a class without both a
positive and a negative training image, or whose scores separate nothing (balanced
accuracy <= 0.5, e.g. an all-zero network), keeps its current tau_hat and rho_hat.
"current" = the thresholds stored in the checkpoint's model.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrloc.classes import NUM_CLASSES
from cxrloc.decision import best_cut, image_scores
from cxrloc.geometry import union_patch_mask
from cxrloc.rundir import RunDir
from cxrloc.thresholds import Thresholds
from cxrloc.utils import CxrlocError, check_writable_file, console

TAU_QUANTILE: float = 0.25
RHO_QUANTILE: float = 0.75
RHO_HAT_FRACTION: float = 0.5

CRITERION: str = (
    "tau = q{tq:g} quantile of achieved in-box fraction, rho = q{rq:g} quantile of achieved outside fraction "
    "(annotated training images); tau_hat = cut on 1'z maximising balanced accuracy on training images; "
    "rho_hat = {rf:g} * tau_hat; all clipped to Thresholds bounds"
)


def box_fractions(z_k: np.ndarray, boxes: Sequence[Sequence[float]]) -> tuple[float, float | None]:
    """In-box fraction ``sum_b z / |b|`` and outside fraction ``sum_bbar z / |bbar|`` of one class map.

    ``b`` is the union of the boxes' patch masks (as in the loss). The outside fraction is
    ``None`` when the boxes cover the whole grid.
    """
    z_k = np.asarray(z_k, dtype=np.float64)
    b = union_patch_mask(boxes, z_k.shape[0])
    inside = float(z_k[b].sum() / b.sum())
    n_out = int((~b).sum())
    outside = float(z_k[~b].sum() / n_out) if n_out else None
    return inside, outside


@dataclass
class ThresholdStats:
    """What the criterion needs from the training predictions, accumulated batch by batch."""

    num_classes: int = NUM_CLASSES
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    inside: dict[int, list[float]] = field(default_factory=dict)
    outside: dict[int, list[float]] = field(default_factory=dict)

    def add(self, z: np.ndarray, labels: np.ndarray, boxes: Sequence[Sequence[Sequence[float]]]) -> None:
        """Add a batch: ``z`` (B, K, P, P), ``labels`` (B, K), per-image box lists ``(k, x0, y0, x1, y1)``."""
        z = np.asarray(z, dtype=np.float64)
        self.scores.append(image_scores(z))
        self.labels.append(np.asarray(labels, dtype=np.float64).reshape(z.shape[0], -1))
        for i, image_boxes in enumerate(boxes):
            per_class: dict[int, list[tuple[float, ...]]] = {}
            for k, *box in image_boxes:
                per_class.setdefault(int(k), []).append(tuple(box))
            for k, class_boxes in per_class.items():
                inside, outside = box_fractions(z[i, k], class_boxes)
                self.inside.setdefault(k, []).append(inside)
                if outside is not None:
                    self.outside.setdefault(k, []).append(outside)


def thresholds_from_stats(
    stats: ThresholdStats,
    current: Thresholds,
    *,
    tau_quantile: float = TAU_QUANTILE,
    rho_quantile: float = RHO_QUANTILE,
    rho_hat_fraction: float = RHO_HAT_FRACTION,
) -> Thresholds:
    """Apply the criterion (module docstring) to accumulated statistics.

    Args:
        stats: training-set statistics.
        current: thresholds kept for classes where the criterion has no data.
        tau_quantile, rho_quantile, rho_hat_fraction: the criterion's parameters.

    Returns:
        Clipped :class:`Thresholds` whose ``info`` says, per class, what was fitted from what.
    """
    for name, v in (("tau_quantile", tau_quantile), ("rho_quantile", rho_quantile)):
        if not 0.0 <= v <= 1.0:
            raise CxrlocError(f"{name} must be in [0, 1], got {v}.")
    if not 0.0 < rho_hat_fraction <= 1.0:
        raise CxrlocError(f"rho_hat_fraction must be in (0, 1], got {rho_hat_fraction}.")
    k_all = stats.num_classes
    scores = np.concatenate(stats.scores) if stats.scores else np.zeros((0, k_all))
    labels = np.concatenate(stats.labels) if stats.labels else np.zeros((0, k_all))
    tau, rho = current.tau.copy(), current.rho.copy()
    tau_hat, rho_hat = current.tau_hat.copy(), current.rho_hat.copy()
    per_class: dict[str, Any] = {}
    for k in range(k_all):
        name = current.classes[k]
        entry: dict[str, Any] = {
            "annotated_images": len(stats.inside.get(k, [])),
            "positives": int((labels[:, k] > 0.5).sum()),
            "negatives": int((labels[:, k] <= 0.5).sum()),
        }
        if stats.inside.get(k):
            tau[k] = float(np.quantile(stats.inside[k], tau_quantile))
            entry["tau_from"] = "fitted"
        else:
            entry["tau_from"] = "kept (no annotated training image)"
        if stats.outside.get(k):
            rho[k] = float(np.quantile(stats.outside[k], rho_quantile))
        cut = best_cut(scores[:, k], labels[:, k] > 0.5, criterion="balanced_accuracy")
        if cut is not None:
            tau_hat[k] = cut.cut
            rho_hat[k] = rho_hat_fraction * cut.cut
            entry["tau_hat_from"] = "fitted"
            entry["train_balanced_accuracy"] = cut.value
        else:
            entry["tau_hat_from"] = "kept (no positive/negative pair or no separating cut)"
        per_class[name] = entry
    fitted = Thresholds(
        tau=tau, rho=rho, tau_hat=tau_hat, rho_hat=rho_hat, patch_grid=current.patch_grid, classes=current.classes
    ).clipped()
    # Clipping tau_hat (up to P^2/2) and rho_hat (up to P^2/4) separately could invert them.
    fitted.rho_hat = np.minimum(fitted.rho_hat, fitted.tau_hat)
    fitted.info = {
        "criterion": CRITERION.format(tq=tau_quantile, rq=rho_quantile, rf=rho_hat_fraction),
        "tau_quantile": tau_quantile,
        "rho_quantile": rho_quantile,
        "rho_hat_fraction": rho_hat_fraction,
        "images": int(scores.shape[0]),
        "per_class": per_class,
    }
    return fitted


def fit_thresholds_from_predictions(
    z: np.ndarray,
    labels: np.ndarray,
    boxes: Sequence[Sequence[Sequence[float]]],
    current: Thresholds,
    **kwargs: float,
) -> Thresholds:
    """:func:`thresholds_from_stats` on in-memory predictions ``z`` (N, K, P, P)."""
    stats = ThresholdStats(num_classes=np.asarray(z).shape[1])
    stats.add(z, labels, boxes)
    return thresholds_from_stats(stats, current, **kwargs)


def fit_thresholds(
    fold_dir: str | Path,
    *,
    device: str = "cpu",
    which: str = "best",
    progress: bool = True,
    batch_size: int = 16,
    tau_quantile: float = TAU_QUANTILE,
    rho_quantile: float = RHO_QUANTILE,
    rho_hat_fraction: float = RHO_HAT_FRACTION,
) -> Thresholds:
    """Fit thresholds for one fold from its training images and write ``fold_dir/thresholds.json``.

    Args:
        fold_dir: ``RUN_DIR/fold_K`` (holds ``run.json`` and ``checkpoints/``).
        device: torch device for the forward passes.
        which: checkpoint, ``best`` or ``last``.
        progress: show a progress bar.
        batch_size: images per forward pass.
        tau_quantile, rho_quantile, rho_hat_fraction: the criterion's parameters.

    Returns:
        The fitted thresholds (also written to ``fold_dir/thresholds.json``).
    """
    from cxrloc.evaluation.trained_fold import TrainedFold
    from cxrloc.inference.batch import iter_predictions
    from cxrloc.precision import inference_options

    tf = TrainedFold.open(fold_dir, device=device, which=which)
    check_writable_file(tf.fold_dir.thresholds_json, "thresholds file")
    run, prepared, model, cfg, ckpt = tf.run, tf.prepared, tf.model, tf.cfg, tf.checkpoint
    fold_dir = tf.fold_dir.path
    current = model.thresholds.get()
    ids = tf.ids("train_ids")
    if not ids:
        raise CxrlocError(f"{tf.fold_dir.run_json} lists no training image; nothing to fit thresholds on.")
    stats = ThresholdStats(num_classes=len(current.classes))
    for chunk, z in iter_predictions(
        model,
        prepared,
        ids,
        image_size=cfg.image_size,
        device=device,
        batch_size=batch_size,
        progress=progress,
        description=f"Thresholds {fold_dir.name}",
        **inference_options(cfg, device),
    ):
        stats.add(z, np.stack([prepared.labels(i) for i in chunk]), [prepared.boxes(i) for i in chunk])
    fitted = thresholds_from_stats(
        stats, current, tau_quantile=tau_quantile, rho_quantile=rho_quantile, rho_hat_fraction=rho_hat_fraction
    )
    out = tf.fold_dir.thresholds_json
    previous_round = 0
    if out.is_file():
        try:
            previous_round = int((Thresholds.load(out).info or {}).get("round", 0))
        except (CxrlocError, TypeError, ValueError):
            previous_round = 0
    assert fitted.info is not None
    fitted.info.update(
        {
            "round": previous_round + 1,
            "data": "training images of the fold (run.json train_ids)",
            "fold": run.get("fold"),
            "checkpoint": str(ckpt),
            "which": which,
            "previous": current.to_json()["classes"],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    fitted.save(out)
    return fitted


def fit_thresholds_run(
    run_dir: str | Path,
    *,
    fold: int | str | None = None,
    device: str = "cpu",
    which: str = "best",
    progress: bool = True,
    batch_size: int = 16,
) -> list[Path]:
    """:func:`fit_thresholds` for one or every fold of a run; returns the ``thresholds.json`` paths."""
    paths = []
    for fd in RunDir(Path(run_dir)).folds(fold):
        th = fit_thresholds(fd.path, device=device, which=which, progress=progress, batch_size=batch_size)
        fitted = sum(v.get("tau_hat_from") == "fitted" for v in (th.info or {}).get("per_class", {}).values())
        images = (th.info or {}).get("images", 0)
        console.print(
            f"{fd.name}: thresholds fitted on {images} training images ({fitted}/{len(th.tau)} tau_hat fitted)"
        )
        paths.append(fd.thresholds_json)
    return paths
