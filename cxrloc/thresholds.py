"""Per-class thresholds tau, rho, tau_hat, rho_hat of the threshold loss (eq. 12).

- ``tau[k]`` in [0, 1]: share of the box of class k that must be detected.
- ``rho[k]`` in [0, 1]: share of the box's complement that may be detected.
- ``tau_hat[k]`` in [0, P^2]: soft patch count 1'z above which an image is positive.
- ``rho_hat[k]`` in [0, P^2]: soft patch count below which an image is negative.

They live in the model's state (buffers of :class:`ThresholdBuffers`, saved in every
checkpoint) and in ``thresholds.json`` files, which ``cxrloc fit-thresholds`` writes
and ``cxrloc train --set thresholds_file=...`` reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrloc.classes import CLASSES
from cxrloc.utils import CxrlocError, read_json, write_json_atomic

# Bounds keep fitted thresholds away from the degenerate values (tau, tau_hat -> 0;
# rho -> 1; rho_hat -> P^2) that minimise the loss without localizing anything.
TAU_BOUNDS: tuple[float, float] = (0.3, 1.0)
RHO_BOUNDS: tuple[float, float] = (0.0, 0.3)
TAU_HAT_MIN: float = 1.0
"""tau_hat is at least one patch, and at most P^2 / 2."""
RHO_HAT_MAX_FRACTION: float = 0.25
"""rho_hat is at most this share of P^2 (and at least 0)."""

DEFAULT_TAU: float = 0.7
DEFAULT_RHO: float = 0.05
DEFAULT_TAU_HAT_FRACTION: float = 0.5
"""Initial tau_hat = this share of the class's median box size in patches."""
DEFAULT_RHO_HAT: float = 1.0
"""Initial rho_hat, in patches: a negative image should detect (softly) under one patch."""


def box_patch_counts(box_masks: Iterable[tuple[int, np.ndarray]]) -> dict[int, list[float]]:
    """Sizes ``|b_k|`` in patches of every (image, class) box union, for :meth:`Thresholds.initial`.

    ``box_masks`` as :func:`cxrloc.geometry.class_box_masks` yields them.
    """
    counts: dict[int, list[float]] = {}
    for k, mask in box_masks:
        counts.setdefault(int(k), []).append(float(mask.sum()))
    return counts


