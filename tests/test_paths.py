"""The output-path guard (cxrloc/paths.py) in every command: never over an input, never over a stranger's file.

Issue 22, defects 1 and 2: ``export --out`` over the checkpoint or the check image, ``predict
--json`` over the model, ``--out-dir`` whose batch summary would replace an input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line, run_cli
from PIL import Image

from cxrloc.paths import OutputGuard, made_by_cxrloc, same_file
from cxrloc.utils import CxrlocError


def _png(path: Path, shape: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(40, 200, shape, dtype=np.uint8)).save(path)
    return path


def _refused(code: int, text: str, *needles: str) -> None:
    assert code == 2, text
    assert "Traceback" not in text, text
    flat = one_line(text)
    for needle in needles:
        assert needle in flat, flat


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_run_factory) -> Path:
    root, _ = tiny_run_factory(tmp_path_factory.mktemp("run"), bias_span=3.0, seed=0, tau_hat=20.0)
    return root


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_guard_rules(tmp_path: Path) -> None:
    a = _png(tmp_path / "a.png")
    link = tmp_path / "link.png"
    link.symlink_to(a)
    hard = tmp_path / "hard.png"
    hard.hardlink_to(a)
    assert same_file(a, link) and same_file(a, hard) and same_file(a, tmp_path / "x" / ".." / "a.png")
    assert not same_file(a, tmp_path / "b.png")
    guard = OutputGuard([a, None], overwrite=True)
    for alias in (a, link, hard, tmp_path / "." / "a.png"):
        with pytest.raises(CxrlocError, match="one of this command's inputs"):
            guard.file(alias, "--json")  # even with --overwrite
    stranger = tmp_path / "notes.txt"
    stranger.write_text("mine")
    with pytest.raises(CxrlocError, match="not written by cxrloc; pass --overwrite"):
        OutputGuard([a]).file(stranger, "--out")
    assert OutputGuard([a], overwrite=True).file(stranger, "--out") == stranger
    assert OutputGuard([a]).file(tmp_path / "new.json", "--json") == tmp_path / "new.json"
    with pytest.raises(CxrlocError, match="one of this command's inputs"):
        OutputGuard([tmp_path]).folder(tmp_path / ".", "--out-dir")


def test_made_by_cxrloc_knows_its_own_outputs_only(tmp_path: Path) -> None:
    from cxrloc.inference.overlay import save_overlay

    record = tmp_path / "r"
    record.write_text(json.dumps({"model": "m.pt", "backend": "torch", "image": "x.png"}))
    other_json = tmp_path / "o.json"
    other_json.write_text(json.dumps({"model": "m.pt"}))
    maps = tmp_path / "m.npy"
    np.save(maps, np.zeros((14, 8, 8), np.float32))
    other_npy = tmp_path / "o.npy"
    np.save(other_npy, np.zeros(3))
    png, jpg = save_overlay(Image.new("RGB", (8, 8)), tmp_path / "ov.png"), save_overlay(
        Image.new("RGB", (8, 8)), tmp_path / "ov.jpg")
    plain = _png(tmp_path / "plain.png")
    assert made_by_cxrloc(record) and made_by_cxrloc(maps) and made_by_cxrloc(png) and made_by_cxrloc(jpg)
    assert not any(made_by_cxrloc(p) for p in (other_json, other_npy, plain, tmp_path / "absent.json"))


def test_export_never_writes_over_its_inputs(run: Path, tmp_path: Path) -> None:
    ckpt = run / "fold_0" / "checkpoints" / "best.pt"
    before = _bytes(ckpt)
    _refused(*run_cli("export", run, "--out", ckpt), "--out", "one of this command's inputs")
    image = _png(tmp_path / "ci.png")
    image_bytes = _bytes(image)
    _refused(*run_cli("export", ckpt, "--out", image, "--check-image", image), "one of this command's inputs")
    stranger = tmp_path / "existing.txt"
    stranger.write_text("keep me")
    _refused(*run_cli("export", run, "--out", stranger), "not written by cxrloc", "--overwrite")
    assert _bytes(ckpt) == before and _bytes(image) == image_bytes and stranger.read_text() == "keep me"
    # An ONNX file cxrloc wrote is replaced without a word; a stranger's only with --overwrite.
    out = tmp_path / "m.onnx"
    for _ in range(2):
        code, text = run_cli("export", run, "--out", out, "--check-image", image)
        assert code == 0, text
    code, text = run_cli("export", run, "--out", stranger, "--check-image", image, "--overwrite")
    assert code == 0 and stranger.read_bytes()[:4] != b"keep", text


def test_predict_never_writes_over_its_inputs(run: Path, tmp_path: Path) -> None:
    ckpt = run / "fold_0" / "checkpoints" / "best.pt"
    before = _bytes(ckpt)
    image = _png(tmp_path / "x.png")
    for option in ("--json", "--overlay"):
        target = ckpt if option == "--json" else ckpt.with_suffix(".png")
        if option == "--overlay":
            target = image  # the overlay over the image it draws
        _refused(*run_cli("predict", image, "--model", run, option, target), "one of this command's inputs")
    _refused(*run_cli("predict", image, "--model", ckpt, "--json", ckpt), "one of this command's inputs")
    _refused(*run_cli("predict", image, "--model", run, "--json", ckpt), "one of this command's inputs")
    assert _bytes(ckpt) == before
    stranger = tmp_path / "notes.json"
    stranger.write_text('{"mine": 1}')
    _refused(*run_cli("predict", image, "--model", run, "--json", stranger), "not written by cxrloc")
    assert stranger.read_text() == '{"mine": 1}'
    # Its own record is refreshed by a second run; a stranger's is replaced with --overwrite.
    own = tmp_path / "own.json"
    for _ in range(2):
        code, text = run_cli("predict", image, "--model", run, "--json", own)
        assert code == 0, text
    code, text = run_cli("predict", image, "--model", run, "--json", stranger, "--overwrite")
    assert code == 0 and json.loads(stranger.read_text())["image"] == str(image), text


def test_predict_batch_summary_never_replaces_an_input(run: Path, tmp_path: Path) -> None:
    from conftest import write_dicom

    d = tmp_path / "d"
    _png(d / "x.png")
    dicom = write_dicom(d / "predictions.json", np.full((40, 40), 900, np.uint16), "MONOCHROME2", 12)
    before = _bytes(dicom)
    _refused(*run_cli("predict", d / "x.png", dicom, "--model", run, "--out-dir", d),
             "the batch summary", "one of this command's inputs")
    assert _bytes(dicom) == before and not (d / "x.json").exists()
    # The model file inside --out-dir is safe too; a foreign predictions.json needs --overwrite.
    e = tmp_path / "e"
    _png(e / "a.png")
    _png(e / "b.png", seed=1)
    (e / "predictions.json").write_text("[1, 2]")
    _refused(*run_cli("predict", e / "a.png", e / "b.png", "--model", run, "--out-dir", e), "not written by cxrloc")
    assert (e / "predictions.json").read_text() == "[1, 2]"
    code, text = run_cli("predict", e / "a.png", e / "b.png", "--model", run, "--out-dir", e)
    assert code == 2
    code, text = run_cli("predict", e / "a.png", e / "b.png", "--model", run, "--out-dir", e, "--overwrite")
    assert code == 0 and json.loads((e / "predictions.json").read_text())["count"] == 2, text
    # A second run into the same folder replaces its own outputs without --overwrite.
    code, text = run_cli("predict", e / "a.png", e / "b.png", "--model", run, "--out-dir", e)
    assert code == 0, text


def test_predict_with_an_onnx_model_keeps_it(run: Path, tmp_path: Path) -> None:
    image = _png(tmp_path / "x.png")
    onnx_path = tmp_path / "m.onnx"
    code, text = run_cli("export", run, "--out", onnx_path, "--check-image", image)
    assert code == 0, text
    before = _bytes(onnx_path)
    _refused(*run_cli("predict", image, "--model", onnx_path, "--json", onnx_path), "one of this command's inputs")
    assert _bytes(onnx_path) == before


def test_prepare_and_train_refuse_an_input_as_output(tmp_path: Path, prepared_writer) -> None:
    from test_data_prepare import _make_nih

    nih = tmp_path / "nih"
    _make_nih(nih, corrupt=False)
    _refused(*run_cli("prepare", nih, "--out", nih, "--size", "32", "--folds", "2"), "one of this command's inputs")
    assert not (nih / "manifest.csv").exists()
    # A folder that is not a prepared folder but holds a file of prepare's names.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.csv").write_text("mine\n")
    _refused(*run_cli("prepare", nih, "--out", foreign, "--size", "32", "--folds", "2"),
             "not a prepared folder", "--overwrite")
    assert (foreign / "manifest.csv").read_text() == "mine\n"
    prep = prepared_writer(tmp_path / "prepared")
    _refused(*run_cli("train", prep, "--out", prep, "--preset", "tiny", "--epochs", "1"),
             "one of this command's inputs")
    assert not (prep / "fold_0").exists()
