"""Forward + backward time of the PAC-CRF and of one blur-pool layer, alone, at the paper's sizes.

The parts of issue 10 without the rest of the network: ``PacCrf`` with K = 14, P = 20, a 19 x 19
window and 5 mean-field iterations on a 512 px image (its guidance branch, the kernel G and the
mean-field steps also timed apart), and
``BlurPool2d`` (size 3, stride 2, reflect) on a 64-channel 256 x 256 map, the stem's, in NCHW and
channels_last. Each case runs in interleaved rounds and reports the median; ``--clock process``
uses this process's CPU time (one core's time on a shared machine). Run it against two source
trees with ``PYTHONPATH`` to compare implementations.

Example:
    OMP_NUM_THREADS=1 python bench/bench_layers.py --batch 2 --rounds 7 --clock process
    python bench/bench_layers.py --device cuda --amp bf16 --batch 32 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable

import torch

from cxrloc.model.blurpool import BlurPool2d
from cxrloc.model.pac_crf import PacCrf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall")
    ap.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                    help="autocast dtype, as in training (on CUDA the maps are also channels_last)")
    args = ap.parse_args()
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    b = args.batch

    torch.manual_seed(0)
    crf = PacCrf(14, image_size=512, patch_grid=20, window=19, iterations=5).to(device).train()
    with torch.no_grad():
        crf.compat.normal_(std=0.1, generator=gen)
    image = (torch.rand(b, 1, 512, 512, generator=gen) * 2 - 1).to(device)
    unary = torch.randn(b, 14, 20, 20, generator=gen).to(device).requires_grad_()
    upstream = torch.randn(b, 14, 20, 20, generator=gen).to(device)
    feats = crf.branch(image).detach().requires_grad_()
    kernel_up = torch.randn(crf.kernel(feats).shape, generator=gen).to(device)
    if device.type == "cuda":
        crf = crf.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast() -> contextlib.AbstractContextManager[None]:
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def crf_step() -> None:
        torch.autograd.backward(crf(image, unary), upstream)

    def branch_step() -> None:
        crf.branch(image).sum().backward()

    def kernel_step() -> None:
        torch.autograd.backward(crf.kernel(feats), kernel_up)

    def mean_field_step() -> None:  # kernel + messages only: the part the implementation changed
        if hasattr(crf, "_mean_field"):  # what the network runs (float32 also under autocast)
            torch.autograd.backward(crf._mean_field(feats, unary, False), upstream)
            return
        g = crf.kernel(feats)
        q = torch.sigmoid(unary)
        flat = unary.reshape(b, 14, 400)
        for _ in range(crf.iterations):
            q = torch.sigmoid(flat + crf.message(q, g)).reshape(b, 14, 20, 20)
        torch.autograd.backward(q, upstream)

    pool = BlurPool2d(64, 3, 2).to(device)
    x_cf = torch.randn(b, 64, 256, 256, generator=gen).to(device).requires_grad_()
    x_cl = x_cf.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    up_cf = torch.randn(b, 64, 128, 128, generator=gen).to(device)
    up_cl = up_cf.contiguous(memory_format=torch.channels_last)

    cases: dict[str, Callable[[], None]] = {
        "PAC-CRF (branch + 5 mean-field steps + refinement)": crf_step,
        "  of which the guidance branch": branch_step,
        "  of which kernel + messages": mean_field_step,
        "    of which the kernel G": kernel_step,
        "blur-pool 64 x 256 x 256, NCHW": lambda: torch.autograd.backward(pool(x_cf), up_cf),
        "blur-pool 64 x 256 x 256, channels_last": lambda: torch.autograd.backward(pool(x_cl), up_cl),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        with autocast():
            fn()  # warm-up
    for _ in range(max(1, args.rounds)):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = clock()
            with autocast():
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(clock() - t0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device={device} ({where}) torch={torch.__version__} threads={torch.get_num_threads()} batch={b} "
          f"rounds={max(1, args.rounds)} amp={args.amp} clock={args.clock}; forward + backward, median ms")
    for name, ts in times.items():
        print(f"{name:52s} {statistics.median(ts) * 1000:9.1f}")


if __name__ == "__main__":
    main()
