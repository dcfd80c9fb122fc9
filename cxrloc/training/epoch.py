"""One epoch of a training stage: the optimisation steps (:func:`train_one_epoch`, on a
:class:`Trainer`), validation (:func:`validate`) and the end of the epoch (:func:`end_epoch`:
``metrics.csv``, ``curves.png``, the checkpoints)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import Progress, TaskID
from torch import nn
from torch.utils.data import DataLoader

from cxrloc.checkpoint import CheckpointWriter, make_meta
from cxrloc.config import Config
from cxrloc.data.dataset import warp_batch
from cxrloc.data.prepared import Prepared
from cxrloc.evaluation.metrics import localization_table, mean_localization_accuracy
from cxrloc.inference.batch import predict_prepared
from cxrloc.model.net import CXRLocNet
from cxrloc.precision import inference_options
from cxrloc.rundir import FoldDir
from cxrloc.training.curves import write_curves
from cxrloc.training.losses import compute_loss
from cxrloc.training.runtime import DistInfo, rng_state
from cxrloc.training.stage_setup import set_train_mode
from cxrloc.utils import CxrlocError, console


@dataclass
class Trainer:
    """Everything one optimisation step needs, built once per training by :func:`cxrloc.training.loop.train`."""

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



def end_epoch(
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

