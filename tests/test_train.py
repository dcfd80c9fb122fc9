"""`cxrloc train`: exact resume after SIGKILL, DDP vs one process, stages, run folder, errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cxrloc.checkpoint import load_checkpoint, load_model
from cxrloc.config import make_config
from cxrloc.training.loop import train
from cxrloc.training.runner import run_training
from cxrloc.utils import CxrlocError

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--set", "device=cpu", "--set", "workers=0", "--set", "deterministic=true", "--quiet"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cxrloc", "train", *args]


def _weights(fold_dir: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_checkpoint(fold_dir / "checkpoints" / f"{which}.pt")["model"]


@pytest.fixture(scope="module")
def prep(tmp_path_factory: pytest.TempPathFactory, prepared_writer: Callable[..., Path]) -> Path:
    return prepared_writer(tmp_path_factory.mktemp("prep") / "prepared")


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights_bit_for_bit(prep: Path, tmp_path: Path) -> None:
    args = [str(prep), "--fold", "0", "--preset", "tiny", "--epochs", "4", *COMMON]
    ref = subprocess.run(_cli(*args, "--out", str(tmp_path / "ref")), env=_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    last = out / "fold_0" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), env=_env(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_checkpoint(last)["epoch"]
    assert 1 <= killed_at < 4

    # Resume without --preset: the run's own config.json is the base.
    res = subprocess.run(
        _cli(str(prep), "--out", str(out), "--fold", "0", "--resume", "--quiet"), env=_env(), capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    a, b = _weights(tmp_path / "ref" / "fold_0"), _weights(out / "fold_0")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:5]}"
    rows_ref = list(csv.DictReader((tmp_path / "ref" / "fold_0" / "metrics.csv").open()))
    rows_res = list(csv.DictReader((out / "fold_0" / "metrics.csv").open()))
    assert [r["loss"] for r in rows_ref] == [r["loss"] for r in rows_res] and len(rows_res) == 4


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(prep: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo) == 1 process with 2 accumulation micro-batches.

    Without SyncBatchNorm on CPU each process normalises its own half batch; the single process
    accumulates gradients over the same two halves, so BatchNorm sees the same statistics.
    """
    sets = ["--set", "batch_size=8", "--set", "max_steps_per_epoch=3", "--set", "aug_scale=0.2"]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cxrloc",
         "train", str(prep), "--out", str(tmp_path / "ddp"), "--fold", "0", "--preset", "tiny", "--epochs", "2",
         *sets, *COMMON],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = train(
        prep, tmp_path / "one", fold=0, progress=False,
        cfg=make_config("tiny", ["batch_size=8", "max_steps_per_epoch=3", "aug_scale=0.2", "epochs=2",
                                 "device=cpu", "workers=0", "accum_steps=2"]),
    )  # fmt: skip
    a, b = _weights(tmp_path / "ddp" / "fold_0"), _weights(one)
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params
    ref = make_config("tiny", ["device=cpu"])
    assert ref.batch_size == 8
    with torch.random.fork_rng():
        torch.manual_seed(ref.seed)
        from cxrloc.model.net import build_model

        init = build_model(ref).state_dict()
    moved = sum(not torch.equal(init[k], b[k]) for k in params if k.startswith("unary."))
    assert moved > 10, "training did not change the weights: the comparison would be vacuous"
    # Adam normalises each gradient, so float reductions summed in another order (two processes,
    # other thread counts, another CPU's kernels) can move a weight whose gradient is ~0 by up to lr
    # per step. Compare the disagreement with the training's own movement, tensor by tensor, as a
    # norm (one such weight must not decide it; on an AVX2 CPU one element of a layer-4 kernel
    # differed by 5.5 % of that kernel's largest move) and, looser, element-wise: without gradient
    # averaging the two runs would differ by about as much as they moved.
    for k in params:
        moved_norm, diff_norm = (b[k] - init[k]).norm().item(), (a[k] - b[k]).norm().item()
        update = (b[k] - init[k]).abs().max().item()
        diff = (a[k] - b[k]).abs().max().item()
        assert diff_norm <= 1e-5 + 0.05 * moved_norm, f"{k}: disagree by {diff_norm:.2e}, moved {moved_norm:.2e}"
        assert diff <= 1e-5 + 0.25 * update, f"{k}: an element differs by {diff:.2e}, the largest move {update:.2e}"
    run = json.loads((tmp_path / "ddp" / "fold_0" / "run.json").read_text())
    assert run["world_size"] == 2


