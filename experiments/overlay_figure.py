"""Figure-1-style overlays of a trained fold on real NIH test images, tiled into one JPEG.

Usage:
    python experiments/overlay_figure.py RUN_DIR --fold 0 --nih ../shared/data/nih --out docs/img/nih_overlays.jpg

Picks test images of the fold whose boxes cover different classes (the first test image of each
boxed class, in class order), runs `cxrloc predict` on them with the ground-truth boxes drawn,
and tiles the overlays.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from PIL import Image

from cxrloc.classes import BOXED_CLASSES, CLASSES
from cxrloc.data.prepared import Prepared
from cxrloc.inference.predict import predict_files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--nih", type=Path, default=Path("../shared/data/nih"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tile", type=int, default=320)
    ap.add_argument("--count", type=int, default=6)
    args = ap.parse_args()

    run = json.loads((args.run / f"fold_{args.fold}" / "run.json").read_text())
    prepared = Prepared.open(run["prepared_dir"])
    chosen: list[str] = []
    for name in BOXED_CLASSES:
        k = CLASSES.index(name)
        for image_id in run["test_ids"]:
            if image_id not in chosen and any(b[0] == k for b in prepared.boxes(image_id)):
                chosen.append(image_id)
                break
        if len(chosen) == args.count:
            break
    with tempfile.TemporaryDirectory() as tmp:
        predict_files(
            [str(args.nih / "images" / i) for i in chosen], args.run, out_dir=tmp, fold=args.fold,
            boxes_csv=args.nih / "BBox_List_2017.csv", overlay_classes="gt", progress=False,
        )
        tiles = [Image.open(Path(tmp) / f"{Path(i).stem}.overlay.png").convert("RGB") for i in chosen]
        tiles = [t.resize((args.tile, args.tile), Image.LANCZOS) for t in tiles]
    cols = 3
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * args.tile, rows * args.tile), "white")
    for n, t in enumerate(tiles):
        sheet.paste(t, ((n % cols) * args.tile, (n // cols) * args.tile))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, quality=85)
    print(f"{len(tiles)} overlays ({', '.join(chosen)}) written to {args.out}")


if __name__ == "__main__":
    main()
