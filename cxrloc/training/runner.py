"""What ``cxrloc train`` runs: the config, one fold or all folds, and the paper's alternation."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from cxrloc.checkpoint import load_checkpoint
from cxrloc.config import Config, apply_overrides, load_config, make_config
from cxrloc.data.prepared import Prepared
from cxrloc.evaluation.fit_thresholds import fit_thresholds
from cxrloc.rundir import FoldDir, parse_fold
from cxrloc.training.loop import train
from cxrloc.training.runtime import resolve_device
from cxrloc.utils import CxrlocError, console


def _existing_config(out_dir: Path, fold: int) -> Config | None:
    path = FoldDir.of(out_dir, fold).config_json
    return load_config(path) if path.is_file() else None


def run_training(
    prepared_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    folds: str | int,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    epochs: int | None = None,
    stage: str = "unary",
    resume: bool = False,
    init_from: str | os.PathLike[str] | None = None,
    progress: bool = True,
    alternate: int = 0,
) -> list[Path]:
    """Resolve the config and train one fold or all folds one after another (what ``cxrloc train`` does).

    ``alternate=N`` runs the paper's alternation N times per fold: train ``epochs`` more epochs
    with the thresholds fixed, then fit the thresholds with the network frozen
    (:func:`cxrloc.evaluation.fit_thresholds.fit_thresholds`, written to ``fold_K/thresholds.json``),
    which the next round's training reads. The run ends with ``N * epochs`` epochs and fitted
    thresholds.

    With ``resume`` and no ``preset``, each fold's saved ``config.json`` is the base, so a resumed
    run keeps its settings; ``overrides`` and ``epochs`` still apply (only epochs, workers, device
    and max_steps_per_epoch may differ from the saved run).

    Returns:
        The fold folders, in training order.
    """
    out = Path(out_dir)
    fold_list = list(range(Prepared.open(prepared_dir).num_folds)) if folds == "all" else [parse_fold(folds)]
    if alternate < 0:
        raise CxrlocError(f"--alternate must be >= 0, got {alternate}.")
    if alternate and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CxrlocError(
            "--alternate runs threshold fitting between rounds in one process; under torchrun, alternate by "
            "hand: train, 'cxrloc fit-thresholds RUN_DIR', then train --resume with more --epochs."
        )
    extra = list(overrides) + ([f"epochs={epochs}"] if epochs is not None else [])
    results = []
    for fold in fold_list:
        base = _existing_config(out, fold) if resume and preset is None else None
        cfg = apply_overrides(base, extra) if base is not None else make_config(preset or "paper", extra)
        if alternate == 0:
            results.append(
                train(
                    prepared_dir, out, fold=fold, cfg=cfg, stage=stage, resume=resume, init_from=init_from,
                    progress=progress,
                )
            )
            continue
        per_round = cfg.epochs
        start = 0
        if resume:
            last = FoldDir.of(out, fold).checkpoint("last")
            start = int(load_checkpoint(last)["epoch"]) if last.is_file() else 0
        for r in range(alternate):
            cfg_r = dataclasses.replace(cfg, epochs=start + per_round * (r + 1))
            fold_dir = train(
                prepared_dir, out, fold=fold, cfg=cfg_r, stage=stage, resume=resume or r > 0,
                init_from=init_from, progress=progress,
            )
            fit_thresholds(fold_dir, device=resolve_device(cfg, 0).type, which="best", progress=progress)
            console.print(f"Fold {fold}: alternation round {r + 1}/{alternate} done (thresholds fitted).")
        results.append(fold_dir)
    return results
