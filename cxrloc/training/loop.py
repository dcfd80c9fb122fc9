"""Training one fold: set-up, ``train_one_epoch``, ``validate``, checkpoints and exact resume.

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

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import Progress, TaskID
from torch import nn
from torch.utils.data import DataLoader

from cxrloc.checkpoint import (
    CheckpointWriter,
    checkpoint_config,
    checkpoint_weights,
    load_checkpoint,
    make_meta,
    require_training_state,
)
from cxrloc.config import Config, save_config
from cxrloc.data.dataset import (
    AnnotatedBatchSampler,
    LocalizationDataset,
    repeat_factors,
    split_train_val,
    warp_batch,
)
from cxrloc.data.domain import training_domain
from cxrloc.data.identity import check_prepared_for_run, prepared_identity
from cxrloc.data.prepared import Prepared
from cxrloc.evaluation.metrics import localization_table, mean_localization_accuracy
from cxrloc.geometry import class_box_masks
from cxrloc.inference.batch import predict_prepared
from cxrloc.model.head import init_position_bias
from cxrloc.model.net import CXRLocNet, build_model
from cxrloc.paths import OutputGuard
from cxrloc.precision import inference_options
from cxrloc.rundir import FoldDir, resolve_checkpoint, start_fold
from cxrloc.thresholds import Thresholds, box_patch_counts
from cxrloc.training.curves import earlier_history, write_curves
from cxrloc.training.losses import compute_gamma, compute_loss
from cxrloc.training.runtime import (
    DistInfo,
    amp_dtype,
    channels_last,
    deterministic,
    isolated_rng,
    resolve_device,
    rng_state,
    set_rng_state,
    setup_distributed,
)
from cxrloc.utils import CxrlocError, check_writable_dir, console, progress_bar
from cxrloc.workers import exit_with_parent

STAGES: tuple[str, ...] = ("unary", "crf", "joint")

RESUME_CHANGEABLE: tuple[str, ...] = (
    "epochs", "workers", "device", "max_steps_per_epoch", "compile", "crf_epochs", "joint_epochs", "amp",
    "channels_last",
)
"""Config fields that ``--resume`` may change; any other difference is an error."""

LOADER_SEED_STRIDE: int = 100003
"""Epoch ``e`` of a run with seed ``s`` seeds its DataLoader generator with ``s * STRIDE + e``: a
prime larger than any epoch count, so no two (seed, epoch) pairs share a generator seed."""


# --------------------------------------------------------------------------- set-up pieces
def initial_thresholds(
    cfg: Config, fold_dir: FoldDir, prepared: Prepared, train_ids: Sequence[str], start: FoldDir | None = None
) -> tuple[Thresholds, str]:
    """The thresholds a training stage starts with, and where they came from.

    The file chosen by :meth:`cxrloc.rundir.FoldDir.thresholds_file` (``cfg.thresholds_file``,
    the fold's fitted ``thresholds.json``, the start fold's); else ``Thresholds.initial`` from
    the training boxes' sizes in patches.
    """
    path = fold_dir.thresholds_file(cfg.thresholds_file or None, start)
    if path is not None:
        return Thresholds.load(path), str(path)
    counts = box_patch_counts(class_box_masks((prepared.boxes(i) for i in train_ids), cfg.patch_grid))
    return Thresholds.initial(
        cfg.patch_grid, counts, rho_hat_box_fraction=cfg.rho_hat_box_fraction, classes=cfg.classes
    ), "initial"


def load_start_weights(model: nn.Module, init_from: Path, fold: int) -> Path:
    """Load the weights a ``crf`` / ``joint`` stage starts from (``--from``); return the checkpoint."""
    ckpt_path = init_from if init_from.is_file() else resolve_checkpoint(start_fold(init_from, fold).path, which="best")
    state = load_checkpoint(ckpt_path)
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CxrlocError(f"{ckpt_path}: it holds no model weights; the checkpoint is damaged (use another --from).")
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise CxrlocError(
            f"The weights in {ckpt_path} do not fit this network ({str(exc).splitlines()[0]}); "
            "use the same arch/width/image_size/patch_grid settings as that run."
        ) from None
    bad_missing = [k for k in result.missing_keys if not k.startswith("crf.")]
    if result.unexpected_keys or bad_missing:
        keys = (result.unexpected_keys + bad_missing)[:3]
        raise CxrlocError(f"The weights in {ckpt_path} do not fit this network (keys {keys}).")
    return ckpt_path


def trainable_parameters(model: CXRLocNet, stage: str) -> list[nn.Parameter]:
    """Freeze what ``stage`` does not train; return the parameters it does."""
    unary = set(map(id, model.unary_parameters()))
    crf = set(map(id, model.crf_parameters()))
    want = {"unary": unary, "crf": crf, "joint": unary | crf}[stage]
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) in want)
        if id(p) in want:
            params.append(p)
    return params


def set_train_mode(model: CXRLocNet, stage: str) -> None:
    """``model.train()``, with the frozen part of ``stage`` in eval mode (fixed BatchNorm statistics)."""
    model.train()
    if stage == "crf":
        model.unary.eval()
    elif stage == "unary" and model.crf is not None:
        model.crf.eval()


def make_optimizer(cfg: Config, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------- one epoch / validation
@dataclass
class Trainer:
    """Everything one optimisation step needs, built once per training by :func:`train`."""

    cfg: Config
    stage: str
    model: CXRLocNet
    net: nn.Module
    """``model``, or its DistributedDataParallel wrapper."""
    forward: nn.Module | Any
    """What the training step calls: ``net``, or ``torch.compile(net)`` with ``compile=true``
    (``net`` keeps DDP's ``no_sync`` and ``model`` the state dicts and validation)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    gamma: torch.Tensor
    device: torch.device
    amp: torch.dtype | None
    dist: DistInfo
    channels_last: bool = False
    """Inputs (and the model) in the channels-last memory format (``cfg.channels_last``, CUDA and CPU)."""

    @property
    def loss_cfg(self) -> Config:
        # The unary stage's loss reads the unary output: the threshold loss must not expect a CRF.
        return dataclasses.replace(self.cfg, crf=False) if self.stage == "unary" else self.cfg

    @property
    def micro_batch(self) -> int:
        return self.cfg.batch_size // self.dist.world_size // self.cfg.accum_steps


def train_one_epoch(
    tr: Trainer, loader: DataLoader, epoch: int, bar: Progress | None = None, task: TaskID | None = None
) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch means of the loss and its terms (over processes).

    The loss terms are summed on the training device (:class:`EpochLog`): the host reads them every
    :data:`LOG_EVERY` steps and at the end of the epoch, not after every step, so a GPU is never
    waited for by the bookkeeping.
    """
    cfg, micro = tr.cfg, tr.micro_batch
    loss_cfg = tr.loss_cfg
    set_train_mode(tr.model, tr.stage)
    log = EpochLog()
    ddp = isinstance(tr.net, nn.parallel.DistributedDataParallel)
    for batch in loader:
        tr.optimizer.zero_grad(set_to_none=True)
        for s in range(cfg.accum_steps):
            part = slice(s * micro, (s + 1) * micro)
            x = batch["image"][part].to(tr.device, non_blocking=True)
            if "theta" in batch:  # the augmentation's zoom/shift, on the training device for the whole batch
                x = warp_batch(x, batch["theta"][part].to(tr.device, non_blocking=True))
            if tr.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = s == cfg.accum_steps - 1 or not ddp
            with contextlib.nullcontext() if sync else tr.net.no_sync():  # type: ignore[operator]
                with torch.autocast(tr.device.type, dtype=tr.amp or torch.float32, enabled=tr.amp is not None):
                    z, unary_logits = tr.forward(x)
                unary_logits = unary_logits.float()
                z = torch.sigmoid(unary_logits) if tr.stage == "unary" else z.float()
                loss, terms = compute_loss(
                    loss_cfg,
                    z,
                    unary_logits,
                    batch["labels"][part].to(tr.device, non_blocking=True),
                    batch["annotated"][part].to(tr.device, non_blocking=True),
                    batch["box_mask"][part].to(tr.device, non_blocking=True),
                    tr.model.thresholds,
                    tr.gamma,
                )
                tr.scaler.scale(loss / cfg.accum_steps).backward()
            log.add(loss, terms, cfg.accum_steps)
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
        log.end_step()
        if bar is not None and task is not None:
            if log.steps % LOG_EVERY == 0:  # a host sync only every LOG_EVERY steps
                bar.update(task, info=f"loss {log.check(epoch):.4f}")
            bar.update(task, advance=1)
    sums, steps = log.finish(epoch)
    return _reduce_means(sums, steps, tr.dist, tr.device)


LOG_EVERY: int = 20
"""Training steps between two reads of the running loss on the host (progress bar, non-finite check)."""


class EpochLog:
    """Per-epoch sums of the logged loss terms, kept on the training device.

    The arithmetic is float64, as the host's was (each micro-batch's value over ``accum_steps``,
    summed per step, then over steps), so the logged means are unchanged; the host reads them once
    per epoch (:meth:`finish`) and every ``LOG_EVERY`` steps (:meth:`check`) instead of after every
    step, which lets the CPU queue the next steps while the GPU runs.
    """

    def __init__(self) -> None:
        self.steps = 0
        self._step: dict[str, Any] = {}
        self._sums: dict[str, Any] = {}
        self._last_loss: Any = None

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], accum_steps: int) -> None:
        for k, v in (*terms.items(), ("loss", loss)):
            self._step[k] = self._step.get(k, 0.0) + v.detach().to(torch.float64) / accum_steps

    def end_step(self) -> None:
        for k, v in self._step.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._last_loss = self._step["loss"]
        self._step = {}
        self.steps += 1

    def check(self, epoch: int) -> float:
        """Raise if the loss has not been finite this epoch; return the last step's loss."""
        total, last = torch.stack([self._sums["loss"], self._last_loss]).tolist()
        _check_finite(total, epoch)
        return last

    def finish(self, epoch: int) -> tuple[dict[str, float], int]:
        """The epoch's sums as floats (one host sync) and the number of steps."""
        keys = list(self._sums)
        values = torch.stack([self._sums[k] for k in keys]).tolist() if keys else []
        sums = dict(zip(keys, values, strict=True))
        if sums:
            _check_finite(sums["loss"], epoch)
        return sums, self.steps


