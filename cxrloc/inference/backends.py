"""onnxruntime sessions for exported cxrloc models, and the metadata stored in the ONNX file.

An exported file carries everything ``predict`` needs in its ``metadata_props`` (the same
content as a checkpoint's ``meta``, see :func:`cxrloc.checkpoint.make_meta`): every value is
stored as a JSON string under its own key, plus ``format = "cxrloc-onnx"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cxrloc.utils import CxrlocError, console

ONNX_FORMAT = "cxrloc-onnx"
INPUT_NAME = "image"
OUTPUT_NAMES: tuple[str, str] = ("z", "unary_logits")
DEFAULT_THREADS = 2

REQUIRED_META: tuple[str, ...] = ("classes", "image_size", "patch_grid", "normalisation", "thresholds", "version")


def meta_to_props(meta: dict[str, Any]) -> dict[str, str]:
    """Encode a ``meta`` dict as ONNX ``metadata_props`` (string to JSON string)."""
    props = {key: json.dumps(value) for key, value in meta.items()}
    props["format"] = json.dumps(ONNX_FORMAT)
    return props


def props_to_meta(props: dict[str, str], source: str | os.PathLike[str]) -> dict[str, Any]:
    """Decode ``metadata_props`` written by :func:`meta_to_props`; check the required keys."""
    try:
        meta = {key: json.loads(value) for key, value in props.items()}
    except json.JSONDecodeError as exc:
        raise CxrlocError(f"{source}: malformed cxrloc metadata ({exc}); re-export with 'cxrloc export'.") from None
    if meta.get("format") != ONNX_FORMAT:
        raise CxrlocError(f"{source} is not an ONNX file exported by 'cxrloc export' (no '{ONNX_FORMAT}' metadata).")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CxrlocError(f"{source}: cxrloc metadata lacks {', '.join(missing)}; re-export with 'cxrloc export'.")
    meta.pop("format")
    return meta


def providers_for(device: str) -> list[str]:
    """onnxruntime providers for ``device`` (``cpu`` or ``cuda``), falling back to CPU with a note."""
    import onnxruntime as ort

    if device not in ("cpu", "cuda"):
        raise CxrlocError(f"Unknown device {device!r}: use cpu or cuda.")
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        console.print(
            "[yellow]Note:[/] onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu); using the CPU."
        )
    return ["CPUExecutionProvider"]


def open_session(path: str | os.PathLike[str], device: str = "cpu", threads: int = DEFAULT_THREADS) -> Any:
    """Open an onnxruntime ``InferenceSession`` for an exported cxrloc model.

    Args:
        path: the ``.onnx`` file.
        device: ``cpu`` or ``cuda`` (CUDA provider when available, CPU otherwise).
        threads: intra-op threads of the CPU provider.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise CxrlocError(f"ONNX model not found: {path}. Make one with 'cxrloc export RUN_DIR'.")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings about unused initialisers are noise for a user
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers_for(device))
    except Exception as exc:  # invalid protobuf, unsupported opset, truncated file
        raise CxrlocError(f"onnxruntime cannot load {path}: {exc}") from None


def session_meta(session: Any, source: str | os.PathLike[str]) -> dict[str, Any]:
    """The cxrloc metadata of an open session."""
    return props_to_meta(dict(session.get_modelmeta().custom_metadata_map), source)
