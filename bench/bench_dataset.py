"""Does the training data pipeline keep up with the training step?

Reads items of ``cxrloc.data.dataset.LocalizationDataset`` (what ``cxrloc train`` feeds the network:
uint8 cache row -> optional zoom/shift augmentation with its boxes -> [-1, 1] tensor + box masks)
from a real prepared folder, in one process and one thread, with and without augmentation.
Compare the images/s with the training step's images/s of ``bench/bench_train.py`` for the same
preset: one loader worker keeps up when its figure is the larger.

Example:
    cxrloc prepare ../shared/data/nih --out /tmp/prep512 --size 512
    OMP_NUM_THREADS=1 python bench/bench_dataset.py /tmp/prep512 --preset paper --items 200
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from cxrloc.config import make_config
from cxrloc.data.dataset import LocalizationDataset
from cxrloc.data.prepared import Prepared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prepared")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--items", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prepared = Prepared.open(args.prepared)
    ids = list(prepared.fold(0)["train_annotated"])[: args.items]
    cfg = make_config(args.preset, [f"image_size={prepared.size}"])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one thread")
    print(f"cache {prepared.root} ({prepared.size} px), preset {args.preset}, P = {cfg.patch_grid}")
    for augment in (False, True):
        ds = LocalizationDataset(prepared, ids, cfg, augment=augment)
        ds[0]  # warm the page cache and the code paths
        start = time.perf_counter()
        for i in range(len(ds)):
            item = ds[i]
        rate = len(ds) / (time.perf_counter() - start)
        assert item["image"].shape == (1, prepared.size, prepared.size)
        print(f"dataset items, augmentation {'on ' if augment else 'off'}: {rate:8.1f} images/s per core")


if __name__ == "__main__":
    main()
