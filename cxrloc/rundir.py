"""The run folder: every path of a training run, its small files, and which thresholds a fold uses.

Layout written by ``cxrloc train`` (one ``fold_K`` per trained fold)::

    RUN_DIR/
      fold_K/
        config.json          the fully resolved Config
        run.json             prepared folder, fold, stage, start weights, train/val/test image ids
        metrics.csv          one row per epoch
    curves.png           losses and validation accuracy per epoch (stage boundaries marked)
        thresholds.json      written by ``cxrloc fit-thresholds`` (optional)
        calibration.json     written by ``cxrloc calibrate`` (optional): probabilities, operating points
        checkpoints/
          last.pt            every epoch (resume)
          best.pt            best validation accuracy
      eval/                  ``cxrloc evaluate`` of the whole run (eval_val/, eval_on_NAME/, *_foldN/,
                             *_last/, *_ttaN/: :meth:`RunDir.eval_dir`)
      export/model.onnx      ``cxrloc export`` (:attr:`RunDir.export_path`)
      unary/ crf/ joint/     ``cxrloc train --stage all``: one run per stage (:meth:`RunDir.stage`)

Every module that needs one of these paths asks :class:`FoldDir` or :class:`RunDir`; no other
module spells them.

**Which thresholds a fold uses** (one rule, :meth:`FoldDir.thresholds_file`): an explicit
``thresholds.json`` given by the user wins; then the fold's fitted ``thresholds.json``; then
(for training only) the fitted ``thresholds.json`` of the run it starts from; else the thresholds
saved in the checkpoint (inference) or the initial ones computed from the training boxes
(training).

**Which calibration a checkpoint uses** (:func:`calibration_for_checkpoint`): the
``calibration.json`` of the fold the checkpoint sits in, if any; ``load_model`` then checks that it
was fitted for the same weights.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrloc.utils import CxrlocError, read_json, remove_stale_temporaries, write_json_atomic, write_text_atomic

CHECKPOINTS: tuple[str, ...] = ("best", "last")
"""The checkpoints a fold folder holds: ``best.pt`` (best validation accuracy) and ``last.pt``."""

EXPORT_NAME: str = "model.onnx"
"""The file ``cxrloc export`` writes: ``RUN_DIR/export/model.onnx``, or beside a ``.pt`` checkpoint."""

RUN_JSON_KEYS: tuple[str, ...] = ("prepared_dir", "train_ids", "test_ids")
"""Keys every ``run.json`` must have."""

METRIC_COLUMNS_HEAD: tuple[str, ...] = ("epoch", "stage")
METRIC_COLUMNS_TAIL: tuple[str, ...] = ("loss", "lr", "val_iou_acc", "val_ior_acc", "best", "time_s")
"""``metrics.csv`` columns around the loss terms (which depend on the loss)."""


@dataclass(frozen=True)
class FoldDir:
    """One trained fold: ``RUN_DIR/fold_K``."""

    path: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike[str], fold: int) -> FoldDir:
        return cls(Path(run_dir) / f"fold_{fold}")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_json(self) -> Path:
        return self.path / "config.json"

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def curves_png(self) -> Path:
        """Training curves, redrawn each epoch (:mod:`cxrloc.training.curves`)."""
        return self.path / "curves.png"

    @property
    def thresholds_json(self) -> Path:
        return self.path / "thresholds.json"

    @property
    def calibration_json(self) -> Path:
        return self.path / "calibration.json"

    def checkpoint(self, which: str = "best") -> Path:
        """``checkpoints/{which}.pt`` (whether or not it exists)."""
        if which not in CHECKPOINTS:
            raise CxrlocError(f"Unknown checkpoint {which!r}: use {' or '.join(CHECKPOINTS)}.")
        return self.path / "checkpoints" / f"{which}.pt"

    def existing_checkpoint(self, which: str = "best") -> Path:
        """The checkpoint file, or a clear error when training has not written it yet."""
        ckpt = self.checkpoint(which)
        if not ckpt.is_file():
            raise CxrlocError(f"{ckpt} does not exist: has training finished an epoch in {self.path}?")
        return ckpt

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files that an interrupted atomic write of this fold's files left
        (``checkpoints/.last.pt.XXXX.tmp`` after a kill during a checkpoint write); return them."""
        removed = remove_stale_temporaries(self.path / "checkpoints", [f"{w}.pt" for w in CHECKPOINTS])
        names = [p.name for p in (self.config_json, self.run_json, self.metrics_csv, self.curves_png,
                                  self.thresholds_json)]
        return removed + remove_stale_temporaries(self.path, names)

    def is_trained(self) -> bool:
        return (self.path / "checkpoints").is_dir()

    def read_run(self) -> dict[str, Any]:
        """``run.json``, checked for the keys every command needs."""
        if not self.run_json.is_file():
            raise CxrlocError(f"{self.run_json} not found: is {self.path} a fold folder made by 'cxrloc train'?")
        run = read_json(self.run_json, "run.json")
        if not isinstance(run, dict):
            raise CxrlocError(f"{self.run_json} does not hold a JSON object; re-run 'cxrloc train' to rewrite it.")
        missing = [k for k in RUN_JSON_KEYS if k not in run]
        if missing:
            raise CxrlocError(f"{self.run_json} lacks {', '.join(missing)}; re-run 'cxrloc train' to rewrite it.")
        return run

    def write_run(self, run: dict[str, Any]) -> Path:
        return write_json_atomic(self.run_json, run)

    def write_metrics(self, history: Sequence[dict[str, Any]]) -> None:
        """Rewrite ``metrics.csv`` from the epoch history kept in the checkpoint (exact after resume)."""
        if not history:
            return
        terms = [k for k in history[0] if k not in METRIC_COLUMNS_HEAD + METRIC_COLUMNS_TAIL]
        columns = [*METRIC_COLUMNS_HEAD, *terms, *METRIC_COLUMNS_TAIL]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in columns})
        write_text_atomic(self.metrics_csv, buf.getvalue())

    def thresholds_file(
        self, explicit: str | os.PathLike[str] | None = None, start: FoldDir | None = None
    ) -> Path | None:
        """The ``thresholds.json`` this fold uses, by the module's rule; ``None``: none applies.

        Args:
            explicit: a file named by the user (must exist).
            start: the fold a training stage starts from (``--from``); its fitted file is the
                last candidate.
        """
        if explicit:
            path = Path(explicit)
            if not path.is_file():
                raise CxrlocError(f"Thresholds file not found: {path}.")
            return path
        for candidate in (self, start):
            if candidate is not None and candidate.thresholds_json.is_file():
                return candidate.thresholds_json
        return None


