"""A probability per class and the operating point that calls a class present (``cxrloc calibrate``).

The network's image-level score of class k is the soft count ``s_k = 1'z_k`` (paper eq. 12): the
expected number of positive patches, not a probability. This module maps it to one by **Platt
scaling**,

    p_k = sigmoid(a_k * log(1 + s_k) + b_k),

fitted per class on the fold's validation images, and chooses per class the **operating point**:
the probability ``threshold_k`` at or above which class k is called present: by default
**count-matched** (the class is called present on as many calibration images as carry its label,
never below :data:`MIN_PROBABILITY`), so that the classes called present per image match the
labelled findings per image; or Youden's J; or the highest cut that reaches a target sensitivity.
Why Platt on ``log(1 + s)`` and not isotonic
regression or the paper's noisy-OR ``1 - prod_j (1 - z_kj)``: ``docs/evaluation.md``.

Fitting (pure numpy, no dependency):

- :func:`platt_fit`: Newton's method with a backtracking line search on the cross-entropy with
  Platt's (1999) regularised targets ``(N+ + 1) / (N+ + 2)`` for positives and ``1 / (N- + 2)`` for
  negatives, which keep the slope finite on separable data. A slope that comes out <= 0 (the score
  does not rise with the label) is replaced by a constant probability.
- the operating point: :func:`cxrloc.decision.best_cut` (criterion ``matched``, ``youden`` or ``sensitivity``)
  on the feature ``x = log(1 + s)``, a cut between two neighbouring distinct values (their
  midpoint; any cut inside one gap classifies alike) or below every value.
- :func:`fit_calibration`: per class, the validation images when they hold at least
  ``min_positives`` positives and as many negatives; else validation + training images (the
  network has seen the training images, so their scores are optimistic: recorded as
  ``source = "val+train"``; without training images, the few validation images, with a note);
  else a constant probability (the smoothed prevalence) and no operating point
  (``source = "prior"``: the class is never called present).

:class:`Calibration` is what ``calibration.json`` holds (:attr:`cxrloc.rundir.FoldDir.calibration_json`),
what ``load_model`` puts in ``meta["calibration"]`` and what ``cxrloc export`` writes into the ONNX
metadata, so the torch and onnxruntime backends give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrloc.decision import best_cut, present_at
from cxrloc.utils import CxrlocError, read_json, write_json_atomic

METHOD: str = "platt"
FEATURE: str = "log(1 + 1'z)"
"""The transform of the soft count that Platt scaling is fitted on (monotone: AUROC unchanged)."""

RULES: tuple[str, ...] = ("matched", "youden", "sensitivity")
"""Operating-point rules: count-matched (default), Youden's J, or a target sensitivity."""

DEFAULT_RULE: str = "matched"

MIN_PROBABILITY: float = 0.1
"""The ``matched`` rule never calls a class present below this calibrated probability.

Why 0.1: a calibrated probability p says that about p of the images scored like this one carry the
finding (the reliability diagrams of ``report.html`` check it), so a "present" below 0.1 would be
wrong more than nine times in ten by the model's own account; the calls at 3-5 % that cost a user's
trust (issue 23) are gone. A higher floor was measured to break the rule's purpose on real data: on
the validation images of a real NIH run (docs/evaluation.md) the count-matched rule calls 1.97
classes per image against 2.10 labelled findings unfloored, 1.92 with a floor of 0.1, but 1.38 with
0.15 and 1.23 with 0.2 (-34 % and -41 %): a network that barely tells findings apart cannot give a
rare finding a high probability, so its count-matched thresholds lie at 0.03-0.35. 0.1 is the
highest of 0.05 / 0.1 / 0.15 / 0.2 that keeps that count within 30 %."""

MIN_POSITIVES: int = 3
"""Validation positives (and negatives) a class needs to be calibrated on validation images alone."""

SOURCES: dict[str, str] = {
    "val": "validation images",
    "val+train": "validation + training images (too few validation positives or negatives)",
    "prior": "no positive/negative pair: constant probability, never called present",
}


