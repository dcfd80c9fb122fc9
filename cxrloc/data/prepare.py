"""``cxrloc prepare``: a dataset's folder -> resized uint8 image cache, manifest, fingerprint and splits.

Steps:
1. read the dataset's tables (:mod:`cxrloc.data.source`: NIH's ``Data_Entry_2017.csv`` and
   ``BBox_List_2017.csv``, a plain labels and boxes table, or a COCO file); find the listed images
   anywhere below the images folder (the official NIH download spreads them over
   ``images_001/images/`` ...). Image names from the tables are only ever compared with the files
   found there, never joined to a path, so they cannot point outside the folder; then place the
   boxes in their images (a plain table's boxes need each image's size, read from its header);
2. choose the images to cache: every annotated image plus a seed-sampled fraction of the
   unannotated ones (only images that appear in some split are decoded and cached; the others are
   listed in the manifest with ``cache_index = -1``);
3. decode, resize (area filter) and quantise them into a preallocated ``uint8`` memmap
   ``images.u8`` (N, S, S). ``done.u8`` holds one flag per entry (0 = to do, 1 = written,
   2 = unreadable, skipped); a flag is set only after the entry's pixels have been flushed to disk,
   so an interrupted run resumes where it stopped and never trusts a half-written entry;
4. write ``manifest.csv``, ``classes.json``, ``fingerprint.json`` and ``splits.json`` (reused when
   present).

Same inputs and seed give byte-identical output files, whatever ``workers`` is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.table import Table

from cxrloc.data.boxes import Box, BoxList
from cxrloc.data.formats import SourceOptions, open_source
from cxrloc.data.identity import check_reprepare
from cxrloc.data.imageio import IMAGE_EXTENSIONS, ImageReadError, read_image_u8
from cxrloc.data.prepared import CACHE_VERSION, CLASSES_FILE, ClassList, manifest_columns
from cxrloc.data.source import Columns
from cxrloc.data.splits import (
    HAND_MADE_HINT,
    check_splits,
    is_hand_made,
    load_splits,
    make_splits,
    sample_unannotated,
    split_image_ids,
    write_splits,
)
from cxrloc.utils import (
    CxrlocError,
    atomic_path,
    check_writable_dir,
    console,
    progress_bar,
    read_json,
    write_error,
    write_json_atomic,
)
from cxrloc.workers import exit_with_parent

FLUSH_EVERY = 64
"""Entries written between two flushes (a flush also happens every 2 s and on exit)."""

DONE_TODO, DONE_OK, DONE_FAILED = 0, 1, 2


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


def _decode(task: tuple[int, str, int]) -> tuple[int, np.ndarray | None, str]:
    """Worker: read one image into (size, size) uint8; failures come back as a reason."""
    index, path, size = task
    try:
        return index, read_image_u8(path, size), ""
    except ImageReadError as exc:
        return index, None, str(exc)


class _Cache:
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


def _fill_cache(
    cache: _Cache,
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


def _boxes_json(boxes: list[Box]) -> str:
    return json.dumps([list(b) for b in boxes], separators=(",", ":"))


# --------------------------------------------------------------------------- what prepare dropped or changed
PROBLEM_KINDS: dict[str, str] = {
    "annotated_missing": "annotated image not found (dropped)",
    "annotated_unreadable": "annotated image unreadable (dropped)",
    "unreadable": "unannotated image unreadable (dropped)",
    "no_box_left": "every box row skipped (kept unannotated)",
    "not_in_data_entry": "box: image not in the image list (skipped)",
    "unknown_label": "box: unknown label (skipped)",
    "no_area": "box: no area, negative size (skipped)",
    "non_numeric": "box: non-numeric coordinate (skipped)",
    "extra_columns": "box: extra columns (skipped)",
    "malformed": "box: missing fields (skipped)",
    "outside": "box: outside the image (skipped)",
    "duplicate": "box: exact duplicate row (dropped)",
    "clipped": "box: past the image edge (clipped)",
}
"""Every kind of input that ``prepare`` drops or changes, in the order of its report table, for every
format (the image list is NIH's Data_Entry, a labels table or COCO's ``images``; a "line" of a COCO
file is an annotation's position in its list). Images listed without a file and without boxes
are not here: a partial download is normal (they are counted as ``missing``)."""


@dataclass
class Problem:
    """One input ``prepare`` dropped or changed: its kind (a key of :data:`PROBLEM_KINDS`), the
    image, the box list's line when it comes from a row (else 0) and one line of detail."""

    kind: str
    image: str
    line: int
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "image": self.image, "line": self.line, "detail": self.detail}


