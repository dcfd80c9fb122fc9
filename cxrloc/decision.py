"""Every decision made on the network's maps ``z``, written once (bottom layer: numpy only).

- the **image score** of class k, the soft patch count ``1'z_k`` (paper eq. 12): :func:`image_scores`;
- the **detected region** of class k, the patches with ``z_k >= REGION_THRESHOLD``:
  :func:`detected_regions`;
- the **cut search** on a score: one function, :func:`best_cut`, whose criterion is a parameter
  (balanced accuracy for ``tau_hat`` in ``cxrloc fit-thresholds``; Youden's J or a target
  sensitivity for the operating point in ``cxrloc calibrate``; balanced accuracy is ``(J + 1) / 2``);
- the **presence rule**: with a calibration, ``probability >= threshold`` of the class; without,
  ``1'z >= tau_hat`` (:func:`presence`);
- the **operating point** in words, as the evaluation reports and the prediction records give it
  (:func:`operating_point`).

Evaluation, inference, calibration and threshold fitting all call this module, so that the number
a report measures and the decision a user reads are the same rule.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np

from cxrloc.utils import CxrlocError

REGION_THRESHOLD: float = 0.5
"""A patch is part of the detected region when ``z >= REGION_THRESHOLD``."""

CRITERIA: tuple[str, ...] = ("balanced_accuracy", "youden", "sensitivity", "matched")
"""What :func:`best_cut` maximises: balanced accuracy ``(TPR + TNR) / 2``, Youden's
``J = TPR + TNR - 1``, (``sensitivity``) the most specific cut that reaches a target sensitivity,
or (``matched``) the cut that calls as many examples positive as there are positives."""

_TIE: float = 1e-12
"""Slack under which two criterion values are equal (equal fractions computed two ways)."""


def image_scores(z: np.ndarray) -> np.ndarray:
    """Image-level score of every class, the soft patch count ``1'z``: ``(..., K, P, P) -> (..., K)``
    (float64; ``(N, K, P, P) -> (N, K)`` for a batch, ``(K, P, P) -> (K,)`` for one image)."""
    z = np.asarray(z, dtype=np.float64)
    return z.reshape(*z.shape[:-2], -1).sum(axis=-1)


def detected_regions(z: np.ndarray, threshold: float = REGION_THRESHOLD) -> np.ndarray:
    """Boolean regions ``z >= threshold`` (same shape as ``z``)."""
    return np.asarray(z) >= threshold


def roc_points(
    scores: np.ndarray, labels: np.ndarray, *, below_all: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Every distinct decision ``scores >= cut``: the cuts and their sensitivity and specificity.

    Candidate cuts are the midpoints between consecutive distinct scores (any cut inside the same
    gap decides identically), plus, with ``below_all``, one cut below every score (all positive).

    Returns:
        ``(cuts, tpr, tnr)``, ascending cuts; ``None`` without a positive or a negative example or
        without any candidate.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    if pos.size == 0 or neg.size == 0:
        return None
    values = np.unique(scores)
    cuts = (values[:-1] + values[1:]) / 2.0
    if below_all:
        cuts = np.r_[values[0] - 1.0, cuts]
    if cuts.size == 0:
        return None
    tpr = 1.0 - np.searchsorted(pos, cuts, side="left") / pos.size  # share of positives >= cut
    tnr = np.searchsorted(neg, cuts, side="left") / neg.size  # share of negatives < cut
    return cuts, tpr, tnr


class Cut(NamedTuple):
    """A cut chosen by :func:`best_cut`: "positive" when ``score >= cut``."""

    cut: float
    sensitivity: float
    """On the data it was chosen on."""
    specificity: float
    value: float
    """The criterion's value at the cut (balanced accuracy, J, or the sensitivity reached)."""


