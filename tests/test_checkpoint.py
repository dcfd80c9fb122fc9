"""Checkpoint loading: weights_only, format marker, fitted thresholds beside the checkpoint."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cxrloc.checkpoint import load_checkpoint, load_model, make_meta, save_checkpoint
from cxrloc.config import make_config
from cxrloc.model.net import build_model
from cxrloc.rundir import resolve_checkpoint
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
