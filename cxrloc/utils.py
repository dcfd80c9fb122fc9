"""Small shared helpers: the console, user errors, atomic writes, JSON reading, progress bars."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Nothing half-written is ever visible under the final name: on an exception
    the temporary file is removed and ``path`` is left as it was.

    Example:
        >>> with atomic_path("out.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (sorted keys off, trailing newline)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


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
    return Progress(*columns, console=console, disable=not enabled, transient=transient)
