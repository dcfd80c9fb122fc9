"""Throughput of ``cxrloc pretrain`` steps (SimCLR: two views, backbone, projection, NT-Xent, AdamW).

Images per second (each image = two views) of :func:`cxrloc.training.pretrain.train_step` for a
preset's backbone at several view sizes, in float32 and bf16 autocast, with and without
channels_last. Variants are timed in interleaved rounds (``--rounds`` of ``--steps`` steps after
``--warmup``) and the median round is printed, so a machine whose load changes affects every row
alike. ``--clock process`` (CPU) divides by this process's CPU time: with ``OMP_NUM_THREADS=1``
that is the throughput of one core, little affected by other jobs on a shared machine.

The images are the prepared cache's kind (uint8, ``image_size`` square); their content does not
change the time of a step, so they are random unless ``--images DIR`` points at real ones.

Example:
    OMP_NUM_THREADS=1 python bench/bench_pretrain.py --crops 96,112 --batch 128 --clock process
    OMP_NUM_THREADS=1 python bench/bench_pretrain.py --crops 96 --batch 64 --steps 2 --rounds 2 --amp off
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from cxrloc.config import make_config
from cxrloc.data.pretrain_augment import ViewSpec
from cxrloc.training.pretrain import PretrainOptions, build_simclr, train_step


def _images(args: argparse.Namespace, size: int) -> torch.Tensor:
    if args.images:
        from cxrloc.data.pretrain_images import build_cache, find_pretrain_images

        paths = find_pretrain_images([args.images], max_images=args.batch)
        cache = build_cache(paths, args.cache or "/tmp/cxrloc-bench-pretrain-cache", size, progress=False)
        return torch.from_numpy(cache.images[: args.batch].copy())
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (args.batch, size, size), dtype=torch.uint8, generator=g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--crops", default="96,112", help="comma-separated view sizes")
    p.add_argument("--amp", default="off,bf16", help="comma-separated: off, bf16")
    p.add_argument("--channels-last", default="1", help="comma-separated: 0, 1")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "process"), default="wall")
    p.add_argument("--images", default="", help="a folder of real images (default: random pixels)")
    p.add_argument("--cache", default="", help="cache folder for --images")
    args = p.parse_args()
    cfg = make_config(args.preset)
    batch = _images(args, cfg.image_size)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    variants = [
        (int(c), a, cl == "1")
        for c in args.crops.split(",") for a in args.amp.split(",") for cl in args.channels_last.split(",")
    ]
    runs = {}
    for crop, amp, cl in variants:
        opts = PretrainOptions(batch_size=args.batch, views=ViewSpec(crop=crop))
        torch.manual_seed(0)
        model = build_simclr(cfg, opts)
        memory = torch.channels_last if cl else torch.contiguous_format
        model.to(memory_format=memory)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runs[(crop, amp, cl)] = (model, optimizer, opts, memory, torch.bfloat16 if amp == "bf16" else None)
    g = torch.Generator().manual_seed(0)

    def steps(key: tuple[int, str, bool], n: int) -> float:
        model, optimizer, opts, memory, dtype = runs[key]
        t0 = clock()
        for _ in range(n):
            train_step(model, optimizer, batch, g, opts, 1e-4, torch.device("cpu"), dtype, memory)
        return n * args.batch / (clock() - t0)

    for key in runs:
        steps(key, args.warmup)
    rates: dict[tuple[int, str, bool], list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for key in runs:
            rates[key].append(steps(key, args.steps))
    print(f"# {platform.machine()} {platform.processor() or ''} torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), preset {args.preset} ({cfg.arch} width {cfg.width} output stride {cfg.output_stride}), "
          f"batch {args.batch}, clock {args.clock}, median of {args.rounds} rounds x {args.steps} steps")
    print("crop  amp   channels_last  images/s  (x2 views)  s/epoch of 4781 images")
    for (crop, amp, cl), r in rates.items():
        m = statistics.median(r)
        print(f"{crop:4d}  {amp:5s} {int(cl):13d}  {m:8.1f}  {2 * m:10.1f}  {4781 / m:10.0f}")


if __name__ == "__main__":
    main()
