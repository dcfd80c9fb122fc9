"""Images per second per core read from a 512 x 512 uint8 memmap cache into [-1, 1] torch tensors.

Usage:
    OMP_NUM_THREADS=1 python bench/bench_loader.py [--count 512] [--batch 32] [--batches 200]

Builds a cache in the exact `cxrloc prepare` layout (images.u8 (N, S, S) uint8) in a temporary folder,
then reads random batches: memmap rows -> uint8 array -> float tensor x = u8 / 127.5 - 1, the
network input scaling. One thread (one core).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=512)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.u8"
        shape = (args.count, args.size, args.size)
        w = np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)
        w[:] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        w.flush()
        del w
        images = np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
        # Per image (what a Dataset.__getitem__ does) and per batch (fancy indexing of sorted rows).
        t = time.perf_counter()
        n = 0
        for _ in range(args.batches):
            idx = rng.integers(0, args.count, size=args.batch)
            xs = [torch.from_numpy(np.array(images[i])).to(torch.float32).mul_(1 / 127.5).sub_(1.0) for i in idx]
            x = torch.stack(xs).unsqueeze(1)
            n += len(idx)
        per_item = n / (time.perf_counter() - t)
        t = time.perf_counter()
        n = 0
        for _ in range(args.batches):
            idx = np.sort(rng.integers(0, args.count, size=args.batch))
            x = torch.from_numpy(images[idx]).to(torch.float32).mul_(1 / 127.5).sub_(1.0).unsqueeze(1)
            n += len(idx)
        per_batch = n / (time.perf_counter() - t)
        assert x.shape == (args.batch, 1, args.size, args.size) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    print(f"cache: {args.count} x {args.size} x {args.size} uint8 memmap (page cache warm), batch {args.batch}")
    print(f"per-image reads + stack:  {per_item:8.0f} images/s/core (aim >= 2000)")
    print(f"batched fancy-index read: {per_batch:8.0f} images/s/core")


if __name__ == "__main__":
    main()
