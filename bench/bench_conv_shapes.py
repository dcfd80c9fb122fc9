"""Where a CPU training step's convolution time goes: every convolution of a preset's network, timed alone.

For each convolution of the network (the shapes a training batch gives it, read by forward hooks) the
script times, in the network's memory format, the forward (``F.conv2d``), the input gradient and the
weight gradient (``aten.convolution_backward`` with one output each; the stem's image needs no input
gradient) and prints GFLOP/s for each. As the reference of what a core can do, it times MKL's float32
GEMM (``torch.mm``) at a size where it runs at its best (512^3 by default), timed in the same
alternation as every convolution (a machine whose speed drifts moves both alike), so that every
figure reads as a fraction of this core's practical peak. Last, the sums: milliseconds per step for each
part and what the step's convolutions would take at the reference speed.

Each tensor has the layout a training step gives it (weights as ``model.to(memory_format)`` makes
them, the image as the training loop's ``.contiguous(memory_format)``): for a one-channel tensor the
two differ in the strides of the size-1 dimension, and a stem weight with NCHW strides beside a
channels-last gradient made oneDNN's weight gradient 5x slower than in training.

Repetitions alternate between the parts (``--reps`` rounds, the first two dropped as warm-up) and
each figure is the median, in process time (``time.process_time``): with one thread (the script
sets it), that is the time of one core, nearly unaffected by other jobs on the machine.

Example:
    python bench/bench_conv_shapes.py --preset cpu --size 128 --batch 8
    python bench/bench_conv_shapes.py --preset cpu --size 256 --batch 8 --channels-last off
    python bench/bench_conv_shapes.py --preset cpu --size 128 --dtype bf16   # a CPU with AVX-512 BF16 / AMX
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cxrloc.config import make_config
from cxrloc.model.net import build_model


def _median_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v[2:] if len(v) > 4 else v) * 1e3 for k, v in times.items()}


def conv_shapes(preset: str, size: int, batch: int, overrides: list[str]) -> list[dict]:
    """The convolutions of ``preset``'s network on a ``batch x 1 x size x size`` input, in call order."""
    cfg = make_config(preset, [f"image_size={size}", *overrides])
    model = build_model(cfg).eval()
    found: list[dict] = []

    def hook(mod: torch.nn.Conv2d, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x = inputs[0]
        if hasattr(mod, "blur"):  # BlurConv2d: its convolution sees the blur-pooled input
            x = mod.blur(x)
        found.append({
            "name": names[mod], "input": tuple(x.shape), "weight": tuple(mod.weight.shape),
            "stride": mod.stride, "padding": mod.padding, "groups": mod.groups, "output": tuple(out.shape),
        })

    names = {m: n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    hooks = [m.register_forward_hook(hook) for m in names]
    with torch.no_grad():
        model(torch.zeros(batch, 1, size, size))
    for h in hooks:
        h.remove()
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels-last", choices=["on", "off"], default="on")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--dtype", choices=["float32", "bf16"], default="float32",
                    help="bf16: what training under CPU autocast runs (on a CPU with native bf16)")
    ap.add_argument("--gemm", type=int, default=512, help="side of the reference float32 GEMM")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fmt = torch.channels_last if args.channels_last == "on" else torch.contiguous_format
    dtype = {"float32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    a, b = torch.randn(args.gemm, args.gemm, dtype=dtype), torch.randn(args.gemm, args.gemm, dtype=dtype)
    gemm_ms: list[float] = []
    print(f"{platform.machine()} torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), one "
          f"thread, process time; preset {args.preset} {' '.join(args.overrides)}, {args.size} px, batch "
          f"{args.batch}, {args.dtype}, channels-last {args.channels_last}; GFLOP/s in brackets\n")
    print("| convolution | input | weight | GFLOP | forward ms (GFLOP/s) | input grad | weight grad |")
    print("|---|---|---|---|---|---|---|")
    total = {"forward": 0.0, "input grad": 0.0, "weight grad": 0.0}
    total_gflop = 0.0
    for c in conv_shapes(args.preset, args.size, args.batch, args.overrides):
        # The layouts training gives them: the weights through module.to(memory_format) (so a one-channel
        # weight gets channels-last strides; .contiguous() would keep NCHW strides, which sends oneDNN's
        # weight gradient down a path 5x slower), the image through .contiguous(memory_format) as the
        # training loop does, activations and gradients as the convolutions write them.
        x = torch.randn(c["input"], dtype=dtype)
        x = x.contiguous(memory_format=fmt) if c["input"][1] == 1 else x.to(memory_format=fmt)
        w = (torch.randn(c["weight"], dtype=dtype) * 0.05).to(memory_format=fmt)
        go = torch.randn(c["output"], dtype=dtype).to(memory_format=fmt)
        conv = dict(stride=c["stride"], padding=c["padding"], groups=c["groups"])
        kw = [list(c["stride"]), list(c["padding"]), [1, 1], False, [0, 0], c["groups"]]
        first = c["input"][1] == 1  # the stem: its image needs no gradient
        fns: dict[str, Callable[[], object]] = {
            "forward": lambda x=x, w=w, conv=conv: F.conv2d(x, w, **conv),
            "weight grad": lambda x=x, w=w, go=go, kw=kw: torch.ops.aten.convolution_backward(
                go, x, w, None, *kw, [False, True, False]),
        }
        if not first:
            fns["input grad"] = lambda x=x, w=w, go=go, kw=kw: torch.ops.aten.convolution_backward(
                go, x, w, None, *kw, [True, False, False])
        fns["gemm"] = lambda: torch.mm(a, b)
        ms = _median_ms(fns, args.reps)
        gemm_ms.append(ms.pop("gemm"))
        gflop = 2 * torch.Size(c["output"]).numel() * c["weight"][1] * c["weight"][2] * c["weight"][3] / 1e9
        total_gflop += gflop * (2 if first else 3)
        cells = []
        for part in ("forward", "input grad", "weight grad"):
            if part in ms:
                total[part] += ms[part]
                cells.append(f"{ms[part]:.2f} ({gflop / ms[part] * 1e3:.0f})")
            else:
                cells.append("-")
        print(f"| {c['name']} | {'x'.join(map(str, c['input'][1:]))} | {'x'.join(map(str, c['weight']))} | "
              f"{gflop:.3f} | " + " | ".join(cells) + " |")
    conv_ms = sum(total.values())
    peak = 2 * args.gemm**3 / statistics.median(gemm_ms) / 1e6
    print(f"\nreference: {args.dtype} GEMM {args.gemm}^3 (torch.mm) {peak:.1f} GFLOP/s (median of its "
          f"{len(gemm_ms)} medians, from {2 * args.gemm**3 / max(gemm_ms) / 1e6:.1f} to "
          f"{2 * args.gemm**3 / min(gemm_ms) / 1e6:.1f})")
    print(f"per step: forward {total['forward']:.1f} ms, input gradients {total['input grad']:.1f} ms, "
          f"weight gradients {total['weight grad']:.1f} ms; convolutions {conv_ms:.1f} ms for "
          f"{total_gflop:.2f} GFLOP = {total_gflop / conv_ms * 1e3:.1f} GFLOP/s "
          f"({total_gflop / conv_ms * 1e3 / peak:.0%} of the reference GEMM); at the reference speed "
          f"they would take {total_gflop / peak * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
