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

Writing (``save_checkpoint``, ``CheckpointWriter``, ``torch_save``, ``FORMAT``) is in
:mod:`cxrloc.checkpoint_writer`; those names stay importable from here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cxrloc import __version__
from cxrloc.checkpoint_writer import DISK_FULL_BYTES as DISK_FULL_BYTES
from cxrloc.checkpoint_writer import FORMAT
from cxrloc.checkpoint_writer import CheckpointWriter as CheckpointWriter
from cxrloc.checkpoint_writer import save_checkpoint as save_checkpoint
from cxrloc.checkpoint_writer import torch_save as torch_save
from cxrloc.config import Config
from cxrloc.utils import CxrlocError

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
    ``None`` until ``cxrloc calibrate`` has run. ``classes`` is the config's class list (the
    prepared folder's, NIH's 14 for NIH data).
    """
    return {
        "classes": list(cfg.classes),
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


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CxrlocError(f"Checkpoint not found: {path}.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated or unsafe pickle
        raise CxrlocError(_unreadable(path, exc)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CxrlocError(f"{path} is not a cxrloc checkpoint (no '{FORMAT}' marker).")
    return state


def _unreadable(path: Path, exc: Exception) -> str:
    """One line for a checkpoint ``torch.load(weights_only=True)`` refused (never PyTorch's advice to
    set ``weights_only=False``: that would run whatever the file holds)."""
    import pickle

    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    if size == 0:
        return f"Cannot read checkpoint {path}: the file is empty (0 bytes); use another checkpoint or retrain."
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
        return (
            f"Cannot read checkpoint {path}: refused, it holds pickled Python objects (code that would run on "
            "loading), not only weights; cxrloc loads weights only. Use a checkpoint written by 'cxrloc train'."
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"Cannot read checkpoint {path}: {first[:200]}. Is it a cxrloc checkpoint (truncated, or another file)?"


def check_finite_weights(weights: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Refuse weights holding NaN or infinity: such a network scores every image NaN, which would
    read as "no finding" (a diverged run, a damaged file).

    Raises:
        CxrlocError: one line naming the file, the first bad tensor and how many are bad.
    """
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise _damaged(
            Path(path), f"{len(bad)} weight tensor(s) hold NaN or infinite values (first {bad[0]}): the training "
            "diverged or the file is damaged"
        )


TRAINING_KEYS: tuple[str, ...] = ("optimizer", "scheduler", "rng", "epoch", "best_metric")
"""Keys a checkpoint needs to resume training (``last.pt``), besides ``config`` and ``model``."""


def _damaged(path: Path, what: str) -> CxrlocError:
    return CxrlocError(
        f"{path}: {what}; the checkpoint is damaged or was not written by 'cxrloc train' (retrain, or use "
        "another checkpoint)"
    )


