"""Does the training data pipeline keep up with the training step?

Reads items of ``cxrloc.data.dataset.LocalizationDataset`` (what a loader worker of ``cxrloc train``
does: uint8 cache row -> [-1, 1] tensor, the augmentation's zoom/shift drawn and applied to the
boxes, box masks) from a real prepared folder, in one process and one thread, with and without
augmentation; then the pixels' warp that the training step applies to whole batches on its device
(``warp_batch``), timed here on this CPU with one thread. Compare the images/s with the training
step's images/s of ``bench/bench_train.py`` for the same preset: one loader worker keeps up when
its figure is the larger.

``--rounds`` alternates the two settings that many times and reports the median; ``--clock
process`` divides by this process's CPU time instead of wall time (one core's rate, nearly
unaffected by other jobs on a shared machine).

Example:
    cxrloc prepare ../shared/data/nih --out /tmp/prep512 --size 512
    OMP_NUM_THREADS=1 python bench/bench_dataset.py /tmp/prep512 --preset paper --items 200
    OMP_NUM_THREADS=1 python bench/bench_dataset.py /tmp/prep512 --rounds 5 --clock process
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from cxrloc.config import make_config
from cxrloc.data.dataset import LocalizationDataset, warp_batch
from cxrloc.data.prepared import Prepared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prepared")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "process"], default="wall")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(1)
    prepared = Prepared.open(args.prepared)
    ids = list(prepared.fold(0)["train_annotated"])[: args.items]
    cfg = make_config(args.preset, [f"image_size={prepared.size}"])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one thread")
    print(f"cache {prepared.root} ({prepared.size} px), preset {args.preset}, P = {cfg.patch_grid}, "
          f"{len(ids)} items x {max(1, args.rounds)} rounds, clock {args.clock}")
    datasets = {augment: LocalizationDataset(prepared, ids, cfg, augment=augment) for augment in (False, True)}
    rates: dict[bool, list[float]] = {False: [], True: []}
    for ds in datasets.values():
        ds[0]  # warm the page cache and the code paths
    for _ in range(max(1, args.rounds)):
        for augment, ds in datasets.items():
            start = clock()
            for i in range(len(ds)):
                item = ds[i]
            rates[augment].append(len(ds) / (clock() - start))
            assert item["image"].shape == (1, cfg.image_size, cfg.image_size)
    for augment in (False, True):
        print(f"dataset items, augmentation {'on ' if augment else 'off'}: "
              f"{statistics.median(rates[augment]):8.1f} images/s per core")
    # The warp of the pixels, as the training step does it: one affine_grid + grid_sample per batch.
    ds = datasets[True]
    batch = [ds[i] for i in range(min(16, len(ds)))]
    images = torch.stack([b["image"] for b in batch])
    theta = torch.stack([b["theta"] for b in batch])
    warp_rates = []
    for _ in range(max(1, args.rounds)):
        start = clock()
        for _ in range(5):
            warp_batch(images, theta)
        warp_rates.append(5 * len(batch) / (clock() - start))
    print(f"batch warp on the training device (this CPU, batch {len(batch)}): "
          f"{statistics.median(warp_rates):8.1f} images/s per core")


if __name__ == "__main__":
    main()
