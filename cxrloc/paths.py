"""The output-path guard of every command: never write over an input, never replace a stranger's file.

Every command that writes a file or a folder the user names calls :class:`OutputGuard` before long
work. An output is refused when

* it is one of the command's inputs (the model, the checkpoint a run folder resolves to, an image,
  a table, a prepared folder), whatever ``--overwrite`` says: reading and replacing one file in
  one command is never what was meant (``export RUN --out RUN/fold_0/checkpoints/best.pt``);
* it is an existing file that cxrloc did not write (:func:`made_by_cxrloc` recognises its own
  outputs by their content), unless the user passed ``--overwrite``. Outputs cxrloc wrote are
  replaced freely, so running a command again just refreshes them.

A folder output (``--out-dir``, ``--out`` of ``prepare``/``train``/``demo``/``ensemble``) is refused
when it is one of the inputs; the files the command writes into it are checked one by one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from cxrloc.utils import CxrlocError

MARKER = "cxrloc"
"""Written into the PNG ``Software`` text chunk and the JPEG comment of every overlay."""

_JSON_SNIFF_BYTES = 64 << 20
"""A JSON output larger than this is not parsed to recognise it (treated as not ours)."""


def _key(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` name the same file or folder (links and ``..`` resolved; hard links too)."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return _key(a) == _key(b)


def made_by_cxrloc(path: str | os.PathLike[str]) -> bool:
    """Whether the existing file ``path`` is an output cxrloc writes, recognised by its content
    (whatever its name's extension).

    JSON records and summaries of ``predict`` (``model`` + ``backend`` keys), ONNX files of
    ``export`` (cxrloc metadata), overlays (the ``cxrloc`` marker in the PNG text / JPEG comment),
    maps (a float32 ``.npy`` array of 3 axes) and every JSON of a run or prepared folder that
    cxrloc writes at a fixed name are recognised; anything else is not.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
        if head.startswith((b"\x89PNG", b"\xff\xd8")):
            from PIL import Image

            with Image.open(path) as im:
                info = im.info
                return info.get("Software") == MARKER or info.get("comment") in (MARKER, MARKER.encode())
        if head.startswith(b"\x93NUMPY"):
            import numpy as np

            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return arr.dtype == np.float32 and arr.ndim == 3
        if head.lstrip()[:1] == b"{":
            if path.stat().st_size > _JSON_SNIFF_BYTES:
                return False
            data = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(data, dict) and "model" in data and "backend" in data
        if path.suffix.lower() == ".onnx":
            import onnx

            proto = onnx.load(str(path), load_external_data=False)
            return any(p.key == "format" and "cxrloc" in p.value for p in proto.metadata_props)
    except Exception:  # unreadable, malformed, not what it claims: not ours
        return False
    return False


class OutputGuard:
    """Checks the outputs of one command against its inputs and the files already on disk.

    Args:
        inputs: the command's input files and folders (``None`` entries are ignored).
        overwrite: the user's ``--overwrite``: replace existing files cxrloc did not write.

    Example:
        >>> guard = OutputGuard([model_path, image_path], overwrite=False)  # doctest: +SKIP
        >>> guard.file(json_path, "--json")  # doctest: +SKIP
    """

    def __init__(self, inputs: Iterable[str | os.PathLike[str] | None] = (), *, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self.inputs: list[Path] = []
        self.add_inputs(inputs)

    def add_inputs(self, inputs: Iterable[str | os.PathLike[str] | None]) -> None:
        """Add more inputs (e.g. the checkpoint a run folder resolved to)."""
        self.inputs.extend(Path(p) for p in inputs if p is not None and str(p) != "")

    def _input_of(self, path: Path) -> Path | None:
        if not os.path.lexists(path):
            return None
        return next((i for i in self.inputs if os.path.lexists(i) and same_file(path, i)), None)

    def folder(self, path: str | os.PathLike[str], what: str) -> Path:
        """Check the output folder ``path`` (``what``: the option, e.g. ``"--out-dir"``).

        Raises:
            CxrlocError: ``path`` is one of the inputs.
        """
        path = Path(path)
        hit = self._input_of(path)
        if hit is not None:
            raise CxrlocError(f"{what} {path} is one of this command's inputs ({hit}); choose another folder")
        return path

    def file(self, path: str | os.PathLike[str], what: str) -> Path:
        """Check the output file ``path`` (``what``: the option or the output's name).

        Raises:
            CxrlocError: ``path`` is one of the inputs, or an existing file cxrloc did not write
                and ``--overwrite`` was not given.
        """
        path = Path(path)
        hit = self._input_of(path)
        if hit is not None:
            raise CxrlocError(
                f"{what} {path} is one of this command's inputs ({hit}); writing it would destroy it: "
                "choose another output path"
            )
        if not self.overwrite and os.path.isfile(path) and not made_by_cxrloc(path):
            raise CxrlocError(
                f"{what} {path} exists and was not written by cxrloc; pass --overwrite to replace it, "
                "or choose another output path"
            )
        return path

    def is_input(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is one of the inputs."""
        return self._input_of(Path(path)) is not None