def _check_finite(loss_sum: float, epoch: int) -> None:
    if not math.isfinite(loss_sum):
        raise CxrlocError(f"The loss became {loss_sum} at epoch {epoch + 1}; lower lr or use amp=off.")


def _reduce_means(sums: dict[str, float], steps: int, dd: DistInfo, device: torch.device) -> dict[str, float]:
    """Per-epoch means of the logged terms, averaged over processes."""
    keys = sorted(sums)
    if dd.world_size > 1 and keys:
        t = torch.tensor([sums[k] for k in keys] + [float(steps)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        sums = dict(zip(keys, t[:-1].tolist(), strict=True))
        steps = int(t[-1].item())
    return {k: sums[k] / max(steps, 1) for k in keys}


def validate(
    model: nn.Module, prepared: Prepared, val_ids: Sequence[str], cfg: Config, device: torch.device
) -> tuple[float, float]:
    """Mean per-class IoU and IoR accuracy at ``cfg.eval_threshold`` on the annotated validation images."""
    ids = [i for i in val_ids if prepared.boxes(i)]
    if not ids:
        return math.nan, math.nan
    z = predict_prepared(
        model, prepared, ids, image_size=cfg.image_size, device=device, batch_size=cfg.batch_size, progress=False,
        **inference_options(cfg, device),
    )
    table = localization_table(z, [prepared.boxes(i) for i in ids], [cfg.eval_threshold])
    return float(mean_localization_accuracy(table, "iou")[0]), float(mean_localization_accuracy(table, "ior")[0])


# --------------------------------------------------------------------------- train one fold
def _check_resume(fold_dir: FoldDir, cfg: Config, stage: str, resume: bool) -> dict[str, Any] | None:
    """The saved state to resume from, or ``None`` for a fresh run; refuses inconsistent requests."""
    last_path = fold_dir.checkpoint("last")
    if not last_path.is_file():
        return None
    if not resume:
        raise CxrlocError(f"{fold_dir.path} already holds a run; add --resume to continue it, or choose another --out.")
    state = load_checkpoint(last_path)
    saved = checkpoint_config(state, last_path)
    checkpoint_weights(state, last_path, saved)
    require_training_state(state, last_path)
    diff = [
        f.name
        for f in dataclasses.fields(Config)
        if f.name not in RESUME_CHANGEABLE and getattr(saved, f.name) != getattr(cfg, f.name)
    ]
    if diff:
        raise CxrlocError(
            f"--resume with a different config than {last_path} ({', '.join(diff)}); "
            f"only {', '.join(RESUME_CHANGEABLE)} may change."
        )
    if state.get("stage", "unary") != stage:
        raise CxrlocError(f"{fold_dir.path} was trained with --stage {state.get('stage')}, not {stage}.")
    return state


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
    resume_state = _check_resume(fold_dir, cfg, stage, resume)
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
    val_seed = cfg.val_seed if cfg.val_seed >= 0 else cfg.seed
    train_ids, val_ids = split_train_val(prepared, fold, cfg.val_fraction, val_seed)
    test_ids = prepared.fold(fold)["test"]
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
    tr = Trainer(
        cfg=cfg,
        stage=stage,
        model=model,
        net=net,
        forward=torch.compile(net) if cfg.compile else net,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        gamma=torch.as_tensor(compute_gamma(prepared.label_matrix(train_ids), cfg.gamma), dtype=torch.float32).to(
            device
        ),
        device=device,
        amp=dtype,
        dist=dd,
        channels_last=channels_last(cfg, device),
    )
    dataset = LocalizationDataset(prepared, train_ids, cfg, augment=True)
    sampler = AnnotatedBatchSampler(
        dataset.is_annotated(),
        cfg.batch_size,
        annotated_per_batch=cfg.annotated_per_batch,
        seed=cfg.seed,
        rank=dd.rank,
        world_size=dd.world_size,
        max_batches=cfg.max_steps_per_epoch,
        repeat_factors=repeat_factors(dataset.boxes, cfg.repeat_threshold),  # all ones (off) at threshold 0
    )

    start_epoch, best_metric, history = 0, -math.inf, []
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
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
            model.thresholds.set(thresholds)
    elif dd.main:
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
                "world_size": dd.world_size,
                "train_ids": train_ids,
                "val_ids": val_ids,
                "test_ids": test_ids,
            }
        )
    if dd.main and resume_state is not None:
        save_config(cfg, fold_dir.config_json)  # records a changed epochs / workers / device
    dd.barrier()

    show = progress and dd.main
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
    # One loader for the whole run: the workers persist between epochs (items depend only on
    # (seed, epoch, index), and the sampler's epoch is read each time the loader is iterated); the
    # generator only seeds the worker processes, which the items do not depend on.
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        # A kill -9 of train must not leave the workers running under PID 1 (issue 22, 14).
        worker_init_fn=functools.partial(exit_with_parent, os.getpid()) if cfg.workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed * LOADER_SEED_STRIDE + start_epoch),
    )
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
                best_metric = _end_epoch(
                    tr, prepared, fold_dir, val_ids, epoch, means, lr_used, t0, best_metric, history,
                    thresholds_source, show, writer, earlier, domain,
                )
            dd.barrier()
    return fold_dir.path


