"""``cxrloc prepare``: a dataset's folder -> resized image cache, manifest, class list, fingerprint and folds."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrloc.data.formats import format_help
from cxrloc.utils import console, read_json

EXAMPLE = """
Example (the official download, images in images_001/images/ ... images_012/images/):

  cxrloc prepare ~/data/nih --out prepared/nih --size 512 --folds 5 --unannotated-fraction 0.2 --workers 4

Images in several folders (the CSVs in ~/data/nih, extra images elsewhere), stored as PNG, JPEG or
DICOM under their NIH names:

  cxrloc prepare ~/data/nih --images /mnt/nih_batch2 --images ~/more_jpeg --out prepared/nih --size 256

Your own data, as a labels table and a boxes table (box x, y, w, h in pixels of each image file;
images PNG, JPEG or DICOM, in any folders below IMAGES_DIR):

  cxrloc prepare ~/data/hospital --format table --labels labels.csv --boxes boxes.csv --out prepared/hosp

As COCO (categories = classes; images without annotations are negatives unless --labels says more):

  cxrloc prepare ~/tbx11k/imgs --format coco --boxes ~/tbx11k/annotations/json/TBX11K_train.json --out prepared/tbx

Running it again after an interruption finishes the cache without redoing finished images;
an existing PREPARED_DIR/splits.json is reused (delete it to recompute the folds).
"""


HELP = (
    "Resize a dataset's images into a fast uint8 cache and write manifest.csv, classes.json, "
    "fingerprint.json and splits.json (patient-grouped folds). Reads NIH ChestX-ray14 (default), a plain "
    "labels + boxes table, or COCO; see docs/data.md.\n" + EXAMPLE
)

# The arguments and options of ``cxrloc prepare``, in the order --help lists them.
DATA_DIR = typer.Argument(
    ..., metavar="DATA_DIR", help="The images anywhere below it (and NIH's CSVs, for --format nih)."
)
OUT = typer.Option(..., "--out", "-o", help="PREPARED_DIR to write (resumed if present).")
FORMAT = typer.Option("nih", "--format", help=format_help())
DATA_ENTRY = typer.Option(
    None, "--data-entry", help="nih: Data_Entry_2017.csv (or _v2020, .gz) if not in DATA_DIR."
)
BBOX_LIST = typer.Option(None, "--bbox-list", help="nih: BBox_List_2017.csv if not in DATA_DIR.")
LABELS = typer.Option(
    None, "--labels", help="table, coco: the labels table (image, patient, labels separated by '|')."
)
BOXES = typer.Option(
    None, "--boxes", help="table: the boxes table (image, label, x, y, w, h in pixels of the image file); "
    "coco: the COCO annotation file."
)
COLUMN = typer.Option(
    [], "--column", help="table, coco: a column name, KEY=NAME (repeatable); keys image, patient, labels, "
    "label, x, y, w, h (each named as its key by default)."
)
CLASSES = typer.Option(
    None, "--classes", help="table: the class list, comma-separated, in output order (default: every label "
    "of the tables, sorted)."
)
IMAGES = typer.Option(
    [],
    "--images",
    help="Another folder to search for images (repeatable), besides DATA_DIR. Images are matched by "
    "name stem, so 00000001_000.png may be stored as .jpg, .jpeg, .dcm or .dicom.",
)
SIZE = typer.Option(512, "--size", help="Side of the cached square images (area filter).")
FOLDS = typer.Option(5, "--folds", help="Number of patient-grouped folds.")
UNANNOTATED_FRACTION = typer.Option(
    1.0, "--unannotated-fraction", help="Fraction of the label-only images (labels, no box) found on disk "
    "that join the training pools (default 1: all of them, the method's premise; 0 leaves them out)."
)
SEED = typer.Option(0, "--seed", help="Seed of the folds and of the unannotated sampling.")
WORKERS = typer.Option(1, "--workers", "-j", help="Decoding processes.")
LABELS_FROM_BOXES = typer.Option(
    True, "--labels-from-boxes/--no-labels-from-boxes", help="Give an image the label of each class it has "
    "a box of when its table lacks it (default; the summary counts them per class). --no-labels-from-boxes "
    "keeps the table's labels as they are (AUROC and labels per image then use them)."
)
STRICT = typer.Option(
    False, "--strict", help="Fail (exit 2, nothing written) instead of dropping or changing any input: "
    "missing or unreadable annotated images, skipped, duplicate or clipped box rows."
)
REBUILD = typer.Option(
    False, "--rebuild", help="Replace a finished PREPARED_DIR made with other parameters (--size, --folds, "
    "--seed, --unannotated-fraction or other tables); without it prepare refuses, as runs trained on it "
    "would silently read the new images. Runs trained on the old folder then refuse it."
)
OVERWRITE = typer.Option(
    False, "--overwrite", help="Write into an --out folder that is not a prepared folder although it holds "
    "files of the names prepare writes (manifest.csv, splits.json, ...)."
)


def register(app: typer.Typer) -> None:
    """Add the ``prepare`` command to ``app``."""
    app.command("prepare", help=HELP)(prepare_cmd)


def prepare_cmd(
    data_dir: Path = DATA_DIR,
    out: Path = OUT,
    data_format: str = FORMAT,
    data_entry: Path | None = DATA_ENTRY,
    bbox_list: Path | None = BBOX_LIST,
    labels: Path | None = LABELS,
    boxes: Path | None = BOXES,
    column: list[str] = COLUMN,
    classes: str | None = CLASSES,
    images: list[Path] = IMAGES,
    size: int = SIZE,
    folds: int = FOLDS,
    unannotated_fraction: float = UNANNOTATED_FRACTION,
    seed: int = SEED,
    workers: int = WORKERS,
    labels_from_boxes: bool = LABELS_FROM_BOXES,
    strict: bool = STRICT,
    rebuild: bool = REBUILD,
    overwrite: bool = OVERWRITE,
) -> None:
    """``cxrloc prepare``: one call of :func:`cxrloc.data.prepare.prepare`, then its report."""
    from cxrloc.data.prepare import StrictError, prepare, problems_table

    try:
        result = prepare(
            data_dir,
            out,
            data_format=data_format,
            data_entry=data_entry,
            bbox_list=bbox_list,
            labels=labels,
            boxes=boxes,
            columns=column,
            classes=[c.strip() for c in classes.split(",")] if classes else None,
            images=images,
            size=size,
            folds=folds,
            unannotated_fraction=unannotated_fraction,
            seed=seed,
            workers=workers,
            strict=strict,
            labels_from_boxes=labels_from_boxes,
            rebuild=rebuild,
            overwrite=overwrite,
        )
    except StrictError as exc:
        table = problems_table(exc.problems)
        if table is not None:
            console.print(table)
        raise
    print_prepare_report(result)


def print_prepare_report(result: Path) -> None:
    """What ``prepare`` did, from the folder it wrote: dropped or changed rows, notes, the summary."""
    from cxrloc.data.prepare import labels_line, problems_table, summary_line

    fingerprint = read_json(result / "fingerprint.json", "fingerprint")
    table = problems_table(fingerprint.get("problems", []))
    if table is not None:
        console.print(table)
    for note in fingerprint.get("notes", []):
        console.print(f"[yellow]Note:[/] {note}")
    console.print(summary_line(result))
    line = labels_line(result)
    if line:
        console.print(line)
    console.print(f"Results saved to {result} (images.u8, manifest.csv, classes.json, fingerprint.json, "
                  "splits.json)")