@dataclass
class Thresholds:
    """Per-class thresholds, each an array of shape ``(K,)`` (float64), K = ``len(classes)``."""

    tau: np.ndarray
    rho: np.ndarray
    tau_hat: np.ndarray
    rho_hat: np.ndarray
    patch_grid: int
    info: dict[str, Any] | None = None
    """How they were obtained (criterion, data, round); written to JSON."""
    classes: Sequence[str] = CLASSES
    """The class names, in the order of the arrays (the keys of the JSON's ``classes``)."""

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        k_all = len(self.classes)
        for name in ("tau", "rho", "tau_hat", "rho_hat"):
            arr = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            if arr.shape != (k_all,):
                raise CxrlocError(f"Threshold '{name}' must have {k_all} values (one per class), got {arr.shape[0]}.")
            if not np.all(np.isfinite(arr)):
                raise CxrlocError(f"Threshold '{name}' holds a non-finite value.")
            setattr(self, name, arr)

    def clipped(self) -> Thresholds:
        """Return a copy inside the documented bounds."""
        n = float(self.patch_grid**2)
        return Thresholds(
            tau=np.clip(self.tau, *TAU_BOUNDS),
            rho=np.clip(self.rho, *RHO_BOUNDS),
            tau_hat=np.clip(self.tau_hat, TAU_HAT_MIN, n / 2),
            rho_hat=np.clip(self.rho_hat, 0.0, RHO_HAT_MAX_FRACTION * n),
            patch_grid=self.patch_grid,
            info=self.info,
            classes=self.classes,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "patch_grid": self.patch_grid,
            "classes": {
                name: {
                    "tau": float(self.tau[k]),
                    "rho": float(self.rho[k]),
                    "tau_hat": float(self.tau_hat[k]),
                    "rho_hat": float(self.rho_hat[k]),
                }
                for k, name in enumerate(self.classes)
            },
            "info": self.info or {},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], classes: Sequence[str] | None = None) -> Thresholds:
        """Thresholds from their JSON form (``thresholds.json``, a checkpoint's ``meta``).

        Args:
            data: the JSON content.
            classes: the class list wanted, in order (the model's); ``None``: the file's own, in the
                file's order.

        Raises:
            CxrlocError: malformed data, or a class of ``classes`` the file lacks.
        """
        try:
            per = data["classes"]
            names = list(per) if classes is None else list(classes)
            missing = [c for c in names if c not in per]
            if missing:
                raise CxrlocError(f"thresholds file lacks classes: {', '.join(missing)}.")
            return cls(
                tau=np.array([per[c]["tau"] for c in names]),
                rho=np.array([per[c]["rho"] for c in names]),
                tau_hat=np.array([per[c]["tau_hat"] for c in names]),
                rho_hat=np.array([per[c]["rho_hat"] for c in names]),
                patch_grid=int(data["patch_grid"]),
                info=data.get("info") or {},
                classes=names,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CxrlocError(
                f"Malformed thresholds data ({exc!r}); expected the format written by fit-thresholds."
            ) from None

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        data = read_json(path, "thresholds file", hint="run 'cxrloc fit-thresholds RUN_DIR' to make one")
        return cls.from_json(data)

    @classmethod
    def initial(
        cls,
        patch_grid: int,
        box_patch_counts: dict[int, list[float]] | None = None,
        rho_hat_box_fraction: float = 0.0,
        classes: Sequence[str] = CLASSES,
    ) -> Thresholds:
        """Initial thresholds before any fitting.

        Args:
            patch_grid: P.
            box_patch_counts: for each class index, the sizes |b| (in patches) of its
                training boxes. tau_hat starts at ``DEFAULT_TAU_HAT_FRACTION`` times the
                class's median box size (the median over all boxes for classes without
                boxes; 2 patches when there are no boxes at all).
            rho_hat_box_fraction: when > 0, rho_hat starts at this share of the class's median
                box size instead of ``DEFAULT_RHO_HAT``: an image without the finding may then
                show a region of about that size at no cost (the evaluation protocol never asks
                for the region of an absent class), which keeps a weak network from learning to
                show nothing at all.
            classes: the class list (K names; NIH's 14 by default).
        """
        all_sizes = [s for sizes in (box_patch_counts or {}).values() for s in sizes]
        fallback = float(np.median(all_sizes)) if all_sizes else 4.0
        k_all = len(classes)
        tau_hat = np.empty(k_all)
        rho_hat = np.full(k_all, DEFAULT_RHO_HAT)
        for k in range(k_all):
            sizes = (box_patch_counts or {}).get(k) or []
            med = float(np.median(sizes)) if sizes else fallback
            tau_hat[k] = DEFAULT_TAU_HAT_FRACTION * med
            if rho_hat_box_fraction > 0:
                rho_hat[k] = rho_hat_box_fraction * med
        return cls(
            tau=np.full(k_all, DEFAULT_TAU),
            rho=np.full(k_all, DEFAULT_RHO),
            tau_hat=tau_hat,
            rho_hat=rho_hat,
            patch_grid=patch_grid,
            info={
                "criterion": "initial",
                "tau_hat_fraction_of_median_box": DEFAULT_TAU_HAT_FRACTION,
                "rho_hat_fraction_of_median_box": rho_hat_box_fraction,
            },
            classes=classes,
        ).clipped()


class ThresholdBuffers(nn.Module):
    """Holds thresholds as non-trainable buffers so they travel with the model's state."""

    def __init__(self, patch_grid: int, classes: Sequence[str] = CLASSES) -> None:
        super().__init__()
        init = Thresholds.initial(patch_grid, classes=classes)
        self.patch_grid = patch_grid
        self.classes: tuple[str, ...] = tuple(classes)
        for name in ("tau", "rho", "tau_hat", "rho_hat"):
            self.register_buffer(name, torch.tensor(getattr(init, name), dtype=torch.float32))

    def set(self, thresholds: Thresholds) -> None:
        if thresholds.patch_grid != self.patch_grid:
            raise CxrlocError(
                f"Thresholds were made for P={thresholds.patch_grid} but the model has P={self.patch_grid}."
            )
        if tuple(thresholds.classes) != self.classes:
            if sorted(thresholds.classes) != sorted(self.classes):
                raise CxrlocError(
                    f"Thresholds were made for the classes {list(thresholds.classes)}, but the model has "
                    f"{list(self.classes)}; use a thresholds file of this model's run."
                )
            thresholds = Thresholds.from_json(thresholds.to_json(), classes=self.classes)  # same names, model order
        for name in ("tau", "rho", "tau_hat", "rho_hat"):
            getattr(self, name).copy_(torch.as_tensor(getattr(thresholds, name), dtype=torch.float32))

    def get(self) -> Thresholds:
        return Thresholds(
            **{n: getattr(self, n).detach().cpu().double().numpy() for n in ("tau", "rho", "tau_hat", "rho_hat")},
            patch_grid=self.patch_grid,
            classes=self.classes,
        )
