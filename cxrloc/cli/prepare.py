"""``cxrloc prepare``: NIH folder -> resized image cache, manifest, fingerprint and patient-grouped folds."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrloc.utils import console, read_json

EXAMPLE = """
Example (the official download, images in images_001/images/ ... images_012/images/):

  cxrloc prepare ~/data/nih --out prepared/nih --size 512 --folds 5 --unannotated-fraction 0.2 --workers 4

Images in several folders (the CSVs in ~/data/nih, extra images elsewhere), stored as PNG, JPEG or
DICOM under their NIH names:

  cxrloc prepare ~/data/nih --images /mnt/nih_batch2 --images ~/more_jpeg --out prepared/nih --size 256

Running it again after an interruption finishes the cache without redoing finished images;
an existing PREPARED_DIR/splits.json is reused (delete it to recompute the folds).
"""


def register(app: typer.Typer) -> None:
    """Add the ``prepare`` command to ``app``."""

    @app.command(
        "prepare",
        help="Resize NIH images into a fast uint8 cache and write manifest.csv, fingerprint.json and "
        "splits.json (patient-grouped folds).\n" + EXAMPLE,
    )
    def prepare_cmd(
        nih_dir: Path = typer.Argument(..., help="NIH_DIR: the CSVs and the images anywhere below it."),
        out: Path = typer.Option(..., "--out", "-o", help="PREPARED_DIR to write (resumed if present)."),
        data_entry: Path | None = typer.Option(
            None, "--data-entry", help="Data_Entry_2017.csv (or _v2020, .gz) if not in NIH_DIR."
        ),
        bbox_list: Path | None = typer.Option(None, "--bbox-list", help="BBox_List_2017.csv if not in NIH_DIR."),
        images: list[Path] = typer.Option(
            [],
            "--images",
            help="Another folder to search for images (repeatable), besides NIH_DIR. Images are matched by "
            "name stem, so 00000001_000.png may be stored as .jpg, .jpeg, .dcm or .dicom.",
        ),
        size: int = typer.Option(512, "--size", help="Side of the cached square images (area filter)."),
        folds: int = typer.Option(5, "--folds", help="Number of patient-grouped folds."),
        unannotated_fraction: float = typer.Option(
            0.0, "--unannotated-fraction", help="Fraction of unannotated images sampled into the training pool."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the folds and of the unannotated sampling."),
        workers: int = typer.Option(1, "--workers", "-j", help="Decoding processes."),
        strict: bool = typer.Option(
            False, "--strict", help="Fail (exit 2, nothing written) instead of dropping or changing any input: "
            "missing or unreadable annotated images, skipped, duplicate or clipped box rows."
        ),
    ) -> None:
        from cxrloc.data.prepare import StrictError, prepare, problems_table, summary_line

        try:
            result = prepare(
                nih_dir,
                out,
                data_entry=data_entry,
                bbox_list=bbox_list,
                images=images,
                size=size,
                folds=folds,
                unannotated_fraction=unannotated_fraction,
                seed=seed,
                workers=workers,
                strict=strict,
            )
        except StrictError as exc:
            table = problems_table(exc.problems)
            if table is not None:
                console.print(table)
            raise
        table = problems_table(read_json(result / "fingerprint.json", "fingerprint").get("problems", []))
        if table is not None:
            console.print(table)
        console.print(summary_line(result))
        console.print(f"Results saved to {result} (images.u8, manifest.csv, fingerprint.json, splits.json)")
