"""``prepare``'s image cache: decode, resize and quantise images (in worker processes or not) into
a preallocated ``uint8`` memmap ``images.u8``, with one flag per entry in ``done.u8`` (0 = to do,
1 = written, 2 = unreadable). A flag is set only after the entry's pixels are flushed, so an
interrupted run resumes where it stopped and never trusts a half-written entry."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cxrloc.data.imageio import ImageReadError, read_image_u8
from cxrloc.data.prepared import CACHE_VERSION
from cxrloc.utils import progress_bar, write_json_atomic
from cxrloc.workers import exit_with_parent

FLUSH_EVERY = 64
"""Entries written between two flushes (a flush also happens every 2 s and on exit)."""

DONE_TODO, DONE_OK, DONE_FAILED = 0, 1, 2



def _decode(task: tuple[int, str, int]) -> tuple[int, np.ndarray | None, str]:
    """Worker: read one image into (size, size) uint8; failures come back as a reason."""
    index, path, size = task
    try:
        return index, read_image_u8(path, size), ""
    except ImageReadError as exc:
        return index, None, str(exc)


class ImageCache:
    """The preallocated memmap cache and its per-entry flags (resume bookkeeping)."""

    def __init__(self, out: Path, ids: list[str], size: int) -> None:
        self.out, self.size, self.count = out, size, len(ids)
        self.meta = {
            "version": CACHE_VERSION,
            "size": size,
            "count": len(ids),
            "file": "images.u8",
            "dtype": "uint8",
            "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        }
        self.images_path, self.done_path, self.meta_path = out / "images.u8", out / "done.u8", out / "cache.json"
        self.resumed = self._can_resume()
        if not self.resumed:
            self._create()
        shape = (max(self.count, 1), size, size)
        # A zero-entry cache still needs a valid memmap; it is never indexed.
        self.images = np.memmap(self.images_path, dtype=np.uint8, mode="r+", shape=shape) if self.count else None
        self.done = np.fromfile(self.done_path, dtype=np.uint8)

    def _can_resume(self) -> bool:
        try:
            old = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        return (
            old == self.meta
            and self.images_path.is_file()
            and self.images_path.stat().st_size == self.count * self.size * self.size
            and self.done_path.is_file()
            and self.done_path.stat().st_size == self.count
        )

    def _create(self) -> None:
        # cache.json goes last: until it exists, nothing here is trusted by a later run.
        self.meta_path.unlink(missing_ok=True)
        with open(self.images_path, "wb") as fh:
            fh.truncate(self.count * self.size * self.size)  # sparse zeros, no time spent writing them
        with open(self.done_path, "wb") as fh:
            fh.write(bytes(self.count))
            fh.flush()
            os.fsync(fh.fileno())
        write_json_atomic(self.meta_path, self.meta)

    def commit(self, ok: list[int], failed: list[int]) -> None:
        """Flush pixels of ``ok`` entries, then mark ``ok`` done and ``failed`` unreadable."""
        if not ok and not failed:
            return
        if ok and self.images is not None:
            self.images.flush()
        for i in ok:
            self.done[i] = DONE_OK
        for i in failed:
            self.done[i] = DONE_FAILED
        # Rewrite the flags through a fresh handle + fsync: small (N bytes) and crash-safe per byte.
        with open(self.done_path, "r+b") as fh:
            fh.write(self.done.tobytes())
            fh.flush()
            os.fsync(fh.fileno())


def _tasks_results(tasks: list[tuple[int, str, int]], workers: int) -> Iterator[tuple[int, np.ndarray | None, str]]:
    if workers <= 1 or len(tasks) < 2:
        for t in tasks:
            yield _decode(t)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        yield from pool.map(_decode, tasks, chunksize=4)


def fill_cache(
    cache: ImageCache,
    paths: list[Path],
    *,
    workers: int,
    progress: bool,
) -> tuple[dict[int, str], int]:
    """Decode every entry not yet done; return (entry -> failure reason, number decoded now)."""
    todo = [i for i in range(cache.count) if cache.done[i] != DONE_OK]
    failures: dict[int, str] = {}
    tasks = [(i, str(paths[i]), cache.size) for i in todo]
    ok: list[int] = []
    failed: list[int] = []
    last = time.monotonic()
    with progress_bar(enabled=progress) as bar:
        job = bar.add_task("prepare", total=cache.count, completed=cache.count - len(todo))
        try:
            for index, pixels, reason in _tasks_results(tasks, workers):
                if pixels is None:
                    failures[index] = reason
                    failed.append(index)
                else:
                    assert cache.images is not None
                    cache.images[index] = pixels
                    ok.append(index)
                bar.advance(job)
                if len(ok) + len(failed) >= FLUSH_EVERY or time.monotonic() - last > 2.0:
                    cache.commit(ok, failed)
                    ok, failed, last = [], [], time.monotonic()
        finally:
            # Entries in ok were fully assigned before being listed, so they are safe to flush and mark
            # even when we leave by an exception (Ctrl-C, a worker crash).
            cache.commit(ok, failed)
    return failures, len(tasks)



def cache_bytes_needed(out: Path, count: int, size: int) -> int:
    """Disk space the cache still needs: its full size, less what an interrupted run already wrote."""
    total = count * size * size + count
    images = out / "images.u8"
    try:
        written = images.stat().st_blocks * 512 if images.stat().st_size == count * size * size else 0
    except (OSError, AttributeError):
        written = 0
    return max(total - written, 0)

