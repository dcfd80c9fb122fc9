"""What ``predict`` reads: input files from paths, folders and patterns, and their preprocessing."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrloc.data.imageio import (
    IMAGE_EXTENSIONS,
    looks_like_dicom,
    not_regular_message,
    resize_square,
    special_file_kind,
    to_uint8,
)
from cxrloc.data.prepared import to_network_range


def preprocess_u8(img: np.ndarray, image_size: int) -> np.ndarray:
    """The training cache's uint8 image (S, S) of a ``read_image`` array (what the domain check measures)."""
    return to_uint8(resize_square(img, image_size))


def preprocess(img: np.ndarray, image_size: int) -> np.ndarray:
    """The training cache's preprocessing of a ``read_image`` array: (1, S, S) float32 in [-1, 1]."""
    return to_network_range(preprocess_u8(img, image_size))[None]



def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Turn files, folders (searched recursively) and glob patterns into image files.

    Only regular files are taken: a FIFO, socket or device (by name or with an image extension
    in a folder) is reported, never opened.

    Returns:
        ``(files, problems)``: the sorted unique files, and ``(input, message)`` for each input
        that matched nothing or is not a regular file.
    """
    files: list[Path] = []
    problems: list[tuple[str, str]] = []

    def add_dir(d: Path) -> int:
        found = []
        for p in sorted(d.rglob("*")):
            if p.name.startswith(".") or not (
                p.suffix.lower() in IMAGE_EXTENSIONS or (p.suffix == "" and p.is_file() and looks_like_dicom(p))
            ):
                continue
            if p.is_file():
                found.append(p)
            elif (kind := special_file_kind(p)) is not None:
                problems.append((str(p), not_regular_message(p, kind)))
        files.extend(found)
        return len(found)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if add_dir(path) == 0:
                problems.append((item, f"{item}: folder holds no PNG, JPEG or DICOM file"))
        elif path.is_file():
            files.append(path)  # an explicit file is always tried, whatever its extension
        elif (kind := special_file_kind(path)) is not None:
            problems.append((item, not_regular_message(item, kind)))
        elif any(ch in item for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            matched = 0
            for m in matches:
                if m.is_dir():
                    matched += add_dir(m)
                elif m.is_file():
                    files.append(m)
                    matched += 1
                elif (kind := special_file_kind(m)) is not None:
                    problems.append((str(m), not_regular_message(m, kind)))
            if matched == 0:
                problems.append((item, f"{item}: pattern matches no image file"))
        elif os.path.islink(path):
            problems.append((item, f"{item}: a symbolic link that leads nowhere (a loop, or its target is missing)"))
        else:
            problems.append((item, f"{item}: no such file or folder"))
    seen: set[Path] = set()
    unique: list[Path] = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, problems


SUMMARY_NAME = "predictions"
"""Stem of the batch summary ``predictions.json`` in ``--out-dir``: no image output may take it."""


def output_names(files: Sequence[Path], reserved: Sequence[str] = (SUMMARY_NAME,)) -> list[str]:
    """Output names of the inputs in ``--out-dir``: unique, and never one of ``reserved``.

    A name is the input's path relative to the inputs' common folder, without its extension, in
    POSIX form (``scans/a/x.png`` and ``scans/b/x.png`` -> ``a/x`` and ``b/x``; outputs go to
    ``OUT/a/x.json`` ...). Inputs whose names would coincide (``x.png`` and ``x.dcm``, compared
    ignoring case for file systems that do) or take a reserved name (``predictions.png`` would
    write ``predictions.json``, the batch summary) keep their extension instead (``x.png``,
    ``x.dcm``, ``predictions.png``). Distinct files have distinct relative paths, so the names are
    unique; as every output is ``NAME`` + a fixed suffix (``.json``, ``.overlay.png``,
    ``.maps.npy``), no two outputs collide. Names that differ only in case get ``~2``, ``~3``.
    """
    if not files:
        return []
    absolute = [Path(os.path.abspath(f)) for f in files]
    try:
        root: Path | None = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    except ValueError:  # no common folder (different drives)
        root = None
    full = [(p.relative_to(root) if root is not None else Path(*p.parts[1:])).as_posix() for p in absolute]
    names = [f[: -len(p.suffix)] if p.suffix and p.stem else f for f, p in zip(full, absolute, strict=True)]
    taken_reserved = {r.casefold() for r in reserved}
    while True:
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name.casefold(), []).append(i)
        clash = [
            i
            for key, idx in groups.items()
            if len(idx) > 1 or key in taken_reserved
            for i in idx
            if names[i] != full[i]
        ]
        if not clash:
            break
        for i in clash:
            names[i] = full[i]
    used: set[str] = set(taken_reserved)
    for i, name in enumerate(names):
        candidate, n = name, 1
        while candidate.casefold() in used:
            n += 1
            candidate = f"{name}~{n}"
        used.add(candidate.casefold())
        names[i] = candidate
    return [fit_name(n) for n in names]


LONGEST_OUTPUT_SUFFIX = ".overlay.png"
"""The longest suffix ``predict`` adds to an output name (``.json``, ``.maps.npy`` are shorter)."""

NAME_MAX = 255
"""Bytes in one file name on common file systems (ext4, XFS, APFS, NTFS in UTF-16 units)."""


def fit_name(name: str, limit: int = NAME_MAX) -> str:
    """``name`` (``a/b/stem``) with its last part shortened so that it plus any output suffix fits ``limit`` bytes.

    A last part that is too long keeps its first bytes and gets ``~`` and 12 hex digits of its
    SHA-1, so two long names sharing their first 230 bytes still give distinct outputs.
    """
    head, _, last = name.rpartition("/")
    room = limit - len(LONGEST_OUTPUT_SUFFIX.encode())
    raw = last.encode("utf-8", "surrogateescape")
    if len(raw) <= room:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:12]
    short = raw[: room - len(digest) - 1].decode("utf-8", "ignore") + "~" + digest
    return f"{head}/{short}" if head else short
