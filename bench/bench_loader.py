"""Images per second per core read from a 512 x 512 uint8 memmap cache into [-1, 1] torch tensors.

Usage:
    OMP_NUM_THREADS=1 python bench/bench_loader.py [--count 512] [--batch 32] [--batches 200]

Builds a cache in the exact `cxrloc prepare` layout (images.u8 (N, S, S) uint8) in a temporary folder,
then reads random batches: memmap rows -> uint8 array -> float tensor x = u8 / 127.5 - 1, the
network input scaling, done by ``cxrloc.data.prepared.to_network_range`` (the library's conversion)
and, for comparison, by the same arithmetic on a fresh torch tensor. One thread (one core).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxrloc.data.prepared import to_network_range


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
        def rate(convert, batched: bool) -> float:
            t = time.perf_counter()
            n = 0
            for _ in range(args.batches):
                idx = rng.integers(0, args.count, size=args.batch)
                if batched:
                    x = convert(images[np.sort(idx)]).unsqueeze(1)
                else:
                    x = torch.stack([convert(np.array(images[i])) for i in idx]).unsqueeze(1)
                n += len(idx)
            elapsed = time.perf_counter() - t
            assert x.shape == (args.batch, 1, args.size, args.size) and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
            return n / elapsed

        def ours(u8: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(to_network_range(u8))

        def torch_ops(u8: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(u8).to(torch.float32).mul_(1 / 127.5).sub_(1.0)

        figures = {
            "per-image reads + stack (to_network_range)": rate(ours, False),
            "batched read (to_network_range)": rate(ours, True),
            "per-image reads + stack (torch arithmetic)": rate(torch_ops, False),
            "batched read (torch arithmetic)": rate(torch_ops, True),
        }
    print(f"cache: {args.count} x {args.size} x {args.size} uint8 memmap (page cache warm), batch {args.batch}")
    for name, value in figures.items():
        print(f"{name:45s} {value:8.0f} images/s/core (aim >= 2000)")


if __name__ == "__main__":
    main()
