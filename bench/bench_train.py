"""Training throughput of the cxrloc network beside a bare torchvision ResNet-50.

Measures images per second of full training steps (forward, loss, backward, Adam step) for
the ``paper`` preset's network (ResNet-50 with anti-aliasing, patch head, PAC-CRF, threshold
loss) and for torchvision's ResNet-50 (one input channel, BCE on its pooled 14-way output) at
the same input size, batch and precision. The ratio is the overhead of anti-aliasing, head,
CRF and loss.

Example:
    OMP_NUM_THREADS=2 python bench/bench_train.py --steps 3 --batch 4
    python bench/bench_train.py --device cuda --amp bf16 --batch 32 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.models import resnet50

from cxrloc.classes import NUM_CLASSES
from cxrloc.config import make_config
from cxrloc.model.net import build_model
from cxrloc.training.losses import compute_loss


def _time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast() -> contextlib.AbstractContextManager[None]:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    gen = torch.Generator().manual_seed(args.seed)
    b, s = args.batch, args.size
    x = (torch.rand(b, 1, s, s, generator=gen) * 2 - 1).to(device)
    labels = (torch.rand(b, NUM_CLASSES, generator=gen) < 0.2).float().to(device)
    channels_last = device.type == "cuda"

    cfg = make_config(args.preset, ["init=scratch", f"image_size={s}"])
    p = cfg.patch_grid
    annotated = torch.zeros(b, NUM_CLASSES, dtype=torch.bool)
    annotated[0, 0] = True  # one annotated box per batch, like the sampled batches of training
    box_mask = torch.zeros(b, NUM_CLASSES, p, p)
    box_mask[0, 0, p // 4 : p // 2, p // 4 : p // 2] = 1
    annotated, box_mask = annotated.to(device), box_mask.to(device)
    gamma = torch.full((NUM_CLASSES,), 0.2, device=device)

    net = build_model(cfg).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=0.01)
    xin = x.to(memory_format=torch.channels_last) if channels_last else x

    def ours_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            z, u = net(xin)
        loss, _ = compute_loss(cfg, z, u, labels, annotated, box_mask, net.thresholds, gamma)
        loss.backward()
        opt.step()

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

    t_base = _time_steps(base_step, args.warmup, args.steps, device)
    t_ours = _time_steps(ours_step, args.warmup, args.steps, device)
    n = b * args.steps
    ips_base, ips_ours = n / t_base, n / t_ours
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device={device} ({where}) torch={torch.__version__} threads={torch.get_num_threads()} "
          f"size={s} batch={b} steps={args.steps} amp={args.amp} preset={args.preset}")
    print(f"torchvision resnet50 (BCE on pooled logits): {ips_base:8.2f} images/s")
    print(f"cxrloc {cfg.arch} aa={cfg.antialias} P={p} crf={cfg.crf} (window {cfg.crf_window}, "
          f"{cfg.crf_iterations} it.) loss={cfg.loss}: {ips_ours:8.2f} images/s")
    print(f"ratio cxrloc / resnet50 throughput: {ips_ours / ips_base:.3f} (overhead x{ips_base / ips_ours:.2f})")


if __name__ == "__main__":
    main()
