"""``cxrloc pretrain``: self-supervised pretraining of a preset's backbone (SimCLR, Chen et al. 2020).

Two random views of each image of a batch (:mod:`cxrloc.data.pretrain_augment`) go through the
backbone that ``train`` builds (same arch, width, anti-aliasing, output stride), a global average
pool and a projection MLP; the NT-Xent loss pulls the two views of an image together and pushes
the other ``2B - 2`` views of the batch away. Only the backbone is kept: the weights file holds
its state dict (key ``state_dict``, the layout :func:`cxrloc.model.backbone.create_backbone`
loads for ``--set init=FILE``) and a ``cxrloc_pretrain`` record of how it was made.

Outputs, rewritten atomically after every epoch (a stopped run leaves usable weights):

- ``OUT`` (e.g. ``backbone.pt``): the backbone weights;
- ``WORK/last.pt``: the resumable state (model with projection head, optimizer, epoch, history);
- ``WORK/history.csv``: one row per epoch (loss, learning rate, images/s);
- ``WORK/cache/``: the decoded images (:mod:`cxrloc.data.pretrain_images`), reused by later runs.

``WORK`` defaults to the folder ``OUT`` without its suffix plus ``-pretrain`` beside ``OUT``.
Epoch ``e`` draws its image order and every view from a generator seeded with
``seed * LOADER_SEED_STRIDE + e`` and nothing else is random after the model's initialisation
(seeded with ``seed``): the checkpoint's weights, optimizer state and epoch are all a resumed run
needs to give the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrloc import __version__, precision
from cxrloc.config import Config, make_config
from cxrloc.data.pretrain_augment import ViewSpec, make_views
from cxrloc.data.pretrain_images import ImageCache, build_cache, find_pretrain_images
from cxrloc.model.backbone import create_backbone
from cxrloc.training.loop import LOADER_SEED_STRIDE
from cxrloc.training.runtime import deterministic, fused_ok, isolated_rng, resolve_device
from cxrloc.utils import (
    CxrlocError,
    atomic_path,
    check_writable_dir,
    check_writable_file,
    console,
    progress_bar,
    write_text_atomic,
)

FORMAT = "cxrloc-pretrain-checkpoint"
BACKBONE_FIELDS: tuple[str, ...] = ("arch", "width", "antialias", "blur_size", "output_stride", "init", "image_size")
"""Config fields that shape what ``pretrain`` builds (besides ``seed``, ``device``, ``amp``, ``channels_last``,
``deterministic``); other ``--set`` fields are accepted (the same preset serves ``train``) and unused."""


@dataclass(frozen=True)
class PretrainOptions:
    """The SimCLR settings of one run (the CLI options of the same names)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    """AdamW peak learning rate (linear warm-up for ``warmup_epochs``, then cosine to 0)."""
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    temperature: float = 0.2
    """NT-Xent temperature (0.1-0.5 in SimCLR; lower suits small batches)."""
    proj_hidden: int = 512
    proj_dim: int = 128
    views: ViewSpec = ViewSpec()

    def check(self) -> None:
        """Raise ``CxrlocError`` naming the first invalid option."""
        v = self.views
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 2, f"--batch-size must be at least 2 (NT-Xent needs negatives), got {self.batch_size}"),
            (self.lr > 0 and self.weight_decay >= 0, "--lr must be > 0 and the weight decay >= 0"),
            (0 < self.temperature <= 10, f"--temperature must be in (0, 10], got {self.temperature}"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.proj_hidden >= 1 and self.proj_dim >= 1, "the projection sizes must be >= 1"),
            (8 <= v.crop <= 4096, f"--crop must be between 8 and 4096 pixels, got {v.crop}"),
            (0 < v.min_scale <= 1, f"--min-scale must be in (0, 1], got {v.min_scale}"),
            (0 <= v.max_rotation <= 45, f"--max-rotation must be in [0, 45] degrees, got {v.max_rotation}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CxrlocError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SimCLRNet(nn.Module):
    """Backbone -> global average pool -> projection MLP (Linear, BN, ReLU, Linear)."""

    def __init__(self, backbone: nn.Module, channels: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x).float().mean(dim=(2, 3)))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two ``(B, D)`` batches of projections, view ``i`` of ``z1`` paired with ``i`` of ``z2``.

    Each of the ``2B`` views is a ``2B - 1``-way classification of its partner among all other
    views, by cosine similarity / ``temperature``; the loss is the mean cross-entropy.
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def learning_rate(opts: PretrainOptions, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to 0 at the end of ``epochs``."""
    total = opts.epochs * steps_per_epoch
    warm = min(int(round(opts.warmup_epochs * steps_per_epoch)), total - 1)
    if step < warm:
        return opts.lr * (step + 1) / warm
    progress = (step - warm) / max(total - warm, 1)
    return opts.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast: ``amp=bf16``, or ``auto`` where the device computes bf16 natively (the rule of
    :func:`cxrloc.precision.autocast_dtype`, as for ``train``); else float32. A GPU without bf16 gets
    float32 here, not fp16: SimCLR's loss would need loss scaling."""
    if cfg.amp == "fp16":
        raise CxrlocError("pretrain supports amp=bf16, auto or off (fp16 would need loss scaling); use --set amp=bf16.")
    dtype = precision.autocast_dtype(cfg.amp, device)
    return dtype if dtype == torch.bfloat16 else None


def build_simclr(cfg: Config, opts: PretrainOptions) -> SimCLRNet:
    """The backbone ``train`` would build for ``cfg`` (weights from ``cfg.init``), with a projection head."""
    backbone, channels = create_backbone(
        cfg.arch, cfg.width, cfg.antialias, cfg.blur_size, cfg.init, cfg.output_stride
    )
    return SimCLRNet(backbone, channels, opts.proj_hidden, opts.proj_dim)


def default_work_dir(out: Path) -> Path:
    """``runs/backbone.pt`` -> ``runs/backbone-pretrain``."""
    return out.with_name(f"{out.stem}-pretrain")


@dataclass
class _Run:
    cfg: Config
    opts: PretrainOptions
    model: SimCLRNet
    optimizer: torch.optim.Optimizer
    cache: ImageCache
    device: torch.device
    dtype: torch.dtype | None
    out: Path
    work: Path
    history: list[dict[str, Any]]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.cache.paths) // self.opts.batch_size


