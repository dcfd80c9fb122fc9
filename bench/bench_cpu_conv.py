"""What ``CpuConv2d`` (cxrloc/model/cpu_conv.py) gives on this CPU: per convolution and per training step.

1. The weight gradient of every 3x3 stride-1 convolution of the preset's network (shapes from forward
   hooks, as ``bench_conv_shapes.py``) and of the stem, by oneDNN and by GEMM formulations, timed
   alternately (median milliseconds, GFLOP/s in brackets): for the stem ``CpuConv2d``'s im2col +
   GEMM; for the 3x3 layers two formulations that were tried and not kept (one GEMM over an im2col
   of all nine taps; three GEMMs over column-shifted rows), defined here so that the measurement
   can be repeated.
2. Whole unary-stage training steps (forward, a smooth loss on the patch outputs, backward, fused
   AdamW), float32, channels-last, in one process: ``CpuConv2d``'s fast path (the stem) on and off in
   alternating rounds of ``--steps`` steps; medians and the median of the per-round ratios, so that
   a machine whose speed drifts moves both alike.

One thread (set here), process time. Example:
    python bench/bench_cpu_conv.py --size 128 --rounds 30
    python bench/bench_cpu_conv.py --size 256 --rounds 12 --skip-layers
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_conv_shapes import conv_shapes

from cxrloc.config import make_config
from cxrloc.model import cpu_conv
from cxrloc.model.net import build_model


def _nhwc_padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous ``(B, H + 2, W + 2, C)`` tensor, zero-padded by one pixel."""
    return F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous()


def _im2col_gemm(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, conf: tuple) -> torch.Tensor:
    """3x3, stride 1, padding 1: the nine taps of every pixel as one ``(B*H*W, 9*C)`` matrix, one GEMM."""
    b, c, h, w = x.shape
    out_ch = weight.shape[0]
    xp = _nhwc_padded(x)
    s = xp.stride()
    cols = xp.as_strided((b, h, w, 3, 3, c), (s[0], s[1], s[2], s[1], s[2], 1)).reshape(b * h * w, 9 * c)
    g = grad.permute(0, 2, 3, 1).reshape(-1, out_ch)
    return (g.t() @ cols).view(out_ch, 3, 3, c).permute(0, 3, 1, 2)


def _row_gemm(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, conf: tuple) -> torch.Tensor:
    """3x3, stride 1, padding 1: three GEMMs, one per kernel row ``i``, over a matrix of the three
    column-shifted copies of every padded row (3x the input instead of im2col's 9x).

    Row ``(b, y', x)`` of ``cols`` holds ``xp[b, y', x + j, :]`` for ``j = 0..2``; kernel row ``i`` pairs
    output row ``y`` with padded row ``y + i``, i.e. ``cols`` shifted by ``i * W`` rows, provided the
    gradient gets two zero rows below each image (the K dimension runs over ``B * (H + 2) * W``).
    """
    b, c, h, w = x.shape
    out_ch = weight.shape[0]
    xp = _nhwc_padded(x)
    s = xp.stride()
    cols = xp.as_strided((b, h + 2, w, 3, c), (s[0], s[1], s[2], s[2], 1)).reshape(b * (h + 2) * w, 3 * c)
    cols = torch.cat([cols, cols.new_zeros(2 * w, 3 * c)])
    k = b * (h + 2) * w
    g = F.pad(grad.permute(0, 2, 3, 1), (0, 0, 0, 0, 0, 2)).reshape(k, out_ch).t()
    out = torch.empty(out_ch, 3, 3 * c, dtype=x.dtype)
    for i in range(3):
        torch.mm(g, cols[i * w : i * w + k], out=out[:, i])
    return out.view(out_ch, 3, 3, c).permute(0, 3, 1, 2)


ALGORITHMS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple], torch.Tensor]] = {
    "onednn": cpu_conv._onednn,
    "im2col": _im2col_gemm,
    "rows": _row_gemm,
}
"""Weight-gradient algorithms for a 3x3 stride-1 convolution (name -> function)."""


def _median_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}


