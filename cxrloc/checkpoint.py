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

import errno
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from cxrloc import __version__
from cxrloc.config import Config
from cxrloc.utils import CxrlocError, OutputError, atomic_path, os_error_message

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


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temporary name, then rename)."""
    state = {"format": FORMAT, "version": __version__, **state}
    with atomic_path(path) as tmp:
        torch_save(state, tmp)
    return Path(path)


def torch_save(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` into ``path`` through a Python file object, so that a failed write is the ``OSError``
    it is (``ENOSPC`` for a full disk), which the caller turns into its one-line message.

    Given a file name, PyTorch's zip writer reports a full disk as ``RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos ...``; should such an error still come, it becomes
    ``OSError(ENOSPC)`` when the disk has (almost) no space left, else ``OSError(EIO)``.
    """
    try:
        with open(path, "wb") as fh:
            torch.save(state, fh)
    except RuntimeError as exc:
        text = str(exc)
        if not any(s in text for s in ("unexpected pos", "write failed", "PytorchStreamWriter", "enforce fail")):
            raise
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = 0
        code = errno.ENOSPC if free < DISK_FULL_BYTES else errno.EIO
        raise OSError(code, os.strerror(code)) from None


DISK_FULL_BYTES = 64 << 20
"""Free space below which a failed checkpoint write is reported as a full disk."""


def _cpu_snapshot(value: Any) -> Any:
    """A copy of ``value`` whose tensors are detached CPU copies (training may change the originals)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_snapshot(v) for v in value)
    return value


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time and in order, so training goes on meanwhile.

    :meth:`submit` takes a CPU snapshot of the state at once (so later training steps cannot change
    what is written), waits for the previous write, and writes the snapshot to the first path
    atomically (temporary name, then rename, as :func:`save_checkpoint`); every further path becomes
    the same file (a hard link, or a copy where links are not possible), renamed into place too.
    Errors of a write are raised by the next :meth:`submit`, :meth:`wait` or leaving the ``with`` block,
    which waits for the last write.

    Example:
        >>> with CheckpointWriter() as writer:  # doctest: +SKIP
        ...     writer.submit([run / "best.pt", run / "last.pt"], state)
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_path: Path | None = None
        """The file being written when the error happened, for the message."""
        umask = os.umask(0)  # read here, in the caller's thread: the writer thread never changes it
        os.umask(umask)
        self._mode = 0o666 & ~umask

    def submit(self, paths: Sequence[str | os.PathLike[str]], state: dict[str, Any]) -> None:
        """Snapshot ``state`` and write it to ``paths`` in the background."""
        if not paths:
            raise ValueError("CheckpointWriter.submit needs at least one path")
        snapshot = {"format": FORMAT, "version": __version__, **_cpu_snapshot(state)}
        self.wait()
        self._thread = threading.Thread(
            target=self._write, args=([Path(p) for p in paths], snapshot), name="cxrloc-checkpoint", daemon=True
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until the last write is on disk; raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, OSError):  # disk full, read-only...: one clear message, as every write
                raise OutputError(os_error_message(error, error.filename or self._error_path, "checkpoint")) from None
            raise error

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.wait()
        elif self._thread is not None:  # already failing: finish the write, keep the first error
            self._thread.join()
            self._thread = None

    def _write(self, paths: list[Path], state: dict[str, Any]) -> None:
        self._error_path = paths[0]
        try:
            first = paths[0]
            self._to_place(first, lambda tmp: torch_save(state, tmp))
            for other in paths[1:]:
                self._error_path = other
                self._to_place(other, lambda tmp, src=first: _link_or_copy(src, tmp))
        except BaseException as exc:  # reported to the training thread
            self._error = exc

    def _to_place(self, path: Path, fill: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            fill(tmp)
            os.chmod(tmp, self._mode)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _link_or_copy(src: Path, tmp: Path) -> None:
    """Make ``tmp`` (an existing empty file) the same content as ``src``: a hard link, else a copy."""
    tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)


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