@dataclass(frozen=True)
class RunDir:
    """A run folder holding ``fold_K`` folders (or, given one fold folder, just that fold)."""

    path: Path

    def fold(self, k: int) -> FoldDir:
        return FoldDir.of(self.path, k)

    def fold_dirs(self) -> list[FoldDir]:
        """Every ``fold_K`` folder of the run (K an integer), by K: the one rule for what a fold is.
        Callers keep those they need (trained, with a ``run.json``, with a ``config.json``)."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.glob("fold_*") if p.is_dir() and _fold_index(p) is not None]
        return [FoldDir(p) for p in sorted(found, key=lambda p: _fold_index(p) or 0)]

    def stage(self, name: str) -> RunDir:
        """The run of one stage of ``train --stage all``: ``RUN_DIR/<stage>`` (``unary``, ``crf``, ``joint``)."""
        return RunDir(self.path / name)

    def eval_dir(
        self,
        split: str = "test",
        *,
        data_name: str | None = None,
        tta: int = 1,
        fold: int | None = None,
        which: str = "best",
    ) -> Path:
        """Where ``cxrloc evaluate`` writes: ``eval/`` (test images), ``eval_val/`` (validation images),
        ``eval_on_NAME/`` (an external test set NAME), then ``_foldN`` when one fold of several is
        evaluated (``fold``), ``_last`` for the ``last`` checkpoint and ``_ttaN`` for N test-time views:
        evaluations with other options never share a folder."""
        if which not in CHECKPOINTS:
            raise CxrlocError(f"Unknown checkpoint {which!r}: use {' or '.join(CHECKPOINTS)}.")
        name = "eval" if split == "test" else "eval_val"
        if data_name is not None:
            name = f"eval_on_{data_name}"
        name += f"_fold{fold}" if fold is not None else ""
        name += "_last" if which == "last" else ""
        return self.path / (name + (f"_tta{tta}" if tta > 1 else ""))

    @property
    def export_path(self) -> Path:
        """``cxrloc export``'s default file: ``RUN_DIR/export/model.onnx`` (also for a fold folder)."""
        return self.path / "export" / EXPORT_NAME

    def folds(self, fold: int | str | None = None) -> list[FoldDir]:
        """The trained folds meant by ``fold``: ``None`` or ``"all"`` (every one), or an index.

        ``self.path`` may also be a single fold folder (then ``fold`` must be ``None``/``"all"``).
        """
        if (self.path / "run.json").is_file():
            if fold not in (None, "all"):
                raise CxrlocError(f"{self.path} is a single fold folder; drop --fold or pass the run folder.")
            return [FoldDir(self.path)]
        if not self.path.is_dir():
            raise CxrlocError(f"No run folder at {self.path}.")
        found = [d for d in self.fold_dirs() if d.run_json.is_file()]
        if not found:
            inner = [p.parent for p in self.path.glob("*/fold_*/run.json") if _fold_index(p.parent) is not None]
            if inner:  # e.g. demo_out given for demo_out/run, or a --stage all run for RUN/joint
                runs = sorted({str(f.parent) for f in inner})
                raise CxrlocError(f"{self.path} is not a run folder, but holds {len(runs)}: {', '.join(runs)}; "
                                  "pass one of them.")
            raise CxrlocError(f"{self.path} holds no fold_*/run.json. Run 'cxrloc train' first.")
        if fold is None or fold == "all":
            return found
        k = parse_fold(fold)
        target = self.fold(k)
        if target not in found:
            names = ", ".join(d.name for d in found)
            raise CxrlocError(f"{target.path} is not a trained fold; {self.path} holds {names}.")
        return [target]


