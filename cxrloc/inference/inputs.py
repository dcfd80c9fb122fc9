"""What ``predict`` reads: input files from paths, folders and patterns, and their preprocessing."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrloc.data.imageio import IMAGE_EXTENSIONS, looks_like_dicom, resize_square, to_uint8
from cxrloc.data.prepared import to_network_range


def preprocess(img: np.ndarray, image_size: int) -> np.ndarray:
    """The training cache's preprocessing of a ``read_image`` array: (1, S, S) float32 in [-1, 1]."""
    return to_network_range(to_uint8(resize_square(img, image_size)))[None]



def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Turn files, folders (searched recursively) and glob patterns into image files.

    Returns:
        ``(files, problems)``: the sorted unique files, and ``(input, message)`` for each input
        that matched nothing.
    """
    files: list[Path] = []
    problems: list[tuple[str, str]] = []

    def add_dir(d: Path) -> int:
        found = [
            p for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
            and (p.suffix.lower() in IMAGE_EXTENSIONS or (p.suffix == "" and looks_like_dicom(p)))
        ]
        files.extend(found)
        return len(found)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if add_dir(path) == 0:
                problems.append((item, f"{item}: folder holds no PNG, JPEG or DICOM file"))
        elif path.exists():
            files.append(path)  # an explicit file is always tried, whatever its extension
        elif any(ch in item for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            matched = 0
            for m in matches:
                if m.is_dir():
                    matched += add_dir(m)
                elif m.is_file():
                    files.append(m)
                    matched += 1
            if matched == 0:
                problems.append((item, f"{item}: pattern matches no image file"))
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


def unique_stems(files: Sequence[Path]) -> list[str]:
    """Output names: the file's stem, made unique with ``_2``, ``_3`` ... when two files share it."""
    used: dict[str, int] = {}
    names: list[str] = []
    for f in files:
        stem = f.stem or f.name
        n = used.get(stem, 0) + 1
        used[stem] = n
        names.append(stem if n == 1 else f"{stem}_{n}")
    return names
