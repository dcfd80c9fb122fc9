"""Training one fold (:func:`train`): the order of its set-up, the epochs, checkpoints and exact resume.

The pieces live beside it: :mod:`cxrloc.training.stage_setup` (starting weights and thresholds,
what a stage trains, the optimizer, the ``--resume`` checks) and :mod:`cxrloc.training.epoch`
(``train_one_epoch``, ``validate``, the end of an epoch); their public names stay importable from here.

Stages (``stage=``):

- ``unary``: trains the base model (backbone + patch head). The loss is computed on the unary
  output ``sigmoid(unary_logits)``; the CRF's parameters, if the model has a CRF, are frozen.
- ``crf``: loads the weights of a unary run (``init_from``, its ``best.pt``), freezes the unary
  part (``requires_grad=False`` and its BatchNorm layers in eval mode) and trains only the CRF
  with the loss on the CRF output ``z``.
- ``joint``: loads a run (``init_from``) and fine-tunes everything with the loss on ``z`` at the
  lower learning rate ``lr * joint_lr_factor``.

Each fold trains into ``OUT/fold_K/`` (:class:`cxrloc.rundir.FoldDir`): ``config.json``,
``run.json``, ``metrics.csv``, ``checkpoints/last.pt`` (every epoch) and ``checkpoints/best.pt``
(best validation accuracy). See ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from cxrloc.checkpoint import CheckpointWriter
from cxrloc.config import Config, save_config
from cxrloc.data.dataset import AnnotatedBatchSampler, LocalizationDataset, repeat_factors, split_train_val
from cxrloc.data.domain import training_domain
from cxrloc.data.identity import check_prepared_for_run, prepared_identity
from cxrloc.data.prepared import Prepared
from cxrloc.geometry import class_box_masks
from cxrloc.model.head import init_position_bias
from cxrloc.model.net import CXRLocNet, build_model
from cxrloc.paths import OutputGuard
from cxrloc.rundir import FoldDir, start_fold
from cxrloc.thresholds import Thresholds
from cxrloc.training.curves import earlier_history
from cxrloc.training.epoch import LOG_EVERY as LOG_EVERY
from cxrloc.training.epoch import EpochLog as EpochLog
from cxrloc.training.epoch import Trainer, end_epoch, train_one_epoch
from cxrloc.training.epoch import validate as validate
from cxrloc.training.losses import compute_gamma
from cxrloc.training.runtime import (
    DistInfo,
    amp_dtype,
    channels_last,
    deterministic,
    isolated_rng,
    resolve_device,
    set_rng_state,
    setup_distributed,
)
from cxrloc.training.stage_setup import RESUME_CHANGEABLE as RESUME_CHANGEABLE
from cxrloc.training.stage_setup import (
    check_resume,
    initial_thresholds,
    load_start_weights,
    make_optimizer,
    trainable_parameters,
)
from cxrloc.training.stage_setup import set_train_mode as set_train_mode
from cxrloc.utils import CxrlocError, check_writable_dir, console, progress_bar
from cxrloc.workers import exit_with_parent

STAGES: tuple[str, ...] = ("unary", "crf", "joint")

LOADER_SEED_STRIDE: int = 100003
"""Epoch ``e`` of a run with seed ``s`` seeds its DataLoader generator with ``s * STRIDE + e``: a
prime larger than any epoch count, so no two (seed, epoch) pairs share a generator seed."""



def train(
    prepared_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    fold: int,
    cfg: Config,
    stage: str = "unary",
    resume: bool = False,
    init_from: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """Train one fold into ``out_dir/fold_{fold}`` and return that folder.

    Args:
        prepared_dir: a folder written by ``cxrloc prepare``.
        out_dir: the run folder (``RUN_DIR``).
        fold: fold index of ``splits.json``.
        cfg: the resolved configuration.
        stage: ``unary``, ``crf`` or ``joint`` (see the module docstring).
        resume: continue from ``checkpoints/last.pt`` of the fold folder when it exists.
        init_from: run folder, fold folder or checkpoint to start from (required by ``crf``
            and ``joint``; its ``best.pt`` when a folder).
        progress: show a rich progress bar.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls this; rank 0 writes the files.
    """
    if stage not in STAGES:
        raise CxrlocError(f"Unknown stage '{stage}': use one of {', '.join(STAGES)}.")
    if stage in ("crf", "joint") and init_from is None:
        raise CxrlocError(f"--stage {stage} starts from a trained run: pass --from UNARY_RUN_DIR.")
    if stage == "crf" and not cfg.crf:
        raise CxrlocError("--stage crf needs a model with a CRF; remove --set crf=false.")
    prepared = Prepared.open(prepared_dir)
    OutputGuard([prepared_dir, init_from]).folder(out_dir, "--out")
    cfg = dataclasses.replace(cfg, classes=list(prepared.classes))  # the class list comes from the data
    fold_dir = FoldDir.of(out_dir, fold)
    check_writable_dir(fold_dir.path, "run folder")
    if resume and not fold_dir.checkpoint("last").is_file() and not fold_dir.config_json.is_file():
        raise CxrlocError(
            f"--resume: there is no run to resume in {fold_dir.path} (no checkpoints/last.pt, no config.json); "
            "drop --resume to start a new run there, or check --out and --fold."
        )
    check_prepared_for_run(prepared, cfg, fold_dir if resume else None)
    resume_state = check_resume(fold_dir, cfg, stage, resume)
    if resume and int(os.environ.get("RANK", "0")) == 0:
        # A kill during an atomic write leaves its temporary file; a resumed run removes them.
        stale = fold_dir.remove_stale_temporaries()
        if stale and progress:
            console.print(f"Removed {len(stale)} unfinished temporary file(s) left by an interrupted write.")

    device = resolve_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    dd = setup_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dd.local_rank)
        torch.cuda.set_device(device)
    try:
        with isolated_rng(), deterministic(cfg.deterministic):
            return _train_fold(
                prepared, fold_dir, fold, cfg, stage, resume_state,
                Path(init_from) if init_from is not None else None, progress, device, dd,
            )
    finally:
        if dd.created:
            dist.destroy_process_group()




def _train_fold(
    prepared: Prepared,
    fold_dir: FoldDir,
    fold: int,
    cfg: Config,
    stage: str,
    resume_state: dict[str, Any] | None,
    init_path: Path | None,
    progress: bool,
    device: torch.device,
    dd: DistInfo,
) -> Path:
    """Build the stage's model, trainer and data, restore or record the run, then train its epochs.

    The steps run in this order on every process (the random state depends on it)."""
    val_seed = cfg.val_seed if cfg.val_seed >= 0 else cfg.seed
    train_ids, val_ids = split_train_val(prepared, fold, cfg.val_fraction, val_seed)
    start = start_fold(init_path, fold) if init_path is not None else None

    torch.manual_seed(cfg.seed)  # inside isolated_rng: model initialisation depends on the seed only
    model = build_model(cfg)
    init_ckpt = load_start_weights(model, init_path, fold) if init_path is not None and resume_state is None else None
    thresholds, thresholds_source = initial_thresholds(cfg, fold_dir, prepared, train_ids, start)
    model.thresholds.set(thresholds)
    if init_path is None and resume_state is None:
        init_position_bias(model.unary.head, class_box_masks((prepared.boxes(i) for i in train_ids), cfg.patch_grid))
    # The unary stage's loss reads sigmoid(unary_logits) only: skip the CRF's forward.
    model.use_crf = stage != "unary"
    tr = _make_trainer(model, cfg, stage, prepared.label_matrix(train_ids), device, dd)
    dataset = LocalizationDataset(prepared, train_ids, cfg, augment=True)
    sampler = _batch_sampler(dataset, cfg, dd)

    start_epoch, best_metric, history = 0, -math.inf, []
    if resume_state is not None:
        start_epoch, best_metric, history, thresholds_source = _restore_training_state(
            tr, resume_state, thresholds, thresholds_source
        )
    elif dd.main:
        _record_new_run(
            fold_dir, cfg, prepared, fold, stage, init_ckpt, thresholds_source, dd.world_size, train_ids, val_ids
        )
    if dd.main and resume_state is not None:
        save_config(cfg, fold_dir.config_json)  # records a changed epochs / workers / device
    dd.barrier()

    show = progress and dd.main
    _announce(cfg, fold, fold_dir, stage, start_epoch, show, dd, train_ids, val_ids, dataset, device)
    loader = _epoch_loader(dataset, sampler, cfg, device, start_epoch)
    earlier = earlier_history(fold_dir.read_run()) if dd.main else []
    domain = training_domain(prepared, train_ids) if dd.main else None  # recorded in the checkpoints' metadata
    writer = CheckpointWriter()
    with progress_bar(enabled=show, info=True, elapsed=True) as bar, writer:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(sampler), info="")
            means = train_one_epoch(tr, loader, epoch, bar, task)
            lr_used = tr.optimizer.param_groups[0]["lr"]
            tr.scheduler.step()
            bar.remove_task(task)
            if dd.main:
                best_metric = end_epoch(
                    tr, prepared, fold_dir, val_ids, epoch, means, lr_used, t0, best_metric, history,
                    thresholds_source, show, writer, earlier, domain,
                )
            dd.barrier()
    return fold_dir.path


def _make_trainer(
    model: CXRLocNet, cfg: Config, stage: str, train_labels: np.ndarray, device: torch.device, dd: DistInfo
) -> Trainer:
    """Freeze what ``stage`` does not train, move the model to ``device`` (DDP-wrapped under torchrun)
    and build its optimizer, scheduler, gradient scaler and the loss's gamma (from ``train_labels``)."""
    params = trainable_parameters(model, stage)
    if not params:
        raise CxrlocError(f"Stage {stage} has no parameter to train with this config.")
    model.to(device)
    if channels_last(cfg, device):
        model.to(memory_format=torch.channels_last)
    if dd.world_size > 1 and device.type == "cuda" and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net: nn.Module = model
    if dd.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if (cfg.batch_size // dd.world_size) % cfg.accum_steps:
        raise CxrlocError(
            f"batch_size={cfg.batch_size} must split into {dd.world_size} processes x {cfg.accum_steps} accum_steps."
        )

    lr = cfg.lr * (cfg.joint_lr_factor if stage == "joint" else 1.0)
    optimizer = make_optimizer(cfg, params, lr)
    dtype = amp_dtype(cfg, device)
    return Trainer(
        cfg=cfg,
        stage=stage,
        model=model,
        net=net,
        forward=torch.compile(net) if cfg.compile else net,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        gamma=torch.as_tensor(compute_gamma(train_labels, cfg.gamma), dtype=torch.float32).to(device),
        device=device,
        amp=dtype,
        dist=dd,
        channels_last=channels_last(cfg, device),
    )


def _batch_sampler(dataset: LocalizationDataset, cfg: Config, dd: DistInfo) -> AnnotatedBatchSampler:
    """The batches of every epoch: ``annotated_per_batch`` boxed images in each, this process's share."""
    return AnnotatedBatchSampler(
        dataset.is_annotated(),
        cfg.batch_size,
        annotated_per_batch=cfg.annotated_per_batch,
        seed=cfg.seed,
        rank=dd.rank,
        world_size=dd.world_size,
        max_batches=cfg.max_steps_per_epoch,
        repeat_factors=repeat_factors(dataset.boxes, cfg.repeat_threshold),  # all ones (off) at threshold 0
    )


def _restore_training_state(
    tr: Trainer, resume_state: dict[str, Any], thresholds: Thresholds, thresholds_source: str
) -> tuple[int, float, list[dict[str, Any]], str]:
    """Load a resumed run's weights, optimizer, scheduler, scaler and random state into ``tr``; return
    ``(start_epoch, best_metric, history, thresholds_source)``."""
    tr.model.load_state_dict(resume_state["model"])
    tr.optimizer.load_state_dict(resume_state["optimizer"])
    tr.scheduler.load_state_dict(resume_state["scheduler"])
    if resume_state.get("scaler"):
        tr.scaler.load_state_dict(resume_state["scaler"])
    set_rng_state(resume_state["rng"])
    start_epoch = int(resume_state["epoch"])
    best_metric = float(resume_state["best_metric"])
    history = list(resume_state.get("history", []))
    if thresholds_source == "initial":
        thresholds_source = resume_state.get("thresholds_source", thresholds_source)
    else:
        # A thresholds file (e.g. from fit-thresholds between two trainings) replaces the saved ones:
        # the paper alternates network training and threshold fitting.
        tr.model.thresholds.set(thresholds)
    return start_epoch, best_metric, history, thresholds_source


def _record_new_run(
    fold_dir: FoldDir,
    cfg: Config,
    prepared: Prepared,
    fold: int,
    stage: str,
    init_ckpt: Path | None,
    thresholds_source: str,
    world_size: int,
    train_ids: list[str],
    val_ids: list[str],
) -> None:
    """Write a new run's ``config.json`` and ``run.json`` (rank 0)."""
    fold_dir.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, fold_dir.config_json)
    fold_dir.write_run(
        {
            "prepared_dir": str(Path(prepared.root).resolve()),
            "prepared": prepared_identity(prepared.root),
            "fold": fold,
            "stage": stage,
            "init_from": str(init_ckpt.resolve()) if init_ckpt else None,
            "thresholds": thresholds_source,
            "world_size": world_size,
            "train_ids": train_ids,
            "val_ids": val_ids,
            "test_ids": prepared.fold(fold)["test"],
        }
    )