def test_stages_freeze_what_they_do_not_train(prep: Path, tmp_path: Path) -> None:
    base = ["epochs=1", "max_steps_per_epoch=2", "device=cpu", "workers=0"]
    unary_dir = train(prep, tmp_path / "unary", fold=1, cfg=make_config("tiny", base), progress=False)
    crf_dir = train(
        prep, tmp_path / "crf", fold=1, cfg=make_config("tiny", base), stage="crf", init_from=tmp_path / "unary",
        progress=False,
    )
    u, c = _weights(unary_dir, "best"), _weights(crf_dir)
    unary_keys = [k for k in u if k.startswith("unary.")]
    crf_keys = [k for k in u if k.startswith("crf.") and u[k].is_floating_point()]
    assert unary_keys and crf_keys
    assert all(torch.equal(u[k], c[k]) for k in unary_keys), "stage crf changed the frozen unary part (or its BN)"
    assert any(not torch.equal(u[k], c[k]) for k in crf_keys), "stage crf did not train the CRF"

    with torch.random.fork_rng():
        torch.manual_seed(0)
        from cxrloc.model.net import build_model

        init = build_model(make_config("tiny")).state_dict()
    assert all(torch.equal(init[k], u[k]) for k in crf_keys), "stage unary changed the CRF"

    joint_dir = train(
        prep, tmp_path / "joint", fold=1, cfg=make_config("tiny", [*base, "joint_lr_factor=0.25"]), stage="joint",
        init_from=tmp_path / "unary", progress=False,
    )
    rows = list(csv.DictReader((joint_dir / "metrics.csv").open()))
    assert float(rows[0]["lr"]) == pytest.approx(0.25e-3)
    j = _weights(joint_dir)
    assert any(not torch.equal(u[k], j[k]) for k in unary_keys) and any(not torch.equal(u[k], j[k]) for k in crf_keys)


def test_run_folder_layout_and_checkpoint_contents(prep: Path, tmp_path: Path) -> None:
    dirs = run_training(
        prep, tmp_path / "run", folds="all", preset="tiny", progress=False,
        overrides=["epochs=2", "max_steps_per_epoch=1", "device=cpu", "loss=li2018", "crf=false"],
    )  # fmt: skip
    assert [d.name for d in dirs] == ["fold_0", "fold_1"]
    for fold, d in enumerate(dirs):
        run = json.loads((d / "run.json").read_text())
        assert run["fold"] == fold and run["stage"] == "unary"
        assert not set(run["test_ids"]) & set(run["train_ids"] + run["val_ids"])
        assert json.loads((d / "config.json").read_text())["loss"] == "li2018"
        rows = list(csv.DictReader((d / "metrics.csv").open()))
        assert [r["epoch"] for r in rows] == ["1", "2"]
        assert {"ann", "un_pos", "un_neg", "loss", "lr", "val_iou_acc", "val_ior_acc", "time_s"} <= set(rows[0])
        assert float(rows[1]["lr"]) == pytest.approx(1e-3 * 0.95)
        state = torch.load(d / "checkpoints" / "last.pt", weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "meta", "config"} <= set(state)
        assert state["meta"]["thresholds"]["patch_grid"] == 8
        model, meta, cfg = load_model(d)
        assert cfg.crf is False and model.crf is None


