"""What ``cxrloc train`` runs: the config, one fold or all folds, and the paper's alternation."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cxrloc.checkpoint import load_checkpoint
from cxrloc.config import Config, apply_overrides, default_preset, load_config, make_config
from cxrloc.data.prepared import Prepared
from cxrloc.evaluation.fit_thresholds import fit_thresholds
from cxrloc.rundir import FoldDir, RunDir, parse_fold
from cxrloc.training.loop import STAGES, train
from cxrloc.training.runtime import resolve_device
from cxrloc.utils import CxrlocError, console


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def stage_line(fold_dir: Path, fold: int, stage: str) -> str:
    """One line for a finished stage of one fold, from its ``metrics.csv``: epochs, last loss, best
    validation IoU / IoR accuracy and its epoch, time. Printed even with ``--quiet``, so a log written
    to a file shows every stage."""
    try:
        with open(FoldDir(Path(fold_dir)).metrics_csv, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        rows = []
    if not rows:
        return f"Fold {fold}, stage {stage}: no epoch trained ({fold_dir})."

    def num(row: dict[str, str], key: str) -> float:
        try:
            return float(row.get(key) or "nan")
        except ValueError:
            return math.nan

    scored = [r for r in rows if not math.isnan(num(r, "val_iou_acc"))]
    best = max(scored, key=lambda r: num(r, "val_iou_acc")) if scored else None
    val = (f"best val IoU acc {num(best, 'val_iou_acc'):.3f}, IoR acc {num(best, 'val_ior_acc'):.3f} "
           f"(epoch {best['epoch']})" if best else "no validation box")
    seconds = sum(num(r, "time_s") for r in rows if not math.isnan(num(r, "time_s")))
    return (f"Fold {fold}, stage {stage} done: {len(rows)} epoch(s), last loss {num(rows[-1], 'loss'):.4f}, "
            f"{val}, {seconds:.1f} s ({fold_dir})")


def _has_run(out_dir: Path, fold: int) -> bool:
    fd = FoldDir.of(out_dir, fold)
    return fd.checkpoint("last").is_file() or fd.config_json.is_file()


def _resume_config(out_dir: Path, fold: int) -> Config:
    """The saved config a resumed fold starts from: its own, else that of another fold of the run.

    Raises:
        CxrlocError: no fold of ``out_dir`` holds a ``config.json``: there is nothing to resume.
    """
    own = FoldDir.of(out_dir, fold).config_json
    if own.is_file():
        return load_config(own)
    others = [d.config_json for d in RunDir(out_dir).fold_dirs() if d.config_json.is_file()]
    if not others:
        raise CxrlocError(
            f"--resume: there is no run to resume in {out_dir} (no fold_*/config.json); drop --resume to start "
            "a new run there, or check --out."
        )
    return load_config(others[0])


def _fold_config(out: Path, fold: int, *, resume: bool, preset: str | None, extra: Sequence[str]) -> Config:
    """The config a fold trains with: the run's saved one on ``--resume`` without ``--preset``, else
    the preset (by default :func:`cxrloc.config.default_preset`: ``paper`` on CUDA, ``cpu`` otherwise);
    ``extra`` (``--set`` items and ``epochs=``) on top."""
    base = _resume_config(out, fold) if resume and preset is None else None
    return apply_overrides(base, list(extra)) if base is not None else make_config(
        preset or default_preset(extra)[0], list(extra))


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

    ``stage="all"`` runs the whole recipe, fold by fold: ``unary`` (``epochs``) into ``out_dir/unary``,
    then ``crf`` (``cfg.crf_epochs``) into ``out_dir/crf`` and ``joint`` (``cfg.joint_epochs``) into
    ``out_dir/joint``, each starting from the one before (see :func:`_run_all_stages`).

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
    extra = list(overrides) + ([f"epochs={epochs}"] if epochs is not None else [])
    if preset is None and not resume:
        preset, why = default_preset(extra)
        if progress:
            console.print(f"No --preset: using '{preset}' ({why}).")
    if stage == "all":
        return _run_all_stages(
            prepared_dir, out, fold_list, preset=preset, extra=extra, resume=resume, init_from=init_from,
            progress=progress, alternate=alternate,
        )
    _check_alternate(alternate)
    results = []
    if resume and not any(_has_run(out, f) for f in fold_list):
        where = FoldDir.of(out, fold_list[0]).path if len(fold_list) == 1 else out
        raise CxrlocError(
            f"--resume: there is no run to resume in {where} (no checkpoints/last.pt, no config.json); drop "
            "--resume to start a new run there, or check --out and --fold."
        )
    for fold in fold_list:
        cfg = _fold_config(out, fold, resume=resume, preset=preset, extra=extra)
        # With --fold all, the folds an interrupted run had not reached yet start now.
        resume_fold = resume and _has_run(out, fold)
        if alternate == 0:
            fold_dir = train(
                prepared_dir, out, fold=fold, cfg=cfg, stage=stage, resume=resume_fold, init_from=init_from,
                progress=progress,
            )
            if _main_process():
                console.print(stage_line(fold_dir, fold, stage))
            results.append(fold_dir)
            continue
        results.append(
            _train_alternating(
                prepared_dir, out, fold, cfg, stage=stage, resume=resume_fold, init_from=init_from,
                progress=progress, alternate=alternate,
            )
        )
    return results


def _check_alternate(alternate: int) -> None:
    """Refuse a negative ``--alternate``, and any under torchrun (threshold fitting runs in one process)."""
    if alternate < 0:
        raise CxrlocError(f"--alternate must be >= 0, got {alternate}.")
    if alternate and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CxrlocError(
            "--alternate runs threshold fitting between rounds in one process; under torchrun, alternate by "
            "hand: train, 'cxrloc fit-thresholds RUN_DIR', then train --resume with more --epochs."
        )


def _train_alternating(
    prepared_dir: str | os.PathLike[str],
    out: Path,
    fold: int,
    cfg: Config,
    *,
    stage: str,
    resume: bool,
    init_from: str | os.PathLike[str] | None,
    progress: bool,
    alternate: int,
) -> Path:
    """The paper's alternation on one fold: ``alternate`` rounds of ``cfg.epochs`` more epochs of training,
    then :func:`~cxrloc.evaluation.fit_thresholds.fit_thresholds` (after the epochs a resumed fold already
    has). Returns the fold folder."""
    per_round = cfg.epochs
    start = 0
    if resume:
        last = FoldDir.of(out, fold).checkpoint("last")
        start = int(load_checkpoint(last).get("epoch", 0)) if last.is_file() else 0
    for r in range(alternate):
        cfg_r = dataclasses.replace(cfg, epochs=start + per_round * (r + 1))
        fold_dir = train(
            prepared_dir, out, fold=fold, cfg=cfg_r, stage=stage, resume=resume or r > 0,
            init_from=init_from, progress=progress,
        )
        fit_thresholds(fold_dir, device=resolve_device(cfg, 0).type, which="best", progress=progress)
        console.print(stage_line(fold_dir, fold, stage))
        console.print(f"Fold {fold}: alternation round {r + 1}/{alternate} done (thresholds fitted).")
    return fold_dir


def _run_all_stages(
    prepared_dir: str | os.PathLike[str],
    out: Path,
    fold_list: list[int],
    *,
    preset: str | None,
    extra: Sequence[str],
    resume: bool,
    init_from: str | os.PathLike[str] | None,
    progress: bool,
    alternate: int,
) -> list[Path]:
    """``--stage all``: for each fold, unary -> crf -> joint into ``out/{unary,crf,joint}``.

    The epochs of the later stages are the config's ``crf_epochs`` and ``joint_epochs`` (0 skips a
    stage; ``crf=false`` skips the CRF stage, and ``joint`` then fine-tunes the unary run). With
    ``resume`` every stage that has started resumes and the others start; a finished stage resumed
    trains no further epochs. Returns the fold folders of the last stage trained.
    """
    if init_from is not None:
        raise CxrlocError("--stage all starts from scratch (or ImageNet, --set init=...); drop --from, or train "
                          "the stages one by one with --stage crf / joint --from RUN.")
    if alternate:
        raise CxrlocError("--alternate trains one stage; use it with --stage unary, crf or joint.")
    results: list[Path] = []
    for fold in fold_list:
        cfg = _fold_config(RunDir(out).stage("unary").path, fold, resume=resume, preset=preset, extra=extra)
        results.append(
            train_stages(prepared_dir, out, fold, cfg, resume=resume, progress=progress, stage_lines=True)
        )
    return results


StageHook = Callable[[str, FoldDir], None]
"""Called after each stage of :func:`train_stages` with the stage's name and its trained fold."""


