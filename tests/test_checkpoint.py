"""Checkpoint loading: weights_only, format marker, fitted thresholds beside the checkpoint."""

from __future__ import annotations

import os
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


def _damage(state: dict, how: str) -> dict:
    state = dict(state)
    if how == "no config":
        del state["config"]
    elif how == "config not a dict":
        state["config"] = "resnet"
    elif how == "huge width":
        state["config"] = {**state["config"], "width": 200000}
    elif how == "nan lr":
        state["config"] = {**state["config"], "lr": float("nan")}
    elif how == "width is text":
        state["config"] = {**state["config"], "width": "eight"}
    elif how == "no model":
        del state["model"]
    elif how == "missing key":
        state["model"] = {k: v for k, v in state["model"].items() if k != "unary.backbone.conv1.weight"}
    elif how == "extra key":
        state["model"] = {**state["model"], "surprise.weight": torch.zeros(3)}
    elif how == "wrong shape":
        state["model"] = {**state["model"], "unary.head.conv2.weight": torch.zeros(14, 3, 1, 1)}
    elif how == "not a tensor":
        state["model"] = {**state["model"], "unary.head.conv2.bias": [0.0] * 14}
    elif how == "no meta":
        del state["meta"]
    elif how == "meta disagrees":
        state["meta"] = {**state["meta"], "image_size": 512}
    return state


DAMAGE = {
    "no config": "holds no config",
    "config not a dict": "holds no config",
    "huge width": "width=200000: use 1 to 256",
    "nan lr": "lr=nan: it must be a finite number",
    "width is text": "width='eight': expected a value of type int",
    "no model": "holds no model weights",
    "missing key": "1 missing (first unary.backbone.conv1.weight)",
    "extra key": "1 unexpected (first surprise.weight)",
    "wrong shape": "unary.head.conv2.weight is (14, 3, 1, 1), expected (14, 16, 1, 1)",
    "not a tensor": "non-tensor entries (first 'unary.head.conv2.bias')",
    "no meta": "no inference metadata",
    "meta disagrees": "image_size=512 but its config 64",
}


def test_malformed_checkpoints_with_the_marker_are_one_message(tmp_path):
    """Each damage is named, before any network is built (a width of 200000 would need 1.4 TB)."""
    from conftest import one_line, run_cli
    from PIL import Image

    good = tmp_path / "good" / "fold_0"
    _save_tiny(good)
    state = torch.load(good / "checkpoints" / "best.pt", weights_only=True)
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40), 100, np.uint8)).save(img)
    for how, words in DAMAGE.items():
        path = tmp_path / how.replace(" ", "_") / "best.pt"
        path.parent.mkdir()
        torch.save(_damage(state, how), path)
        with pytest.raises(CxrlocError) as info:
            load_model(path)
        assert str(path) in str(info.value) and words in str(info.value), (how, str(info.value))
        code, text = run_cli("predict", img, "--model", path, "--json", tmp_path / "r.json")
        assert code == 2 and "Traceback" not in text and words in one_line(text), (how, text)
    assert not (tmp_path / "r.json").exists()


def test_nan_and_bounds_in_set_are_refused():
    from conftest import one_line, run_cli

    for override, words in (("lr=nan", "lr=nan"), ("aug_scale=nan", "aug_scale=nan"), ("lambda_ann=inf", "finite"),
                            ("width=200000", "use 1 to 256"), ("patch_grid=0", "patch_grid=0"),
                            ("epochs=0", "at least 1 epoch")):
        with pytest.raises(CxrlocError, match=words):
            make_config("tiny", [override])
        code, text = run_cli("train", "/nonexistent-prepared", "--out", "/tmp/x", "--set", override)
        assert code == 2 and words in one_line(text) and "Traceback" not in text, (override, text)


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
    with pytest.raises(CxrlocError, match="cannot write checkpoint .*a file of that name exists"):
        writer.wait()


# --------------------------------------------------------------------------- issue 22 (defects 3, 5, 10)


def test_non_finite_weights_are_refused_at_load_in_one_line(tmp_path):
    from conftest import one_line, run_cli
    from PIL import Image

    for bad in (float("nan"), float("inf")):
        fold = tmp_path / f"run_{bad}" / "fold_0"
        cfg, model = _save_tiny(fold)
        state = load_checkpoint(fold / "checkpoints" / "best.pt")
        key = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
        state["model"][key].view(-1)[1] = bad
        save_checkpoint(fold / "checkpoints" / "best.pt", {k: v for k, v in state.items() if k != "format"})
        with pytest.raises(CxrlocError, match=f"NaN or infinite values \\(first {key}\\)"):
            load_model(fold / "checkpoints" / "best.pt")
    image = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40), 100, np.uint8)).save(image)
    out = tmp_path / "x.json"
    code, text = run_cli("predict", image, "--model", fold.parent, "--json", out)
    assert code == 2 and "Traceback" not in text and "NaN or infinite" in one_line(text), text
    assert text.count("\n") <= 2 and not out.exists()  # one line; no "no finding" record


def test_pickle_and_empty_checkpoints_are_one_line(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "cxrloc-checkpoint", "payload": pickle.PickleError("x")}, evil)
    with pytest.raises(CxrlocError) as info:
        load_checkpoint(evil)
    message = str(info.value)
    assert "\n" not in message and "weights_only=False" not in message and "pickled Python objects" in message
    zero = tmp_path / "zero.pt"
    zero.write_bytes(b"")
    with pytest.raises(CxrlocError, match=r"the file is empty \(0 bytes\)"):
        load_checkpoint(zero)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with pytest.raises(CxrlocError) as info:
        load_checkpoint(garbage)
    assert "\n" not in str(info.value) and ": ." not in str(info.value)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device whose writes fail: disk full)")
def test_a_full_disk_during_a_checkpoint_write_is_one_line(tmp_path):
    """torch.save given a file name says "[enforce fail at inline_container.cc] unexpected pos"; through
    a file object the write error stays ENOSPC, which every command reports as "disk full"."""
    import errno
    from pathlib import Path

    from cxrloc.checkpoint import torch_save
    from cxrloc.utils import os_error_message

    state = {"w": torch.zeros(100_000)}
    with pytest.raises(OSError) as info:
        torch_save(state, Path("/dev/full"))
    assert info.value.errno == errno.ENOSPC
    assert "disk full" in os_error_message(info.value, tmp_path / "last.pt", "checkpoint")


def test_loss_settings_out_of_range_are_refused():
    # Issue 22, defect 8: lambda_ann=-5 trained with a loss of -2.53 (a reward for wrong boxes).
    from conftest import one_line, run_cli

    for override in ("lambda_ann=-5", "sigmoid_temperature=0", "rho_hat_box_fraction=-1", "init_prob=1",
                     "init_prob=-0.1", "eval_threshold=0", "eval_threshold=1.5"):
        key = override.split("=")[0]
        with pytest.raises(CxrlocError, match=f"Invalid {key}=.*--set {key}=VALUE"):
            make_config("tiny", [override])
        code, text = run_cli("train", "/nonexistent-prepared", "--out", "/tmp/x", "--set", override)
        assert code == 2 and f"Invalid {key}=" in one_line(text) and "Traceback" not in text, (override, text)
    for fine in ("lambda_ann=0", "lambda_ann=70", "init_prob=0.5", "eval_threshold=1", "rho_hat_box_fraction=0"):
        make_config("tiny", [fine])