def _end_epoch(
    tr: Trainer,
    prepared: Prepared,
    fold_dir: FoldDir,
    val_ids: Sequence[str],
    epoch: int,
    means: dict[str, float],
    lr_used: float,
    t0: float,
    best_metric: float,
    history: list[dict[str, Any]],
    thresholds_source: str,
    show: bool,
    writer: CheckpointWriter,
    earlier: Sequence[dict[str, Any]] = (),
    domain: dict[str, Any] | None = None,
) -> float:
    """Validate, log the epoch to ``metrics.csv`` and ``curves.png`` (after the ``earlier`` stages' epochs) and
    write the checkpoints (rank 0); return the best metric."""
    cfg, model = tr.cfg, tr.model
    iou, ior = validate(model, prepared, val_ids, cfg, tr.device)
    set_train_mode(model, tr.stage)
    metric = iou if not math.isnan(iou) else -means.get("loss", 0.0)
    is_best = metric > best_metric
    if is_best:
        best_metric = metric
    row: dict[str, Any] = {"epoch": epoch + 1, "stage": tr.stage}
    row.update({k: v for k, v in means.items() if k != "loss"})
    row.update(
        {
            "loss": means.get("loss", math.nan),
            "lr": lr_used,
            "val_iou_acc": iou,
            "val_ior_acc": ior,
            "best": int(is_best),
            "time_s": round(time.perf_counter() - t0, 3),
        }
    )
    history.append(row)
    state = {
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "meta": {**make_meta(cfg, model.thresholds.get().to_json()), "training_data": domain},
        "optimizer": tr.optimizer.state_dict(),
        "scheduler": tr.scheduler.state_dict(),
        "scaler": tr.scaler.state_dict(),
        "rng": rng_state(),
        "epoch": epoch + 1,
        "best_metric": best_metric,
        "history": history,
        "stage": tr.stage,
        "thresholds_source": thresholds_source,
    }
    fold_dir.write_metrics(history)
    write_curves(fold_dir.curves_png, [*earlier, *history], title=f"{fold_dir.path.name}, stage {tr.stage}")
    # Written in the background (a CPU snapshot is taken now); best.pt, when this epoch is the best,
    # is the same file as last.pt (a hard link, else a copy).
    best = [fold_dir.checkpoint("best")] if is_best else []
    writer.submit([*best, fold_dir.checkpoint("last")], state)
    if show:
        console.print(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  val IoU acc@{cfg.eval_threshold} "
            f"{iou:.3f}  IoR acc {ior:.3f}{'  (best)' if is_best else ''}  {row['time_s']:.1f}s"
        )
    return best_metric

