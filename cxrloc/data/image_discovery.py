"""Where ``prepare`` finds a table's images: any folder below one or several roots, matched by
stem (``x.png`` listed, ``x.dcm`` on disk), following links, each folder once."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from cxrloc.data.imageio import IMAGE_EXTENSIONS


def _stem_key(name: str) -> str | None:
    """The lookup key of an image file name: its stem when the extension is an image one, else None."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or "." + ext.lower() not in IMAGE_EXTENSIONS:
        return None
    return stem


def _walk(root: Path, seen: set[tuple[int, int]]) -> Iterator[tuple[Path, list[str]]]:
    """``(folder, sorted file names)`` below ``root``, following symbolic links.

    Folders are identified by (device, inode), so a link loop or a folder reached twice (through
    a link, or because it was also given as another root) is visited once.
    """
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames.sort()
        yield Path(dirpath), sorted(filenames)


def find_images(
    roots: Path | Sequence[Path], wanted: set[str]
) -> tuple[dict[str, Path], int, list[str]]:
    """Map each wanted image name to a file anywhere below ``roots``, matching by stem.

    A name listed as ``00000001_000.png`` is found as ``00000001_000.png``, ``.jpg``, ``.jpeg``,
    ``.dcm`` or ``.dicom`` (any case), in any folder below any root: users convert and compress
    datasets, and the NIH download itself comes as twelve folders. A name with folders,
    ``tb/tb0005.png`` (tables of other datasets, COCO's ``file_name``), is found at that path below
    a root, again by stem (``tb/tb0005.dcm``): DICOM archives reuse file names in every folder.
    Symbolic links are followed; every folder is visited once. Names from the tables are only
    compared with names found on disk, never joined to a path.

    Returns:
        (wanted name -> path, number of image files matching no wanted name, wanted names found
        more than once). With several candidates the file whose name is exactly the wanted one
        wins, else the first in root order, then sorted walk order.
    """
    roots = [roots] if isinstance(roots, Path | str) else list(roots)
    by_stem: dict[str, str] = {}
    by_path: dict[str, str] = {}
    for name in wanted:
        head, slash, tail = name.rpartition("/")
        if slash:
            by_path.setdefault(f"{head}/{_stem_key(tail) or tail}", name)
        else:
            by_stem.setdefault(_stem_key(name) or name, name)
    found: dict[str, Path] = {}
    exact: set[str] = set()
    unlisted = 0
    duplicates: set[str] = set()
    seen: set[tuple[int, int]] = set()
    for root in roots:
        for folder, filenames in _walk(Path(root), seen):
            rel = folder.relative_to(root).as_posix() if by_path else "."
            for fname in filenames:
                key = _stem_key(fname)
                here = fname
                target = by_stem.get(key) if key is not None else by_stem.get(fname)
                if target is None and fname in wanted:
                    target = fname
                if target is None and rel != ".":
                    here = f"{rel}/{fname}"
                    target = by_path.get(f"{rel}/{key if key is not None else fname}")
                if target is None:
                    if key is not None:
                        unlisted += 1
                    continue
                if target in found:
                    duplicates.add(target)
                    if here == target and target not in exact:
                        found[target] = folder / fname  # the exact name beats a converted copy
                        exact.add(target)
                    continue
                found[target] = folder / fname
                if here == target:
                    exact.add(target)
    return found, unlisted, sorted(duplicates)