def _announce(
    cfg: Config,
    fold: int,
    fold_dir: FoldDir,
    stage: str,
    start_epoch: int,
    show: bool,
    dd: DistInfo,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    dataset: LocalizationDataset,
    device: torch.device,
) -> None:
    """Say that a finished run trains nothing more (rank 0), or what is about to be trained (``show``)."""
    if start_epoch >= cfg.epochs and dd.main:
        console.print(
            f"Fold {fold}: {fold_dir.path} already has {start_epoch} epoch(s), --epochs is {cfg.epochs}: nothing "
            "was trained. Pass a larger --epochs to train more."
        )
    if show and start_epoch < cfg.epochs:
        console.print(
            f"Fold {fold}, stage {stage}: {len(train_ids)} training images "
            f"({int(dataset.is_annotated().sum())} annotated), {len(val_ids)} validation, device {device}, "
            f"{dd.world_size} process(es), epochs {start_epoch + 1}..{cfg.epochs}"
        )


def _epoch_loader(
    dataset: LocalizationDataset, sampler: AnnotatedBatchSampler, cfg: Config, device: torch.device, start_epoch: int
) -> DataLoader:
    """One loader for the whole run: the workers persist between epochs (items depend only on
    (seed, epoch, index), and the sampler's epoch is read each time the loader is iterated); the
    generator only seeds the worker processes, which the items do not depend on."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        # A kill -9 of train must not leave the workers running under PID 1 (issue 22, 14).
        worker_init_fn=functools.partial(exit_with_parent, os.getpid()) if cfg.workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed * LOADER_SEED_STRIDE + start_epoch),
    )
