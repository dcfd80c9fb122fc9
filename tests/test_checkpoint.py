"""Checkpoint loading: weights_only, format marker, fitted thresholds beside the checkpoint."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from cxrloc.checkpoint import load_checkpoint, load_model, make_meta, resolve_checkpoint, save_checkpoint
from cxrloc.config import make_config
from cxrloc.model.net import build_model
from cxrloc.thresholds import Thresholds
from cxrloc.utils import CxrlocError


def _save_tiny(fold_dir):
    cfg = make_config("tiny")
    model = build_model(cfg)
    meta = make_meta(cfg, model.thresholds.get().to_json())
    state = {"config": cfg.to_dict(), "model": model.state_dict(), "meta": meta}
    save_checkpoint(fold_dir / "checkpoints" / "best.pt", state)
    return cfg, model


def test_fitted_thresholds_file_overrides_checkpoint(tmp_path):
    fold = tmp_path / "run" / "fold_0"
    cfg, model = _save_tiny(fold)
    saved = model.thresholds.get()

    loaded, meta, _ = load_model(tmp_path / "run")
    np.testing.assert_allclose(loaded.thresholds.get().tau_hat, saved.tau_hat, rtol=1e-6)
    assert "thresholds_source" not in meta

    k = cfg.patch_grid
    fitted = Thresholds(
        tau=np.linspace(0.4, 0.9, 14), rho=np.full(14, 0.1), tau_hat=np.arange(14) + 1.5,
        rho_hat=np.full(14, 0.5), patch_grid=k,
    )
    fitted.save(fold / "thresholds.json")
    loaded, meta, _ = load_model(tmp_path / "run")
    np.testing.assert_allclose(loaded.thresholds.get().tau_hat, np.arange(14) + 1.5, rtol=1e-6)
    np.testing.assert_allclose(loaded.thresholds.get().tau, np.linspace(0.4, 0.9, 14), rtol=1e-6)
    assert meta["thresholds"]["classes"]["Hernia"]["tau_hat"] == pytest.approx(14.5)
    assert meta["thresholds_source"].endswith("thresholds.json")


def test_unsafe_pickle_is_refused(tmp_path):
    # A checkpoint carrying an arbitrary Python object must not load (weights_only=True).
    path = tmp_path / "evil.pt"
    torch.save({"format": "cxrloc-checkpoint", "payload": pickle.PickleError("x")}, path)
    with pytest.raises(CxrlocError, match="Cannot read checkpoint"):
        load_checkpoint(path)


def test_not_a_checkpoint_and_missing(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CxrlocError, match="not a cxrloc checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CxrlocError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_resolve_checkpoint_needs_fold_when_several(tmp_path):
    _save_tiny(tmp_path / "run" / "fold_0")
    _save_tiny(tmp_path / "run" / "fold_1")
    with pytest.raises(CxrlocError, match="several folds"):
        resolve_checkpoint(tmp_path / "run")
    assert resolve_checkpoint(tmp_path / "run", fold=1) == tmp_path / "run" / "fold_1" / "checkpoints" / "best.pt"
    with pytest.raises(CxrlocError, match="no trained fold"):
        resolve_checkpoint(tmp_path)


def test_background_writer_snapshots_links_and_reports_errors(tmp_path):
    from cxrloc.checkpoint import CheckpointWriter

    weights = torch.arange(6.0)
    best, last = tmp_path / "ck" / "best.pt", tmp_path / "ck" / "last.pt"
    with CheckpointWriter() as writer:
        writer.submit([best, last], {"model": {"w": weights}, "epoch": 1})
        weights += 100  # training goes on: the file must hold the values at submit time
        writer.wait()
        assert os.path.samefile(best, last)  # one write, two names
        writer.submit([last], {"model": {"w": weights}, "epoch": 2})
    assert load_checkpoint(best)["epoch"] == 1 and torch.equal(load_checkpoint(best)["model"]["w"], torch.arange(6.0))
    assert load_checkpoint(last)["epoch"] == 2 and torch.equal(load_checkpoint(last)["model"]["w"], weights)
    assert not os.path.samefile(best, last)  # replacing last.pt left best.pt alone
    assert sorted(p.name for p in best.parent.iterdir()) == ["best.pt", "last.pt"]  # no temporary left
    # a failing write surfaces in the training thread, at the next wait
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    writer = CheckpointWriter()
    writer.submit([blocked / "last.pt"], {"epoch": 3})
    with pytest.raises(OSError):
        writer.wait()
