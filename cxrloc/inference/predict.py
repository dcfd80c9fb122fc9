"""Predict findings and their regions on any chest X-ray files (``cxrloc predict``).

Every image goes through the training cache's exact preprocessing
(``read_image -> resize_square(S) -> to_uint8 -> x = u8 / 127.5 - 1``,
:func:`cxrloc.inference.inputs.preprocess`), then through one
:class:`cxrloc.inference.backends.Predictor` (a torch checkpoint or an onnxruntime session; same
interface); :mod:`cxrloc.inference.postprocess` turns ``z`` into the JSON record,
:mod:`cxrloc.inference.image_outputs` writes each image's outputs, and this module reads the inputs in
batches and writes the batch summary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from cxrloc.data.domain import check_image, describe, synthetic_warning
from cxrloc.data.prepared import to_network_range
from cxrloc.inference.backends import DEFAULT_THREADS, Predictor, load_predictor
from cxrloc.inference.image_outputs import ImageOutputs, maps_path, write_image_outputs
from cxrloc.inference.inputs import SUMMARY_NAME, expand_inputs, output_names, preprocess_u8
from cxrloc.utils import (
    CxrlocError,
    check_writable_dir,
    check_writable_file,
    console,
    progress_bar,
    write_json_atomic,
)

OVERLAY_CLASSES: tuple[str, ...] = ("present", "all", "gt")
"""What an overlay shows: the classes called present, every class, or the ground-truth classes."""


@dataclass
class PredictSummary:
    """What :func:`predict_files` did."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    """Every file written."""
    location: str = ""
    """Where the outputs are, for the closing line."""
    operating_point: str = ""
    """Which operating point decided "present", for the output line."""
    warning: str = ""
    """The run's warning (a model trained on synthetic images), empty when none."""