def checkpoint_config(state: dict[str, Any], path: str | os.PathLike[str]) -> Config:
    """The validated :class:`Config` stored in a checkpoint (types, bounds: nothing is built yet).

    Raises:
        CxrlocError: no config, or an invalid one (e.g. ``width=200000``), naming the file.
    """
    path = Path(path)
    data = state.get("config")
    if not isinstance(data, dict):
        raise _damaged(path, "it holds no config")
    try:
        return Config.from_dict(data)
    except CxrlocError as exc:
        raise _damaged(path, f"its config is invalid ({exc})") from None
    except TypeError as exc:  # keys that are not strings
        raise _damaged(path, f"its config is invalid ({exc})") from None


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and tensor shapes of the network ``cfg`` describes.

    Built on PyTorch's ``meta`` device: no memory is allocated for the weights, so a config
    from a damaged file cannot exhaust memory here.
    """
    import dataclasses

    from cxrloc.model.net import build_model

    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg, init="scratch"))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def checkpoint_weights(
    state: dict[str, Any], path: str | os.PathLike[str], cfg: Config, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, checked against the network of ``cfg`` before any is built.

    Args:
        state: the loaded checkpoint.
        path: its file, for messages.
        cfg: the network the weights must fit.
        strict: every key of the network must be present (``False``: only the present keys are
            checked, for ``--from`` weights that may lack a CRF).

    Raises:
        CxrlocError: no weights, tensors of the wrong kind, missing or unexpected keys, wrong shapes.
    """
    path = Path(path)
    weights = state.get("model")
    if not isinstance(weights, dict) or not weights:
        raise _damaged(path, "it holds no model weights")
    bad = [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise _damaged(path, f"its weights hold non-tensor entries (first {bad[0]!r})")
    expected = expected_shapes(cfg)
    problems = []
    missing = [k for k in expected if k not in weights] if strict else []
    unexpected = [k for k in weights if k not in expected]
    wrong = [
        f"{k} is {tuple(weights[k].shape)}, expected {shape}"
        for k, shape in expected.items()
        if k in weights and tuple(weights[k].shape) != shape
    ]
    if missing:
        problems.append(f"{len(missing)} missing (first {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape (first {wrong[0]})")
    if problems:
        raise _damaged(path, f"its weights do not fit the network of its config: {'; '.join(problems)}")
    check_finite_weights(weights, path)
    return weights


def checkpoint_meta(state: dict[str, Any], path: str | os.PathLike[str], cfg: Config) -> dict[str, Any]:
    """The checkpoint's inference metadata, checked against its config (image size, P)."""
    path = Path(path)
    meta = state.get("meta")
    if not isinstance(meta, dict):
        raise _damaged(path, "it holds no inference metadata ('meta')")
    for key in ("image_size", "patch_grid", "classes"):
        if key == "classes" and "classes" not in meta:
            continue  # not required of hand-made files; make_meta always writes it
        if meta.get(key) != getattr(cfg, key):
            raise _damaged(path, f"its metadata says {key}={meta.get(key)!r} but its config {getattr(cfg, key)}")
    return dict(meta)


def require_training_state(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Check that a checkpoint can resume training (optimizer, scheduler, random state, epoch...)."""
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise _damaged(Path(path), f"it lacks the training state needed to resume ({', '.join(missing)})")


def _build_checked(state: dict[str, Any], path: Path, cfg: Config | None = None) -> torch.nn.Module:
    """The network of one checkpoint (or ensemble member) ``{"config", "model"}``, checked first."""
    from cxrloc.model.net import build_model

    cfg = cfg if cfg is not None else checkpoint_config(state, path)
    cfg.init = "scratch"  # weights come from the checkpoint, never from the network
    weights = checkpoint_weights(state, path, cfg)
    model = build_model(cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # e.g. a tensor whose dtype cannot be copied
        raise _damaged(path, f"its weights cannot be loaded ({str(exc).splitlines()[0]})") from None
    return model


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

    The config, the metadata and every weight's key and shape are checked before the network is
    built (:func:`checkpoint_config`, :func:`checkpoint_weights`; for an ensemble, each member's),
    so a damaged or edited file gives one message naming it, never a traceback or a huge allocation.

    Returns:
        ``(model, meta, config)``.
    """
    from cxrloc.calibration import Calibration
    from cxrloc.rundir import calibration_for_checkpoint, resolve_checkpoint, thresholds_for_checkpoint
    from cxrloc.thresholds import Thresholds

    ckpt_path = resolve_checkpoint(path, fold=fold, which=which)
    state = load_checkpoint(ckpt_path, map_location="cpu")
    cfg = checkpoint_config(state, ckpt_path)
    cfg.init = "scratch"  # weights come from the checkpoint, never from the network
    meta = checkpoint_meta(state, ckpt_path, cfg)
    model: torch.nn.Module
    if "ensemble" in state:  # written by `cxrloc ensemble`: one network per member, outputs averaged
        from cxrloc.model.ensemble import EnsembleNet

        entries = state["ensemble"]
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise _damaged(ckpt_path, "its ensemble entry is not a list of members")
        model = EnsembleNet([_build_checked(e, ckpt_path) for e in entries])
    else:
        model = _build_checked(state, ckpt_path, cfg)
    chosen = thresholds_for_checkpoint(ckpt_path, thresholds_file)
    if chosen is not None:
        thresholds = Thresholds.load(chosen)
        model.thresholds.set(thresholds)
        meta["thresholds"] = thresholds.to_json()
        meta["thresholds_source"] = str(chosen)
    elif "ensemble" in state and meta.get("thresholds"):
        model.thresholds.set(Thresholds.from_json(meta["thresholds"], classes=cfg.classes))
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
