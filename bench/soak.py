"""Soak test: many predictions through one process, and many kill -9 / resume cycles of a training run.

Part 1 (``predict``): ``--predictions`` calls of ``predict_files`` (JSON + overlay of one real
image each time) in ONE process, with the torch checkpoint and with its ONNX export; the resident
memory (VmRSS) is sampled every 100 predictions. The memory is steady when it grows by less than
``--rss-bound-mb`` (default 25 MB) from the sample at 200 predictions (after warm-up: allocator
pools, onnxruntime arenas, font caches) to the last one.

Part 2 (``resume``): a tiny training run (``tiny`` preset, deterministic, one step per epoch) is
killed with SIGKILL ``--cycles`` times, each time at a random moment after it wrote a new
``last.pt`` (so every cycle makes progress), and resumed with ``--resume``; its final ``last.pt``
and ``best.pt`` weights must equal (``torch.equal``) those of the same run trained without
interruption.

    python bench/soak.py                                   # 1,000 predictions per backend, 20 cycles
    python bench/soak.py --predictions 300 --cycles 5      # a shorter run

Prints the figures and ``SOAK OK`` / ``SOAK FAILED`` (exit 1).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def rss_mb() -> float:
    """This process's resident memory in MB (VmRSS from /proc; ru_maxrss where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def soak_predict(root: Path, n: int, bound_mb: float) -> bool:
    import numpy as np
    from conftest import save_tiny_run
    from PIL import Image

    from cxrloc.inference.export import default_check_image, export_onnx
    from cxrloc.inference.predict import predict_files

    run, _ = save_tiny_run(root / "run", bias_span=3.0, seed=0, tau_hat=20.0)
    image = default_check_image()
    if image is None:  # no ../shared/data: a generated image of a chest's size
        image = root / "x.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024), dtype=np.uint8)).save(image)
    onnx = export_onnx(run, root / "m.onnx", check_image=image).path
    ok = True
    for backend, model in (("torch", run), ("onnx", onnx)):
        samples: list[tuple[int, float]] = []
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            summary = predict_files([str(image)], model, json_path=root / "p.json", overlay=root / "p.png",
                                    progress=False)
            assert len(summary.records) == 1 and not summary.failures, summary.failures
            if i % 100 == 0 or i == 1:
                samples.append((i, rss_mb()))
        seconds = time.perf_counter() - t0
        after_warmup = next((mb for i, mb in samples if i >= 200), samples[0][1])
        growth = samples[-1][1] - after_warmup
        steady = growth < bound_mb
        ok &= steady
        print(f"predict {backend:5s}: {n} predictions in {seconds:.1f} s ({1000 * seconds / n:.1f} ms each); "
              f"RSS MB at " + ", ".join(f"{i}: {mb:.0f}" for i, mb in samples))
        print(f"predict {backend:5s}: growth from 200 to {n}: {growth:+.1f} MB (bound {bound_mb:g} MB): "
              f"{'steady' if steady else 'NOT STEADY'}", flush=True)
    return ok


def _train_cmd(prep: Path, out: Path, epochs: int, resume: bool) -> list[str]:
    args = [sys.executable, "-m", "cxrloc", "train", str(prep), "--out", str(out), "--fold", "0", "--preset", "tiny",
            "--epochs", str(epochs), "--quiet", "--set", "device=cpu", "--set", "workers=0",
            "--set", "deterministic=true", "--set", "max_steps_per_epoch=1"]
    return args + (["--resume"] if resume else [])


def soak_resume(root: Path, cycles: int, seed: int) -> bool:
    import torch
    from conftest import write_prepared

    from cxrloc.checkpoint import load_checkpoint

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    prep = write_prepared(root / "prepared")
    epochs = 3 * cycles + 10  # an epoch is one step: a start may run several before its kill
    t0 = time.perf_counter()
    ref = subprocess.run(_train_cmd(prep, root / "ref", epochs, False), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    print(f"resume: uninterrupted run of {epochs} epochs in {time.perf_counter() - t0:.1f} s", flush=True)

    rng = random.Random(seed)
    out = root / "killed"
    last = out / "fold_0" / "checkpoints" / "last.pt"
    kills, starts, t0 = 0, 0, time.perf_counter()
    while True:
        before = last.stat().st_mtime_ns if last.exists() else 0
        proc = subprocess.Popen(_train_cmd(prep, out, epochs, resume=starts > 0), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        starts += 1
        if kills < cycles:
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                if last.exists() and last.stat().st_mtime_ns != before:
                    time.sleep(rng.uniform(0.0, 0.15))  # in the next epochs, or during a checkpoint write
                    break
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        _, err = proc.communicate()
        if proc.returncode != 0:
            print(f"resume: start {starts} failed: {err.strip().splitlines()[-1:]}")
            return False
        break
    print(f"resume: {kills} kill -9 cycles, {starts} starts, {time.perf_counter() - t0:.1f} s", flush=True)
    same = True
    for which in ("last", "best"):
        a = load_checkpoint(root / "ref" / "fold_0" / "checkpoints" / f"{which}.pt")["model"]
        b = load_checkpoint(out / "fold_0" / "checkpoints" / f"{which}.pt")["model"]
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        same &= equal
        print(f"resume: {which}.pt weights {'equal (torch.equal, every tensor)' if equal else 'DIFFER'} "
              f"to the uninterrupted run's")
    return same and kills == cycles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=int, default=1000, help="predictions per backend")
    parser.add_argument("--cycles", type=int, default=20, help="kill -9 / resume cycles")
    parser.add_argument("--rss-bound-mb", type=float, default=25.0, help="allowed RSS growth after warm-up")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--part", choices=["all", "predict", "resume"], default="all")
    args = parser.parse_args()
    import torch

    print(f"# soak: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}; --predictions {args.predictions} "
          f"--cycles {args.cycles}", flush=True)
    ok = True
    with tempfile.TemporaryDirectory(prefix="cxrloc-soak-") as tmp:
        if args.part in ("all", "predict"):
            ok &= soak_predict(Path(tmp), args.predictions, args.rss_bound_mb)
        if args.part in ("all", "resume"):
            ok &= soak_resume(Path(tmp), args.cycles, args.seed)
    print("SOAK OK" if ok else "SOAK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
