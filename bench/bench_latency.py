"""Single-image CPU latency of torch eager vs onnxruntime, and peak memory of ``cxrloc predict``.

Builds the paper-preset network from scratch (weights do not change the cost), saves it as a
checkpoint, exports it with ``cxrloc.inference.export.export_onnx`` (which also checks onnxruntime
against torch), then times one 512 px image: the median of ``--repeats`` runs after one warm-up,
with 2 threads for every backend: torch twice (the bare module in NCHW float32, and the checkpoint
through ``TorchPredictor`` as ``cxrloc predict`` runs it: the run's CPU precision and channels-last)
and onnxruntime. Finally runs ``cxrloc predict`` on a real image
(or a generated one) in a child process per backend and reads its peak resident memory
(``ru_maxrss``, measured through a small launcher process).

Usage:
    python bench/bench_latency.py [--repeats 5] [--threads 2] [--preset paper]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxrloc.checkpoint import make_meta, save_checkpoint
from cxrloc.config import make_config
from cxrloc.data.synthetic import healthy_chest
from cxrloc.inference.backends import TorchPredictor, open_session
from cxrloc.inference.export import default_check_image, export_onnx
from cxrloc.inference.inputs import preprocess
from cxrloc.model.net import build_model


def _median_ms(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: allocations, oneDNN primitive creation, onnxruntime arena
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), times


_LAUNCHER = (
    "import resource, subprocess, sys, time; t0 = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc, time.perf_counter() - t0)"
)


def _peak_rss_mib(cmd: list[str], cwd: Path) -> tuple[float, int, float]:
    """Run ``cmd`` and return (peak RSS in MiB, exit code, wall seconds) of that process alone.

    Linux carries a process's pre-exec memory high-water mark into ``ru_maxrss`` after
    fork + exec, so a child forked from this (large) bench process would report at least the
    bench's own size. A small launcher process starts the command instead and reports its
    child's ``ru_maxrss`` (KiB on Linux).
    """
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=cwd, capture_output=True, text=True,
                         check=True)
    kib, rc, wall = out.stdout.split()
    return int(kib) / 1024.0, int(rc), float(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    cfg = make_config(args.preset, ["init=scratch"])
    torch.set_num_threads(args.threads)
    model = build_model(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    real = default_check_image()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run = tmp / "run"
        save_checkpoint(run / "fold_0" / "checkpoints" / "best.pt",
                        {"config": cfg.to_dict(), "model": model.state_dict(), "meta": make_meta(cfg)})
        t0 = time.perf_counter()
        report = export_onnx(run, threads=args.threads)
        export_s = time.perf_counter() - t0

        if real is not None:
            from cxrloc.data.imageio import read_image

            img = read_image(real)
        else:
            img = healthy_chest(cfg.image_size)
        x = preprocess(img, cfg.image_size)[None]
        xt = torch.from_numpy(x)

        def torch_once() -> None:
            with torch.inference_mode():
                model(xt)

        # What `cxrloc predict --model RUN` runs: the checkpoint through TorchPredictor, with the run's
        # CPU precision and layout (bf16 where the CPU has it, the network in channels-last).
        predictor = TorchPredictor(run)

        def predictor_once() -> None:
            predictor.run(x)

        sess = open_session(report.path, device="cpu", threads=args.threads)

        def ort_once() -> None:
            sess.run(["z", "unary_logits"], {"image": x})

        torch_ms, torch_all = _median_ms(torch_once, args.repeats)
        pred_ms, pred_all = _median_ms(predictor_once, args.repeats)
        ort_ms, ort_all = _median_ms(ort_once, args.repeats)

        image_path = real if real is not None else tmp / "chest.png"
        if real is None:
            from PIL import Image

            Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(image_path)
        env_cmd = [sys.executable, "-m", "cxrloc", "predict", str(image_path), "--threads", str(args.threads)]
        rss_onnx, rc_onnx, wall_onnx = _peak_rss_mib(
            env_cmd + ["--model", str(report.path), "--json", str(tmp / "p1.json")], tmp)
        rss_torch, rc_torch, wall_torch = _peak_rss_mib(
            env_cmd + ["--model", str(run), "--json", str(tmp / "p2.json")], tmp)

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPU(s), python {platform.python_version()}, "
          f"torch {torch.__version__}")
    print(f"network: preset={args.preset} arch={cfg.arch} S={cfg.image_size} P={cfg.patch_grid} crf={cfg.crf} "
          f"({cfg.crf_iterations} iterations, window {cfg.crf_window}) antialias={cfg.antialias}, "
          f"{n_params / 1e6:.1f} M parameters")
    print(f"input: {real if real is not None else 'generated chest-like image'}")
    print(f"export: {export_s:.1f} s, {report.size_bytes / 1e6:.1f} MB, opset {report.opset}, "
          f"max |dz| torch vs onnxruntime = {report.max_abs_diff_z:.2g}")
    print(f"torch eager, {args.threads} threads: median {torch_ms:.0f} ms over {args.repeats} runs "
          f"({', '.join(f'{t:.0f}' for t in torch_all)})")
    print(f"torch, the checkpoint as `cxrloc predict` runs it (TorchPredictor: the run's CPU precision and "
          f"layout), {args.threads} threads: median {pred_ms:.0f} ms over {args.repeats} runs "
          f"({', '.join(f'{t:.0f}' for t in pred_all)})")
    print(f"onnxruntime CPU, {args.threads} threads: median {ort_ms:.0f} ms over {args.repeats} runs "
          f"({', '.join(f'{t:.0f}' for t in ort_all)})")
    print(f"cxrloc predict (onnx) process: peak RSS {rss_onnx:.0f} MiB, wall {wall_onnx:.1f} s, exit {rc_onnx}")
    print(f"cxrloc predict (torch checkpoint) process: peak RSS {rss_torch:.0f} MiB, wall {wall_torch:.1f} s, "
          f"exit {rc_torch}")


if __name__ == "__main__":
    main()