def pretrain(
    roots: Sequence[str | Path],
    out: str | Path,
    *,
    preset: str = "cpu",
    overrides: Sequence[str] = (),
    opts: PretrainOptions = PretrainOptions(),
    resume: bool = False,
    max_images: int = 0,
    work_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Pretrain the backbone of ``preset`` (with ``overrides``) on every image below ``roots``; return ``out``.

    Raises:
        CxrlocError: no readable image, fewer images than ``batch_size``, a bad option, ``--resume``
            without a checkpoint (or with other settings), an existing checkpoint without ``--resume``.
    """
    opts.check()
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else default_work_dir(out)
    cfg = make_config(preset, list(overrides))
    check_writable_file(out, "--out")
    check_writable_dir(work, "--work-dir")
    state = _resume_state(work, cfg, opts, resume)
    paths = find_pretrain_images(roots, max_images, cfg.seed)
    cache = build_cache(paths, Path(cache_dir) if cache_dir is not None else work / "cache", cfg.image_size,
                        progress=progress)
    if len(cache.paths) < opts.batch_size:
        raise CxrlocError(
            f"only {len(cache.paths)} readable images for --batch-size {opts.batch_size}; pass a smaller --batch-size"
        )
    if state is not None and state["images"] != cache.fingerprint():
        raise CxrlocError(
            f"{work / 'last.pt'} was trained on other images (the folders, --max-images or the files changed); "
            "resume with the same image folders, or start a new run with another --out"
        )
    device = resolve_device(cfg)
    with isolated_rng(), deterministic(cfg.deterministic):
        torch.manual_seed(cfg.seed)
        model = build_simclr(cfg, opts).to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        params = list(model.parameters())
        fused = fused_ok(params) or None
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, fused=fused)
        run = _Run(cfg, opts, model, optimizer, cache, device, autocast_dtype(cfg, device), out, work, [])
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            run.history = list(state["history"])
            start = int(state["epoch"])
        _announce(run, start, progress)
        for epoch in range(start, opts.epochs):
            row = _train_epoch(run, epoch, progress)
            run.history.append(row)
            _save_epoch(run, epoch + 1)
            if progress:
                console.print(
                    f"epoch {epoch + 1}/{opts.epochs}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                    f"{row['images_per_s']:.1f} images/s  {row['time_s']:.0f}s"
                )
    return out


def _announce(run: _Run, start: int, progress: bool) -> None:
    if not progress:
        return
    cfg, opts = run.cfg, run.opts
    if start >= opts.epochs:
        console.print(f"{run.work / 'last.pt'} already has {start} epoch(s), --epochs is {opts.epochs}: nothing to do.")
        return
    precision = "bf16 autocast" if run.dtype is not None else "float32"
    console.print(
        f"SimCLR on {len(run.cache.paths)} images ({run.steps_per_epoch} steps of {opts.batch_size} per epoch), "
        f"{cfg.arch} width {cfg.width} output stride {cfg.output_stride}, views {opts.views.crop} px from "
        f"{cfg.image_size} px, device {run.device}, {precision}, {torch.get_num_threads()} thread(s), "
        f"epochs {start + 1}..{opts.epochs}"
    )


def _train_epoch(run: _Run, epoch: int, progress: bool) -> dict[str, Any]:
    """One pass over a seeded permutation of the images (the last partial batch is dropped)."""
    opts, model = run.opts, run.model
    g = torch.Generator().manual_seed(run.cfg.seed * LOADER_SEED_STRIDE + epoch)
    order = torch.randperm(len(run.cache.paths), generator=g).numpy()
    steps, b = run.steps_per_epoch, opts.batch_size
    memory = torch.channels_last if run.cfg.channels_last else torch.contiguous_format
    model.train()
    t0, loss_sum, lr = time.perf_counter(), torch.zeros((), dtype=torch.float64), opts.lr
    with progress_bar(enabled=progress and _is_terminal(), info=True, elapsed=True, transient=True) as bar:
        task = bar.add_task(f"epoch {epoch + 1}/{opts.epochs}", total=steps, info="")
        for step in range(steps):
            idx = np.sort(order[step * b : (step + 1) * b])
            batch = torch.from_numpy(np.asarray(run.cache.images[idx]))
            lr = learning_rate(opts, epoch * steps + step, steps)
            loss = train_step(model, run.optimizer, batch, g, opts, lr, run.device, run.dtype, memory)
            loss_sum += loss.double().cpu()
            if step % 5 == 4 or step == steps - 1:
                done = (step + 1) * b
                mean = float(loss_sum) / (step + 1)
                if not math.isfinite(mean):
                    raise CxrlocError(
                        f"the loss became {mean} at epoch {epoch + 1}, step {step + 1}; restart with a lower --lr"
                    )
                rate = done / (time.perf_counter() - t0)
                bar.update(task, completed=step + 1, info=f"loss {mean:.4f}  {rate:.1f} img/s")
    elapsed = time.perf_counter() - t0
    return {
        "epoch": epoch + 1,
        "loss": float(loss_sum) / max(steps, 1),
        "lr": lr,
        "images_per_s": steps * b / elapsed,
        "time_s": round(elapsed, 3),
    }


def train_step(
    model: SimCLRNet,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    g: torch.Generator,
    opts: PretrainOptions,
    lr: float,
    device: torch.device,
    dtype: torch.dtype | None,
    memory: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """One SimCLR step on ``(B, S, S)`` uint8 images: two views each, NT-Xent, AdamW at ``lr``; returns the loss."""
    b = batch.shape[0]
    views = torch.cat([make_views(batch, opts.views, g), make_views(batch, opts.views, g)])
    views = views.to(device, non_blocking=True).contiguous(memory_format=memory)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        z = model(views)
    loss = nt_xent(z[:b], z[b:], opts.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _is_terminal() -> bool:
    return bool(console.is_terminal)


def backbone_state(model: SimCLRNet) -> dict[str, torch.Tensor]:
    """The backbone's weights as contiguous CPU tensors, under the names ``create_backbone`` loads."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.backbone.state_dict().items()}


def _save_epoch(run: _Run, epochs_done: int) -> None:
    """Write the weights file, then the resumable state and the history (each atomically)."""
    cfg, opts = run.cfg, run.opts
    record = {
        "method": "simclr",
        "version": __version__,
        "epochs": epochs_done,
        "images": len(run.cache.paths),
        "loss": run.history[-1]["loss"] if run.history else math.nan,
        "backbone": {k: getattr(cfg, k) for k in BACKBONE_FIELDS},
        "options": opts.to_dict(),
    }
    with atomic_path(run.out, "pretrained weights") as tmp:
        torch.save({"state_dict": backbone_state(run.model), "cxrloc_pretrain": record}, tmp)
    state = {
        "format": FORMAT,
        "version": __version__,
        "config": cfg.to_dict(),
        "options": opts.to_dict(),
        "images": run.cache.fingerprint(),
        "model": {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "epoch": epochs_done,
        "history": run.history,
    }
    run.work.mkdir(parents=True, exist_ok=True)
    with atomic_path(run.work / "last.pt", "pretraining checkpoint") as tmp:
        torch.save(state, tmp)
    keys = list(run.history[0]) if run.history else []
    lines = [",".join(keys)] + [",".join(f"{row[k]}" for k in keys) for row in run.history]
    write_text_atomic(run.work / "history.csv", "\n".join(lines) + "\n", what="pretraining history")


RESUME_CHANGEABLE: tuple[str, ...] = ("epochs",)
CONFIG_CHECKED: tuple[str, ...] = ("arch", "width", "antialias", "blur_size", "output_stride", "image_size", "init",
                                   "seed", "deterministic")
"""Config fields a resumed pretraining must keep: those that shape the backbone, its input and its random
draws. The others are not used by pretraining (``device``, ``amp`` and ``channels_last`` may change, as on
``train --resume``), so a config field added by a later cxrloc version never blocks a resume."""


def _resume_state(work: Path, cfg: Config, opts: PretrainOptions, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from (``resume``), after checking that the settings match."""
    path = work / "last.pt"
    if not resume:
        if path.exists():
            raise CxrlocError(
                f"{path} already holds a pretraining run; pass --resume to continue it, or choose another --out"
            )
        return None
    if not path.is_file():
        raise CxrlocError(f"--resume: {path} not found; start without --resume (or give the run's --out / --work-dir)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CxrlocError(f"{path}: cannot read the pretraining checkpoint ({exc}); start a new run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CxrlocError(f"{path} is not a cxrloc pretraining checkpoint; start a new run with another --out")
    saved_opts, now = dict(state["options"]), opts.to_dict()
    diff = [k for k in now if k not in RESUME_CHANGEABLE and saved_opts.get(k) != now[k]]
    saved_cfg, cfg_now = dict(state["config"]), cfg.to_dict()
    diff += [k for k in CONFIG_CHECKED if saved_cfg.get(k) != cfg_now[k]]
    if diff:
        k = diff[0]
        was = saved_opts.get(k, saved_cfg.get(k))
        now_value = now.get(k, cfg_now.get(k))
        raise CxrlocError(
            f"--resume: {k} was {was!r} in {path}, now {now_value!r}; resume with the run's settings "
            f"(only --epochs may change)"
        )
    return state
