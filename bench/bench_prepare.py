"""Images per second per core of `cxrloc prepare` beside a plain Pillow decode of the same PNGs.

Usage:
    OMP_NUM_THREADS=1 python bench/bench_prepare.py [--images ../shared/data/nih-originals/images] [--repeat 3]

Prints (1) Pillow decode only, (2) prepare's image stage (the real code: decode, resize to 512 with
the area filter, quantise, write to the memmap, flush, set the done flags; one process = one core)
and their ratio, and (3) a whole `prepare()` call including reading the 112,120-row Data_Entry CSV.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image

import cxrloc.data.prepare as prep
from cxrloc.data.image_cache import ImageCache, fill_cache

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=SHARED / "nih-originals" / "images")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    files = sorted(args.images.glob("*.png"))
    if not files:
        raise SystemExit(f"no PNG in {args.images}")
    paths = files * args.repeat

    for p in files:  # warm the page cache so both measurements read from memory
        p.read_bytes()
    t = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            im.load()
    decode = len(paths) / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        ids = [f"{i:05d}_{p.name}" for i, p in enumerate(paths)]
        cache = ImageCache(Path(tmp), ids, args.size)
        t = time.perf_counter()
        failures, n = fill_cache(cache, paths, workers=1, progress=False)
        stage = n / (time.perf_counter() - t)
        assert not failures

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        prep.prepare(
            args.images.parent,
            Path(tmp) / "p",
            data_entry=SHARED / "nih" / "Data_Entry_2017.csv",
            bbox_list=SHARED / "nih" / "BBox_List_2017.csv",
            size=args.size,
            progress=False,
        )
        whole = time.perf_counter() - t

    print(f"files: {len(files)} x {args.repeat} PNGs from {args.images}")
    print(f"Pillow decode only:            {decode:7.1f} images/s/core")
    print(f"prepare image stage ({args.size} px):   {stage:7.1f} images/s/core")
    print(f"ratio prepare / decode:        {stage / decode:7.2f}  (aim >= 0.8)")
    print(f"whole prepare() on {len(files)} images:  {whole:7.2f} s (incl. reading the 112,120-row Data_Entry CSV)")


if __name__ == "__main__":
    main()
