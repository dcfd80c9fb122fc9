"""Make a larger NIH-format folder from a small one by repeating its images as new patients.

For throughput measurements that need more images than a pack holds (``bench/gpu_check.sh``
measures ``cxrloc train`` end to end: with a few hundred images an epoch lasts well under a
second, so per-epoch work such as validation and the loader's start weighs far more than on real
data). Copy ``k`` of image ``PPPPPPPP_FFF.png`` becomes ``(P + k * STRIDE)_FFF.png`` of patient
``P + k * STRIDE``, with its Data_Entry and BBox_List rows; copy 0 keeps the original names. The
images are hard links where the file system allows, else copies. Real pixels and boxes, repeated:
fit for timing, not for accuracy (the same image can be in training and test folds).

Example:
    python bench/replicate_nih.py .nih_pack /tmp/nih_x6 --copies 6
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

STRIDE = 100_000
"""Patient-ID step between copies (NIH patient IDs are below 31,000)."""


def _renamed(name: str, k: int) -> str:
    stem, ext = os.path.splitext(name)
    patient, _, follow_up = stem.partition("_")
    return f"{int(patient) + k * STRIDE:08d}_{follow_up}{ext}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="NIH folder: Data_Entry_2017.csv, BBox_List_2017.csv, images/")
    ap.add_argument("dst", type=Path, help="new folder (must not exist)")
    ap.add_argument("--copies", type=int, default=6, help="how many times each image appears (>= 1)")
    args = ap.parse_args()
    if args.copies < 1:
        ap.error("--copies must be at least 1")
    entry, bbox = args.src / "Data_Entry_2017.csv", args.src / "BBox_List_2017.csv"
    for path in (entry, bbox):
        if not path.is_file():
            raise SystemExit(f"{path} not found: SRC must hold the NIH CSVs.")
    if args.dst.exists():
        raise SystemExit(f"{args.dst} exists: choose a new folder.")
    images = {p.name: p for p in sorted(args.src.rglob("*.png"))}
    (args.dst / "images").mkdir(parents=True)

    entry_lines = entry.read_text(encoding="utf-8").splitlines(keepends=True)
    bbox_lines = bbox.read_text(encoding="utf-8").splitlines(keepends=True)
    out_entry, out_bbox = [entry_lines[0]], [bbox_lines[0]]
    for k in range(args.copies):
        for line in entry_lines[1:]:
            name, rest = line.split(",", 1)
            if name not in images:
                continue
            fields = rest.split(",")
            fields[2] = str(int(fields[2]) + k * STRIDE)  # Patient ID (after labels and follow-up)
            out_entry.append(f"{_renamed(name, k)},{','.join(fields)}")
        for line in bbox_lines[1:]:
            name, rest = line.split(",", 1)
            if name in images:
                out_bbox.append(f"{_renamed(name, k)},{rest}")
        for name, src in images.items():
            dst = args.dst / "images" / _renamed(name, k)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    (args.dst / "Data_Entry_2017.csv").write_text("".join(out_entry), encoding="utf-8")
    (args.dst / "BBox_List_2017.csv").write_text("".join(out_bbox), encoding="utf-8")
    print(f"{args.dst}: {len(images) * args.copies} images ({len(images)} x {args.copies}), "
          f"{len(out_entry) - 1} Data_Entry rows, {len(out_bbox) - 1} boxes")


if __name__ == "__main__":
    main()
