"""Training: stages, validation-based model selection, exact resume, mixed precision and DDP.

Stages (``stage=``):

- ``unary``: trains the base model (backbone + patch head). The loss is computed on the unary
  output ``sigmoid(unary_logits)``; the CRF's parameters, if the model has a CRF, are frozen.
- ``crf``: loads the weights of a unary run (``init_from``, its ``best.pt``), freezes the unary
  part (``requires_grad=False`` and its BatchNorm layers in eval mode) and trains only the CRF
  with the loss on the CRF output ``z``.
- ``joint``: loads a run (``init_from``) and fine-tunes everything with the loss on ``z`` at the
  lower learning rate ``lr * joint_lr_factor``.

Each fold trains into ``OUT/fold_K/``: ``config.json``, ``run.json``, ``metrics.csv``,
``checkpoints/last.pt`` (every epoch) and ``checkpoints/best.pt`` (best validation accuracy).
See ``docs/training.md``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader

from cxrloc.checkpoint import CheckpointWriter, load_checkpoint, make_meta, resolve_checkpoint
from cxrloc.config import Config, apply_overrides, load_config, make_config, save_config
from cxrloc.data.dataset import AnnotatedBatchSampler, LocalizationDataset, repeat_factors, split_train_val
from cxrloc.geometry import union_patch_mask
from cxrloc.thresholds import Thresholds
from cxrloc.utils import CxrlocError, console, write_json_atomic, write_text_atomic

STAGES: tuple[str, ...] = ("unary", "crf", "joint")

RESUME_CHANGEABLE: tuple[str, ...] = ("epochs", "workers", "device", "max_steps_per_epoch", "compile")
"""Config fields that ``--resume`` may change; any other difference is an error."""

METRIC_COLUMNS_HEAD: tuple[str, ...] = ("epoch", "stage")
METRIC_COLUMNS_TAIL: tuple[str, ...] = ("loss", "lr", "val_iou_acc", "val_ior_acc", "best", "time_s")


# --------------------------------------------------------------------------- distributed / device
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _setup_distributed(device_kind: str) -> _Dist:
    """Join the process group that ``torchrun`` describes in the environment (no-op otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if world <= 1:
        return _Dist()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created=True)