class StrictError(CxrlocError):
    """``prepare --strict`` met inputs it would drop or change; nothing was written."""

    def __init__(self, message: str, problems: list[Problem]) -> None:
        super().__init__(message)
        self.problems = problems


def table_problems(
    box_list: BoxList,
    box_path: Path,
    entry_name: str,
    listed: set[str],
    found: dict[str, Path],
) -> list[Problem]:
    """What the tables lose before any image is decoded: the box list's skipped, duplicate and
    clipped rows, box rows of images not in Data_Entry, annotated images not on disk, and images
    left without any box because all their rows were skipped."""
    problems = [Problem(p.kind, p.image, p.line, p.detail) for p in box_list.problems]
    for image_id, lines in box_list.lines.items():
        if image_id not in listed:
            problems += [
                Problem("not_in_data_entry", image_id, line, f"{box_path.name} line {line}: {image_id} is not listed "
                        f"in {entry_name}")
                for line in lines
            ]
        elif image_id not in found:
            problems.append(Problem("annotated_missing", image_id, 0, f"{image_id}: {len(lines)} box(es) in "
                                    f"{box_path.name} (line {lines[0]}), no image file found"))
    skipped_rows = {p.image for p in box_list.problems if p.kind not in ("clipped", "duplicate") and p.image}
    for image_id in sorted(skipped_rows - set(box_list.boxes)):
        if image_id in listed and image_id in found:
            lines = [p.line for p in box_list.problems if p.image == image_id]
            problems.append(Problem("no_box_left", image_id, 0, f"{image_id}: every box row was skipped "
                                    f"(lines {', '.join(map(str, lines))}); it is kept without boxes"))
    return problems


def decode_problems(failed: dict[str, str], annotated: set[str]) -> list[Problem]:
    """Images that could not be decoded, annotated ones apart."""
    return [
        Problem("annotated_unreadable" if i in annotated else "unreadable", i, 0, reason)
        for i, reason in sorted(failed.items())
    ]


def _strict_error(problems: list[Problem], written: str) -> StrictError:
    first = problems[0]
    return StrictError(
        f"--strict: {len(problems)} input problem(s) that prepare would drop or change (first: {first.detail}); "
        f"{written}. Fix the inputs, or run without --strict to prepare anyway (the full list then goes to "
        "fingerprint.json)",
        problems,
    )


