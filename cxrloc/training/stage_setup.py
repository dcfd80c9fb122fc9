"""Setting up one training stage: its starting weights and thresholds, what it trains, its optimizer,
and the checks of a ``--resume`` (:func:`cxrloc.training.loop.train` calls these in order)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrloc.checkpoint import checkpoint_config, checkpoint_weights, load_checkpoint, require_training_state
from cxrloc.config import Config
from cxrloc.data.prepared import Prepared
from cxrloc.geometry import class_box_masks
from cxrloc.model.net import CXRLocNet
from cxrloc.rundir import FoldDir, resolve_checkpoint, start_fold
from cxrloc.thresholds import Thresholds, box_patch_counts
from cxrloc.training.runtime import fused_ok
from cxrloc.utils import CxrlocError

RESUME_CHANGEABLE: tuple[str, ...] = (
    "epochs", "workers", "device", "max_steps_per_epoch", "compile", "crf_epochs", "joint_epochs", "amp",
    "channels_last",
)
"""Config fields that ``--resume`` may change; any other difference is an error."""


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
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused_ok(params) or None)



def check_resume(fold_dir: FoldDir, cfg: Config, stage: str, resume: bool) -> dict[str, Any] | None:
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

