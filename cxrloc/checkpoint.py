"""Checkpoint files: what a run saves, and how every command loads a model back.

A checkpoint is a ``dict`` that ``torch.load(weights_only=True)`` can read (tensors and
plain Python types only). Keys:

- ``format``: ``"cxrloc-checkpoint"``; ``version``: the cxrloc version that wrote it.
- ``config``: the fully resolved :class:`cxrloc.config.Config` as a dict.
- ``model``: the model's ``state_dict`` (threshold buffers included); or, for an ensemble written
  by ``cxrloc ensemble``, ``ensemble``: a list of ``{"config", "model"}``, one per member.
- ``meta``: what inference needs, see :func:`make_meta`. ``load_model`` completes it with the
  fold's fitted ``thresholds.json`` and ``calibration.json`` (:mod:`cxrloc.rundir`).
- training state, when saved by ``train``: ``optimizer``, ``scheduler``, ``scaler``,
  ``rng``, ``epoch``, ``best_metric``, ``history``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cxrloc import __version__
from cxrloc.classes import CLASSES
from cxrloc.config import Config
from cxrloc.utils import CxrlocError, atomic_path

FORMAT = "cxrloc-checkpoint"

NORMALISATION: dict[str, Any] = {
    "description": "grey level g in [0, 1] (read_image convention) -> x = 2 g - 1 in [-1, 1]",
    "scale": 2.0,
    "offset": -1.0,
}
"""How a [0, 1] grey image becomes the network input in [-1, 1] (paper, section 4)."""


def make_meta(
    cfg: Config, thresholds: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Inference metadata carried by every checkpoint and ONNX file.

    ``calibration`` is the ``calibration.json`` content (:class:`cxrloc.calibration.Calibration`),
    ``None`` until ``cxrloc calibrate`` has run.
    """
    return {
        "classes": list(CLASSES),
        "image_size": cfg.image_size,
        "patch_grid": cfg.patch_grid,
        "normalisation": dict(NORMALISATION),
        "thresholds": thresholds,
        "calibration": calibration,
        "version": __version__,
        "arch": cfg.arch,
        "crf": cfg.crf,
        "antialias": cfg.antialias,
        "loss": cfg.loss,
    }


def model_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A hash of a model's weights (threshold buffers left out), to tie a calibration to them.

    The same for a checkpoint's ``state["model"]`` and for the ``state_dict()`` of the model
    loaded from it, on any device.
    """
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(state_dict):
        if key.startswith("thresholds."):
            continue  # refitted by fit-thresholds without changing z
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temporary name, then rename)."""
    state = {"format": FORMAT, "version": __version__, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CxrlocError(f"Checkpoint not found: {path}.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated or unsafe pickle
        raise CxrlocError(f"Cannot read checkpoint {path}: {exc}. Is it a cxrloc checkpoint?") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CxrlocError(f"{path} is not a cxrloc checkpoint (no '{FORMAT}' marker).")
    return state


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    fold: int | None = None,
    which: str = "best",
    thresholds_file: str | os.PathLike[str] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any], Config]:
    """Load a trained model in eval mode from a run folder or checkpoint file.

    Thresholds follow the one rule of :mod:`cxrloc.rundir`: ``thresholds_file`` when given, else
    the fold's fitted ``thresholds.json`` (written by ``cxrloc fit-thresholds``), else the ones
    saved in the checkpoint. The chosen ones are in the model's buffers and in
    ``meta["thresholds"]`` (with ``meta["thresholds_source"]`` when a file replaced the saved
    ones), so ``predict``, ``evaluate`` and
    ``export`` all use the same values.

    The fold's ``calibration.json`` (written by ``cxrloc calibrate``) goes into
    ``meta["calibration"]`` (with ``meta["calibration_source"]``) when it was fitted for these
    weights; a calibration fitted for other weights (the checkpoint changed since) is left out,
    and ``meta["calibration_note"]`` says why.

    Returns:
        ``(model, meta, config)``.
    """
    from cxrloc.calibration import Calibration
    from cxrloc.model.net import build_model
    from cxrloc.rundir import calibration_for_checkpoint, resolve_checkpoint, thresholds_for_checkpoint
    from cxrloc.thresholds import Thresholds

    ckpt_path = resolve_checkpoint(path, fold=fold, which=which)
    state = load_checkpoint(ckpt_path, map_location="cpu")
    cfg = Config.from_dict(state["config"])
    cfg.init = "scratch"  # weights come from the checkpoint, never from the network
    model: torch.nn.Module
    if "ensemble" in state:  # written by `cxrloc ensemble`: one network per member, outputs averaged
        from cxrloc.model.ensemble import EnsembleNet

        members = []
        for member in state["ensemble"]:
            member_cfg = Config.from_dict(member["config"])
            member_cfg.init = "scratch"
            net = build_model(member_cfg)
            net.load_state_dict(member["model"])
            members.append(net)
        model = EnsembleNet(members)
    else:
        model = build_model(cfg)
        model.load_state_dict(state["model"])
    meta = dict(state["meta"])
    chosen = thresholds_for_checkpoint(ckpt_path, thresholds_file)
    if chosen is not None:
        thresholds = Thresholds.load(chosen)
        model.thresholds.set(thresholds)
        meta["thresholds"] = thresholds.to_json()
        meta["thresholds_source"] = str(chosen)
    elif "ensemble" in state and meta.get("thresholds"):
        model.thresholds.set(Thresholds.from_json(meta["thresholds"]))
    elif not meta.get("thresholds"):
        meta["thresholds"] = model.thresholds.get().to_json()
    meta.setdefault("calibration", None)
    cal_path = calibration_for_checkpoint(ckpt_path)
    if cal_path is not None:
        cal = Calibration.load(cal_path)
        fitted_for = cal.info.get("model_fingerprint")
        if fitted_for and fitted_for != model_fingerprint(model.state_dict()):
            meta["calibration"] = None
            meta["calibration_note"] = (
                f"{cal_path} was fitted for other weights than {ckpt_path.name} (checkpoint changed since, or "
                f"another --which): not used; run 'cxrloc calibrate {cal_path.parent.parent}' again."
            )
        else:
            meta["calibration"] = cal.to_json()
            meta["calibration_source"] = str(cal_path)
    model.to(device).eval()
    return model, meta, cfg