def layers(args: argparse.Namespace) -> None:
    print("| convolution | input | weight | GFLOP | " + " | ".join(ALGORITHMS) + " | fastest | largest difference |")
    print("|---|---|---|---|" + "---|" * (len(ALGORITHMS) + 2))
    seen = set()
    for c in conv_shapes(args.preset, args.size, args.batch, ["crf=false"]):
        key = (c["input"], c["weight"], c["stride"])
        thin = c["input"][1] <= cpu_conv.THIN_INPUT
        eligible = c["weight"][2:] == (3, 3) and c["stride"] == (1, 1) and c["padding"] == (1, 1)
        if key in seen or not (thin or eligible):
            continue
        seen.add(key)
        x = torch.randn(c["input"]).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(c["weight"]) * 0.05).contiguous(memory_format=torch.channels_last)
        go = torch.randn(c["output"]).contiguous(memory_format=torch.channels_last)
        conf = (c["stride"], c["padding"], (1, 1), 1)
        if thin:
            fns = {"onednn": lambda x=x, go=go, w=w, conf=conf: cpu_conv._onednn(x, go, w, conf),
                   "unfold": lambda x=x, go=go, w=w, conf=conf: cpu_conv._unfold_gemm(x, go, w, conf)}
        else:
            fns = {n: (lambda fn=fn, x=x, go=go, w=w, conf=conf: fn(x, go, w, conf)) for n, fn in ALGORITHMS.items()}
        ms = _median_ms(fns, args.reps)
        gflop = 2 * torch.Size(c["output"]).numel() * c["weight"][1] * c["weight"][2] * c["weight"][3] / 1e9
        picked = min(ms, key=ms.get)
        # Each result against oneDNN's, relative to the gradient's largest entry (float32 sums in another order).
        ref = cpu_conv._onednn(x, go, w, conf)
        diff = max(float((fn() - ref).abs().max()) for fn in fns.values()) / float(ref.abs().max())
        cells = [f"{ms[n]:.2f} ({gflop / ms[n] * 1e3:.0f})" if n in ms else "-" for n in ALGORITHMS]
        if thin:
            cells[1] = f"unfold {ms['unfold']:.2f} ({gflop / ms['unfold'] * 1e3:.0f})"
        print(f"| {c['name']} | {'x'.join(map(str, c['input'][1:]))} | {'x'.join(map(str, c['weight']))} | "
              f"{gflop:.3f} | " + " | ".join(cells) + f" | {picked} | {diff:.1e} |")


def steps(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    cfg = make_config(args.preset, [f"image_size={args.size}", "crf=false"])
    model = build_model(cfg).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.batch, 1, args.size, args.size).contiguous(memory_format=torch.channels_last)
    fast = cpu_conv.CpuConv2d._fast_path

    def step() -> None:
        z, unary = model(x)
        loss = F.softplus(unary).mean() + z.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {"plain": [], "CpuConv2d": []}
    try:
        for _ in range(args.rounds):
            for name in times:
                cpu_conv.CpuConv2d._fast_path = fast if name == "CpuConv2d" else (lambda self, x: False)
                step()  # a warm-up step per round (and, the first time, the choice of algorithms)
                t0 = time.process_time()
                for _ in range(args.steps):
                    step()
                times[name].append((time.process_time() - t0) / args.steps)
    finally:
        cpu_conv.CpuConv2d._fast_path = fast
    ratios = [a / b for a, b in zip(times["plain"], times["CpuConv2d"], strict=True)]
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t) * 1e3:.1f} ms per step, "
              f"{args.batch / statistics.median(t):.2f} images/s per core")
    print(f"CpuConv2d / plain speed: median of {len(ratios)} rounds' ratios {statistics.median(ratios):.3f} "
          f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.3f} - {statistics.quantiles(ratios, n=4)[2]:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=9, help="repetitions per algorithm and shape")
    ap.add_argument("--rounds", type=int, default=20, help="alternating rounds of training steps")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--skip-layers", action="store_true", help="only the training steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), one thread, process time; "
          f"preset {args.preset}, {args.size} px, batch {args.batch}, float32, channels-last\n")
    if not args.skip_layers:
        layers(args)
        print()
    steps(args)


if __name__ == "__main__":
    main()