def _resolve_device(cfg: Config, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CxrlocError("device=cuda was asked for but CUDA is not available; use --set device=cpu.")
    return torch.device("cuda", local_rank)


def _amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: ``auto`` = bf16 on CUDA when supported (fp16 otherwise), off on CPU."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cfg.amp == "fp16" and device.type != "cuda":
        raise CxrlocError("amp=fp16 needs CUDA; on CPU use amp=bf16 or amp=off.")
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


# --------------------------------------------------------------------------- RNG state
@contextlib.contextmanager
def _isolated_rng() -> Iterator[None]:
    """Run with the global RNGs saved and restored, so ``train`` leaves no global side effect."""
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), [int(v) for v in keys], int(pos), int(has_gauss), float(cached)],
        "python": [int(version), [int(v) for v in internal], gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the duration of training only."""
    before = torch.are_deterministic_algorithms_enabled()
    bench = torch.backends.cudnn.benchmark
    if enabled:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.benchmark = bench


# --------------------------------------------------------------------------- pieces
def class_box_masks(
    prepared: Any, image_ids: Sequence[str], patch_grid: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(k, b_k)`` for every (image, class) with boxes: the union of that class's boxes as
    a ``(P, P)`` bool patch mask (``union_patch_mask``, the losses' ``b_k``)."""
    for image_id in image_ids:
        by_class: dict[int, list[tuple[float, float, float, float]]] = {}
        for k, x0, y0, x1, y1 in prepared.boxes(image_id):
            by_class.setdefault(k, []).append((x0, y0, x1, y1))
        for k, rects in by_class.items():
            yield k, union_patch_mask(rects, patch_grid)


def box_patch_counts(prepared: Any, image_ids: Sequence[str], patch_grid: int) -> dict[int, list[float]]:
    """Sizes ``|b_k|`` in patches of every (image, class) box union, for ``Thresholds.initial``."""
    counts: dict[int, list[float]] = {}
    for k, mask in class_box_masks(prepared, image_ids, patch_grid):
        counts.setdefault(k, []).append(float(mask.sum()))
    return counts


def init_position_bias(model: nn.Module, prepared: Any, image_ids: Sequence[str], patch_grid: int) -> int:
    """Start the head's position bias at the log-odds of each patch's coverage by the class's boxes.

    For class k, ``f_kj`` = the share of the training images with a box of class k whose box union
    covers patch j (``union_patch_mask``); the bias becomes ``logit(clip(f, 0.02, 0.98))`` and the
    last conv's bias is zeroed for those classes, so the untrained network's region ``z >= 0.5``
    is the set of patches covered by at least half of the class's boxes. Classes without training
    boxes keep the default start. Returns the number of classes initialised.
    """
    head = model.unary.head
    if head.position_bias is None:
        return 0
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for k, mask in class_box_masks(prepared, image_ids, patch_grid):
        sums[k] = sums.get(k, 0) + mask.astype(np.float64)
        counts[k] = counts.get(k, 0) + 1
    with torch.no_grad():
        for k, total in sums.items():
            f = np.clip(total / counts[k], 0.02, 0.98)
            head.position_bias[k] = torch.as_tensor(np.log(f / (1 - f)), dtype=head.position_bias.dtype)
            head.conv2.bias[k] = 0.0
    return len(sums)


def initial_thresholds(
    cfg: Config, fold_dir: Path, prepared: Any, train_ids: Sequence[str], init_dir: Path | None = None
) -> tuple[Thresholds, str]:
    """Thresholds for training and where they came from.

    Order: ``cfg.thresholds_file``; ``fold_dir/thresholds.json`` (written by ``fit-thresholds``);
    the ``thresholds.json`` of the ``init_from`` fold folder; else ``Thresholds.initial`` from the
    training boxes' sizes in patches.
    """
    candidates = [Path(cfg.thresholds_file)] if cfg.thresholds_file else []
    candidates.append(fold_dir / "thresholds.json")
    if init_dir is not None:
        candidates.append(init_dir / "thresholds.json")
    for i, path in enumerate(candidates):
        if path.is_file() or (i == 0 and cfg.thresholds_file):
            return Thresholds.load(path), str(path)
    counts = box_patch_counts(prepared, train_ids, cfg.patch_grid)
    return Thresholds.initial(cfg.patch_grid, counts, rho_hat_box_fraction=cfg.rho_hat_box_fraction), "initial"


def _fold_dir_of(init_from: Path, fold: int) -> Path:
    """The fold folder meant by ``--from`` (a run folder, a fold folder or a checkpoint file)."""
    if init_from.is_file():
        return init_from.parent.parent
    if (init_from / "checkpoints").is_dir():
        return init_from
    return init_from / f"fold_{fold}"


def _load_init_weights(model: nn.Module, init_from: Path, fold: int) -> Path:
    fold_dir = _fold_dir_of(init_from, fold)
    ckpt_path = init_from if init_from.is_file() else resolve_checkpoint(fold_dir, which="best")
    state = load_checkpoint(ckpt_path)
    try:
        result = model.load_state_dict(state["model"], strict=False)
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


def _trainable(model: nn.Module, stage: str) -> list[nn.Parameter]:
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


def _set_train_mode(model: nn.Module, stage: str) -> None:
    model.train()
    if stage == "crf":
        model.unary.eval()  # frozen BatchNorm statistics: the unary part is fixed
    elif stage == "unary" and model.crf is not None:
        model.crf.eval()


def _make_optimizer(cfg: Config, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.csv`` from the history kept in the checkpoint (atomic; exact after resume)."""
    if not history:
        return
    terms = [k for k in history[0] if k not in METRIC_COLUMNS_HEAD + METRIC_COLUMNS_TAIL]
    columns = [*METRIC_COLUMNS_HEAD, *terms, *METRIC_COLUMNS_TAIL]
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in columns})
    write_text_atomic(path, buf.getvalue())


def validation_accuracy(
    model: nn.Module, prepared: Any, val_ids: Sequence[str], cfg: Config, device: torch.device
) -> tuple[float, float]:
    """Mean per-class IoU and IoR accuracy at ``cfg.eval_threshold`` on annotated validation images."""
    from cxrloc.inference import predict_prepared
    from cxrloc.metrics import localization_table, mean_localization_accuracy

    ids = [i for i in val_ids if prepared.boxes(i)]
    if not ids:
        return math.nan, math.nan
    z = predict_prepared(
        model, prepared, ids, image_size=cfg.image_size, device=device, batch_size=cfg.batch_size, progress=False
    )
    table = localization_table(z, [prepared.boxes(i) for i in ids], [cfg.eval_threshold])
    iou = float(mean_localization_accuracy(table, "iou")[0])
    ior = float(mean_localization_accuracy(table, "ior")[0])
    return iou, ior


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )


# --------------------------------------------------------------------------- train
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
    from cxrloc.data.prepared import Prepared
    from cxrloc.losses import compute_gamma, compute_loss
    from cxrloc.model.net import build_model

    if stage not in STAGES:
        raise CxrlocError(f"Unknown stage '{stage}': use one of {', '.join(STAGES)}.")
    if stage in ("crf", "joint") and init_from is None:
        raise CxrlocError(f"--stage {stage} starts from a trained run: pass --from UNARY_RUN_DIR.")
    if stage == "crf" and not cfg.crf:
        raise CxrlocError("--stage crf needs a model with a CRF; remove --set crf=false.")
    prepared = Prepared.open(prepared_dir)
    fold_dir = Path(out_dir) / f"fold_{fold}"
    last_path = fold_dir / "checkpoints" / "last.pt"
    resume_state = None
    if last_path.is_file():
        if not resume:
            raise CxrlocError(
                f"{fold_dir} already holds a run; add --resume to continue it, or choose another --out."
            )
        resume_state = load_checkpoint(last_path)
        saved = Config.from_dict(resume_state["config"])
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
        if resume_state.get("stage", "unary") != stage:
            raise CxrlocError(f"{fold_dir} was trained with --stage {resume_state.get('stage')}, not {stage}.")

    device = _resolve_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    dd = _setup_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dd.local_rank)
        torch.cuda.set_device(device)
    amp_dtype = _amp_dtype(cfg, device)
    try:
        with _isolated_rng(), _deterministic(cfg.deterministic):
            return _train(
                prepared, fold_dir, fold, cfg, stage, resume_state, init_from, progress, device, amp_dtype, dd,
                build_model, compute_loss, compute_gamma,
            )
    finally:
        if dd.created:
            dist.destroy_process_group()


def _train(
    prepared: Any,
    fold_dir: Path,
    fold: int,
    cfg: Config,
    stage: str,
    resume_state: dict[str, Any] | None,
    init_from: str | os.PathLike[str] | None,
    progress: bool,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    dd: _Dist,
    build_model: Any,
    compute_loss: Any,
    compute_gamma: Any,
) -> Path:
    val_seed = cfg.val_seed if cfg.val_seed >= 0 else cfg.seed
    train_ids, val_ids = split_train_val(prepared, fold, cfg.val_fraction, val_seed)
    test_ids = prepared.fold(fold)["test"]
    init_path = Path(init_from) if init_from is not None else None
    init_dir = _fold_dir_of(init_path, fold) if init_path is not None else None

    torch.manual_seed(cfg.seed)  # inside _isolated_rng: model initialisation depends on the seed only
    model = build_model(cfg)
    init_ckpt = _load_init_weights(model, init_path, fold) if init_path is not None and resume_state is None else None
    thresholds, thresholds_source = initial_thresholds(cfg, fold_dir, prepared, train_ids, init_dir)
    model.thresholds.set(thresholds)
    if init_path is None and resume_state is None:
        init_position_bias(model, prepared, train_ids, cfg.patch_grid)
    # The unary stage's loss reads sigmoid(unary_logits) only: skip the CRF's forward.
    model.use_crf = stage != "unary"
    params = _trainable(model, stage)
    if not params:
        raise CxrlocError(f"Stage {stage} has no parameter to train with this config.")
    model.to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if dd.world_size > 1 and device.type == "cuda" and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if dd.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # compile=true: the training forward runs through torch.compile; `net` (DDP's no_sync) and `model`
    # (state dicts, validation) stay the plain modules.
    forward = torch.compile(net) if cfg.compile else net

    lr = cfg.lr * (cfg.joint_lr_factor if stage == "joint" else 1.0)
    optimizer = _make_optimizer(cfg, params, lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    gamma = torch.as_tensor(compute_gamma(prepared_labels(prepared, train_ids), cfg.gamma), dtype=torch.float32)
    gamma = gamma.to(device)
    loss_cfg = dataclasses.replace(cfg, crf=False) if stage == "unary" else cfg

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
    micro = cfg.batch_size // dd.world_size
    if micro % cfg.accum_steps:
        raise CxrlocError(
            f"batch_size={cfg.batch_size} must split into {dd.world_size} processes x {cfg.accum_steps} accum_steps."
        )
    micro //= cfg.accum_steps

    start_epoch, best_metric, history = 0, -math.inf, []
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        _set_rng_state(resume_state["rng"])
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
        fold_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, fold_dir / "config.json")
        write_json_atomic(
            fold_dir / "run.json",
            {
                "prepared_dir": str(Path(prepared.root).resolve()),
                "fold": fold,
                "stage": stage,
                "init_from": str(init_ckpt.resolve()) if init_ckpt else None,
                "thresholds": thresholds_source,
                "world_size": dd.world_size,
                "train_ids": train_ids,
                "val_ids": val_ids,
                "test_ids": test_ids,
            },
        )
    if dd.main and resume_state is not None:
        save_config(cfg, fold_dir / "config.json")  # records a changed epochs / workers / device
    dd.barrier()

    show = progress and dd.main
    if show:
        console.print(
            f"Fold {fold}, stage {stage}: {len(train_ids)} training images "
            f"({int(dataset.is_annotated().sum())} annotated), {len(val_ids)} validation, device {device}, "
            f"{dd.world_size} process(es), epochs {start_epoch + 1}..{cfg.epochs}"
        )
    # One loader for the whole run: the workers persist between epochs (items depend only on
    # (index, epoch), and the sampler's epoch is read each time the loader is iterated); the
    # generator only seeds the worker processes, which the items do not depend on.
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed * 100003 + start_epoch),
    )
    writer = CheckpointWriter()
    with _progress(show) as bar, writer:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            _set_train_mode(model, stage)
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(sampler), info="")
            log = _EpochLog()
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                for s in range(cfg.accum_steps):
                    part = slice(s * micro, (s + 1) * micro)
                    x = batch["image"][part].to(device, non_blocking=True)
                    if device.type == "cuda" and cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    sync = s == cfg.accum_steps - 1 or not isinstance(net, nn.parallel.DistributedDataParallel)
                    ctx = contextlib.nullcontext() if sync else net.no_sync()
                    with ctx:
                        autocast = torch.autocast(
                            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                        )
                        with autocast:
                            z, unary_logits = forward(x)
                        unary_logits = unary_logits.float()
                        z = torch.sigmoid(unary_logits) if stage == "unary" else z.float()
                        loss, terms = compute_loss(
                            loss_cfg,
                            z,
                            unary_logits,
                            batch["labels"][part].to(device, non_blocking=True),
                            batch["annotated"][part].to(device, non_blocking=True),
                            batch["box_mask"][part].to(device, non_blocking=True),
                            model.thresholds,
                            gamma,
                        )
                        scaler.scale(loss / cfg.accum_steps).backward()
                    log.add(loss, terms, cfg.accum_steps)
                scaler.step(optimizer)
                scaler.update()
                log.end_step()
                if log.steps % LOG_EVERY == 0:  # a host sync only every LOG_EVERY steps
                    bar.update(task, info=f"loss {log.check(epoch):.4f}")
                bar.update(task, advance=1)
            sums, steps = log.finish(epoch)
            means = _reduce_means(sums, steps, dd, device)
            lr_used = optimizer.param_groups[0]["lr"]
            scheduler.step()
            bar.remove_task(task)

            row: dict[str, Any] = {"epoch": epoch + 1, "stage": stage}
            if dd.main:
                iou, ior = validation_accuracy(model, prepared, val_ids, cfg, device)
                _set_train_mode(model, stage)
                metric = iou if not math.isnan(iou) else -means.get("loss", 0.0)
                is_best = metric > best_metric
                if is_best:
                    best_metric = metric
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
                    "meta": make_meta(cfg, model.thresholds.get().to_json()),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(),
                    "epoch": epoch + 1,
                    "best_metric": best_metric,
                    "history": history,
                    "stage": stage,
                    "thresholds_source": thresholds_source,
                }
                _write_metrics(fold_dir / "metrics.csv", history)
                # Written in the background (a CPU snapshot is taken now); best.pt, when this epoch is
                # the best, is the same file as last.pt (a hard link, else a copy).
                best = [fold_dir / "checkpoints" / "best.pt"] if is_best else []
                writer.submit([*best, last_path_of(fold_dir)], state)
                if show:
                    console.print(
                        f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.4f}  val IoU acc@{cfg.eval_threshold} "
                        f"{iou:.3f}  IoR acc {ior:.3f}{'  (best)' if is_best else ''}  {row['time_s']:.1f}s"
                    )
            dd.barrier()
    return fold_dir


def last_path_of(fold_dir: Path) -> Path:
    """``fold_dir/checkpoints/last.pt``."""
    return fold_dir / "checkpoints" / "last.pt"


def prepared_labels(prepared: Any, image_ids: Sequence[str]) -> np.ndarray:
    """``(N, 14)`` labels of ``image_ids`` (a boxed class counts as positive)."""
    labels = np.stack([prepared.labels(i) for i in image_ids]).astype(np.float64)
    for row, image_id in enumerate(image_ids):
        for k, *_ in prepared.boxes(image_id):
            labels[row, k] = 1.0
    return labels


LOG_EVERY = 20
"""Training steps between two reads of the running loss on the host (progress bar, non-finite check)."""


class _EpochLog:
    """Per-epoch sums of the logged loss terms, kept on the training device.

    The arithmetic is the float64 arithmetic the host did before (each micro-batch's value over
    ``accum_steps``, summed per step, then over steps), so the logged means are unchanged; the host
    reads them once per epoch (:meth:`finish`) and every ``LOG_EVERY`` steps (:meth:`check`) instead
    of after every step, which lets the CPU queue the next steps while the GPU runs.
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


def _reduce_means(sums: dict[str, float], steps: int, dd: _Dist, device: torch.device) -> dict[str, float]:
    """Per-epoch means of the logged terms, averaged over processes."""
    keys = sorted(sums)
    if dd.world_size > 1 and keys:
        t = torch.tensor([sums[k] for k in keys] + [float(steps)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        sums = dict(zip(keys, t[:-1].tolist(), strict=True))
        steps = int(t[-1].item())
    return {k: sums[k] / max(steps, 1) for k in keys}


# --------------------------------------------------------------------------- several folds / CLI
def _existing_config(out_dir: Path, fold: int) -> Config | None:
    path = out_dir / f"fold_{fold}" / "config.json"
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
    (:func:`cxrloc.fit_thresholds.fit_thresholds`, written to ``fold_K/thresholds.json``), which
    the next round's training reads. The run ends with ``N * epochs`` epochs and fitted thresholds.

    With ``resume`` and no ``preset``, each fold's saved ``config.json`` is the base, so a resumed
    run keeps its settings; ``overrides`` and ``epochs`` still apply (only epochs, workers, device
    and max_steps_per_epoch may differ from the saved run).

    Returns:
        The fold folders, in training order.
    """
    from cxrloc.data.prepared import Prepared

    out = Path(out_dir)
    if folds == "all":
        fold_list = list(range(Prepared.open(prepared_dir).num_folds))
    else:
        try:
            fold_list = [int(folds)]
        except ValueError:
            raise CxrlocError(f"--fold must be a number or 'all', got {folds!r}.") from None
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
        from cxrloc.fit_thresholds import fit_thresholds

        per_round = cfg.epochs
        start = 0
        if resume:
            last = out / f"fold_{fold}" / "checkpoints" / "last.pt"
            start = int(load_checkpoint(last)["epoch"]) if last.is_file() else 0
        for r in range(alternate):
            cfg_r = dataclasses.replace(cfg, epochs=start + per_round * (r + 1))
            fold_dir = train(
                prepared_dir, out, fold=fold, cfg=cfg_r, stage=stage, resume=resume or r > 0,
                init_from=init_from, progress=progress,
            )
            fit_thresholds(fold_dir, device=_resolve_device(cfg, 0).type, which="best", progress=progress)
            console.print(f"Fold {fold}: alternation round {r + 1}/{alternate} done (thresholds fitted).")
        results.append(fold_dir)
    return results
