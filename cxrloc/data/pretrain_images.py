"""The images of ``cxrloc pretrain``: every image file below some folders, decoded once into a uint8 cache.

No table lists these images: every PNG, JPEG or DICOM file below the folders is taken (by its
extension, or an extensionless file that starts like a DICOM file), read with the readers of
``cxrloc prepare`` (:func:`cxrloc.data.imageio.read_image_u8`: grey, area-resized to a square,
quantised) and stored in one ``(N, S, S)`` uint8 file, so that training epochs never decode an
image again. A file that cannot be read is skipped with a warning and listed in the cache's
``skipped.txt``; the run stops only when no image at all can be read.

Cache folder layout::

    images.u8     (N, S, S) uint8, the readable images in sorted path order
    index.json    size, the source files (path, bytes, mtime), which entries were kept
    skipped.txt   one line per unreadable file: its reason (path first)

``index.json`` is written last: a cache without it (an interrupted fill) is rebuilt, and one whose
sources changed (a file added, removed or rewritten, another size) is rebuilt too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.markup import escape

from cxrloc.data.imageio import IMAGE_EXTENSIONS, ImageReadError, looks_like_dicom, read_image_u8
from cxrloc.utils import (
    CxrlocError,
    atomic_path,
    check_writable_dir,
    console,
    progress_bar,
    read_json,
    write_json_atomic,
    write_text_atomic,
)

INDEX_VERSION = 1


def find_pretrain_images(roots: Sequence[str | os.PathLike[str]], max_images: int = 0, seed: int = 0) -> list[Path]:
    """Every image file below ``roots``, in sorted order (roots in the order given).

    Symbolic links are followed; a folder reached twice (a link loop, nested roots) is visited
    once. Hidden files (``.name``) are left out. With ``max_images > 0``, a seeded random sample of
    that many files is kept (in the same order), for quick trials and tests.

    Raises:
        CxrlocError: a root is not a folder, or no image file is found.
    """
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise CxrlocError(f"{root}: image folder not found; pass folders that hold PNG, JPEG or DICOM files")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith("."):
                    continue
                ext = os.path.splitext(name)[1].lower()
                if ext in IMAGE_EXTENSIONS or (not ext and looks_like_dicom(path)):
                    found.append(path)
    if not found:
        where = ", ".join(str(r) for r in roots)
        raise CxrlocError(
            f"{where}: no image file found (looked for {', '.join(IMAGE_EXTENSIONS)} and extensionless DICOM "
            "files in every subfolder)"
        )
    if 0 < max_images < len(found):
        keep = np.sort(np.random.default_rng(seed).choice(len(found), size=max_images, replace=False))
        found = [found[i] for i in keep]
    return found


@dataclass
class ImageCache:
    """The decoded images: ``images`` ``(N, S, S)`` uint8 (a read-only memmap) and their source files."""

    images: np.ndarray
    paths: list[Path]
    skipped: list[str]
    folder: Path

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def fingerprint(self) -> str:
        """A hash of the cached image list and size (a resumed run must train on the same images)."""
        text = "\n".join(str(p) for p in self.paths) + f"\n{self.size}"
        return hashlib.sha256(text.encode()).hexdigest()


def _sources(paths: Sequence[Path], size: int) -> dict[str, object]:
    files = []
    for p in paths:
        st = p.stat()
        files.append([str(p), int(st.st_size), int(st.st_mtime_ns)])
    return {"version": INDEX_VERSION, "size": size, "files": files}


def _load_existing(folder: Path, sources: dict[str, object]) -> ImageCache | None:
    index_path = folder / "index.json"
    if not index_path.is_file():
        return None
    try:
        index = read_json(index_path, "pretraining cache index")
    except CxrlocError:
        return None
    if not isinstance(index, dict) or {k: index.get(k) for k in sources} != sources:
        return None
    kept = index.get("kept")
    size = int(sources["size"])  # type: ignore[call-overload]
    images_path = folder / "images.u8"
    if not isinstance(kept, list) or not images_path.is_file():
        return None
    if images_path.stat().st_size != len(kept) * size * size or not kept:
        return None
    files = sources["files"]
    paths = [Path(files[i][0]) for i in kept]  # type: ignore[index]
    images = np.memmap(images_path, dtype=np.uint8, mode="r", shape=(len(kept), size, size))
    skipped = [str(s) for s in index.get("skipped", [])]
    return ImageCache(images, paths, skipped, folder)


def build_cache(
    paths: Sequence[Path], folder: str | os.PathLike[str], size: int, *, progress: bool = True
) -> ImageCache:
    """Decode ``paths`` into ``folder`` at ``size`` x ``size`` (or reuse the cache there when it matches).

    Unreadable files are skipped, each with its reason in ``skipped.txt`` and a warning naming the
    first ones and their count.

    Raises:
        CxrlocError: no file can be read, or the folder cannot be written.
    """
    folder = Path(folder)
    sources = _sources(paths, size)
    cache = _load_existing(folder, sources)
    if cache is not None:
        if progress:
            console.print(f"Using the image cache {folder} ({len(cache.paths)} images, {size} px)")
        _warn_skipped(cache.skipped, len(paths), folder)
        return cache
    check_writable_dir(folder, "pretraining cache", need_bytes=len(paths) * size * size)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").unlink(missing_ok=True)
    kept: list[int] = []
    skipped: list[str] = []
    with atomic_path(folder / "images.u8", "pretraining cache") as tmp:
        with open(tmp, "wb") as fh, progress_bar(enabled=progress) as bar:
            task = bar.add_task("cache", total=len(paths))
            for i, path in enumerate(paths):
                try:
                    pixels = read_image_u8(path, size)
                except ImageReadError as exc:
                    skipped.append(str(exc))
                else:
                    fh.write(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
                    kept.append(i)
                bar.advance(task)
    write_text_atomic(folder / "skipped.txt", "".join(f"{s}\n" for s in skipped), what="pretraining cache")
    if not kept:
        raise CxrlocError(
            f"none of the {len(paths)} image files could be read (first: {skipped[0]}); "
            f"every reason is in {folder / 'skipped.txt'}"
        )
    write_json_atomic(folder / "index.json", {**sources, "kept": kept, "skipped": skipped}, indent=None,
                      what="pretraining cache")
    _warn_skipped(skipped, len(paths), folder)
    images = np.memmap(folder / "images.u8", dtype=np.uint8, mode="r", shape=(len(kept), size, size))
    return ImageCache(images, [paths[i] for i in kept], skipped, folder)


def _warn_skipped(skipped: list[str], total: int, folder: Path) -> None:
    if not skipped:
        return
    shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
    console.print(
        f"[yellow]Warning:[/] skipped {len(skipped)} unreadable image file(s) of {total} (all listed in "
        f"{escape(str(folder / 'skipped.txt'))}): {escape(shown)}",
        highlight=False,
        soft_wrap=True,
        markup=True,
    )