def train_stages(
    prepared_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fold: int,
    cfg: Config,
    *,
    resume: bool = False,
    progress: bool = True,
    stage_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    after_stage: StageHook | None = None,
    stage_lines: bool | None = None,
) -> Path:
    """The whole recipe for one fold: ``unary`` -> ``crf`` -> ``joint`` into ``out/<stage>/fold_K``
    (:meth:`RunDir.stage`), each starting from the one before (what ``--stage all`` and the demo run).

    The epochs of the stages are ``cfg.epochs``, ``cfg.crf_epochs`` and ``cfg.joint_epochs`` (0
    skips a stage; ``crf=false`` skips the CRF stage). ``stage_overrides``: config fields that differ
    in one stage (e.g. ``{"crf": {"lr": 1e-3}}``); ``after_stage``: run after each stage (e.g. fit the
    thresholds and calibrate, so the next stage starts from fitted thresholds). ``stage_lines``: print
    where each stage starts and one line when it ends (:func:`stage_line`), by default with ``progress``;
    ``train --stage all`` prints them also with ``--quiet``, so a log written to a file shows every stage.

    Returns:
        The fold folder of the last stage trained.
    """
    run = RunDir(Path(out))
    show = (progress if stage_lines is None else stage_lines) and _main_process()
    prev: Path | None = None
    prev_dir: Path | None = None
    for stage in STAGES:  # also the sub-folders of the run, in training order
        stage_epochs = {"unary": cfg.epochs, "crf": cfg.crf_epochs, "joint": cfg.joint_epochs}[stage]
        if stage_epochs == 0 or (stage == "crf" and not cfg.crf):
            continue
        sub = run.stage(stage).path
        if show:
            console.print(f"Fold {fold}, stage {stage} ({stage_epochs} epochs): {sub / f'fold_{fold}'}")
        changes = {"epochs": stage_epochs, **dict((stage_overrides or {}).get(stage, {}))}
        prev_dir = train(
            prepared_dir, sub, fold=fold, cfg=dataclasses.replace(cfg, **changes), stage=stage,
            resume=resume and _has_run(sub, fold), init_from=prev, progress=progress,
        )
        if show:
            console.print(stage_line(Path(prev_dir), fold, stage))
        if after_stage is not None:
            after_stage(stage, FoldDir(Path(prev_dir)))
        prev = sub
    if prev_dir is None:
        raise CxrlocError("Every stage has 0 epochs: nothing to train (set epochs, crf_epochs or joint_epochs).")
    return prev_dir
