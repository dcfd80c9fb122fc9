"""Small shared helpers: the console, user errors, atomic writes, JSON reading, progress bars."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
"""Console for progress and messages (stderr, so stdout stays machine-readable)."""


class CxrlocError(Exception):
    """An error caused by the user's input; the CLI prints its message without a traceback."""


class OutputError(CxrlocError):
    """An output could not be written (disk full, read-only folder, bad path); the message says which and why."""


_WRITE_REASONS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("disk full (no space left on the device)", "free some space or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "choose a folder on a writable disk"),
    errno.EACCES: ("permission denied", "choose a folder you may write to, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you may write to, or change its permissions"),
    errno.ENAMETOOLONG: ("the name is too long for the file system", "choose a shorter name"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "remove that file or choose another path"),
    errno.EISDIR: ("a folder of that name exists", "give a file name, not a folder"),
    errno.EEXIST: ("a file of that name exists where a folder is needed", "remove it or choose another path"),
}
"""errno -> (what happened, what to do), for the one-line messages of failed writes."""


def os_error_message(exc: OSError, path: str | os.PathLike[str] | None = None, what: str = "output") -> str:
    """One line for an ``OSError`` met while writing ``path``: the file, what happened, what to do.

    Args:
        exc: the error.
        path: the output being written (default: the file named by the error).
        what: what the output is, for the message (e.g. ``"prepared folder"``, ``"overlay"``).
    """
    target = path if path is not None else (exc.filename or "")
    reason, hint = _WRITE_REASONS.get(exc.errno or -1, (exc.strerror or str(exc), "check the path and the disk"))
    culprit = f" ({exc.filename})" if exc.filename and path is not None and str(exc.filename) != str(path) else ""
    return f"cannot write {what} {target}{culprit}: {reason}; {hint}"


def write_error(exc: OSError, path: str | os.PathLike[str] | None = None, what: str = "output") -> OutputError:
    """The :class:`OutputError` for an ``OSError`` met while writing ``path`` (see :func:`os_error_message`)."""
    return OutputError(os_error_message(exc, path, what))


_TMP_NAME_KEEP = 80
"""Characters of the final name kept in a temporary name (a long final name must not make the
temporary one exceed the file system's limit when the final one fits)."""


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _nearest_existing(path: Path) -> Path:
    # os.path.exists, unlike Path.exists, says False (not raises) for a name too long.
    path = Path(os.path.abspath(path))
    while not os.path.exists(path) and path != path.parent:
        path = path.parent
    return path


def _check_name_lengths(path: Path, what: str) -> None:
    limit = _name_max(_nearest_existing(path))
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise OutputError(
                f"cannot write {what} {str(path)[:80]}...: the name {part[:40]!r}... is too long ({size} bytes; the "
                f"file system allows {limit}); choose a shorter name"
            )


def check_writable_dir(path: str | os.PathLike[str], what: str = "output folder", *, need_bytes: int = 0) -> Path:
    """Check, before long work, that the folder ``path`` can be created (if absent) and written to.

    Nothing is created: a probe file is made in the nearest existing folder and removed at once.

    Args:
        path: the folder the command will write into.
        what: what it is, for the message (e.g. ``"--out"``, ``"run folder"``).
        need_bytes: fail now when the disk has less free space than this.

    Raises:
        OutputError: ``path`` is a file, a name in it is too long, its nearest existing folder
            cannot be written (read-only, permission) or the disk lacks ``need_bytes``.
    """
    path = Path(path)
    _check_name_lengths(path, what)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{what} {path} is a file, not a folder; remove it or choose another path")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputError(
            f"cannot create {what} {path}: {base} is a file, not a folder; remove it or choose another path"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".cxrloc-write-check.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise write_error(exc, path, what) from None
    if need_bytes > 0:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise OutputError(
                f"cannot write {what} {path}: disk full: it needs about {need_bytes / 1e9:.2f} GB and "
                f"{base} has {free / 1e9:.2f} GB free; free some space or write to another disk"
            )
    return path


def check_writable_file(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Check, before long work, that the file ``path`` can be written (its folder too; not a folder itself).

    Raises:
        OutputError: as :func:`check_writable_dir`, or ``path`` is an existing folder.
    """
    path = Path(path)
    _check_name_lengths(path, what)
    if os.path.isdir(path):
        raise OutputError(f"{what} {path} is a folder; give a file name")
    check_writable_dir(path.parent, f"folder of {what}")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Nothing half-written is ever visible under the final name: on an exception
    the temporary file is removed and ``path`` is left as it was. An ``OSError`` (disk full,
    read-only folder, a folder in the way, a name too long) becomes one :class:`OutputError`
    naming ``path`` and ``what``.

    Example:
        >>> with atomic_path("out.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(path):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name[:_TMP_NAME_KEEP]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(exc, path, what) from None
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise write_error(exc, path, what) from None
        raise


def remove_stale_temporaries(folder: str | os.PathLike[str], names: Sequence[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` for ``names`` (after a kill).

    Only files named ``.{name}.XXXXXXXX.tmp`` for one of ``names`` are removed; returns them.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for name in names:
        for tmp in folder.glob(f".{glob.escape(name[:_TMP_NAME_KEEP])}.*.tmp"):
            if tmp.is_file():
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    removed.append(tmp)
    return removed


def write_text_atomic(path: str | os.PathLike[str], text: str, *, what: str = "output") -> Path:
    """Write ``text`` to ``path`` atomically and return the path (``what`` names it in errors)."""
    with atomic_path(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_texts_atomic(texts: Mapping[str | os.PathLike[str], str], *, what: str = "output") -> list[Path]:
    """Write several text files as a set: every file goes to a temporary name first, and only when
    all are written are they renamed onto their names. A failure while writing any of them (disk
    full, a folder in the way) leaves every one of the files as it was; returns the paths."""
    paths = [Path(p) for p in texts]
    with contextlib.ExitStack() as stack:
        for path, text in zip(paths, texts.values(), strict=True):
            stack.enter_context(atomic_path(path, what)).write_text(text, encoding="utf-8")
    return paths


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, what: str = "output") -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (sorted keys off, trailing newline)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n", what=what)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | os.PathLike[str], what: str, hint: str = "") -> Any:
    """Read a JSON file, turning a missing, unreadable or malformed file into one clear ``CxrlocError``.

    Args:
        path: the file.
        what: what the file is, for the message (e.g. ``"splits"``, ``"run.json"``).
        hint: what to do about it, appended to the message.
    """
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if not path.is_file():
        raise CxrlocError(f"{path}: {what} not found{tail}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CxrlocError(f"{path}: cannot read {what} ({exc}){tail}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CxrlocError(f"{path}: {what} is not valid JSON ({exc}){tail}") from None


def progress_bar(
    *, enabled: bool = True, info: bool = False, elapsed: bool = False, transient: bool = False
) -> Progress:
    """The one progress-bar layout of every command: description, bar, done/total, time.

    Args:
        enabled: show it (``False``: a silent bar with the same API).
        info: a free text column, set with ``bar.update(task, info=...)``.
        elapsed: show the elapsed time instead of the time remaining.
        transient: remove the bar when done.
    """
    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns.append(TimeElapsedColumn() if elapsed else TimeRemainingColumn())
    # A transient bar leaves nothing behind, except, on a console that is not a terminal (a log file, a
    # pipe), the blank line rich prints when it stops: there, it is not shown at all.
    disable = not enabled or (transient and not console.is_terminal)
    return Progress(*columns, console=console, disable=disable, transient=transient)
