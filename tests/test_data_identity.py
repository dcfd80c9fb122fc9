"""A prepared folder's identity (size, image list, tables) recorded by a run and checked by its readers.

Issue 22, defect 6: re-preparing over a finished 64 px folder at 32 px silently replaced the
cache; evaluate, fit-thresholds and train --resume of the 64 px run then ran on the new pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import one_line, run_cli

from cxrloc.data.identity import check_prepared_identity, prepared_identity
from cxrloc.data.prepare import prepare
from cxrloc.training.runner import run_training
from cxrloc.utils import CxrlocError

BASE = ["max_steps_per_epoch=1", "device=cpu", "workers=0", "batch_size=4", "annotated_per_batch=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from test_data_prepare import _make_nih

    root = tmp_path_factory.mktemp("identity")
    nih = root / "nih"
    _make_nih(nih, corrupt=False)
    prep = prepare(nih, root / "p", size=64, folds=2, progress=False)
    run_training(prep, root / "run", folds=0, preset="tiny", overrides=BASE, epochs=1, progress=False)
    return nih, prep, root / "run"


def test_run_records_the_prepared_folder(trained: tuple[Path, Path, Path]) -> None:
    _, prep, run = trained
    recorded = json.loads((run / "fold_0" / "run.json").read_text())["prepared"]
    cache = json.loads((prep / "cache.json").read_text())
    assert recorded["size"] == 64 == cache["size"] and recorded["ids_sha256"] == cache["ids_sha256"]
    assert recorded == prepared_identity(prep)
    check_prepared_identity(prep, recorded, run / "fold_0")  # unchanged: accepted
    check_prepared_identity(prep, None, run / "fold_0")  # a run made before the record: not checked


def test_reprepare_at_another_size_needs_rebuild_and_then_runs_refuse_it(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    nih, prep, run = trained
    before = (prep / "images.u8").read_bytes()
    code, text = run_cli("prepare", nih, "--out", prep, "--size", "32", "--folds", "2", "--unannotated-fraction", "0")
    flat = one_line(text)
    assert code == 2 and "finished prepared folder" in flat and "--size 64 -> 32" in flat and "--rebuild" in flat
    assert (prep / "images.u8").read_bytes() == before
    # Same parameters: resumed / reused as before, no --rebuild needed.
    code, text = run_cli("prepare", nih, "--out", prep, "--size", "64", "--folds", "2", "--unannotated-fraction", "0")
    assert code == 0, text
    code, text = run_cli("prepare", nih, "--out", prep, "--size", "32", "--folds", "2",
                         "--unannotated-fraction", "0", "--rebuild")
    assert code == 0, text
    assert json.loads((prep / "cache.json").read_text())["size"] == 32
    for args in (("evaluate", run), ("fit-thresholds", run), ("calibrate", run),
                 ("train", prep, "--out", run, "--preset", "tiny", "--set", "image_size=32", "--set", "patch_grid=4",
                  "--epochs", "2", "--resume", *[a for s in BASE for a in ("--set", s)])):
        code, text = run_cli(*args)
        flat = one_line(text)
        assert code == 2 and "Traceback" not in text, (args, text)
        assert "was trained on" in flat and "at 64 px" in flat and "now caches its images at 32 px" in flat, flat
        assert "cxrloc prepare" in flat and "--size 64" in flat and "--rebuild" in flat, flat
    assert not (run / "eval").exists()
    # Restoring the run's size makes the run usable again.
    code, text = run_cli("prepare", nih, "--out", prep, "--size", "64", "--folds", "2",
                         "--unannotated-fraction", "0", "--rebuild")
    assert code == 0, text
    check_prepared_identity(prep, json.loads((run / "fold_0" / "run.json").read_text())["prepared"], run)


def test_train_refuses_a_cache_smaller_than_the_network_input(tmp_path: Path) -> None:
    from test_data_prepare import _make_nih

    nih = tmp_path / "nih"
    _make_nih(nih, corrupt=False)
    prep = prepare(nih, tmp_path / "p32", size=32, folds=2, progress=False)
    code, text = run_cli("train", prep, "--out", tmp_path / "r", "--preset", "tiny", "--epochs", "1")
    flat = one_line(text)
    assert code == 2 and "caches its images at 32 px" in flat and "image_size=64" in flat, text
    assert "--set image_size=32" in flat and "--size 64" in flat and not (tmp_path / "r" / "fold_0").exists()


def test_identity_mismatch_of_the_tables(tmp_path: Path) -> None:
    prep = tmp_path / "p"
    prep.mkdir()
    (prep / "cache.json").write_text(json.dumps({"size": 64, "count": 3, "ids_sha256": "a"}))
    (prep / "fingerprint.json").write_text(json.dumps({"inputs": {"format": "nih", "data_entry": {"sha256": "x"}}}))
    now = prepared_identity(prep)
    with pytest.raises(CxrlocError, match="another image list"):
        check_prepared_identity(prep, {**now, "ids_sha256": "b"}, tmp_path / "run")
    with pytest.raises(CxrlocError, match="another set of tables"):
        check_prepared_identity(prep, {**now, "tables_sha256": "0"}, tmp_path / "run")
