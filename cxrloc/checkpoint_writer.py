"""Writing checkpoint files: the format marker, an atomic :func:`save_checkpoint`, :class:`CheckpointWriter`
(background writes while training goes on) and :func:`torch_save` (a full disk reported as one).

``cxrloc.checkpoint`` re-exports every public name of this module; what a checkpoint holds is
described there.
"""

from __future__ import annotations

import errno
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
from cxrloc.utils import OutputError, atomic_path, os_error_message

FORMAT = "cxrloc-checkpoint"
"""The marker in every checkpoint's ``format`` key (:func:`cxrloc.checkpoint.load_checkpoint` checks it)."""


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
