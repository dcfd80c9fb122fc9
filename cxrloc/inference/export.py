"""Export a trained model to ONNX (``cxrloc export``) and check it against torch.

The whole network (backbone, patch head and PAC-CRF) becomes one graph with input
``image`` (B, 1, S, S) float32 in [-1, 1] and outputs ``z`` and ``unary_logits``
(B, K, P, P), with a dynamic batch axis. The checkpoint's inference metadata
(classes, S, P, normalisation, thresholds, calibration, version, arch, crf, antialias, ...)
goes into the file's ``metadata_props`` so ``cxrloc predict`` needs nothing else. The
calibration is the fold's ``calibration.json`` as ``load_model`` reads it (only when fitted for
these weights): calibrate before exporting.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter. It
traces the CRF's fixed number of mean-field iterations into a flat graph in seconds; the
dynamo exporter also works for plain convolutions but is much slower and adds little here.

After writing, onnxruntime runs a REAL image (a batch of two: the image and its mirror,
which also exercises the dynamic batch axis) and the largest absolute difference of ``z``
from torch must stay below ``tolerance`` (default 1e-4 on probabilities), else the export
fails and nothing is left under the output name.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrloc.data.synthetic import healthy_chest
from cxrloc.inference.backends import DEFAULT_THREADS
from cxrloc.utils import CxrlocError, atomic_path, check_writable_file, console

DEFAULT_OPSET: int = 17
MIN_OPSET: int = 17
DEFAULT_TOLERANCE: float = 1e-4
"""Largest allowed |z_onnx - z_torch| (z are probabilities in [0, 1]); float32 reordering gives ~1e-6."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` did."""

    path: Path
    checkpoint: Path
    opset: int
    check_image: str
    """The image used for the check (a file, or ``"generated synthetic chest"``)."""
    provider: str
    """The onnxruntime execution provider that ran the check."""
    max_abs_diff_z: float
    max_abs_diff_unary: float
    tolerance: float
    seconds: float
    size_bytes: int
    calibration: str = ""
    """The embedded operating point in words, or why there is none."""

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "checkpoint": str(self.checkpoint), "opset": self.opset,
            "check_image": self.check_image, "provider": self.provider,
            "max_abs_diff_z": self.max_abs_diff_z, "max_abs_diff_unary": self.max_abs_diff_unary,
            "tolerance": self.tolerance, "seconds": round(self.seconds, 2), "size_bytes": self.size_bytes,
            "calibration": self.calibration,
        }


