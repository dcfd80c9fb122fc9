"""Predict findings and their regions on any chest X-ray files (``cxrloc predict``).

Every image goes through the training cache's exact preprocessing
(``read_image -> resize_square(S) -> to_uint8 -> x = u8 / 127.5 - 1``), then through one
:class:`Predictor` (a torch checkpoint or an onnxruntime session; same interface). For every
class the JSON record holds the image-level score ``1'z`` (soft patch count, paper eq. 12) and
the decision ``1'z >= tau_hat``; for each present class the detected region (patches with
``z >= 0.5``, METHOD.md) is split into 4-connected components, each reported as a box in the
ORIGINAL image's pixel frame with the mean ``z`` of its patches as its score.
"""

from __future__ import annotations

import glob
import json
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrloc.classes import CLASSES
from cxrloc.utils import CxrlocError, atomic_path, console, write_json_atomic

REGION_THRESHOLD: float = 0.5
"""A patch belongs to the detected region iff ``z >= 0.5`` (METHOD.md, evaluation protocol)."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
"""Extensions picked up when a folder is given; extensionless DICOM files are detected too."""


# --------------------------------------------------------------------------- backends


class Predictor:
    """One interface over a torch checkpoint and an ONNX file.

    Attributes:
        backend: ``"torch"`` or ``"onnx"``.
        source: the file the model came from.
        meta: the inference metadata (``checkpoint.make_meta`` content).
        image_size: S, the network's input side.
        patch_grid: P.
        classes: class names in output order.
        tau_hat: per-class decision thresholds on ``1'z`` (shape ``(K,)``).
    """

    backend: str = ""

    def __init__(self, source: Path, meta: dict[str, Any], thresholds_json: dict[str, Any]) -> None:
        from cxrloc.thresholds import Thresholds

        self.source = source
        self.meta = meta
        self.image_size = int(meta["image_size"])
        self.patch_grid = int(meta["patch_grid"])
        self.classes: list[str] = list(meta.get("classes") or CLASSES)
        if self.classes != list(CLASSES):
            raise CxrlocError(f"{source} was made for classes {self.classes}, not cxrloc's {list(CLASSES)}.")
        th = Thresholds.from_json(thresholds_json)
        if th.patch_grid != self.patch_grid:
            raise CxrlocError(f"Thresholds are for P={th.patch_grid} but {source} has P={self.patch_grid}.")
        self.thresholds_json = thresholds_json
        self.tau_hat = np.asarray(th.tau_hat, dtype=np.float64)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the network on ``x`` (B, 1, S, S) float32 in [-1, 1]; return ``(z, unary_logits)``."""
        raise NotImplementedError


class TorchPredictor(Predictor):
    """A model loaded from a checkpoint (``torch.load(weights_only=True)``)."""

    backend = "torch"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        fold: int | None = None,
        thresholds_json: dict[str, Any] | None = None,
    ) -> None:
        import torch

        from cxrloc.checkpoint import load_model, resolve_checkpoint

        if device == "cuda" and not torch.cuda.is_available():
            console.print("[yellow]Note:[/] CUDA is not available to torch here; using the CPU.")
            device = "cpu"
        ckpt = resolve_checkpoint(path, fold=fold)
        model, meta, _cfg = load_model(ckpt, device=device)
        self.model = model
        self.device = device
        # Thresholds: explicit file > checkpoint meta > the model's own buffers (always present).
        th = thresholds_json or meta.get("thresholds") or model.thresholds.get().to_json()
        super().__init__(ckpt, meta, th)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            z, unary = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
        return z.float().cpu().numpy(), unary.float().cpu().numpy()


