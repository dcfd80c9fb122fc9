"""Checkpoint files: what a run saves, and how every command loads a model back.

A checkpoint is a ``dict`` that ``torch.load(weights_only=True)`` can read (tensors and
plain Python types only). Keys:

- ``format``: ``"cxrloc-checkpoint"``; ``version``: the cxrloc version that wrote it.
- ``config``: the fully resolved :class:`cxrloc.config.Config` as a dict.
- ``model``: the model's ``state_dict`` (threshold buffers included).
- ``meta``: what inference needs, see :func:`make_meta`.
- training state, when saved by ``train``: ``optimizer``, ``scheduler``, ``scaler``,
  ``rng``, ``epoch``, ``best_metric``, ``history``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
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


def make_meta(cfg: Config, thresholds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Inference metadata carried by every checkpoint and ONNX file."""
    return {
        "classes": list(CLASSES),
        "image_size": cfg.image_size,
        "patch_grid": cfg.patch_grid,
        "normalisation": dict(NORMALISATION),
        "thresholds": thresholds,
        "version": __version__,
        "arch": cfg.arch,
        "crf": cfg.crf,
        "antialias": cfg.antialias,
        "loss": cfg.loss,
    }


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temporary name, then rename)."""
    state = {"format": FORMAT, "version": __version__, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


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
        try:
            first = paths[0]
            self._to_place(first, lambda tmp: torch.save(state, tmp))
            for other in paths[1:]:
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
        raise CxrlocError(f"Cannot read checkpoint {path}: {exc}. Is it a cxrloc checkpoint?") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CxrlocError(f"{path} is not a cxrloc checkpoint (no '{FORMAT}' marker).")
    return state


def resolve_checkpoint(path: str | os.PathLike[str], fold: int | None = None, which: str = "best") -> Path:
    """Find the checkpoint meant by a run folder, a fold folder or a ``.pt`` file.

    ``RUN_DIR`` with a single ``fold_K`` uses it; with several, ``fold`` must be given.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CxrlocError(f"No run folder or checkpoint at {path}.")
    if (path / "checkpoints").is_dir():
        ckpt = path / "checkpoints" / f"{which}.pt"
        if not ckpt.is_file():
            raise CxrlocError(f"{ckpt} does not exist: has training finished an epoch in {path}?")
        return ckpt
    folds = sorted(p for p in path.glob("fold_*") if (p / "checkpoints").is_dir())
    if fold is not None:
        return resolve_checkpoint(path / f"fold_{fold}", which=which)
    if len(folds) == 1:
        return resolve_checkpoint(folds[0], which=which)
    if not folds:
        raise CxrlocError(f"{path} holds no trained fold (no fold_*/checkpoints). Run 'cxrloc train' first.")
    names = ", ".join(p.name for p in folds)
    raise CxrlocError(f"{path} holds several folds ({names}); pick one with --fold N.")


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    fold: int | None = None,
    which: str = "best",
) -> tuple[torch.nn.Module, dict[str, Any], Config]:
    """Load a trained model in eval mode from a run folder or checkpoint file.

    When the checkpoint's fold folder holds a ``thresholds.json`` (written by
    ``cxrloc fit-thresholds``), those thresholds replace the ones saved in the
    checkpoint, in the model's buffers and in ``meta["thresholds"]``, so that
    ``predict``, ``evaluate`` and ``export`` all use the fitted values.

    Returns:
        ``(model, meta, config)``.
    """
    from cxrloc.model.net import build_model

    ckpt_path = resolve_checkpoint(path, fold=fold, which=which)
    state = load_checkpoint(ckpt_path, map_location="cpu")
    cfg = Config.from_dict(state["config"])
    cfg.init = "scratch"  # weights come from the checkpoint, never from the network
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    meta = dict(state["meta"])
    fitted = ckpt_path.parent.parent / "thresholds.json"
    if ckpt_path.parent.name == "checkpoints" and fitted.is_file():
        from cxrloc.thresholds import Thresholds

        thresholds = Thresholds.load(fitted)
        model.thresholds.set(thresholds)
        meta["thresholds"] = thresholds.to_json()
        meta["thresholds_source"] = str(fitted)
    model.to(device).eval()
    return model, meta, cfg
