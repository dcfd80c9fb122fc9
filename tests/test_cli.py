"""Every command, through the real entry point: an output that cannot be written is one clear line
(exit 2, no traceback), checked before long work where possible, and nothing existing is changed."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line, run_cli
from PIL import Image


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _clean(code: int, text: str, expected_code: int = 2) -> str:
    assert code == expected_code, text
    assert "Traceback" not in text and "Error:" in text, text
    return one_line(text)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_run_factory) -> Path:
    run, _ = tiny_run_factory(tmp_path_factory.mktemp("run"), bias_span=3.0, seed=0, tau_hat=20.0)
    return run


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, prepared_writer: Callable[..., Path]) -> Path:
    return prepared_writer(tmp_path_factory.mktemp("prep") / "prepared")


def _image(path: Path, shape: tuple[int, int] = (40, 48), value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def test_predict_out_dir_of_the_wrong_kind_or_too_long(tiny: Path, tmp_path: Path) -> None:
    a, b = _image(tmp_path / "in" / "a.png"), _image(tmp_path / "in" / "b.png")
    taken = tmp_path / "taken"
    taken.write_text("keep")
    flat = _clean(*run_cli("predict", a, b, "--model", tiny, "--out-dir", taken))
    assert f"--out-dir {taken} is a file, not a folder" in flat
    assert taken.read_text() == "keep"
    flat = _clean(*run_cli("predict", a, b, "--model", tiny, "--out-dir", tmp_path / ("x" * 300)))
    assert "too long" in flat
    folder = tmp_path / "folder.json"
    folder.mkdir()
    flat = _clean(*run_cli("predict", a, "--model", tiny, "--json", folder))
    assert f"--json {folder} is a folder" in flat


def test_predict_read_only_out_dir_is_refused_before_work(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cxrloc.inference.predict as predict_mod
    import cxrloc.utils as utils

    loaded: list[str] = []
    monkeypatch.setattr(predict_mod, "load_predictor", lambda *a, **k: loaded.append("model"))

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(utils.tempfile, "mkstemp", read_only)
    a = _image(tmp_path / "a.png")
    flat = _clean(*run_cli("predict", a, "--model", tiny, "--out-dir", tmp_path / "out"))
    assert "read-only" in flat and "--out-dir" in flat
    assert loaded == [] and not (tmp_path / "out").exists()


def test_prepare_out_is_a_file_or_the_disk_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_data_prepare import _make_nih

    import cxrloc.data.image_cache as cache_mod
    import cxrloc.utils as utils

    nih = tmp_path / "nih"
    _make_nih(nih, corrupt=False)
    decoded: list[str] = []
    real = cache_mod.read_image_u8
    monkeypatch.setattr(cache_mod, "read_image_u8", lambda p, s: decoded.append(p) or real(p, s))
    taken = tmp_path / "taken"
    taken.write_text("keep")
    flat = _clean(*run_cli("prepare", nih, "--out", taken, "--size", "32", "--folds", "2"))
    assert f"--out {taken} is a file, not a folder" in flat and taken.read_text() == "keep"
    # Not enough free space for the cache: refused before decoding anything.
    usage = utils.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    flat = _clean(*run_cli("prepare", nih, "--out", tmp_path / "p", "--size", "32", "--folds", "2"))
    assert "disk full" in flat and "GB free" in flat
    assert decoded == [] and not (tmp_path / "p").exists()
    monkeypatch.undo()
    # The disk fills up while the manifest is written: one line, and an existing manifest is kept.
    out = tmp_path / "q"
    assert run_cli("prepare", nih, "--out", out, "--size", "32", "--folds", "2")[0] == 0
    before = (out / "manifest.csv").read_bytes()
    import pandas as pd

    monkeypatch.setattr(pd.DataFrame, "to_csv", _disk_full)
    flat = _clean(*run_cli("prepare", nih, "--out", out, "--size", "32", "--folds", "2"))
    assert "disk full" in flat and "manifest.csv" in flat
    assert (out / "manifest.csv").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_train_out_is_a_file_or_the_disk_fills_up(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    args = ["--fold", "0", "--preset", "tiny", "--epochs", "1", "--set", "max_steps_per_epoch=1", "--set",
            "device=cpu", "--quiet"]
    taken = tmp_path / "taken"
    taken.write_text("keep")
    flat = _clean(*run_cli("train", prepared, "--out", taken, *args))
    assert "is a file, not a folder" in flat and taken.read_text() == "keep"
    monkeypatch.setattr(torch, "save", _disk_full)
    flat = _clean(*run_cli("train", prepared, "--out", tmp_path / "run", *args))
    assert "disk full" in flat and ("best.pt" in flat or "last.pt" in flat)
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_export_out_of_the_wrong_kind(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    flat = _clean(*run_cli("export", tiny, "--out", folder))
    assert f"ONNX file {folder} is a folder" in flat and list(folder.iterdir()) == []
    a_file = tmp_path / "plain"
    a_file.write_text("keep")
    flat = _clean(*run_cli("export", tiny, "--out", a_file / "m.onnx"))
    assert "is a file, not a folder" in flat and a_file.read_text() == "keep"


def test_evaluate_and_fit_thresholds_outputs_of_the_wrong_kind(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / "eval").write_text("keep")
    flat = _clean(*run_cli("evaluate", run_dir))
    assert "evaluation folder" in flat and "is a file, not a folder" in flat
    assert (run_dir / "eval").read_text() == "keep"
    (run_dir / "fold_0" / "thresholds.json").mkdir()
    flat = _clean(*run_cli("fit-thresholds", run_dir, "--fold", "0"))
    assert "thresholds.json is a folder" in flat


def test_demo_out_is_a_file(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep")
    flat = _clean(*run_cli("demo", "--out", taken, "--quick"))
    assert f"--out {taken} is a file, not a folder" in flat and taken.read_text() == "keep"


def test_unexpected_os_error_is_one_line_exit_1(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry point is the last line of defence: an OSError no command foresaw is still one line."""
    import cxrloc.evaluation.evaluate as ev

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/somewhere/results.json")

    monkeypatch.setattr(ev, "evaluate", broken)
    flat = _clean(*run_cli("evaluate", run_dir), expected_code=1)
    assert "/somewhere/results.json" in flat and "disk full" in flat


def test_usage_json_untouched_after_failure(tiny: Path, tmp_path: Path) -> None:
    """A failed single-image predict leaves an existing --json as it was."""
    existing = tmp_path / "r.json"
    old = {"old": True, "model": "m.pt", "backend": "torch"}  # an earlier record (a stranger's file: test_paths.py)
    existing.write_text(json.dumps(old))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    code, text = run_cli("predict", bad, "--model", tiny, "--json", existing)
    assert code == 1 and "bad.png" in one_line(text) and "Traceback" not in text
    assert json.loads(existing.read_text()) == old
    assert "Nothing was written" in one_line(text)