class OnnxPredictor(Predictor):
    """A model exported by ``cxrloc export``, run by onnxruntime."""

    backend = "onnx"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        threads: int = 2,
        thresholds_json: dict[str, Any] | None = None,
    ) -> None:
        from cxrloc.inference.backends import INPUT_NAME, OUTPUT_NAMES, open_session, session_meta

        path = Path(path)
        self.session = open_session(path, device=device, threads=threads)
        self.provider = self.session.get_providers()[0]
        meta = session_meta(self.session, path)
        self._input = INPUT_NAME
        self._outputs = list(OUTPUT_NAMES)
        th = thresholds_json or meta.get("thresholds")
        if not th:
            raise CxrlocError(f"{path} carries no thresholds; re-export it or pass --thresholds FILE.")
        super().__init__(path, meta, th)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z, unary = self.session.run(self._outputs, {self._input: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(z, dtype=np.float32), np.asarray(unary, dtype=np.float32)


def load_predictor(
    model: str | os.PathLike[str],
    *,
    device: str = "cpu",
    fold: int | None = None,
    threads: int = 2,
    thresholds_file: str | os.PathLike[str] | None = None,
) -> Predictor:
    """Open a run folder / checkpoint (torch backend) or a ``.onnx`` file (onnxruntime backend).

    Args:
        model: ``RUN_DIR``, ``RUN_DIR/fold_K``, a ``.pt`` checkpoint or a ``.onnx`` file.
        device: ``cpu`` or ``cuda`` (falls back to the CPU with a note when CUDA is missing).
        fold: which fold of a multi-fold run folder.
        threads: onnxruntime CPU threads.
        thresholds_file: a ``thresholds.json`` overriding the thresholds stored with the model.
    """
    if device not in ("cpu", "cuda"):
        raise CxrlocError(f"Unknown device {device!r}: use cpu or cuda.")
    th = None
    if thresholds_file is not None:
        from cxrloc.thresholds import Thresholds

        th = Thresholds.load(thresholds_file).to_json()
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        return OnnxPredictor(path, device=device, threads=threads, thresholds_json=th)
    return TorchPredictor(path, device=device, fold=fold, thresholds_json=th)


# --------------------------------------------------------------------------- pre/post-processing


def preprocess(img: np.ndarray, image_size: int) -> np.ndarray:
    """The training cache's preprocessing of a ``read_image`` array: (1, S, S) float32 in [-1, 1]."""
    from cxrloc.data.imageio import resize_square, to_uint8
    from cxrloc.data.prepared import to_network_range

    return to_network_range(to_uint8(resize_square(img, image_size)))[None]


def connected_components(mask: np.ndarray) -> np.ndarray:
    """Label the 4-connected components of a boolean grid.

    Args:
        mask: 2-D boolean array.

    Returns:
        int32 array of the same shape: 0 for background, 1..n for the components, numbered in
        the raster order (row by row) of their first cell.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"connected_components expects a 2-D grid, got shape {mask.shape}")
    rows, cols = mask.shape
    labels = np.zeros((rows, cols), dtype=np.int32)
    current = 0
    for r0 in range(rows):
        for c0 in range(cols):
            if not mask[r0, c0] or labels[r0, c0]:
                continue
            current += 1
            labels[r0, c0] = current
            queue = deque([(r0, c0)])
            while queue:
                r, c = queue.popleft()
                for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= rr < rows and 0 <= cc < cols and mask[rr, cc] and not labels[rr, cc]:
                        labels[rr, cc] = current
                        queue.append((rr, cc))
    return labels


@dataclass
class Region:
    """One connected component of positive patches of one class."""

    box: tuple[float, float, float, float]
    """``(x0, y0, x1, y1)`` in pixels of the original image (x = column, y = row)."""
    box_normalised: tuple[float, float, float, float]
    """The same box as fractions of the image's width and height."""
    score: float
    """Mean ``z`` over the component's patches."""
    patches: int
    """Number of patches in the component."""

    def to_json(self) -> dict[str, Any]:
        return {
            "box": [round(v, 2) for v in self.box],
            "box_normalised": [round(v, 6) for v in self.box_normalised],
            "score": round(self.score, 6),
            "patches": self.patches,
        }


def regions_from_map(
    zk: np.ndarray, width: int, height: int, threshold: float = REGION_THRESHOLD
) -> list[Region]:
    """Connected components of ``zk >= threshold`` as boxes in an image of ``width`` x ``height``.

    Patch ``(r, c)`` of a P x P grid covers columns ``[c W/P, (c+1) W/P)`` and rows
    ``[r H/P, (r+1) H/P)`` of the original image: x and y are scaled separately, because
    a non-square image was stretched (not padded) to the square network input.
    """
    p_rows, p_cols = zk.shape
    labels = connected_components(zk >= threshold)
    regions: list[Region] = []
    for lab in range(1, int(labels.max()) + 1):
        rr, cc = np.nonzero(labels == lab)
        nx0, nx1 = cc.min() / p_cols, (cc.max() + 1) / p_cols
        ny0, ny1 = rr.min() / p_rows, (rr.max() + 1) / p_rows
        regions.append(
            Region(
                box=(nx0 * width, ny0 * height, nx1 * width, ny1 * height),
                box_normalised=(nx0, ny0, nx1, ny1),
                score=float(zk[rr, cc].mean()),
                patches=int(rr.size),
            )
        )
    return regions


def make_record(
    z: np.ndarray,
    tau_hat: np.ndarray,
    *,
    width: int,
    height: int,
    classes: Sequence[str] = CLASSES,
) -> dict[str, Any]:
    """The per-image JSON content from one output map ``z`` (K, P, P).

    Returns:
        ``{"width", "height", "present": [names], "classes": [{"name", "score", "tau_hat",
        "present", "regions"}]}``; ``regions`` is filled for present classes only.
    """
    out: list[dict[str, Any]] = []
    for k, name in enumerate(classes):
        score = float(z[k].sum())
        present = bool(score >= float(tau_hat[k]))
        regions = [r.to_json() for r in regions_from_map(z[k], width, height)] if present else []
        out.append(
            {"name": name, "score": round(score, 6), "tau_hat": float(tau_hat[k]), "present": present,
             "regions": regions}
        )
    return {
        "width": int(width),
        "height": int(height),
        "present": [c["name"] for c in out if c["present"]],
        "classes": out,
    }


# --------------------------------------------------------------------------- inputs


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


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
            and (p.suffix.lower() in IMAGE_EXTENSIONS or (p.suffix == "" and _looks_like_dicom(p)))
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


def _unique_stems(files: Sequence[Path]) -> list[str]:
    """Output names: the file's stem, made unique with ``_2``, ``_3`` ... when two files share it."""
    used: dict[str, int] = {}
    names: list[str] = []
    for f in files:
        stem = f.stem or f.name
        n = used.get(stem, 0) + 1
        used[stem] = n
        names.append(stem if n == 1 else f"{stem}_{n}")
    return names


# --------------------------------------------------------------------------- driver


@dataclass
class PredictSummary:
    """What :func:`predict_files` did."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    """Every file written."""
    location: str = ""
    """Where the outputs are, for the closing line."""


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
    threads: int = 2,
    batch_size: int = 8,
    thresholds_file: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> PredictSummary:
    """Run a model on image files and write JSON records, overlays and maps.

    One input without ``--out-dir``: ``json_path`` / ``overlay`` name the outputs (the JSON goes
    to stdout when neither they nor ``out_dir`` are given). Several inputs: everything goes to
    ``out_dir`` (default ``./predictions``): ``<stem>.json``, ``<stem>.overlay.png`` (unless
    ``overlays`` is False), ``<stem>.maps.npy`` with ``save_maps`` and ``predictions.json``.

    A file that cannot be read is reported with one error line and recorded in
    ``failures``; the other files are still processed.

    ``overlay_classes``: ``present`` draws a blob for every class decided present (1'z >= tau_hat);
    ``gt`` draws only the classes that have a ground-truth box on the image (needs ``boxes_csv``),
    as in the paper's Figure 1.

    Raises:
        CxrlocError: bad options, or a model that cannot be loaded.
    """
    from cxrloc.data.imageio import read_image

    if overlay_classes not in ("present", "gt"):
        raise CxrlocError(f"--overlay-classes {overlay_classes!r}: use 'present' or 'gt'.")
    if overlay_classes == "gt" and boxes_csv is None:
        raise CxrlocError("--overlay-classes gt draws the classes of the ground-truth boxes: pass --boxes CSV.")

    files, problems = expand_inputs(inputs)
    summary = PredictSummary()
    for item, msg in problems:
        console.print(f"[bold red]Error:[/] {msg}")
        summary.failures.append({"image": item, "error": msg})
    many = len(files) + len(problems) > 1
    if many and out_dir is None and (overlay is not None or json_path is not None):
        raise CxrlocError("--overlay and --json name the outputs of ONE image; for several use --out-dir DIR.")
    if many and out_dir is None:
        out_dir = Path("predictions")
    if batch_size < 1:
        raise CxrlocError("--batch-size must be at least 1.")
    gt_boxes = None
    if boxes_csv is not None:
        from cxrloc.inference.overlay import load_box_csv

        gt_boxes = load_box_csv(boxes_csv)
    if not files:
        summary.location = str(out_dir) if out_dir else "nowhere (no input could be read)"
        return summary

    predictor = load_predictor(model, device=device, fold=fold, threads=threads, thresholds_file=thresholds_file)
    out = Path(out_dir) if out_dir is not None else None
    stems = _unique_stems(files)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]Predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[name]}"), console=console, disable=not progress or len(files) < 2, transient=True,
    )
    with bar:
        task = bar.add_task("predict", total=len(files), name="")
        for start in range(0, len(files), batch_size):
            chunk = list(range(start, min(start + batch_size, len(files))))
            loaded: list[tuple[int, np.ndarray]] = []
            for i in chunk:
                try:
                    loaded.append((i, read_image(files[i])))
                except CxrlocError as exc:
                    console.print(f"[bold red]Error:[/] {exc}")
                    summary.failures.append({"image": str(files[i]), "error": str(exc)})
                    bar.advance(task)
            if not loaded:
                continue
            x = np.stack([preprocess(img, predictor.image_size) for _, img in loaded])
            z_all, _ = predictor.run(x)
            for (i, img), z in zip(loaded, z_all, strict=True):
                bar.update(task, name=files[i].name)
                record = _finish_one(
                    files[i], stems[i], img, z, predictor, out=out, overlay=overlay, json_path=json_path,
                    gt_boxes=gt_boxes, save_maps=save_maps, overlays=overlays, overlay_classes=overlay_classes,
                    summary=summary,
                )
                summary.records.append(record)
                bar.advance(task)

    if out is not None:
        summary_path = out / "predictions.json"
        write_json_atomic(summary_path, {
            "model": str(predictor.source), "backend": predictor.backend,
            "count": len(summary.records), "failed": len(summary.failures),
            "predictions": summary.records, "failures": summary.failures,
        })
        summary.outputs.append(summary_path)
        summary.location = str(out)
    else:
        if json_path is None and summary.records:
            print(json.dumps(summary.records[0], indent=2))  # stdout stays machine-readable
        summary.location = ", ".join([str(p) for p in summary.outputs] + (["stdout"] if json_path is None else []))
        if not summary.records and not summary.outputs:
            summary.location = "nowhere (no input could be read)"
    return summary


def _finish_one(
    path: Path,
    stem: str,
    img: np.ndarray,
    z: np.ndarray,
    predictor: Predictor,
    *,
    out: Path | None,
    overlay: str | os.PathLike[str] | None,
    json_path: str | os.PathLike[str] | None,
    gt_boxes: dict[str, list[tuple[str, float, float, float, float]]] | None,
    save_maps: bool,
    overlays: bool,
    overlay_classes: str,
    summary: PredictSummary,
) -> dict[str, Any]:
    """Write the outputs of one image and return its record."""
    height, width = img.shape
    record = {
        "image": str(path),
        "model": str(predictor.source),
        "backend": predictor.backend,
        "image_size": predictor.image_size,
        "patch_grid": predictor.patch_grid,
        **make_record(z, predictor.tau_hat, width=width, height=height, classes=predictor.classes),
    }
    if out is not None:
        json_path = out / f"{stem}.json"
        overlay = out / f"{stem}.overlay.png" if overlays else None
        maps_path: Path | None = out / f"{stem}.maps.npy"
    else:
        base = Path(json_path) if json_path is not None else Path(overlay) if overlay is not None else None
        maps_path = base.with_suffix(".maps.npy") if base is not None else Path(f"{stem}.maps.npy")
    if save_maps and maps_path is not None:
        with atomic_path(maps_path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, z.astype(np.float32))
        record["maps"] = str(maps_path)
        summary.outputs.append(maps_path)
    if overlay is not None:
        from cxrloc.inference.overlay import render_overlay, save_png

        gts = gt_boxes.get(path.name, []) if gt_boxes is not None else None
        if overlay_classes == "gt":
            names = {name for name, *_ in gts or []}
            present = [k for k, c in enumerate(predictor.classes) if c in names]
        else:
            present = [k for k, c in enumerate(record["classes"]) if c["present"]]
        save_png(render_overlay(img, z, present, classes=predictor.classes, gt_boxes=gts), overlay)
        record["overlay"] = str(overlay)
        summary.outputs.append(Path(overlay))
    if json_path is not None:
        write_json_atomic(json_path, record)
        summary.outputs.append(Path(json_path))
    return record