def _shared_data_candidates() -> list[Path]:
    repo = Path(__file__).resolve().parents[1]
    return [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def default_check_image() -> Path | None:
    """A real NIH image from ``../shared/data/nih/images`` when that folder exists, else None."""
    for root in _shared_data_candidates():
        images = root / "nih" / "images"
        if images.is_dir():
            found = sorted(images.glob("*.png"))
            if found:
                return found[0]
    return None


class _Wrapper:
    """Builds a module returning exactly ``(z, unary_logits)`` (a model may return extras in future)."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class OnnxModule(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                z, unary = self.inner(image)[:2]
                return z, unary

        return OnnxModule(model).eval()


def export_onnx(
    run_or_ckpt: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    *,
    fold: int | None = None,
    opset: int = DEFAULT_OPSET,
    check_image: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    threads: int = DEFAULT_THREADS,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
) -> ExportReport:
    """Export a run's model to ONNX with its metadata, then check onnxruntime against torch.

    Args:
        run_or_ckpt: ``RUN_DIR``, ``RUN_DIR/fold_K`` or a ``.pt`` checkpoint.
        out_path: the ``.onnx`` file (default ``RUN_DIR/export/model.onnx``, or beside the
            checkpoint as ``model.onnx`` when a ``.pt`` file is given).
        fold: the fold of a multi-fold run folder.
        opset: ONNX opset (>= 17).
        check_image: image for the check (default: a real NIH image from ``../shared/data``
            when present, else a generated synthetic chest).
        device: onnxruntime device for the check (``cpu`` or ``cuda``; CPU when CUDA is missing).
        threads: onnxruntime CPU threads.
        tolerance: largest allowed absolute difference of ``z`` between torch and onnxruntime
            (a finite number above 0).
        overwrite: replace an existing ``out_path`` that cxrloc did not write. An output that is
            one of the inputs (the checkpoint, the check image) is always refused.

    Raises:
        CxrlocError: bad arguments, an output path that is an input or another program's file,
            unreadable checkpoint or image, failed export, or a
            difference above ``tolerance`` (the output file is then not created).
    """
    import torch

    from cxrloc.checkpoint import load_model
    from cxrloc.paths import OutputGuard
    from cxrloc.rundir import resolve_checkpoint

    if opset < MIN_OPSET:
        raise CxrlocError(f"--opset {opset} is too old: use {MIN_OPSET} or newer.")
    if not (np.isfinite(tolerance) and tolerance > 0):
        raise CxrlocError(f"--tolerance must be a finite number above 0, got {tolerance:g}.")
    t0 = time.perf_counter()
    ckpt = resolve_checkpoint(run_or_ckpt, fold=fold)
    out_path = _default_out_path(run_or_ckpt, ckpt) if out_path is None else Path(out_path)
    OutputGuard([run_or_ckpt, ckpt, check_image], overwrite=overwrite).file(out_path, "--out")
    check_writable_file(out_path, "ONNX file")
    if threads < 1:
        raise CxrlocError(f"--threads must be at least 1, got {threads}.")
    model, meta, _cfg = load_model(ckpt, device="cpu")
    meta = dict(meta)
    x, check_name = _check_batch(check_image, int(meta["image_size"]))

    wrapped = _Wrapper.wrap(model)
    with torch.inference_mode():
        z_ref, unary_ref = (t.numpy() for t in wrapped(torch.from_numpy(x)))

    with atomic_path(out_path, "ONNX file") as tmp:
        _write_onnx(wrapped, x, tmp, ckpt=ckpt, meta=meta, opset=opset)
        provider, diff_z, diff_u = _compare_with_torch(tmp, x, z_ref, unary_ref, device=device, threads=threads)
        console.print(
            f"onnxruntime ({provider}) vs torch on {check_name} (batch of 2): "
            f"max |dz| = {diff_z:.3g}, max |d unary_logits| = {diff_u:.3g} (tolerance on z: {tolerance:g})"
        )
        if not np.isfinite(diff_z) or diff_z > tolerance:
            raise CxrlocError(
                f"onnxruntime output differs from torch by {diff_z:.3g} on z (tolerance {tolerance:g}); "
                f"the export of {ckpt} is not trustworthy and was not written."
            )
    return ExportReport(
        path=out_path, checkpoint=ckpt, opset=opset, check_image=check_name, provider=provider,
        max_abs_diff_z=diff_z, max_abs_diff_unary=diff_u, tolerance=tolerance,
        seconds=time.perf_counter() - t0, size_bytes=out_path.stat().st_size, calibration=_calibration_text(meta),
    )


def _default_out_path(run_or_ckpt: str | os.PathLike[str], ckpt: Path) -> Path:
    """``RUN_DIR/export/model.onnx`` for a run folder, ``model.onnx`` beside a ``.pt`` file given."""
    from cxrloc.rundir import EXPORT_NAME, RunDir

    src = Path(run_or_ckpt)
    return (ckpt.parent / EXPORT_NAME) if src.is_file() else RunDir(src).export_path


def _check_batch(check_image: str | os.PathLike[str] | None, size: int) -> tuple[np.ndarray, str]:
    """The check's input ``(2, 1, size, size)`` float32 (the image and its mirror: a batch of two tests the
    dynamic axis) and the image's name: ``check_image``, else :func:`default_check_image`, else a
    generated synthetic chest."""
    from cxrloc.data.imageio import read_image
    from cxrloc.inference.inputs import preprocess

    if check_image is not None:
        img, check_name = read_image(check_image), str(check_image)
    else:
        found = default_check_image()
        if found is not None:
            img, check_name = read_image(found), str(found)
        else:
            img, check_name = healthy_chest(size), "generated synthetic chest"
    x1 = preprocess(img, size)
    return np.stack([x1, x1[:, :, ::-1]]).astype(np.float32), check_name


def _write_onnx(wrapped: Any, x: np.ndarray, path: Path, *, ckpt: Path, meta: dict[str, Any], opset: int) -> None:
    """Trace ``wrapped`` on ``x[:1]`` into ``path`` (dynamic batch axis), with the checkpoint's inference
    metadata in ``metadata_props``, checked by ``onnx.checker``.

    Raises:
        CxrlocError: the exporter failed.
    """
    import onnx
    import torch

    from cxrloc.inference.backends import INPUT_NAME, OUTPUT_NAMES, meta_to_props

    try:
        # The tracer warns about shape checks it freezes; S is fixed per model, so they are expected.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding")
            # dynamo=False is a deliberate choice (see the module docstring), not an oversight.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapped,
                (torch.from_numpy(x[:1]),),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:
        raise CxrlocError(f"ONNX export of {ckpt} failed: {type(exc).__name__}: {exc}") from None
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta_to_props(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"cxrloc {meta.get('version')} model exported from {ckpt.name}"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _compare_with_torch(
    path: Path, x: np.ndarray, z_ref: np.ndarray, unary_ref: np.ndarray, *, device: str, threads: int
) -> tuple[str, float, float]:
    """Run the ONNX file ``path`` in onnxruntime on ``x``: ``(provider, max |dz|, max |d unary_logits|)``
    against torch's ``z_ref`` and ``unary_ref``."""
    from cxrloc.inference.backends import INPUT_NAME, OUTPUT_NAMES, open_session

    session = open_session(path, device=device, threads=threads)
    provider = session.get_providers()[0]
    z_onnx, unary_onnx = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    diff_z = float(np.max(np.abs(np.asarray(z_onnx) - z_ref)))
    diff_u = float(np.max(np.abs(np.asarray(unary_onnx) - unary_ref)))
    del session
    return provider, diff_z, diff_u


def _calibration_text(meta: dict[str, Any]) -> str:
    """The embedded operating point in words, or why there is none (:attr:`ExportReport.calibration`)."""
    if meta.get("calibration"):
        from cxrloc.calibration import Calibration

        return f"operating point: {Calibration.from_json(meta['calibration']).describe()}"
    return meta.get("calibration_note") or (
        "no calibration: presence falls back to 1'z >= tau_hat (run 'cxrloc calibrate' and export again)"
    )