def _fold_index(path: Path) -> int | None:
    suffix = path.name.split("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


def parse_fold(fold: int | str) -> int:
    """A fold index from an option value, with a clear error."""
    try:
        return int(fold)
    except (TypeError, ValueError):
        raise CxrlocError(f"--fold must be a number or 'all', got {fold!r}.") from None


def resolve_checkpoint(path: str | os.PathLike[str], fold: int | None = None, which: str = "best") -> Path:
    """The checkpoint meant by a ``.pt`` file, a fold folder or a run folder.

    ``RUN_DIR`` with a single trained fold uses it; with several, ``fold`` must be given.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CxrlocError(f"No run folder or checkpoint at {path}.")
    if FoldDir(path).is_trained():
        return FoldDir(path).existing_checkpoint(which)
    if fold is not None:
        return resolve_checkpoint(path / f"fold_{fold}", which=which)
    folds = [d for d in RunDir(path).fold_dirs() if d.is_trained()]
    if len(folds) == 1:
        return folds[0].existing_checkpoint(which)
    if not folds:
        raise CxrlocError(f"{path} holds no trained fold (no fold_*/checkpoints). Run 'cxrloc train' first.")
    names = ", ".join(d.name for d in folds)
    raise CxrlocError(f"{path} holds several folds ({names}); pick one with --fold N.")


def fold_of_checkpoint(ckpt: Path) -> FoldDir | None:
    """The fold folder a checkpoint file sits in (``fold_K/checkpoints/x.pt``), if it does."""
    return FoldDir(ckpt.parent.parent) if ckpt.parent.name == "checkpoints" else None


def start_fold(init_from: str | os.PathLike[str], fold: int) -> FoldDir:
    """The fold folder meant by ``--from`` (a run folder, a fold folder or a checkpoint file)."""
    path = Path(init_from)
    if path.is_file():
        return FoldDir(path.parent.parent)
    if FoldDir(path).is_trained():
        return FoldDir(path)
    return FoldDir.of(path, fold)


def thresholds_for_checkpoint(ckpt: Path, explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The ``thresholds.json`` that replaces a checkpoint's saved thresholds at inference, if any.

    The module's rule: ``explicit`` (must exist), else the fitted file of the checkpoint's fold.
    """
    fold_dir = fold_of_checkpoint(ckpt)
    if fold_dir is not None:
        return fold_dir.thresholds_file(explicit)
    if explicit:
        return FoldDir(ckpt.parent).thresholds_file(explicit)
    return None


def calibration_for_checkpoint(ckpt: Path) -> Path | None:
    """The ``calibration.json`` of the fold a checkpoint sits in, when there is one."""
    fold_dir = fold_of_checkpoint(ckpt)
    if fold_dir is not None and fold_dir.calibration_json.is_file():
        return fold_dir.calibration_json
    return None