def problems_table(problems: Sequence[Problem | dict[str, Any]]) -> Table | None:
    """A short table of what ``prepare`` dropped or changed and why (``None`` when nothing was).

    One row per kind of :data:`PROBLEM_KINDS`: the count, the first image (``+N`` more) and the
    first box-list lines; the full list is in ``fingerprint.json`` under ``problems``.
    """
    rows = [p if isinstance(p, Problem) else Problem(**p) for p in problems]
    if not rows:
        return None
    table = Table(title="What prepare dropped or changed (all of it: fingerprint.json, 'problems')",
                  box=box.SIMPLE_HEAD, title_justify="left", padding=(0, 1), collapse_padding=True)
    table.add_column("input (what was done)", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("first image", no_wrap=True)
    table.add_column("lines", no_wrap=True)
    for kind, label in PROBLEM_KINDS.items():
        of_kind = [p for p in rows if p.kind == kind]
        if not of_kind:
            continue
        first = of_kind[0].image or "?"
        if len(of_kind) > 1:
            first += f" +{len(of_kind) - 1}"
        lines = [str(p.line) for p in of_kind if p.line]
        shown = ", ".join(lines[:3]) + (", ..." if len(lines) > 3 else "")
        table.add_row(label, str(len(of_kind)), first, shown)
    return table


def prepare(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    data_format: str = "nih",
    data_entry: str | os.PathLike[str] | None = None,
    bbox_list: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    boxes: str | os.PathLike[str] | None = None,
    columns: Sequence[str] = (),
    classes: Sequence[str] | None = None,
    images: Sequence[str | os.PathLike[str]] = (),
    size: int = 512,
    folds: int = 5,
    unannotated_fraction: float = 0.0,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    strict: bool = False,
    labels_from_boxes: bool = True,
    rebuild: bool = False,
    overwrite: bool = False,
) -> Path:
    """Prepare a dataset for training; see the module docstring and docs/data.md.

    Args:
        data_dir: folder holding the images anywhere below it (and NIH's CSVs unless given).
        out_dir: the prepared folder to write (created; resumed when a previous run stopped).
        data_format: ``nih`` (NIH ChestX-ray14's CSVs), ``table`` (a labels and a boxes table,
            :mod:`cxrloc.data.table`) or ``coco`` (a COCO file, :mod:`cxrloc.data.coco`).
        data_entry: ``Data_Entry_2017.csv`` (``nih``; default: looked up in ``data_dir``).
        bbox_list: ``BBox_List_2017.csv`` (``nih``; default: looked up in ``data_dir``).
        labels: the labels table (``table``: required; ``coco``: optional).
        boxes: the boxes table (``table``) or the COCO annotation file (``coco``).
        columns: ``KEY=NAME`` column names of the plain tables (:data:`cxrloc.data.source.COLUMN_KEYS`).
        classes: the class list of a ``table`` dataset (default: every label the tables use, sorted).
        images: more folders to search for images, besides ``data_dir`` (e.g. the twelve folders of
            the NIH download kept apart, or a folder of extra unannotated images). Images are
            matched by stem, whatever their extension (PNG, JPEG or DICOM).
        size: side of the cached square images (a non-square image is stretched; boxes follow
            through their normalised coordinates).
        folds: number of patient-grouped folds.
        unannotated_fraction: fraction of the usable unannotated images put in the training pool.
        seed: seed of the fold assignment and of the unannotated sampling.
        workers: decoding processes (1 = in this process).
        progress: show a progress bar.
        strict: fail instead of dropping or changing any input (:data:`PROBLEM_KINDS`): problems
            of the tables stop it before anything is written; unreadable images stop it after the
            decoding pass, before the manifest, fingerprint and splits are written (a folder that
            did not exist before is removed again).
        labels_from_boxes: give an image the label of each class it has a box of, where its table
            lacks that label (counted per class in ``fingerprint.json`` and the summary); ``False``
            keeps the table's labels as they are (the AUROC and "labels per image" of ``evaluate``
            then use them; training still treats a boxed class as present on that image).
        rebuild: replace a finished prepared folder made with other parameters (size, folds,
            seed, unannotated fraction, tables); without it such a folder is refused
            (:func:`cxrloc.data.identity.check_reprepare`).
        overwrite: write into a folder that is not a prepared folder although it holds files of
            the names prepare writes (:data:`PREPARED_FILES`). An input (a table, an images
            folder) is never replaced.

    Everything dropped or changed is listed in ``fingerprint.json`` under ``problems``
    (:func:`problems_table` shows it); the class list goes to ``classes.json``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        CxrlocError: missing table, bad option, no usable image, an inconsistent ``splits.json``,
            or an output that cannot be written (checked before decoding, with the cache's size).
        StrictError: ``strict`` and an input would be dropped or changed.
    """
    data_dir, out = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise CxrlocError(f"{data_dir}: {'NIH' if data_format == 'nih' else 'images'} folder not found")
    image_roots = [data_dir]
    for extra in images:
        if not Path(extra).is_dir():
            raise CxrlocError(f"--images {extra}: folder not found")
        image_roots.append(Path(extra))
    where = data_dir if len(image_roots) == 1 else ", ".join(str(r) for r in image_roots)
    if not 8 <= size <= 4096:
        raise CxrlocError(f"--size must be between 8 and 4096, got {size}")
    if workers < 1:
        raise CxrlocError(f"--workers must be at least 1, got {workers}")
    if not 0.0 <= unannotated_fraction <= 1.0:
        raise CxrlocError(f"--unannotated-fraction must be in [0, 1], got {unannotated_fraction}")
    column_names = Columns.parse(columns)
    _guard_out(out, [data_dir, *images, data_entry, bbox_list, labels, boxes], overwrite=overwrite)
    check_writable_dir(out, "--out")  # again below with the cache's size, once it is known
    source = open_source(data_format, data_dir, SourceOptions(data_entry=data_entry, bbox_list=bbox_list,
                                                              labels=labels, boxes=boxes, columns=column_names,
                                                              classes=classes))
    if check_reprepare(out, size=size, tables={"format": source.data_format, **source.inputs}, folds=folds,
                       seed=seed, fraction=unannotated_fraction, rebuild=rebuild):
        for name in PREPARED_FILES:
            (out / name).unlink(missing_ok=True)
    command = _command(data_dir, data_format, data_entry, bbox_list, labels, boxes, column_names, classes, images,
                       folds, unannotated_fraction, seed, size=size, out=out, labels_from_boxes=labels_from_boxes)

    entries = source.entries
    class_names = list(source.classes)
    listed = set(entries["image_id"])
    found, unlisted, duplicates = find_images(image_roots, listed)
    if not found:
        raise CxrlocError(
            f"{where}: none of the {len(entries):,} images listed in {source.entry_name} was found below it; "
            "check the folder (images may sit in subfolders such as images_001/images/)"
        )
    box_list, no_size = source.box_list(found)
    box_skipped = list(box_list.skipped)
    boxes_of: dict[str, list[Box]] = {}
    for image_id, bs in box_list.boxes.items():
        if image_id in listed:
            boxes_of[image_id] = bs
        else:
            box_skipped.extend(f"{image_id}: box for an image not listed in {source.entry_name}" for _ in bs)
    problems = table_problems(box_list, Path(source.box_name), source.entry_name, listed, found)
    problems += [Problem("annotated_unreadable", i, 0, f"{reason} (its boxes need its size)")
                 for i, reason in sorted(no_size.items())]
    if strict and problems:
        raise _strict_error(problems, "nothing was written")
    for image_id in no_size:
        del found[image_id]  # unusable: its boxes cannot be placed
    ids = entries["image_id"].to_numpy(dtype=object)
    patients = entries["patient_id"].to_numpy()
    present = np.array([i in found for i in ids], dtype=bool)
    missing_ids = [str(i) for i in ids[~present] if i not in no_size]
    patient_of = {str(i): int(p) for i, p in zip(ids[present], patients[present], strict=True)}
    annotated_ids = {i for i in patient_of if i in boxes_of}
    unannotated_ids = [i for i in patient_of if i not in boxes_of]
    if not annotated_ids:
        raise CxrlocError(_no_annotated_message(where, source.box_name, box_list, box_skipped))

    created = not os.path.exists(out)
    splits_path = out / "splits.json"
    reused = splits_path.is_file()
    if reused:
        splits = load_splits(splits_path)
        _check_parameters(splits, splits_path, folds=folds, seed=seed, fraction=unannotated_fraction)
        wanted = split_image_ids(splits)
        absent = sorted(wanted - set(patient_of))
        if absent:
            raise CxrlocError(
                f"{splits_path}: lists {len(absent)} image(s) not found below {where} (first {absent[0]!r}); "
                "fix it or delete it to recompute the folds"
            )
    else:
        if folds < 2:
            raise CxrlocError(
                f"--folds must be at least 2 to make cross-validation folds, got {folds}; for one hand-made split "
                f'write {splits_path} yourself with "seed": null (docs/data.md, "Hand-made splits")'
            )
        pool = sample_unannotated(unannotated_ids, unannotated_fraction, seed)
        wanted = annotated_ids | set(pool)

    if not reused:
        _check_enough_patients(annotated_ids, patient_of, folds, box_skipped)
    cache_ids = [str(i) for i in ids[present] if i in wanted]  # table order
    paths = [found[i] for i in cache_ids]
    check_writable_dir(out, "--out", need_bytes=_cache_bytes_needed(out, len(cache_ids), size))
    try:
        out.mkdir(parents=True, exist_ok=True)
        cache = _Cache(out, cache_ids, size)
        if cache.resumed:
            console.print(
                f"Resuming: {int(np.sum(cache.done == DONE_OK))} of {cache.count} images already in the cache"
            )
        failures, _ = _fill_cache(cache, paths, workers=workers, progress=progress)
    except OSError as exc:
        raise write_error(exc, out, "prepared folder") from None
    failed_ids = {cache_ids[i]: reason for i, reason in failures.items()}
    problems += decode_problems(failed_ids, annotated_ids)
    if strict and failed_ids:
        written = "the manifest, fingerprint and splits were not written"
        if created:
            shutil.rmtree(out, ignore_errors=True)
            written = f"{out} was removed again"
        raise _strict_error([p for p in problems if p.image in failed_ids], written)

    ok_cached = {i: n for n, i in enumerate(cache_ids) if i not in failed_ids}
    usable_annotated = {i: patient_of[i] for i in sorted(annotated_ids) if i in ok_cached}
    usable_unannotated = {i: patient_of[i] for i in unannotated_ids if i not in failed_ids}
    if not usable_annotated:
        raise CxrlocError(
            f"{data_dir}: none of the {len(annotated_ids)} annotated images could be read "
            f"(first problem: {next(iter(failed_ids.values()), 'unknown')}); nothing usable to prepare"
        )
    if reused:
        bad = sorted(set(failed_ids) & wanted)
        if bad:
            raise CxrlocError(
                f"{splits_path}: image {bad[0]!r} cannot be read ({failed_ids[bad[0]]}); "
                "fix the file or delete splits.json to recompute the folds"
            )
        check_splits(splits, usable_annotated, usable_unannotated, where=str(splits_path))
    else:
        pool_ok = {i: patient_of[i] for i in sorted(wanted - annotated_ids) if i not in failed_ids}
        splits = make_splits(
            usable_annotated, pool_ok, folds=folds, seed=seed, unannotated_fraction=unannotated_fraction
        )

    # Labels: the tables', plus (labels_from_boxes) the class of every box (a box is a positive finding).
    label_matrix = entries.loc[present, class_names].to_numpy(dtype=np.uint8).copy()
    row_of = {i: n for n, i in enumerate(ids[present])}
    added_per_class = np.zeros(len(class_names), dtype=np.int64)
    for image_id, bs in boxes_of.items():
        if image_id in row_of and image_id not in failed_ids:
            for k in sorted({int(b[0]) for b in bs}):
                if label_matrix[row_of[image_id], k] == 0:
                    added_per_class[k] += 1
                    if labels_from_boxes:
                        label_matrix[row_of[image_id], k] = 1
    added = int(added_per_class.sum())
    manifest = entries.loc[present, ["image_id", "patient_id", "follow_up", "view_position"]].copy()
    manifest[class_names] = label_matrix
    manifest["annotated"] = [int(i in boxes_of) for i in manifest["image_id"]]
    manifest["cache_index"] = [ok_cached.get(i, -1) for i in manifest["image_id"]]
    manifest["boxes"] = [_boxes_json(boxes_of.get(i, [])) for i in manifest["image_id"]]
    extra = ["patient"] if "patient" in entries.columns else []
    for column in extra:
        manifest[column] = entries.loc[present, column].to_numpy()
    manifest = manifest[~manifest["image_id"].isin(failed_ids)]
    manifest = manifest.loc[:, [*manifest_columns(class_names), *extra]]
    boxed_counts = np.zeros(len(class_names), dtype=np.int64)
    for image_id in usable_annotated:
        for k, *_ in boxes_of[image_id]:
            boxed_counts[k] += 1
    class_list = ClassList(
        source.data_format,
        tuple(class_names),
        source.fixed_boxed or tuple(c for c, n in zip(class_names, boxed_counts, strict=True) if n > 0),
    )

    with atomic_path(out / "manifest.csv") as tmp:
        manifest.to_csv(tmp, index=False, lineterminator="\n")
    write_json_atomic(out / CLASSES_FILE, class_list.to_json())
    if not reused:
        write_splits(splits_path, splits)
    fingerprint = {
        "version": 1,
        "inputs": {
            "format": source.data_format,
            **source.inputs,
            "image_folders": [str(r) for r in image_roots],
        },
        "parameters": {
            "size": size,
            "folds": len(splits["folds"]),
            "unannotated_fraction": splits.get("unannotated_fraction"),
            "seed": splits.get("seed"),
            "splits_reused": reused,
            "splits_hand_made": is_hand_made(splits),
            "labels_from_boxes": labels_from_boxes,
            "command": command,
        },
        "classes": {"names": class_names, "boxed": list(class_list.boxed),
                    "boxes": dict(zip(class_names, [int(n) for n in boxed_counts], strict=True))},
        "notes": source.notes,
        "counts": {
            "listed": len(entries),
            "found": len(found) + len(no_size),
            "missing": len(missing_ids),
            "unlisted_image_files": unlisted,
            "duplicate_file_names": len(duplicates),
            "usable": len(manifest),
            "annotated": len(usable_annotated),
            "unannotated": len(usable_unannotated),
            "unannotated_pool": len(split_image_ids(splits) - set(usable_annotated)),
            "cached": len(ok_cached),
            "skipped": len(failed_ids) + len(no_size),
            "boxes": sum(len(boxes_of[i]) for i in usable_annotated),
            "boxes_clipped": len(box_list.clipped),
            "box_rows_skipped": len(box_skipped),
            "labels_added_from_boxes": added if labels_from_boxes else 0,
            "labels_added_from_boxes_per_class": {
                c: int(n) for c, n in zip(class_names, added_per_class, strict=True) if n and labels_from_boxes},
            "labels_missing_for_boxes": {
                c: int(n) for c, n in zip(class_names, added_per_class, strict=True) if n and not labels_from_boxes},
            "problems": {k: n for k in PROBLEM_KINDS if (n := sum(p.kind == k for p in problems))},
        },
        "skipped": [{"image_id": i, "reason": reason} for i, reason in sorted({**failed_ids, **no_size}.items())],
        "box_problems": {"clipped": box_list.clipped, "skipped": box_skipped},
        "duplicate_file_names": duplicates,
        "problems": [p.to_json() for p in problems],
        "missing": {"reason": f"listed in {source.entry_name} but not found below the images folder",
                    "images": missing_ids},
    }
    write_json_atomic(out / "fingerprint.json", fingerprint)
    return out


PREPARED_FILES: tuple[str, ...] = (
    "fingerprint.json", "cache.json", "images.u8", "done.u8", "manifest.csv", CLASSES_FILE, "splits.json",
)
"""The files ``prepare`` writes into ``--out`` (``--rebuild`` removes them first; fingerprint.json first of all,
so a kill during the removal leaves an unfinished folder, not a finished one with missing files)."""


def _check_enough_patients(
    annotated: set[str], patient_of: dict[str, int], folds: int, skipped: Sequence[str]
) -> None:
    """Refuse, before the folder is created, data with fewer annotated patients than folds (the
    message names the skipped box rows, which are often why)."""
    from cxrloc.data.splits import make_splits

    n = len({patient_of[i] for i in annotated})
    if n >= max(folds, 2):
        return
    try:
        make_splits({i: patient_of[i] for i in annotated}, {}, folds=folds, seed=0, unannotated_fraction=0.0)
    except CxrlocError as exc:
        why = f" ({len(skipped)} box row(s) were skipped; first: {skipped[0]})" if skipped else ""
        raise CxrlocError(f"{exc}{why}; nothing was written") from None


def _no_annotated_message(where: str, box_name: str, box_list: BoxList, skipped: Sequence[str]) -> str:
    """Why no annotated image is left: no box row was usable (and the first reason), or none of the
    boxed images was found on disk."""
    tail = "folds are built over annotated images, so nothing usable can be prepared"
    if not box_list.boxes:
        first = box_list.problems[0].detail if box_list.problems else (skipped[0] if skipped else "")
        return (f"{box_name}: none of its {box_list.rows} box row(s) is usable"
                + (f" (first: {first})" if first else "") + f"; {tail}")
    return f"{where}: no image with a box in {box_name} was found on disk; {tail}"


def _guard_out(out: Path, inputs: Sequence[Any], *, overwrite: bool) -> None:
    """Refuse an ``--out`` that is an input, or a foreign folder holding files of prepare's names."""
    from cxrloc.paths import OutputGuard

    guard = OutputGuard(inputs, overwrite=overwrite)
    guard.folder(out, "--out")
    ours = (out / "cache.json").is_file() or (out / "fingerprint.json").is_file()
    for name in PREPARED_FILES:
        target = out / name
        if guard.is_input(target):
            raise CxrlocError(f"--out {out}: prepare would write {target}, one of this command's inputs; "
                              "choose another --out")
        if target.is_file() and not ours and not overwrite:
            raise CxrlocError(
                f"--out {out} is not a prepared folder but holds {name}, which prepare would replace; choose "
                "another --out, or pass --overwrite"
            )


def _command(
    data_dir: Path,
    data_format: str,
    data_entry: str | os.PathLike[str] | None,
    bbox_list: str | os.PathLike[str] | None,
    labels: str | os.PathLike[str] | None,
    boxes: str | os.PathLike[str] | None,
    columns: Any,
    classes: Sequence[str] | None,
    images: Sequence[str | os.PathLike[str]],
    folds: int,
    fraction: float,
    seed: int,
    *,
    size: int,
    out: Path,
    labels_from_boxes: bool = True,
) -> list[str]:
    """The ``cxrloc prepare`` command that makes this folder again (paths as given, without --workers):
    :func:`cxrloc.data.identity.prepare_command` makes a copy at another size from it."""
    args = ["cxrloc", "prepare", str(data_dir)]
    if data_format != "nih":
        args += ["--format", data_format]
    for option, value in (("--data-entry", data_entry), ("--bbox-list", bbox_list), ("--labels", labels),
                          ("--boxes", boxes)):
        if value is not None:
            args += [option, str(value)]
    args += columns.options()
    if classes:
        args += ["--classes", ",".join(classes)]
    for folder in images:
        args += ["--images", str(folder)]
    if not labels_from_boxes:
        args += ["--no-labels-from-boxes"]
    args += ["--folds", str(folds), "--unannotated-fraction", f"{fraction:g}", "--seed", str(seed)]
    return args + ["--size", str(size), "--out", str(out)]




def _cache_bytes_needed(out: Path, count: int, size: int) -> int:
    """Disk space the cache still needs: its full size, less what an interrupted run already wrote."""
    total = count * size * size + count
    images = out / "images.u8"
    try:
        written = images.stat().st_blocks * 512 if images.stat().st_size == count * size * size else 0
    except (OSError, AttributeError):
        written = 0
    return max(total - written, 0)


def _check_parameters(splits: dict[str, Any], path: Path, *, folds: int, seed: int, fraction: float) -> None:
    """A reused cxrloc-made ``splits.json`` must match the options; a hand-made one (``"seed": null``)
    is reused whatever they say."""
    if is_hand_made(splits):
        return
    have = (len(splits["folds"]), splits.get("seed"), float(splits.get("unannotated_fraction", -1)))
    if have != (folds, seed, float(fraction)):
        raise CxrlocError(
            f"{path} was made with --folds {have[0]} --seed {have[1]} --unannotated-fraction {have[2]:g}, "
            f"not --folds {folds} --seed {seed} --unannotated-fraction {fraction:g}; pass "
            f"--folds {have[0]} --seed {have[1]} --unannotated-fraction {have[2]:g} to reuse it, {HAND_MADE_HINT}, "
            "or delete it to recompute the folds"
        )


def _per_class(counts: Mapping[str, int], limit: int = 20) -> str:
    items = [f"{c} {n}" for c, n in counts.items()]
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def summary_line(out: Path) -> str:
    """One line describing a prepared folder (for the CLI's closing message): the images, and the
    classes with the number of boxes each has in this data (not the classes that may carry boxes)."""
    fp = read_json(out / "fingerprint.json", "fingerprint")
    c = fp["counts"]
    classes = fp.get("classes") or {}
    names = classes.get("names", [])
    boxes = {k: int(v) for k, v in (classes.get("boxes") or {}).items() if int(v) > 0}
    if not boxes and classes.get("boxed"):  # a folder prepared before the counts were recorded
        boxes = {k: 0 for k in classes["boxed"]}
    without = [n for n in names if n not in boxes]
    text = (
        f"{c['cached']} images cached ({c['annotated']} annotated, {c['unannotated_pool']} unannotated in the pool), "
        f"{c['missing']} missing, {c['skipped']} skipped"
        + (f"; {sum(c['problems'].values())} input(s) dropped or changed" if c.get("problems") else "")
    )
    if names:
        text += f"; {len(names)} classes ({len(boxes)} with boxes): boxes per class {_per_class(boxes) or 'none'}"
        if without:
            text += f"; no box: {', '.join(without[:20])}{', ...' if len(without) > 20 else ''}"
    return text


def labels_line(out: Path) -> str | None:
    """The labels that boxes added (per class), or that the table lacks for a box when
    ``--no-labels-from-boxes`` kept the table's labels; ``None`` when the table labels every box."""
    fp = read_json(out / "fingerprint.json", "fingerprint")
    c = fp.get("counts", {})
    added = c.get("labels_added_from_boxes_per_class") or {}
    missing = c.get("labels_missing_for_boxes") or {}
    if added:
        return (f"Labels added from boxes (the table lacked them): {sum(added.values())} image labels, "
                f"{_per_class(added)}; they count in AUROC and labels per image; --no-labels-from-boxes keeps "
                "the table's labels")
    if missing:
        return (f"Boxes without the table's label, kept unlabelled (--no-labels-from-boxes): "
                f"{sum(missing.values())} image labels, {_per_class(missing)}")
    return None
