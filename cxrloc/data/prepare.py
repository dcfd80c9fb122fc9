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

Same inputs and seed give byte-identical output files, whatever ``workers`` is. The parts: image
discovery (:mod:`cxrloc.data.image_discovery`), the cache (:mod:`cxrloc.data.image_cache`), the
report of what was dropped or changed (:mod:`cxrloc.data.prepare_report`); this module reads the
tables, chooses the images and writes the manifest, classes, splits and fingerprint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrloc.data.formats import SourceOptions, open_source
from cxrloc.data.identity import check_reprepare
from cxrloc.data.image_cache import DONE_OK, ImageCache, cache_bytes_needed, fill_cache
from cxrloc.data.image_discovery import find_images
from cxrloc.data.prepare_outputs import Usable, build_fingerprint, build_manifest
from cxrloc.data.prepare_report import (
    PROBLEM_KINDS,
    Problem,
    StrictError,
    decode_problems,
    labels_line,
    problems_table,
    strict_error,
    summary_line,
    table_problems,
)
from cxrloc.data.prepare_tables import Tables, read_tables
from cxrloc.data.prepared import CLASSES_FILE, ClassList
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
    write_error,
    write_json_atomic,
)

__all__ = [
    "PREPARED_FILES",
    "PROBLEM_KINDS",
    "Problem",
    "StrictError",
    "find_images",
    "labels_line",
    "prepare",
    "problems_table",
    "summary_line",
    "table_problems",
]


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
    """Prepare a dataset for training (the module docstring, docs/data.md); returns ``out_dir``.

    ``data_dir`` holds the images anywhere below it (and NIH's CSVs unless given); ``out_dir`` is
    written (resumed when a previous run stopped). ``data_format``: ``nih`` (``data_entry``,
    ``bbox_list``: default looked up in ``data_dir``), ``table`` (``labels`` and ``boxes`` tables,
    ``columns`` as ``KEY=NAME``, ``classes``: default every label used, sorted) or ``coco``
    (``boxes`` = the COCO file, ``labels`` optional). ``images``: more folders to search (matched
    by stem). ``size``: side of the cached square images (boxes follow a stretched image).
    ``folds`` patient-grouped folds; ``unannotated_fraction`` of the usable unannotated images
    join the training pool; ``seed`` drives both. ``workers``: decoding processes. ``strict``: fail
    (:class:`StrictError`) instead of dropping or changing any input (:data:`PROBLEM_KINDS`), before
    anything is written for table problems, before the manifest for unreadable images (a folder
    this run created is removed). ``labels_from_boxes``: give an image the label of each class it
    has a box of (``False`` keeps the table's labels). ``rebuild``: replace a finished folder made
    with other parameters (:func:`cxrloc.data.identity.check_reprepare`). ``overwrite``: write
    into a foreign folder holding files of :data:`PREPARED_FILES`' names (never over an input).
    Everything dropped or changed goes to ``fingerprint.json`` (``problems``). Bad options,
    tables or splits, no usable image or an unwritable output raise one :class:`CxrlocError`.
    """
    data_dir, out = Path(data_dir), Path(out_dir)
    image_roots = _check_options(data_dir, data_format, images, size=size, workers=workers,
                                 fraction=unannotated_fraction)
    column_names = Columns.parse(columns)
    _guard_out(out, [data_dir, *images, data_entry, bbox_list, labels, boxes], overwrite=overwrite)
    check_writable_dir(out, "--out")  # again below with the cache's size, once it is known
    source = open_source(data_format, data_dir, SourceOptions(data_entry=data_entry, bbox_list=bbox_list,
                                                              labels=labels, boxes=boxes, columns=column_names,
                                                              classes=classes))
    tables_identity = {"format": source.data_format, **source.inputs}
    if check_reprepare(out, size=size, tables=tables_identity, folds=folds, seed=seed, fraction=unannotated_fraction,
                       rebuild=rebuild):
        for name in PREPARED_FILES:
            (out / name).unlink(missing_ok=True)
    command = _command(data_dir, data_format, data_entry, bbox_list, labels, boxes, column_names, classes, images,
                       folds, unannotated_fraction, seed, size=size, out=out, labels_from_boxes=labels_from_boxes)
    tables = read_tables(source, image_roots, strict=strict)
    created = not os.path.exists(out)
    splits_path = out / "splits.json"
    reused = splits_path.is_file()
    splits, wanted = _planned_images(tables, splits_path, reused, folds=folds, seed=seed,
                                     fraction=unannotated_fraction)
    cache_ids = [str(i) for i in tables.ids[tables.present] if i in wanted]  # table order
    failed_ids = _write_cache(out, cache_ids, [tables.found[i] for i in cache_ids], size, workers=workers,
                              progress=progress)
    tables.problems += decode_problems(failed_ids, tables.annotated_ids)
    _stop_if_strict(tables, failed_ids, out, created=created, strict=strict)
    usable = Usable.of(tables, cache_ids, failed_ids)
    splits = _final_splits(tables, usable, splits, splits_path, wanted, failed_ids, data_dir=data_dir, folds=folds,
                           seed=seed, fraction=unannotated_fraction)
    manifest, class_list, counts = build_manifest(tables, usable, failed_ids, labels_from_boxes=labels_from_boxes)
    _write_tables(out, manifest, class_list, None if reused else splits)
    parameters = dict(size=size, folds=len(splits["folds"]), unannotated_fraction=splits.get("unannotated_fraction"),
                      seed=splits.get("seed"), splits_reused=reused, splits_hand_made=is_hand_made(splits),
                      labels_from_boxes=labels_from_boxes, command=command)
    write_json_atomic(out / "fingerprint.json", build_fingerprint(
        tables, usable, splits, manifest, class_list, counts, failed_ids, image_roots, parameters))
    return out


