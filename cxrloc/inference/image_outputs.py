"""The outputs of one predicted image (:func:`write_image_outputs`): its JSON record, its overlay and its
raw maps, each checked by the run's :class:`cxrloc.paths.OutputGuard` before it is written.
:func:`cxrloc.inference.predict.predict_files` calls it for every image it reads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrloc.inference.backends import Predictor
from cxrloc.inference.postprocess import make_record
from cxrloc.utils import CxrlocError, atomic_path, write_json_atomic


@dataclass
class ImageOutputs:
    """What :func:`cxrloc.inference.predict.predict_files` writes for each image, and where."""

    out: Path | None
    """``--out-dir`` (every output named after the image), or None (``--json`` / ``--overlay``)."""
    overlay: str | os.PathLike[str] | None
    json_path: str | os.PathLike[str] | None
    gt_boxes: dict[str, list[tuple[str, float, float, float, float]]] | None
    save_maps: bool
    overlays: bool
    overlay_classes: str
    guard: Any
    """The :class:`cxrloc.paths.OutputGuard` that checks each output before it is written."""


def write_image_outputs(
    path: Path,
    name: str,
    img: np.ndarray,
    z: np.ndarray,
    predictor: Predictor,
    *,
    warnings: list[str],
    outputs: ImageOutputs,
    written: list[Path],
) -> dict[str, Any]:
    """Write the outputs of one image (each path written is appended to ``written``) and return its record.

    Raises:
        CxrlocError: an output cannot be written, or ``outputs.guard`` refuses it (an input, a stranger's
            file).
    """
    height, width = img.shape
    if not bool(np.isfinite(z).all()):
        # A NaN score would be written as "NaN" (not JSON) and read as "no finding": refuse it.
        raise CxrlocError(
            f"{path}: the model's output is not finite (NaN or infinity) for this image; nothing was written for it. "
            "The model is damaged or the image is extreme; check the model on another image"
        )
    record = {
        "image": str(path),
        "model": str(predictor.source),
        "backend": predictor.backend,
        "image_size": predictor.image_size,
        "patch_grid": predictor.patch_grid,
        "operating_point": predictor.operating_point(),
        "warnings": warnings,
        **make_record(z, predictor.tau_hat, width=width, height=height, classes=predictor.classes,
                      calibration=predictor.calibration),
    }
    json_path, overlay, maps = _image_paths(path, name, outputs)
    if outputs.save_maps and maps is not None:
        with atomic_path(maps, "maps") as tmp, open(tmp, "wb") as fh:
            np.save(fh, z.astype(np.float32))
        record["maps"] = str(maps)
        written.append(maps)
    if overlay is not None:
        _write_overlay(overlay, path, img, z, predictor, record, outputs)
        record["overlay"] = str(overlay)
        written.append(Path(overlay))
    if json_path is not None:
        write_json_atomic(json_path, record, what="prediction")
        written.append(Path(json_path))
    return record


def _image_paths(
    path: Path, name: str, outputs: ImageOutputs
) -> tuple[str | os.PathLike[str] | None, str | os.PathLike[str] | None, Path | None]:
    """``(json, overlay, maps)`` paths of one image (``NAME.json``, ``NAME.overlay.png``, ``NAME.maps.npy``
    in ``--out-dir``; else ``--json``, ``--overlay`` and the maps beside them), each checked by the guard
    (the maps only with ``--save-maps``).

    Raises:
        CxrlocError: the guard refuses one of them.
    """
    out = outputs.out
    json_path, overlay = outputs.json_path, outputs.overlay
    if out is not None:
        json_path = out / f"{name}.json"
        overlay = out / f"{name}.overlay.png" if outputs.overlays else None
        maps: Path | None = out / f"{name}.maps.npy"
    else:
        maps = maps_path(path, json_path, overlay)
    for target, what in ((json_path, "prediction"), (overlay, "overlay"),
                         (maps if outputs.save_maps else None, "maps")):
        if target is not None:
            try:
                outputs.guard.file(target, f"{path}: its {what}")
            except CxrlocError as exc:
                raise CxrlocError(f"{exc} (--out-dir)" if out is not None else str(exc)) from None
    return json_path, overlay, maps


def _write_overlay(
    overlay: str | os.PathLike[str], path: Path, img: np.ndarray, z: np.ndarray, predictor: Predictor,
    record: dict[str, Any], outputs: ImageOutputs,
) -> None:
    """Draw and save the overlay of one image: the classes ``--overlay-classes`` asks for, the legend at
    the model's operating point, the image's ground-truth boxes when ``--boxes`` is given."""
    from cxrloc.inference.overlay import NO_FINDING, gt_boxes_of, render_overlay, save_overlay

    gt_boxes = outputs.gt_boxes
    gts = gt_boxes_of(gt_boxes, path, (img.shape[1], img.shape[0])) if gt_boxes is not None else None
    if outputs.overlay_classes == "gt":
        names = {label for label, *_ in gts or []}
        shown = [k for k, c in enumerate(predictor.classes) if c in names]
    elif outputs.overlay_classes == "all":
        shown = list(range(len(predictor.classes)))
    else:
        shown = [k for k, c in enumerate(record["classes"]) if c["present"]]
    empty = f"{NO_FINDING} ({_short_rule(predictor)})"
    probabilities = None if predictor.calibration is None else [c["probability"] for c in record["classes"]]
    called = [k for k, c in enumerate(record["classes"]) if c["present"]]
    limits = [c["threshold"] if probabilities is not None else c["tau_hat"] for c in record["classes"]]
    save_overlay(render_overlay(img, z, shown, classes=predictor.classes, probabilities=probabilities,
                                gt_boxes=gts, empty_message=empty, called=called, thresholds=limits), overlay)


def maps_path(
    image: Path, json_path: str | os.PathLike[str] | None, overlay: str | os.PathLike[str] | None
) -> Path:
    """Where ``--save-maps`` writes one image's maps without ``--out-dir``: beside --json / --overlay."""
    base = Path(json_path) if json_path is not None else Path(overlay) if overlay is not None else None
    return base.with_suffix(".maps.npy") if base is not None else Path(f"{image.stem}.maps.npy")


def _short_rule(predictor: Predictor) -> str:
    """The operating point in a few words, for the overlay's "no finding" line."""
    cal = predictor.calibration
    if cal is None:
        return "1'z >= tau_hat"
    if cal.rule == "sensitivity":
        return f"sensitivity {cal.target_sensitivity:g} on validation"
    if cal.rule == "matched":
        return "count-matched on validation"
    return "Youden's J on validation"