def feature(scores: np.ndarray) -> np.ndarray:
    """``log(1 + s)`` of soft counts ``s >= 0`` (negative values, impossible for 1'z, are clipped)."""
    return np.log1p(np.clip(np.asarray(scores, dtype=np.float64), 0.0, None))


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def platt_targets(labels: np.ndarray) -> np.ndarray:
    """Platt's regularised targets: ``(N+ + 1) / (N+ + 2)`` for positives, ``1 / (N- + 2)`` for negatives."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))


def _softplus(f: np.ndarray) -> np.ndarray:
    return np.maximum(f, 0.0) + np.log1p(np.exp(-np.abs(f)))


def platt_fit(x: np.ndarray, labels: np.ndarray, *, max_iter: int = 100, tol: float = 1e-12) -> tuple[float, float]:
    """Fit ``p = sigmoid(a x + b)`` to binary ``labels`` (Platt scaling with Platt's targets).

    Newton's method on the cross-entropy against :func:`platt_targets`, with step halving until
    the loss decreases (Lin, Lin and Weng 2007). With two distinct values of ``x`` the fit passes
    exactly through the mean target at each value.

    Returns:
        ``(a, b)``. When ``x`` has no spread or the fitted slope is <= 0, ``a = 0`` and
        ``b = logit(mean target)`` (a constant probability).

    Raises:
        ValueError: no positive or no negative label, or shapes that differ.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} values for {y.size} labels")
    if not y.any() or y.all():
        raise ValueError("Platt scaling needs at least one positive and one negative label")
    t = platt_targets(y)
    constant = (0.0, logit(float(t.mean())))
    if np.ptp(x) <= 1e-12:
        return constant

    def loss(a: float, b: float) -> float:
        f = a * x + b
        return float(np.sum(_softplus(f) - t * f))

    a, b = 0.0, logit(float(t.mean()))
    current = loss(a, b)
    for _ in range(max_iter):
        p = sigmoid(a * x + b)
        r = p - t
        g = np.array([np.dot(r, x), r.sum()])
        w = p * (1.0 - p)
        h = np.array([[np.dot(w, x * x), np.dot(w, x)], [np.dot(w, x), w.sum()]]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(h, g)
        scale = 1.0
        while scale > 1e-10:
            a_new, b_new = a - scale * step[0], b - scale * step[1]
            new = loss(a_new, b_new)
            if new <= current + 1e-4 * scale * float(np.dot(g, -step)) or new <= current:
                break
            scale /= 2.0
        else:
            break
        a, b, previous, current = a_new, b_new, current, new
        if abs(previous - current) <= tol * max(1.0, abs(current)) and np.max(np.abs(g)) < 1e-8:
            break
    if a <= 0.0:
        return constant
    return float(a), float(b)


@dataclass
class ClassCalibration:
    """The probability map and operating point of one class."""

    a: float
    """Slope on ``log(1 + 1'z)`` (0: constant probability)."""
    b: float
    threshold: float | None
    """Probability at or above which the class is present; ``None``: never present."""
    source: str
    """``val``, ``val+train`` or ``prior`` (:data:`SOURCES`)."""
    positives: int = 0
    negatives: int = 0
    score_cut: float | None = None
    """The same cut on ``1'z`` (for reading; decisions use ``threshold``)."""
    fit_sensitivity: float | None = None
    fit_specificity: float | None = None
    """Of the operating point on the images it was chosen on."""
    note: str = ""

    def probability(self, scores: np.ndarray) -> np.ndarray:
        return sigmoid(self.a * feature(scores) + self.b)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "a": self.a, "b": self.b, "threshold": self.threshold, "score_cut": self.score_cut,
            "source": self.source, "positives": self.positives, "negatives": self.negatives,
            "fit_sensitivity": self.fit_sensitivity, "fit_specificity": self.fit_specificity,
        }
        if self.note:
            out["note"] = self.note
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClassCalibration:
        threshold = data.get("threshold")
        out = cls(
            a=float(data["a"]), b=float(data["b"]), threshold=None if threshold is None else float(threshold),
            source=str(data.get("source", "")), positives=int(data.get("positives", 0)),
            negatives=int(data.get("negatives", 0)), score_cut=data.get("score_cut"),
            fit_sensitivity=data.get("fit_sensitivity"), fit_specificity=data.get("fit_specificity"),
            note=str(data.get("note", "")),
        )
        if not (math.isfinite(out.a) and math.isfinite(out.b)) or out.a < 0:
            raise ValueError(f"a = {out.a}, b = {out.b}: need finite values and a >= 0")
        if out.threshold is not None and not 0.0 <= out.threshold <= 1.0:
            raise ValueError(f"threshold {out.threshold} is not a probability")
        return out


