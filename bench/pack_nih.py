"""Copy a small subset of an NIH ChestX-ray14 folder (images and CSV rows) into a new folder.

For machines that cannot read the full data: ``bench/gpu_check.sh`` prepares the pack with
``cxrloc prepare`` and trains on it. The CSV lines are copied as they are (header quirks and all),
keeping only the rows of the chosen images: the first ``--annotated`` images of the box list and
the first ``--unannotated`` other images found under the folder, in file-name order.

Example:
    python bench/pack_nih.py ../shared/data/nih .nih_pack --annotated 300 --unannotated 0
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def _rows(path: Path, keep: set[str]) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return [lines[0]] + [line for line in lines[1:] if line.split(",", 1)[0] in keep]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="NIH folder: Data_Entry_2017.csv, BBox_List_2017.csv, images below")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--annotated", type=int, default=300)
    ap.add_argument("--unannotated", type=int, default=0)
    args = ap.parse_args()

    entry, bbox = args.src / "Data_Entry_2017.csv", args.src / "BBox_List_2017.csv"
    for path in (entry, bbox):
        if not path.is_file():
            raise SystemExit(f"{path} not found: SRC must hold the NIH CSVs.")
    files = {p.name: p for p in sorted(args.src.rglob("*.png"))}
    boxed = sorted({line.split(",", 1)[0] for line in bbox.read_text(encoding="utf-8").splitlines()[1:]} & set(files))
    others = [n for n in files if n not in set(boxed)]
    chosen = set(boxed[: args.annotated]) | set(others[: args.unannotated])
    if not chosen:
        raise SystemExit(f"No image of the CSVs was found under {args.src}.")
    (args.dst / "images").mkdir(parents=True, exist_ok=True)
    for name in sorted(chosen):
        shutil.copyfile(files[name], args.dst / "images" / name)
    (args.dst / "BBox_List_2017.csv").write_text("".join(_rows(bbox, chosen)), encoding="utf-8")
    (args.dst / "Data_Entry_2017.csv").write_text("".join(_rows(entry, chosen)), encoding="utf-8")
    size = sum(p.stat().st_size for p in args.dst.rglob("*") if p.is_file())
    print(f"{len(chosen)} images ({len(chosen & set(boxed))} with boxes), {size / 2**20:.1f} MiB -> {args.dst}")


if __name__ == "__main__":
    main()