def best_cut(
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    criterion: str = "balanced_accuracy",
    below_all: bool = False,
    target: float | None = None,
) -> Cut | None:
    """The cut on ``scores`` that is best for ``criterion`` against binary ``labels``.

    Candidates: :func:`roc_points` (midpoints between consecutive distinct scores; with
    ``below_all`` also one cut below every score). ``balanced_accuracy`` and ``youden``: the first
    (lowest, i.e. most sensitive) of the equally best cuts, or ``None`` when no cut beats chance
    (balanced accuracy <= 0.5, i.e. J <= 0). ``sensitivity``: the highest (most specific) cut whose
    sensitivity reaches ``target`` in (0, 1]. ``matched``: the cut whose number of examples called
    positive is nearest the number of positives (the highest, i.e. most specific, of equal ones).

    Returns:
        A :class:`Cut`, or ``None`` (no positive or no negative, no candidate, or no informative cut).
    """
    if criterion not in CRITERIA:
        raise CxrlocError(f"Unknown cut criterion {criterion!r}: use {', '.join(CRITERIA)}.")
    if criterion == "sensitivity" and (target is None or not 0.0 < target <= 1.0):
        raise CxrlocError(f"--sensitivity must be in (0, 1], got {target}.")
    points = roc_points(scores, labels, below_all=below_all)
    if points is None:
        return None
    cuts, tpr, tnr = points
    if criterion == "sensitivity":
        assert target is not None
        i = int(np.flatnonzero(tpr >= target - _TIE)[-1])
        return Cut(float(cuts[i]), float(tpr[i]), float(tnr[i]), float(tpr[i]))
    if criterion == "matched":
        y = np.asarray(labels).reshape(-1).astype(bool)
        pos, neg = int(y.sum()), int((~y).sum())
        gap = np.abs(tpr * pos + (1.0 - tnr) * neg - pos)  # calls minus positives
        i = int(np.flatnonzero(gap <= gap.min() + 1e-9)[-1])
        return Cut(float(cuts[i]), float(tpr[i]), float(tnr[i]), float(-gap[i]))
    if criterion == "balanced_accuracy":
        value, chance = (tpr + tnr) / 2.0, 0.5
    else:
        value, chance = tpr + tnr - 1.0, _TIE
    i = int(np.flatnonzero(value >= value.max() - _TIE)[0])
    if value[i] <= chance:
        return None
    return Cut(float(cuts[i]), float(tpr[i]), float(tnr[i]), float(value[i]))


class ProbabilityMap(Protocol):
    """What the presence rule needs of a calibration (:class:`cxrloc.calibration.Calibration`)."""

    def probabilities(self, scores: np.ndarray) -> np.ndarray: ...

    def thresholds(self) -> np.ndarray: ...

    def describe(self) -> str: ...

    rule: str
    target_sensitivity: float | None


def present_at(probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Boolean decisions ``probability >= threshold`` (``inf`` threshold: never present)."""
    return np.asarray(probabilities, dtype=np.float64) >= np.asarray(thresholds, dtype=np.float64)


def presence(
    scores: np.ndarray, *, calibration: ProbabilityMap | None, tau_hat: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray]:
    """The presence rule on image scores ``1'z`` ``(N, K)`` or ``(K,)``.

    With a calibration: calibrated probabilities and ``probability >= threshold``; without: no
    probabilities and ``1'z >= tau_hat`` (the training loss's threshold, not fitted for presence).

    Returns:
        ``(probabilities or None, present)``, both of the shape of ``scores``.
    """
    if calibration is not None:
        probs = calibration.probabilities(scores)
        return probs, present_at(probs, calibration.thresholds())
    if tau_hat is None:
        raise ValueError("presence needs a calibration or tau_hat")
    return None, np.asarray(scores, dtype=np.float64) >= np.asarray(tau_hat, dtype=np.float64)


UNCALIBRATED_REPORT: str = "1'z >= tau_hat (uncalibrated)"
UNCALIBRATED_RECORD: str = "present = 1'z >= tau_hat (the training loss's threshold, not fitted for presence)"


def operating_point(
    calibration: ProbabilityMap | None, *, source: str = "", note: str = "", record: bool = False
) -> dict[str, Any]:
    """What decides "present", as a JSON dict: the calibrated rule, or the ``tau_hat`` fallback.

    Args:
        calibration: the model's calibration, or ``None``.
        source: where the calibration comes from (a file, the model's metadata).
        note: why there is no calibration (uncalibrated models only).
        record: the wording of a prediction record (``present = ...``) instead of a report's.
    """
    if calibration is not None:
        described = calibration.describe()
        if record:
            described = f"present = probability >= the class's threshold, chosen by {described}"
        return {
            "rule": calibration.rule,
            "target_sensitivity": calibration.target_sensitivity,
            "calibrated": True,
            "description": described,
            "source": source,
        }
    return {
        "rule": "tau_hat",
        "target_sensitivity": None,
        "calibrated": False,
        "description": UNCALIBRATED_RECORD if record else UNCALIBRATED_REPORT,
        "note": note,
    }