@dataclass
class Calibration:
    """Per-class probabilities and operating points of one model (``calibration.json``)."""

    classes: list[str]
    per_class: list[ClassCalibration]
    rule: str = "youden"
    target_sensitivity: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.per_class):
            raise CxrlocError(f"Calibration of {len(self.classes)} classes has {len(self.per_class)} entries.")
        if self.rule not in RULES:
            raise CxrlocError(f"Unknown operating-point rule {self.rule!r}: use {' or '.join(RULES)}.")

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """``(N, K)`` (or ``(K,)``) soft counts ``1'z`` -> calibrated probabilities of the same shape."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape[-1] != len(self.per_class):
            raise CxrlocError(f"Scores of {scores.shape[-1]} classes for a calibration of {len(self.per_class)}.")
        return np.stack([c.probability(scores[..., k]) for k, c in enumerate(self.per_class)], axis=-1)

    def thresholds(self) -> np.ndarray:
        """``(K,)`` probability thresholds; ``inf`` where a class is never called present."""
        return np.array([np.inf if c.threshold is None else c.threshold for c in self.per_class])

    def present(self, probabilities: np.ndarray) -> np.ndarray:
        """Boolean decisions ``probability >= threshold`` (same shape as ``probabilities``)."""
        return present_at(probabilities, self.thresholds())

    def describe(self) -> str:
        """The operating point in words, for the command line and the reports."""
        if self.rule == "matched":
            rule = f"count-matched (each class called as often as labelled, p >= {MIN_PROBABILITY:g})"
        else:
            rule = (f"target sensitivity {self.target_sensitivity:g}" if self.rule == "sensitivity"
                    else "Youden's J")
        pooled = sum(c.source == "val+train" for c in self.per_class)
        extra = f", + training images for {pooled} class(es) with few validation positives" if pooled else ""
        return f"{rule} on validation images{extra}"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "method": METHOD,
            "feature": FEATURE,
            "rule": self.rule,
            "target_sensitivity": self.target_sensitivity,
            "classes": {name: c.to_json() for name, c in zip(self.classes, self.per_class, strict=True)},
            "info": self.info,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "calibration data") -> Calibration:
        try:
            if data.get("method", METHOD) != METHOD or data.get("feature", FEATURE) != FEATURE:
                raise ValueError(f"method {data.get('method')!r} on {data.get('feature')!r}, not {METHOD} on {FEATURE}")
            per = data["classes"]
            target = data.get("target_sensitivity")
            return cls(
                classes=list(per),
                per_class=[ClassCalibration.from_json(per[name]) for name in per],
                rule=str(data.get("rule", "youden")),
                target_sensitivity=None if target is None else float(target),
                info=dict(data.get("info") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CxrlocError(
                f"{source}: malformed calibration ({exc!r}); re-run 'cxrloc calibrate RUN_DIR' to rewrite it."
            ) from None

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        data = read_json(path, "calibration file", hint="run 'cxrloc calibrate RUN_DIR' to make one")
        return cls.from_json(data, str(path))


def _class_fit(x: np.ndarray, y: np.ndarray, source: str, rule: str, sensitivity: float | None) -> ClassCalibration:
    """Platt map and operating point of one class on ``x = log(1 + s)`` with labels ``y`` (both classes present)."""
    a, b = platt_fit(x, y)
    entry = ClassCalibration(a=a, b=b, threshold=None, source=source, positives=int(y.sum()),
                             negatives=int((~y).sum()))
    if a <= 0.0:
        entry.note = "the score does not rise with the label on these images: constant probability, never present"
        return entry
    cut = best_cut(x, y, criterion=rule, below_all=True, target=sensitivity)
    if cut is None:
        entry.note = "no cut beats chance (Youden's J <= 0): never present"
        return entry
    c, sens, spec, _ = cut
    entry.threshold = float(sigmoid(a * c + b))
    if rule == "matched" and entry.threshold < MIN_PROBABILITY:
        entry.note = (f"the count-matched threshold {entry.threshold:.3f} is below the minimum probability "
                      f"{MIN_PROBABILITY:g}: raised to it")
        entry.threshold = MIN_PROBABILITY
        c = (logit(MIN_PROBABILITY) - b) / a
        sens, spec = float(np.mean(x[y] >= c)), float(np.mean(x[~y] < c))
    entry.score_cut = float(max(math.expm1(c), 0.0))
    entry.fit_sensitivity, entry.fit_specificity = sens, spec
    return entry


def fit_calibration(
    val_scores: np.ndarray,
    val_labels: np.ndarray,
    classes: Sequence[str],
    *,
    train_scores: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
    rule: str = DEFAULT_RULE,
    sensitivity: float | None = None,
    min_positives: int = MIN_POSITIVES,
) -> Calibration:
    """Fit every class's probability map and operating point (module docstring for the fallbacks).

    Args:
        val_scores, val_labels: ``(N, K)`` soft counts ``1'z`` and 0/1 labels of the validation images.
        classes: the K class names, in column order.
        train_scores, train_labels: the training images' (used only for a class whose validation
            images hold fewer than ``min_positives`` positives or negatives); ``None``: no fallback
            to training images.
        rule: ``matched`` (default: as many calls per class as labelled positives, never below
            :data:`MIN_PROBABILITY`), ``youden`` or ``sensitivity`` (then ``sensitivity`` is the target, in (0, 1]).
        min_positives: validation positives and negatives needed to use validation images alone.

    Returns:
        The :class:`Calibration`; its ``info`` counts the images and names the sources used.
    """
    if rule not in RULES:
        raise CxrlocError(f"Unknown operating-point rule {rule!r}: use {' or '.join(RULES)}.")
    if rule == "sensitivity" and (sensitivity is None or not 0.0 < sensitivity <= 1.0):
        raise CxrlocError(f"--sensitivity must be in (0, 1], got {sensitivity}.")
    if min_positives < 1:
        raise CxrlocError(f"--min-positives must be at least 1, got {min_positives}.")
    k_all = len(classes)
    vs = np.asarray(val_scores, dtype=np.float64).reshape(-1, k_all)
    vl = np.asarray(val_labels).reshape(-1, k_all) > 0.5
    have_train = train_scores is not None and train_labels is not None
    ts = np.asarray(train_scores, dtype=np.float64).reshape(-1, k_all) if have_train else np.zeros((0, k_all))
    tl = np.asarray(train_labels).reshape(-1, k_all) > 0.5 if have_train else np.zeros((0, k_all), bool)
    per_class = []
    for k in range(k_all):
        y = vl[:, k]
        if y.sum() >= min_positives and (~y).sum() >= min_positives:
            per_class.append(_class_fit(feature(vs[:, k]), y, "val", rule, sensitivity))
            continue
        x_all = feature(np.r_[vs[:, k], ts[:, k]])
        y_all = np.r_[y, tl[:, k]]
        if y_all.any() and not y_all.all():
            source = "val+train" if have_train else "val"
            entry = _class_fit(x_all, y_all, source, rule, sensitivity)
            if not have_train:
                few = f"only {int(y.sum())} positive(s) and {int((~y).sum())} negative(s) to calibrate on"
                entry.note = f"{few}; {entry.note}" if entry.note else few
            per_class.append(entry)
            continue
        n_pos = int(y_all.sum())
        per_class.append(ClassCalibration(
            a=0.0, b=logit((n_pos + 1.0) / (y_all.size + 2.0)), threshold=None, source="prior",
            positives=n_pos, negatives=int(y_all.size - n_pos),
            note="no positive or no negative image to calibrate on: smoothed prevalence, never present",
        ))
    sources = [c.source for c in per_class]
    info = {
        "validation_images": int(vs.shape[0]),
        "training_images": int(ts.shape[0]) if "val+train" in sources or "prior" in sources else 0,
        "min_positives": min_positives,
        "sources": {s: sum(x == s for x in sources) for s in SOURCES},
        "source_meaning": dict(SOURCES),
    }
    target = float(sensitivity) if rule == "sensitivity" and sensitivity is not None else None
    return Calibration(list(classes), per_class, rule=rule, target_sensitivity=target, info=info)