def test_epoch_log_keeps_the_host_float64_arithmetic_and_catches_non_finite_losses() -> None:
    from cxrloc.training.loop import EpochLog as _EpochLog

    gen = torch.Generator().manual_seed(0)
    log = _EpochLog()
    want: dict[str, float] = {}
    for _ in range(7):  # steps of 3 micro-batches, float32 values as compute_loss returns them
        step: dict[str, float] = {}
        for _ in range(3):
            loss, terms = torch.rand((), generator=gen), {"ann": torch.rand((), generator=gen) * 70}
            log.add(loss, terms, 3)
            for k, v in (*terms.items(), ("loss", loss)):
                step[k] = step.get(k, 0.0) + float(v) / 3  # what the loop did on the host before
        log.end_step()
        for k, v in step.items():
            want[k] = want.get(k, 0.0) + v
    assert log.check(0) == pytest.approx(step["loss"], rel=0, abs=0)
    sums, steps = log.finish(0)
    assert steps == 7 and sums == want  # bit for bit
    log.add(torch.tensor(float("nan")), {"ann": torch.tensor(0.0)}, 1)
    log.end_step()
    with pytest.raises(CxrlocError, match="loss became nan at epoch 5"):
        log.finish(4)


def test_compile_setting_routes_the_training_forward_through_torch_compile(
    prep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[torch.nn.Module] = []

    def fake_compile(module: torch.nn.Module) -> torch.nn.Module:  # records; compiling takes minutes on CPU
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    common = ["epochs=1", "max_steps_per_epoch=2", "device=cpu", "deterministic=true"]
    train(prep, tmp_path / "plain", fold=0, cfg=make_config("tiny", common), progress=False)
    assert compiled == []
    train(prep, tmp_path / "comp", fold=0, cfg=make_config("tiny", [*common, "compile=true"]), progress=False)
    assert len(compiled) == 1 and hasattr(compiled[0], "unary")
    a, b = _weights(tmp_path / "plain" / "fold_0"), _weights(tmp_path / "comp" / "fold_0")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # compile may be switched when resuming (it changes no setting of the model)
    cfg = make_config("tiny", [*common, "epochs=2"])
    train(prep, tmp_path / "comp", fold=0, cfg=cfg, resume=True, progress=False)


@pytest.mark.cuda
def test_compiled_cuda_training_step_matches_eager() -> None:
    from cxrloc.model.net import build_model

    cfg = make_config("tiny", ["crf=true"])
    torch.manual_seed(0)
    net = build_model(cfg).cuda().train()
    x = (torch.rand(4, 1, 64, 64) * 2 - 1).cuda()
    z_eager, u_eager = net(x)
    # The eager backward first: a second forward in train mode updates the BatchNorm running
    # statistics in place, which cuDNN's batch-norm backward reads (so it would refuse to run after).
    (g_eager,) = torch.autograd.grad(z_eager.square().sum(), net.crf.compat)
    z_comp, u_comp = torch.compile(net)(x)
    (g_comp,) = torch.autograd.grad(z_comp.square().sum(), net.crf.compat)
    torch.testing.assert_close(z_comp, z_eager, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(u_comp, u_eager, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-3, atol=1e-4)


def test_user_errors_are_one_clear_message(prep: Path, tmp_path: Path) -> None:
    cfg = make_config("tiny", ["epochs=1", "max_steps_per_epoch=1", "device=cpu"])
    train(prep, tmp_path / "r", fold=0, cfg=cfg, progress=False)
    with pytest.raises(CxrlocError, match="--resume"):
        train(prep, tmp_path / "r", fold=0, cfg=cfg, progress=False)
    with pytest.raises(CxrlocError, match="lr"):
        train(prep, tmp_path / "r", fold=0, cfg=make_config("tiny", ["lr=0.5", "device=cpu"]), resume=True)
    with pytest.raises(CxrlocError, match="--from"):
        train(prep, tmp_path / "c", fold=0, cfg=cfg, stage="crf")
    with pytest.raises(CxrlocError, match="Did you mean 'epochs'"):
        run_training(prep, tmp_path / "x", folds="0", preset="tiny", overrides=["epoch=3"])
    with pytest.raises(CxrlocError, match="fold 7"):
        run_training(prep, tmp_path / "x", folds="7", preset="tiny")
    for bad in ("output_stride=4", "repeat_threshold=2"):
        with pytest.raises(CxrlocError, match=bad.split("=")[0]):
            run_training(prep, tmp_path / "x", folds="0", preset="tiny", overrides=[bad])
    res = subprocess.run(
        _cli(str(prep), "--out", str(tmp_path / "r"), "--fold", "0", "--preset", "tiny"), env=_env(),
        capture_output=True, text=True,
    )
    assert res.returncode == 2 and "already holds a run" in res.stderr and "Traceback" not in res.stderr


def test_alternate_trains_then_fits_thresholds_each_round(prep: Path, tmp_path: Path) -> None:
    from cxrloc.thresholds import Thresholds

    base = ["max_steps_per_epoch=2", "device=cpu", "workers=0", "crf=false"]
    (fold_dir,) = run_training(
        prep, tmp_path / "alt", folds=0, preset="tiny", overrides=base, epochs=1, progress=False, alternate=2
    )
    rows = list(csv.DictReader((fold_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # 2 rounds x 1 epoch
    fitted = Thresholds.load(fold_dir / "thresholds.json")
    assert fitted.info["round"] == 2
    # Round 2 trained with the thresholds fitted after round 1: those are the checkpoint's buffers,
    # and the file's "previous" values (what round 2 started from) record them.
    state = load_checkpoint(fold_dir / "checkpoints" / "last.pt")["model"]
    prev = fitted.info["previous"]
    names = list(prev)
    for name in ("tau", "rho", "tau_hat", "rho_hat"):
        saved = state[f"thresholds.{name}"].double().numpy()
        expected = [prev[c][name] for c in names]
        assert saved.tolist() == pytest.approx(expected, rel=1e-6), name
    # ... and they are not the initial thresholds (the comparison above would then prove nothing).
    from cxrloc.data.prepared import Prepared
    from cxrloc.geometry import class_box_masks
    from cxrloc.thresholds import box_patch_counts

    run = json.loads((fold_dir / "run.json").read_text())
    p = make_config("tiny").patch_grid
    prepared = Prepared.open(prep)
    initial = Thresholds.initial(p, box_patch_counts(class_box_masks((prepared.boxes(i) for i in run["train_ids"]), p)))
    assert any(
        abs(prev[c][name] - float(getattr(initial, name)[k])) > 1e-6
        for k, c in enumerate(names) for name in ("tau", "rho", "tau_hat", "rho_hat")
    )


def test_resume_with_nothing_to_resume_says_so(prep: Path, tmp_path: Path) -> None:
    from conftest import one_line, run_cli

    for fold in ("0", "all"):
        code, text = run_cli("train", prep, "--out", tmp_path / "empty", "--fold", fold, "--resume", "--quiet")
        assert code == 2 and "Traceback" not in text, text
        assert "no run to resume" in one_line(text) and "drop --resume" in one_line(text)
    assert not (tmp_path / "empty").exists()
    code, text = run_cli("train", prep, "--out", tmp_path / "e0", "--epochs", "0", "--preset", "tiny")
    assert code == 2 and "at least 1 epoch" in one_line(text) and not (tmp_path / "e0").exists()


def test_resume_all_folds_starts_the_missing_ones_with_the_runs_config(prep: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["max_steps_per_epoch=1", "device=cpu", "workers=0", "crf=false", "width=4"]
    run_training(prep, out, folds="0", preset="tiny", overrides=base, epochs=1, progress=False)
    assert not (out / "fold_1").exists()
    run_training(prep, out, folds="all", resume=True, progress=False)  # no --preset: the run's own config
    saved = [json.loads((out / f"fold_{k}" / "config.json").read_text()) for k in (0, 1)]
    assert saved[1] == saved[0] and saved[1]["width"] == 4 and saved[1]["arch"] == "resnet18"  # not 'paper'


def test_resume_cleans_stale_temporaries_and_refuses_a_damaged_last(prep: Path, tmp_path: Path) -> None:
    from conftest import one_line, run_cli

    out = tmp_path / "run"
    args = ["--fold", "0", "--preset", "tiny", "--set", "max_steps_per_epoch=1", "--set", "device=cpu", "--quiet"]
    assert run_cli("train", prep, "--out", out, "--epochs", "1", *args)[0] == 0
    ckpts = out / "fold_0" / "checkpoints"
    stale = [ckpts / ".last.pt.a1b2c3d4.tmp", out / "fold_0" / ".metrics.csv.zz9.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    other = ckpts / "notes.tmp"
    other.write_text("not ours")
    before = (ckpts / "last.pt").read_bytes()
    code, text = run_cli("train", prep, "--out", out, "--resume", "--epochs", "1", "--fold", "0")
    flat = one_line(text)
    assert code == 0, text
    assert "nothing was trained" in flat and "already has 1 epoch(s)" in flat
    assert not any(p.exists() for p in stale) and other.exists()
    assert (ckpts / "last.pt").read_bytes() == before
    # A last.pt that lost its training state: one message at --resume, nothing changed.
    state = torch.load(ckpts / "last.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, ckpts / "last.pt")
    damaged = (ckpts / "last.pt").read_bytes()
    code, text = run_cli("train", prep, "--out", out, "--resume", "--epochs", "2", "--fold", "0")
    assert code == 2 and "Traceback" not in text
    assert "lacks the training state needed to resume (optimizer)" in one_line(text)
    assert (ckpts / "last.pt").read_bytes() == damaged


def test_stage_all_chains_unary_crf_joint_with_their_epochs_and_resumes(prep: Path, tmp_path: Path) -> None:
    out = tmp_path / "recipe"
    base = ["max_steps_per_epoch=1", "device=cpu", "workers=0", "width=4", "crf_epochs=2", "joint_epochs=1"]
    (joint,) = run_training(prep, out, folds="1", preset="tiny", overrides=base, epochs=1, stage="all", progress=False)
    assert joint == out / "joint" / "fold_1"
    stages = {}
    for stage, want_epochs in (("unary", 1), ("crf", 2), ("joint", 1)):
        fd = out / stage / "fold_1"
        rows = list(csv.DictReader((fd / "metrics.csv").open()))
        assert [r["stage"] for r in rows] == [stage] * want_epochs
        stages[stage] = _weights(fd)
    # Each stage started from the one before: the CRF stage kept the unary part it was given.
    unary_keys = [k for k in stages["unary"] if k.startswith("unary.") and stages["unary"][k].is_floating_point()]
    assert all(torch.equal(_weights(out / "unary" / "fold_1", "best")[k], stages["crf"][k]) for k in unary_keys)
    assert any(not torch.equal(stages["crf"][k], stages["joint"][k]) for k in unary_keys)
    assert json.loads((out / "joint" / "fold_1" / "config.json").read_text())["joint_epochs"] == 1
    # curves.png of the last stage draws the whole recipe: 1 + 2 + 1 epochs, three stages.
    from PIL import Image

    with Image.open(out / "joint" / "fold_1" / "curves.png") as im:
        assert im.size == (900, 640)
        assert "4 epoch(s); stages unary -> crf -> joint" in im.info["Description"]

    # Resume without --preset: every stage keeps its config; a finished run trains no further epochs.
    (again,) = run_training(prep, out, folds="1", resume=True, stage="all", progress=False)
    assert again == joint and len(list(csv.DictReader((joint / "metrics.csv").open()))) == 1

    # crf=false skips the CRF stage; joint fine-tunes the unary run.
    (j2,) = run_training(prep, tmp_path / "nocrf", folds="1", preset="tiny", overrides=[*base, "crf=false"],
                         epochs=1, stage="all", progress=False)
    assert j2 == tmp_path / "nocrf" / "joint" / "fold_1" and not (tmp_path / "nocrf" / "crf").exists()
    with pytest.raises(CxrlocError, match="drop --from"):
        run_training(prep, tmp_path / "x", folds="1", preset="tiny", stage="all", init_from=out / "unary")
    with pytest.raises(CxrlocError, match="crf_epochs and joint_epochs must be >= 0"):
        make_config("tiny", ["crf_epochs=-1"])


def test_log_written_to_a_file_has_one_line_per_epoch_and_stage(prep: Path, tmp_path: Path) -> None:
    """A batch job (output to a file, not a terminal): no wrapping, no live bars, one line per epoch
    and per stage with loss, validation accuracy and time; with --quiet still one line per stage."""
    out = tmp_path / ("a_long_folder_name_that_a_cluster_job_would_use_" * 3) / "recipe"
    args = [str(prep), "--out", str(out), "--fold", "1", "--preset", "tiny", "--epochs", "2", "--stage", "all",
            "--set", "max_steps_per_epoch=1", "--set", "width=4", "--set", "crf_epochs=1", "--set", "joint_epochs=1",
            "--set", "device=cpu", "--set", "workers=0"]
    env = {k: v for k, v in _env().items() if k not in ("COLUMNS", "LINES")}
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        done = subprocess.run(_cli(*args), env=env, stdout=fh, stderr=subprocess.STDOUT)
    text = log.read_text()
    assert done.returncode == 0, text
    lines = text.splitlines()
    assert "\r" not in text and "\x1b[" not in text  # no redrawn bar, no colour codes
    # paths of about 200 characters, each on the one line of its message
    assert f"Results saved to {out / 'joint' / 'fold_1'}; use {out / 'joint'} (the last stage) with" in text
    assert any(x.startswith(f"Results saved to {out / 'joint' / 'fold_1'}; use {out / 'joint'} ") for x in lines)
    for stage, epochs in (("unary", 2), ("crf", 1), ("joint", 1)):
        for e in range(1, epochs + 1):
            # epochs of the stage: "epoch e/N  loss ...  val IoU acc@T ...  IoR acc ...  1.2s" on one line
            hits = [x for x in lines if x.startswith(f"epoch {e}/{epochs} ") and " loss " in x and "val IoU acc" in x]
            assert hits, (stage, e, text)
        done_line = [x for x in lines if x.startswith(f"Fold 1, stage {stage} done: {epochs} epoch(s), last loss ")]
        assert len(done_line) == 1 and " s (" in done_line[0] and str(out / stage / "fold_1") in done_line[0], text
    assert sum(1 for x in lines if x.startswith("epoch ")) == 4

    quiet_log = tmp_path / "quiet.log"
    with open(quiet_log, "w") as fh:
        done = subprocess.run(_cli(*[a if a != str(out) else str(out) + "_q" for a in args], "--quiet"), env=env,
                              stdout=fh, stderr=subprocess.STDOUT)
    quiet = quiet_log.read_text().splitlines()
    assert done.returncode == 0, quiet
    for stage in ("unary", "crf", "joint"):
        assert any(x.startswith(f"Fold 1, stage {stage} (") for x in quiet), quiet
        assert any(x.startswith(f"Fold 1, stage {stage} done: ") for x in quiet), quiet
    assert not any(x.startswith("epoch ") for x in quiet)


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc (Linux)")
def test_dataloader_workers_die_with_a_killed_train(prep: Path, tmp_path: Path) -> None:
    # Issue 22, defect 14: after kill -9 of train, its two DataLoader workers lived on 10-20 s under PID 1.
    args = [str(prep), "--fold", "0", "--preset", "tiny", "--epochs", "200", "--out", str(tmp_path / "r"),
            "--set", "device=cpu", "--set", "workers=2", "--quiet"]
    proc = subprocess.Popen(_cli(*args), env=_env(), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, set()
    while time.time() < deadline and proc.poll() is None and len(workers) < 2:
        time.sleep(0.1)
        workers = _children(proc.pid)
    assert len(workers) >= 2, "the workers never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 3.0  # the kernel's PR_SET_PDEATHSIG is immediate; a second of slack
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)]
