"""Model backends behind one interface: a torch checkpoint or an exported ONNX file.

:class:`Predictor` is what ``predict`` runs: :class:`TorchPredictor` loads a checkpoint
(``torch.load(weights_only=True)``), :class:`OnnxPredictor` an onnxruntime session. An exported
file carries everything ``predict`` needs in its ``metadata_props`` (the same content as a
checkpoint's ``meta``, see :func:`cxrloc.checkpoint.make_meta`): every value is stored as a JSON
string under its own key, plus ``format = "cxrloc-onnx"``.

Both backends read the calibration (``meta["calibration"]``, :mod:`cxrloc.calibration`) the same
way, so a checkpoint and its export give the same probabilities and decisions. A model without one
(a run never calibrated, a file exported before calibration existed) decides presence by
``1'z >= tau_hat`` as before, and :meth:`Predictor.operating_point` says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrloc.classes import CLASSES
from cxrloc.decision import operating_point
from cxrloc.utils import CxrlocError, console

if TYPE_CHECKING:
    from cxrloc.calibration import Calibration

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
    from cxrloc.classes import check_class_names

    if not isinstance(meta["classes"], list):
        raise CxrlocError(f"{source}: its metadata 'classes' is not a list; re-export with 'cxrloc export'.")
    check_class_names(meta["classes"], f"{source} (metadata 'classes'; re-export with 'cxrloc export')")
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


def check_finite_initializers(path: str | os.PathLike[str]) -> None:
    """Refuse an ONNX model whose weights (graph initialisers) hold NaN or infinity.

    Raises:
        CxrlocError: one line naming the file and the first bad initialiser.
    """
    import onnx
    from onnx import numpy_helper

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnxruntime read it; a second reader failing is a damaged file all the same
        raise CxrlocError(f"cannot read the weights of {path}: {exc}") from None
    bad = []
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and not bool(np.isfinite(arr).all()):
            bad.append(init.name)
    if bad:
        raise CxrlocError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values (first {bad[0]}); the model is "
            "damaged or was exported from a diverged run: export a good checkpoint again"
        )


def session_meta(session: Any, source: str | os.PathLike[str]) -> dict[str, Any]:
    """The cxrloc metadata of an open session."""
    return props_to_meta(dict(session.get_modelmeta().custom_metadata_map), source)


def check_graph(session: Any, meta: dict[str, Any], source: str | os.PathLike[str]) -> None:
    """Check the graph's input and outputs against the metadata before anything runs.

    The input must be ``image`` of shape (batch, 1, S, S) and the outputs ``z`` and
    ``unary_logits`` of shape (batch, K, P, P), with S, K and P as the metadata says (a dimension
    the graph leaves symbolic is not checked). A file whose metadata was edited, or copied from
    another export, would otherwise fail inside onnxruntime with a long traceback.

    Raises:
        CxrlocError: a missing input or output, or a shape that disagrees with the metadata.
    """
    size, grid = meta.get("image_size"), meta.get("patch_grid")
    if not isinstance(size, int) or not isinstance(grid, int) or size < 1 or grid < 1:
        raise CxrlocError(f"{source}: cxrloc metadata image_size={size!r}, patch_grid={grid!r} are not sizes; "
                          "re-export with 'cxrloc export'.")
    classes = meta.get("classes") or CLASSES
    if not isinstance(classes, list | tuple) or not classes:
        raise CxrlocError(f"{source}: cxrloc metadata classes={classes!r} is not a class list; re-export with "
                          "'cxrloc export'.")
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    wanted = [(INPUT_NAME, inputs, (1, size, size), "input")] + [
        (name, outputs, (len(classes), grid, grid), "output") for name in OUTPUT_NAMES
    ]
    for name, table, dims, kind in wanted:
        if name not in table:
            raise CxrlocError(
                f"{source}: the graph has no {kind} {name!r} (it has {sorted(table)}); it is not a cxrloc export."
            )
        shape = list(table[name])
        if len(shape) != 4:
            raise CxrlocError(f"{source}: graph {kind} {name!r} has shape {shape}, expected 4 dimensions.")
        for got, want in zip(shape[1:], dims, strict=True):
            if isinstance(got, int) and got != want:
                raise CxrlocError(
                    f"{source}: graph {kind} {name!r} has shape {shape} but the metadata (image_size={size}, "
                    f"patch_grid={grid}, {len(classes)} classes) implies (batch, {', '.join(map(str, dims))}); the "
                    "metadata was edited or belongs to another model: re-export with 'cxrloc export'."
                )


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
        calibration: per-class probabilities and operating points, or ``None`` (uncalibrated model).
        calibration_note: why there is no calibration (empty when there is one).
    """

    backend: str = ""

    def __init__(self, source: Path, meta: dict[str, Any], thresholds_json: dict[str, Any]) -> None:
        from cxrloc.thresholds import Thresholds

        self.source = source
        self.meta = meta
        self.image_size = int(meta["image_size"])
        self.patch_grid = int(meta["patch_grid"])
        self.classes: list[str] = list(meta.get("classes") or CLASSES)  # files made before class lists: NIH's
        th = Thresholds.from_json(thresholds_json, classes=self.classes)
        if th.patch_grid != self.patch_grid:
            raise CxrlocError(f"Thresholds are for P={th.patch_grid} but {source} has P={self.patch_grid}.")
        self.thresholds_json = thresholds_json
        self.tau_hat = np.asarray(th.tau_hat, dtype=np.float64)
        self.calibration, self.calibration_note = _calibration_of(meta, self.classes, source)

    def operating_point(self) -> dict[str, Any]:
        """What decides "present", for the JSON record: the calibrated rule, or the ``tau_hat`` fallback."""
        if self.calibration is None:
            return operating_point(None, note=self.calibration_note, record=True)
        fitted = self.meta.get("calibration_source")
        source = fitted if self.backend == "torch" and fitted else (
            f"metadata of {self.source.name}" + (f" (fitted as {fitted})" if fitted else ""))
        return operating_point(self.calibration, source=source, record=True)

    def describe_operating_point(self) -> str:
        """One line for the command's output."""
        if self.calibration is not None:
            return f"Operating point: {self.calibration.describe()}."
        return "Operating point: 1'z >= tau_hat (uncalibrated model; run 'cxrloc calibrate RUN_DIR')."

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the network on ``x`` (B, 1, S, S) float32 in [-1, 1]; return ``(z, unary_logits)``."""
        raise NotImplementedError


def _calibration_of(meta: dict[str, Any], classes: list[str], source: Path) -> tuple[Calibration | None, str]:
    """``(Calibration, "")`` from ``meta["calibration"]``, or ``(None, why not)``."""
    from cxrloc.calibration import Calibration

    data = meta.get("calibration")
    if not data:
        note = meta.get("calibration_note") or (
            f"{source} carries no calibration: probabilities are unknown and presence falls back to "
            "1'z >= tau_hat; run 'cxrloc calibrate RUN_DIR' (then re-export an ONNX file)."
        )
        return None, str(note)
    cal = Calibration.from_json(data, f"{source} calibration")
    if cal.classes != classes:
        raise CxrlocError(f"{source}: the calibration is for classes {cal.classes}, the model has {classes}.")
    return cal, ""


class TorchPredictor(Predictor):
    """A model loaded from a checkpoint (``torch.load(weights_only=True)``)."""

    backend = "torch"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        fold: int | None = None,
        thresholds_file: str | os.PathLike[str] | None = None,
    ) -> None:
        import torch

        from cxrloc.checkpoint import load_model
        from cxrloc.precision import inference_options
        from cxrloc.rundir import resolve_checkpoint

        if device == "cuda" and not torch.cuda.is_available():
            console.print("[yellow]Note:[/] CUDA is not available to torch here; using the CPU.")
            device = "cpu"
        ckpt = resolve_checkpoint(path, fold=fold)
        # Thresholds by the one rule of cxrloc.rundir (explicit file > fitted file > checkpoint).
        model, meta, cfg = load_model(ckpt, device=device, thresholds_file=thresholds_file)
        self.model = model
        self.device = device
        # On a CPU, the run's precision and layout (bf16 where the CPU has it, the network in channels-last,
        # as training puts it).
        self.options = inference_options(cfg, device)
        if self.options["channels_last"]:
            model.to(memory_format=torch.channels_last)
        super().__init__(ckpt, meta, meta["thresholds"])

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        amp = self.options["amp"]
        # One channel: the same tensor in either layout, so the network's own layout (__init__) decides.
        batch = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        with torch.inference_mode(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            z, unary = self.model(batch)
        return z.float().cpu().numpy(), unary.float().cpu().numpy()


class OnnxPredictor(Predictor):
    """A model exported by ``cxrloc export``, run by onnxruntime."""

    backend = "onnx"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        threads: int = DEFAULT_THREADS,
        thresholds_file: str | os.PathLike[str] | None = None,
    ) -> None:
        path = Path(path)
        self.session = open_session(path, device=device, threads=threads)
        self.provider = self.session.get_providers()[0]
        meta = session_meta(self.session, path)
        check_graph(self.session, meta, path)
        check_finite_initializers(path)
        self._input = INPUT_NAME
        self._outputs = list(OUTPUT_NAMES)
        if thresholds_file is not None:
            from cxrloc.thresholds import Thresholds

            th = Thresholds.load(thresholds_file).to_json()
        else:
            th = meta.get("thresholds")
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
    threads: int = DEFAULT_THREADS,
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
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        return OnnxPredictor(path, device=device, threads=threads, thresholds_file=thresholds_file)
    return TorchPredictor(path, device=device, fold=fold, thresholds_file=thresholds_file)