def predict_files(
    inputs: Sequence[str],
    model: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    overlay: str | os.PathLike[str] | None = None,
    json_path: str | os.PathLike[str] | None = None,
    boxes_csv: str | os.PathLike[str] | None = None,
    save_maps: bool = False,
    overlays: bool = True,
    overlay_classes: str = "present",
    device: str = "cpu",
    fold: int | None = None,
    threads: int = DEFAULT_THREADS,
    batch_size: int = 8,
    thresholds_file: str | os.PathLike[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PredictSummary:
    """Run a model on image files and write JSON records, overlays and maps.

    One input without ``--out-dir``: ``json_path`` / ``overlay`` name the outputs (the JSON goes
    to stdout when neither they nor ``out_dir`` are given; the overlay is PNG or JPEG by its
    extension). Several inputs: everything goes to ``out_dir`` (default ``./predictions``):
    ``NAME.json``, ``NAME.overlay.png`` (unless ``overlays`` is False), ``NAME.maps.npy`` with
    ``save_maps`` and ``predictions.json``, where NAME is the input's path relative to the
    inputs' common folder, without extension, kept unique by
    :func:`cxrloc.inference.inputs.output_names`.

    A file that cannot be read, and an output that cannot be written (disk full, read-only
    folder), is reported with one error line and recorded in ``failures``; the other files are
    still processed and ``predictions.json`` is still written. Output folders and files are
    checked for writability before the model is loaded; no output ever replaces an input file.

    ``overlay_classes``: ``present`` draws a blob for every class called present at the model's
    operating point (:mod:`cxrloc.calibration`; ``1'z >= tau_hat`` for an uncalibrated model) and
    says so on the image when there is none; ``all`` draws every class; ``gt`` draws only the
    classes that have a ground-truth box on the image (needs ``boxes_csv``), as in the paper's
    Figure 1. The legend gives each class's probability.

    No output ever replaces an input (an image, the model or the checkpoint a run folder stands
    for, the ``--boxes`` or ``--thresholds`` file), and an existing file that cxrloc did not write
    is replaced only with ``overwrite`` (:class:`cxrloc.paths.OutputGuard`): ``--json``,
    ``--overlay`` and the batch summary are checked before the model is loaded, each image's
    outputs before they are written (a refused one is recorded in ``failures``).

    Raises:
        CxrlocError: bad options, an output that is an input or another program's file, or a
            model that cannot be loaded.
    """
    _check_options(overlay, boxes_csv, overlay_classes, threads, batch_size)
    files, problems = expand_inputs(inputs)
    summary = PredictSummary()
    many = len(files) + len(problems) > 1
    if many and out_dir is None and (overlay is not None or json_path is not None):
        raise CxrlocError("--overlay and --json name the outputs of ONE image; for several use --out-dir DIR.")
    if many and out_dir is None:
        out_dir = Path("predictions")
    guard = _guard_outputs(model, fold, [boxes_csv, thresholds_file, *files], files, out_dir=out_dir,
                           json_path=json_path, overlay=overlay, save_maps=save_maps, overwrite=overwrite)
    for item, msg in problems:
        _fail(summary, item, msg)
    gt_boxes = _read_gt_boxes(boxes_csv) if boxes_csv is not None else None
    if not files:
        return summary  # nothing written: no location

    predictor = load_predictor(model, device=device, fold=fold, threads=threads, thresholds_file=thresholds_file)
    summary.operating_point = predictor.describe_operating_point()
    domain = predictor.meta.get("training_data")
    summary.warning = synthetic_warning(domain) or ""
    if summary.warning:  # once per run
        console.print(f"[bold yellow]Warning:[/] {escape(summary.warning)}", highlight=False, soft_wrap=True)
    outputs = ImageOutputs(out=Path(out_dir) if out_dir is not None else None, overlay=overlay,
                           json_path=json_path, gt_boxes=gt_boxes, save_maps=save_maps, overlays=overlays,
                           overlay_classes=overlay_classes, guard=guard)
    _predict_in_batches(files, predictor, outputs, summary, batch_size=batch_size, progress=progress)
    _close_summary(summary, predictor, outputs)
    return summary


def _check_options(
    overlay: str | os.PathLike[str] | None, boxes_csv: str | os.PathLike[str] | None, overlay_classes: str,
    threads: int, batch_size: int,
) -> None:
    """Refuse bad options of :func:`predict_files` before anything is read or written."""
    if overlay_classes not in OVERLAY_CLASSES:
        raise CxrlocError(f"--overlay-classes {overlay_classes!r}: use {', '.join(map(repr, OVERLAY_CLASSES))}.")
    if overlay_classes == "gt" and boxes_csv is None:
        raise CxrlocError("--overlay-classes gt draws the classes of the ground-truth boxes: pass --boxes CSV.")

    if threads < 1:
        raise CxrlocError(f"--threads must be at least 1, got {threads}.")
    if batch_size < 1:
        raise CxrlocError(f"--batch-size must be at least 1, got {batch_size}.")
    if overlay is not None:
        from cxrloc.inference.overlay import overlay_format

        overlay_format(overlay)


def _read_gt_boxes(boxes_csv: str | os.PathLike[str]) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """The ``--boxes`` file's ground-truth boxes per image (:func:`cxrloc.inference.gt_boxes.gt_boxes_by_image`)."""
    from cxrloc.inference.gt_boxes import gt_boxes_by_image

    return gt_boxes_by_image(boxes_csv)


def _guard_outputs(
    model: str | os.PathLike[str],
    fold: int | None,
    inputs: Sequence[str | os.PathLike[str] | None],
    files: Sequence[Path],
    *,
    out_dir: str | os.PathLike[str] | None,
    json_path: str | os.PathLike[str] | None,
    overlay: str | os.PathLike[str] | None,
    save_maps: bool,
    overwrite: bool,
) -> Any:
    """The :class:`cxrloc.paths.OutputGuard` of a prediction (the model, its checkpoint and ``inputs``
    are inputs), with the outputs known before the model is loaded checked: ``--out-dir`` and its batch
    summary, or ``--json``, ``--overlay`` and the first image's ``--save-maps`` file."""
    from cxrloc.paths import OutputGuard

    guard = OutputGuard([model, *inputs], overwrite=overwrite)
    guard.add_inputs([_model_checkpoint(model, fold)])
    if out_dir is not None:
        guard.folder(out_dir, "--out-dir")
        check_writable_dir(out_dir, "--out-dir")
        guard.file(Path(out_dir) / f"{SUMMARY_NAME}.json", "the batch summary")
    else:
        for option, target in (("--json", json_path), ("--overlay", overlay)):
            if target is not None:
                guard.file(target, option)
                check_writable_file(target, option)
        if save_maps and files:
            guard.file(maps_path(files[0], json_path, overlay), "--save-maps")
    return guard


def _predict_in_batches(
    files: Sequence[Path], predictor: Predictor, outputs: ImageOutputs, summary: PredictSummary, *, batch_size: int,
    progress: bool,
) -> None:
    """Read, predict and write ``files`` ``batch_size`` at a time; a file that cannot be read or written is
    recorded in ``summary.failures`` and the others go on."""
    from cxrloc.data.imageio import read_image

    domain = predictor.meta.get("training_data")
    names = output_names(files)
    with progress_bar(enabled=progress and len(files) > 1, info=True, transient=True) as bar:
        task = bar.add_task("Predicting", total=len(files), info="")
        for start in range(0, len(files), batch_size):
            chunk = list(range(start, min(start + batch_size, len(files))))
            loaded: list[tuple[int, np.ndarray]] = []
            for i in chunk:
                try:
                    loaded.append((i, read_image(files[i])))
                except (CxrlocError, MemoryError) as exc:
                    _fail(summary, str(files[i]), _reason(exc, files[i]))
                    bar.advance(task)
            if not loaded:
                continue
            u8 = [preprocess_u8(img, predictor.image_size) for _, img in loaded]
            x = np.stack([to_network_range(u)[None] for u in u8])
            z_all, _ = predictor.run(x)
            for (i, img), z, u in zip(loaded, z_all, u8, strict=True):
                bar.update(task, info=files[i].name)
                warnings = [w for w in (summary.warning, check_image(u, domain)) if w]
                if len(warnings) > int(bool(summary.warning)):  # per image: out of domain
                    console.print(f"[bold yellow]Warning:[/] {escape(f'{files[i]}: {warnings[-1]}')}",
                                  highlight=False, soft_wrap=True)
                try:
                    record = write_image_outputs(files[i], names[i], img, z, predictor, warnings=warnings,
                                                 outputs=outputs, written=summary.outputs)
                except (CxrlocError, MemoryError) as exc:  # an output that cannot be written: go on
                    _fail(summary, str(files[i]), _reason(exc, files[i]))
                else:
                    summary.records.append(record)
                bar.advance(task)
            del loaded, x, z_all


def _close_summary(summary: PredictSummary, predictor: Predictor, outputs: ImageOutputs) -> None:
    """Write ``predictions.json`` in ``--out-dir`` (or print the one record to stdout without
    ``--json``) and say in ``summary.location`` where the outputs are."""
    out = outputs.out
    if out is not None:
        summary_path = out / f"{SUMMARY_NAME}.json"
        write_json_atomic(summary_path, {
            "model": str(predictor.source), "backend": predictor.backend,
            "operating_point": predictor.operating_point(),
            "training_data": describe(predictor.meta.get("training_data")), "warning": summary.warning or None,
            "count": len(summary.records), "failed": len(summary.failures),
            "predictions": summary.records, "failures": summary.failures,
        }, what="batch summary")
        summary.outputs.append(summary_path)
        summary.location = str(out)
    else:
        json_path = outputs.json_path
        if json_path is None and summary.records:
            print(json.dumps(summary.records[0], indent=2))  # stdout stays machine-readable
        where = [str(p) for p in summary.outputs] + (["stdout"] if json_path is None and summary.records else [])
        summary.location = ", ".join(where)


def _fail(summary: PredictSummary, image: str, message: str) -> None:
    from rich.markup import escape

    console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    summary.failures.append({"image": image, "error": message})


def _reason(exc: BaseException, path: Path) -> str:
    if isinstance(exc, MemoryError):
        return f"{path}: out of memory while processing this image; it was skipped"
    return str(exc)


def _model_checkpoint(model: str | os.PathLike[str], fold: int | None) -> Path | None:
    """The checkpoint a run folder stands for (an input to protect); None when it cannot be told yet."""
    if Path(model).suffix.lower() == ".onnx" or not Path(model).is_dir():
        return None
    from cxrloc.rundir import resolve_checkpoint

    try:
        return resolve_checkpoint(model, fold=fold)
    except CxrlocError:
        return None  # load_predictor says why, below