def _write_tables(out: Path, manifest: pd.DataFrame, class_list: ClassList, new_splits: dict[str, Any] | None) -> None:
    """``manifest.csv``, ``classes.json`` and (when made now) ``splits.json``, each atomically."""
    with atomic_path(out / "manifest.csv") as tmp:
        manifest.to_csv(tmp, index=False, lineterminator="\n")
    write_json_atomic(out / CLASSES_FILE, class_list.to_json())
    if new_splits is not None:
        write_splits(out / "splits.json", new_splits)


def _stop_if_strict(tables: Tables, failed_ids: dict[str, str], out: Path, *, created: bool, strict: bool) -> None:
    """``--strict`` and unreadable images: refuse, removing ``out`` again when this run created it."""
    if strict and failed_ids:
        written = "the manifest, fingerprint and splits were not written"
        if created:
            shutil.rmtree(out, ignore_errors=True)
            written = f"{out} was removed again"
        raise strict_error([p for p in tables.problems if p.image in failed_ids], written)


def _final_splits(tables: Tables, usable: Usable, splits: dict[str, Any] | None, splits_path: Path,
                  wanted: set[str], failed_ids: dict[str, str], *, data_dir: Path, folds: int, seed: int,
                  fraction: float) -> dict[str, Any]:
    """The reused splits, checked against the readable images, or new ones made from them."""
    if not usable.annotated:
        raise CxrlocError(
            f"{data_dir}: none of the {len(tables.annotated_ids)} annotated images could be read "
            f"(first problem: {next(iter(failed_ids.values()), 'unknown')}); nothing usable to prepare"
        )
    if splits is not None:
        _check_reused_splits(splits, splits_path, usable, wanted, failed_ids)
        return splits
    pool_ok = {i: tables.patient_of[i] for i in sorted(wanted - tables.annotated_ids) if i not in failed_ids}
    return make_splits(usable.annotated, pool_ok, folds=folds, seed=seed, unannotated_fraction=fraction)


def _check_options(data_dir: Path, data_format: str, images: Sequence[str | os.PathLike[str]], *, size: int,
                   workers: int, fraction: float) -> list[Path]:
    """The image folders (``data_dir`` first), once every option is checked."""
    if not data_dir.is_dir():
        raise CxrlocError(f"{data_dir}: {'NIH' if data_format == 'nih' else 'images'} folder not found")
    image_roots = [data_dir]
    for extra in images:
        if not Path(extra).is_dir():
            raise CxrlocError(f"--images {extra}: folder not found")
        image_roots.append(Path(extra))
    if not 8 <= size <= 4096:
        raise CxrlocError(f"--size must be between 8 and 4096, got {size}")
    if workers < 1:
        raise CxrlocError(f"--workers must be at least 1, got {workers}")
    if not 0.0 <= fraction <= 1.0:
        raise CxrlocError(f"--unannotated-fraction must be in [0, 1], got {fraction}")
    return image_roots


def _planned_images(tables: Tables, splits_path: Path, reused: bool, *, folds: int, seed: int,
                    fraction: float) -> tuple[dict[str, Any] | None, set[str]]:
    """The reused ``splits.json`` (else ``None``) and the images to cache: those it lists, or every
    annotated image plus the seed-sampled unannotated pool."""
    splits = None
    if reused:
        splits = load_splits(splits_path)
        _check_parameters(splits, splits_path, folds=folds, seed=seed, fraction=fraction)
        wanted = split_image_ids(splits)
        absent = sorted(wanted - set(tables.patient_of))
        if absent:
            raise CxrlocError(
                f"{splits_path}: lists {len(absent)} image(s) not found below {tables.where} (first {absent[0]!r}); "
                "fix it or delete it to recompute the folds"
            )
        return splits, wanted
    if folds < 2:
        raise CxrlocError(
            f"--folds must be at least 2 to make cross-validation folds, got {folds}; for one hand-made split "
            f'write {splits_path} yourself with "seed": null (docs/data.md, "Hand-made splits")'
        )
    pool = sample_unannotated(tables.unannotated_ids, fraction, seed)
    _check_enough_patients(tables.annotated_ids, tables.patient_of, folds, tables.box_skipped)
    return splits, tables.annotated_ids | set(pool)


def _write_cache(out: Path, cache_ids: list[str], paths: list[Path], size: int, *, workers: int,
                 progress: bool) -> dict[str, str]:
    """Decode ``paths`` into the cache of ``out`` (resuming); return image -> why it is unreadable."""
    check_writable_dir(out, "--out", need_bytes=cache_bytes_needed(out, len(cache_ids), size))
    try:
        out.mkdir(parents=True, exist_ok=True)
        cache = ImageCache(out, cache_ids, size)
        if cache.resumed:
            console.print(
                f"Resuming: {int(np.sum(cache.done == DONE_OK))} of {cache.count} images already in the cache"
            )
        failures, _ = fill_cache(cache, paths, workers=workers, progress=progress)
    except OSError as exc:
        raise write_error(exc, out, "prepared folder") from None
    return {cache_ids[i]: reason for i, reason in failures.items()}


def _check_reused_splits(splits: dict[str, Any] | None, splits_path: Path, usable: Usable, wanted: set[str],
                         failed_ids: dict[str, str]) -> None:
    assert splits is not None
    bad = sorted(set(failed_ids) & wanted)
    if bad:
        raise CxrlocError(
            f"{splits_path}: image {bad[0]!r} cannot be read ({failed_ids[bad[0]]}); "
            "fix the file or delete splits.json to recompute the folds"
        )
    check_splits(splits, usable.annotated, usable.unannotated, where=str(splits_path))


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


