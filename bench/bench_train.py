"""Training throughput of the cxrloc network beside a bare torchvision ResNet-50.

Measures images per second of full training steps (forward, loss, backward, Adam step) for
the ``paper`` preset's network (ResNet-50 with anti-aliasing, patch head, PAC-CRF, threshold
loss) and for torchvision's ResNet-50 (one input channel, BCE on its pooled 14-way output) at
the same input size, batch and precision. The ratio is the overhead of anti-aliasing, head,
CRF and loss.

``--variants`` measures the five rows of issue 10 in one run: the bare ResNet-50, then the
preset's network without anti-aliasing and CRF, with the CRF only, with anti-aliasing only, and
with both; each row with its ratio to the bare ResNet-50, and the CRF's and blur-pool's costs
(1 - the throughput with the part / without it). The networks are timed in interleaved rounds
(``--rounds``, each ``--steps`` timed steps per network after ``--warmup``) and each row reports
the median round, so that a machine whose load changes during the run affects every row alike.
On CUDA it also reports each network's peak memory (``torch.cuda.max_memory_allocated``).

``--clock process`` (CPU only) divides by this process's CPU time (``time.process_time``) instead
of wall time: with one thread (``OMP_NUM_THREADS=1``) that is the throughput of one core, nearly
unaffected by other jobs that share the machine (wall time on a loaded machine is not).

Example:
    OMP_NUM_THREADS=2 python bench/bench_train.py --steps 3 --batch 4
    OMP_NUM_THREADS=1 python bench/bench_train.py --variants --size 256 --batch 2 --steps 2 --rounds 5 --clock process
    python bench/bench_train.py --device cuda --amp bf16 --batch 32 --steps 15 --warmup 3 --variants
    python bench/bench_train.py --device cuda --amp bf16 --batch 32 --steps 3 --profile 3   # top kernels
    OMP_NUM_THREADS=1 python bench/bench_train.py --preset cpu --size 128 --batch 8 --steps 3 --rounds 5 \
        --clock process --amp bf16 --channels-last on --profile 3     # the CPU fast path (docs/results.md)
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.models import resnet50

from cxrloc.classes import NUM_CLASSES
from cxrloc.config import make_config
from cxrloc.model.net import build_model
from cxrloc.training.losses import compute_loss

VARIANTS: tuple[tuple[str, str, list[str]], ...] = (
    ("cxrloc, no anti-aliasing, no CRF", "plain", ["antialias=false", "crf=false"]),
    ("cxrloc, CRF, no anti-aliasing", "crf", ["antialias=false", "crf=true"]),
    ("cxrloc, anti-aliasing, no CRF", "aa", ["antialias=true", "crf=false"]),
    ("cxrloc, anti-aliasing + CRF", "full", ["antialias=true", "crf=true"]),
)
"""(row label, key, config overrides) of ``--variants``, after the bare ResNet-50."""


@dataclass
class Row:
    label: str
    step: Callable[[], None]
    rounds: list[float]
    peak_mib: float = float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Callable[[], None], steps: int, device: torch.device, clock: Callable[[], float]) -> float:
    _sync(device)
    start = clock()
    for _ in range(steps):
        step()
    _sync(device)
    return clock() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per network and round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds; the median is reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override of the cxrloc network(s), as cxrloc train --set (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", action="store_true", help="the five rows of issue 10 (see above)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the cxrloc networks (as compile=true)")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                    help="memory format of networks and input (auto: on CUDA only, as this script always did; "
                         "training's channels_last=auto also uses it on x86 CPUs)")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="wall time, or this process's CPU time (CPU only; see above)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after timing, profile STEPS steps of the full cxrloc network with torch.profiler "
                         "and print its top operators and kernels by self time (device time on CUDA)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.clock == "process" and device.type != "cpu":
        ap.error("--clock process measures CPU work; use it with --device cpu")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast() -> contextlib.AbstractContextManager[None]:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    gen = torch.Generator().manual_seed(args.seed)
    b, s = args.batch, args.size
    x = (torch.rand(b, 1, s, s, generator=gen) * 2 - 1).to(device)
    labels = (torch.rand(b, NUM_CLASSES, generator=gen) < 0.2).float().to(device)
    channels_last = device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "on"
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    gamma = torch.full((NUM_CLASSES,), 0.2, device=device)

    def cxrloc_step(overrides: list[str]) -> tuple[Callable[[], None], str]:
        cfg = make_config(args.preset, ["init=scratch", f"image_size={s}", *args.overrides, *overrides])
        p = cfg.patch_grid
        annotated = torch.zeros(b, NUM_CLASSES, dtype=torch.bool)
        annotated[0, 0] = True  # one annotated box per batch, like the sampled batches of training
        box_mask = torch.zeros(b, NUM_CLASSES, p, p)
        box_mask[0, 0, p // 4 : p // 2, p // 4 : p // 2] = 1
        annotated, box_mask = annotated.to(device), box_mask.to(device)
        torch.manual_seed(args.seed)
        net = build_model(cfg).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        net.train()
        fwd = torch.compile(net) if args.compile else net
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=0.01)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast():
                z, u = fwd(xin)
            loss, _ = compute_loss(cfg, z, u, labels, annotated, box_mask, net.thresholds, gamma)
            loss.backward()
            opt.step()

        desc = (f"{cfg.arch} aa={cfg.antialias} P={p} crf={cfg.crf} (window {cfg.crf_window}, "
                f"{cfg.crf_iterations} it.) loss={cfg.loss}")
        return step, desc

    torch.manual_seed(args.seed)
    base = resnet50(num_classes=NUM_CLASSES)
    base.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    base = base.to(device)
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    base.train()
    opt_b = torch.optim.Adam(base.parameters(), lr=1e-4, weight_decay=0.01)

    def base_step() -> None:
        opt_b.zero_grad(set_to_none=True)
        with autocast():
            out = base(xin)
        loss = F.binary_cross_entropy_with_logits(out.float(), labels)
        loss.backward()
        opt_b.step()

    rows = {"base": Row("torchvision resnet50 (BCE on pooled logits)", base_step, [])}
    if args.variants:
        for label, key, overrides in VARIANTS:
            step, _ = cxrloc_step(overrides)
            rows[key] = Row(label, step, [])
    else:
        step, desc = cxrloc_step([])
        rows["ours"] = Row(f"cxrloc {desc}", step, [])

    for row in rows.values():  # warm-up, and the peak memory of one step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            row.step()
        _sync(device)
        if device.type == "cuda":
            row.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    for _ in range(max(1, args.rounds)):
        for row in rows.values():
            row.rounds.append(_time_steps(row.step, args.steps, device, clock))

    n = b * args.steps
    ips = {key: n / statistics.median(row.rounds) for key, row in rows.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device={device} ({where}) torch={torch.__version__} threads={torch.get_num_threads()} "
          f"size={s} batch={b} steps={args.steps} rounds={max(1, args.rounds)} amp={args.amp} "
          f"preset={args.preset} compile={args.compile} channels_last={channels_last} clock={args.clock}")
    if not args.variants:
        print(f"{rows['base'].label}: {ips['base']:8.2f} images/s")
        print(f"{rows['ours'].label}: {ips['ours']:8.2f} images/s")
        print(f"ratio cxrloc / resnet50 throughput: {ips['ours'] / ips['base']:.3f} "
              f"(overhead x{ips['base'] / ips['ours']:.2f})")
        if args.profile > 0:
            _profile(rows["ours"].step, args.profile, device)
        return
    memory = device.type == "cuda"
    print(f"| network | images/s | vs bare ResNet-50 |{' peak MiB |' if memory else ''}")
    print(f"|---|---|---|{'---|' if memory else ''}")
    for key, row in rows.items():
        extra = f" {row.peak_mib:.0f} |" if memory else ""
        print(f"| {row.label} | {ips[key]:.2f} | {ips[key] / ips['base']:.2f} |{extra}")
    print(f"CRF cost (no anti-aliasing): {1 - ips['crf'] / ips['plain']:.1%}; "
          f"blur-pool cost (no CRF): {1 - ips['aa'] / ips['plain']:.1%}; "
          f"full vs bare ResNet-50: {ips['full'] / ips['base']:.3f}")
    if args.profile > 0:
        _profile(rows["full"].step, args.profile, device)


def _profile(step: Callable[[], None], steps: int, device: torch.device) -> None:
    """Print the top 25 operators/kernels of ``steps`` training steps by self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\ntorch.profiler, {steps} steps of the full network, sorted by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
