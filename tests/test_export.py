"""Tests of ``cxrloc export``: ONNX graph, metadata, dynamic batch, the torch/onnxruntime check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import SHARED_DATA
from typer.testing import CliRunner

from cxrloc.checkpoint import load_checkpoint
from cxrloc.classes import CLASSES
from cxrloc.data.synthetic import healthy_chest
from cxrloc.inference.export import export_onnx
from cxrloc.utils import CxrlocError


def make_tiny_run(factory, root: Path, thresholds_in_meta: bool = True) -> tuple[Path, torch.nn.Module]:
    # tau_hat distinct per class: a mix-up of classes would show.
    return factory(root, bias_span=2.0, seed=1, tau_hat=np.arange(1, 15, dtype=np.float64),
                   thresholds_in_meta=thresholds_in_meta)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_run_factory):
    root = tmp_path_factory.mktemp("run")
    run, model = make_tiny_run(tiny_run_factory, root)
    report = export_onnx(run)  # default check image: a real NIH image when ../shared/data exists
    return run, model, report


def test_default_path_metadata_and_graph(exported) -> None:
    run, _, report = exported
    assert report.path == run / "export" / "model.onnx" and report.path.is_file()
    assert not [p for p in report.path.parent.iterdir() if p.name.endswith(".tmp")]
    proto = onnx.load(str(report.path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    meta = load_checkpoint(run / "fold_0" / "checkpoints" / "best.pt")["meta"]
    assert props["format"] == "cxrloc-onnx"
    for key in ("classes", "image_size", "patch_grid", "normalisation", "thresholds", "version", "arch", "crf",
                "antialias"):
        assert props[key] == meta[key], key
    assert props["classes"] == list(CLASSES) and props["image_size"] == 64 and props["patch_grid"] == 8
    assert props["thresholds"]["classes"]["Hernia"]["tau_hat"] == 14.0
    (inp,) = proto.graph.input
    assert inp.name == "image"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 64, 64]
    assert [o.name for o in proto.graph.output] == ["z", "unary_logits"]
    if (SHARED_DATA / "nih" / "images").is_dir():
        assert "nih/images" in report.check_image


def test_check_reports_the_difference_measured_here(exported) -> None:
    # The export refuses past its tolerance, so its report alone proves nothing. Here: the check's batch
    # (its image and the mirror image) through onnxruntime and through the test's own torch model (not the
    # one the export loaded); they agree to 1e-4 on z (probabilities; float32 gives ~1e-7), and the
    # report's max |dz| is the one measured here (to 1e-5: two sessions may schedule their sums differently).
    from cxrloc.data.imageio import read_image
    from cxrloc.inference.inputs import preprocess

    _, model, report = exported
    if report.check_image == "generated synthetic chest":
        img = healthy_chest(64)
    else:
        img = read_image(report.check_image)
    x1 = preprocess(img, 64)
    x = np.stack([x1, x1[:, :, ::-1]]).astype(np.float32)
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    z, unary = sess.run(["z", "unary_logits"], {"image": x})
    with torch.no_grad():
        z_t, u_t = model(torch.from_numpy(x))
    diff_z = float(np.abs(z - z_t.numpy()).max())
    assert diff_z <= 1e-4
    assert report.max_abs_diff_z == pytest.approx(diff_z, abs=1e-5)
    assert report.max_abs_diff_unary == pytest.approx(float(np.abs(unary - u_t.numpy()).max()), abs=1e-4)


def test_onnxruntime_matches_torch_for_any_batch(exported) -> None:
    _, model, report = exported
    rng = np.random.default_rng(0)
    x = np.stack([healthy_chest(64, seed=s)[None] * 2 - 1 for s in range(3)]).astype(np.float32)
    x[2] = rng.uniform(-1, 1, size=x[2].shape)
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    z, unary = sess.run(["z", "unary_logits"], {"image": x})
    with torch.no_grad():
        z_t, u_t = model(torch.from_numpy(x))
    assert z.shape == (3, 14, 8, 8)
    np.testing.assert_allclose(z, z_t.numpy(), atol=1e-4)
    np.testing.assert_allclose(unary, u_t.numpy(), atol=1e-3)
    # The CRF is part of the graph: z is not just sigmoid(unary).
    assert np.abs(z - 1 / (1 + np.exp(-unary))).max() > 1e-3


def test_thresholds_from_buffers_when_meta_has_none(tmp_path: Path, tiny_run_factory) -> None:
    run, _ = make_tiny_run(tiny_run_factory, tmp_path / "run", thresholds_in_meta=False)
    report = export_onnx(run, tmp_path / "m.onnx", check_image=None)
    props = {p.key: json.loads(p.value) for p in onnx.load(str(report.path)).metadata_props}
    assert props["thresholds"]["classes"]["Mass"]["tau_hat"] == 5.0  # from the model's buffers


def test_check_failure_leaves_no_file(tmp_path: Path, tiny_run_factory, monkeypatch) -> None:
    import cxrloc.inference.backends as backends

    run, _ = make_tiny_run(tiny_run_factory, tmp_path / "run")
    out = tmp_path / "out" / "m.onnx"
    real_open = backends.open_session

    class Shifted:  # the real session, with z off by 0.5: the check must refuse
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def get_providers(self):
            return self.inner.get_providers()

        def run(self, names, feeds):
            z, unary = self.inner.run(names, feeds)
            return z + 0.5, unary

    monkeypatch.setattr(backends, "open_session", Shifted)
    with pytest.raises(CxrlocError, match="differs from torch"):
        export_onnx(run, out)
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.undo()
    # An impossible tolerance is refused at once, before anything is exported (issue 22, 8).
    for bad_tolerance in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(CxrlocError, match="--tolerance must be a finite number above 0"):
            export_onnx(run, out, tolerance=bad_tolerance)
    assert not out.exists()
    with pytest.raises(CxrlocError, match="opset"):
        export_onnx(run, out, opset=13)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(CxrlocError, match="bad.png"):
        export_onnx(run, out, check_image=bad)


def test_cli_export(tmp_path: Path, tiny_run_factory) -> None:
    from cxrloc.cli import app

    run, _ = make_tiny_run(tiny_run_factory, tmp_path / "run")
    out = tmp_path / "cli.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert f"Results saved to {out}" in result.output.replace("\n", "")
    assert "max |dz|" in result.output
