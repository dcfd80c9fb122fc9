"""``cxrloc pretrain``: self-supervised pretraining (SimCLR) of a preset's backbone on unlabelled images."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrloc.utils import console

EXAMPLE = """
Examples:

  cxrloc pretrain ~/xrays/hospital_a ~/xrays/hospital_b --out runs/backbone.pt --epochs 30

  cxrloc train prepared/ --out runs/cpu-pre --fold 0 --preset cpu --set init=runs/backbone.pt

  cxrloc pretrain ~/xrays/hospital_a ~/xrays/hospital_b --out runs/backbone.pt --epochs 30 --resume   # continue

  A quick trial on 200 images, 3 epochs:

  cxrloc pretrain ~/xrays --out /tmp/try.pt --max-images 200 --epochs 3 --batch-size 32

Every PNG, JPEG and DICOM file below the folders is used (read as `prepare` reads them, cached once in
WORK/cache at the preset's image_size). An unreadable file is skipped with a warning (all are listed in
WORK/cache/skipped.txt). OUT and WORK/last.pt are rewritten after every epoch. Use the same --preset and
--set for `train` (the backbone's arch, width, antialias and output_stride must match). One core:
OMP_NUM_THREADS=1. See docs/training.md.
"""


def register(app: typer.Typer) -> None:
    """Add the ``pretrain`` command to ``app``."""

    @app.command(
        "pretrain",
        help="Pretrain a preset's backbone self-supervised (SimCLR) on every image below IMAGE_DIR...; writes "
        "OUT (backbone weights for `train --set init=OUT`) and WORK/{last.pt, history.csv, cache/}.\n" + EXAMPLE,
    )
    def pretrain_command(
        image_dirs: list[Path] = typer.Argument(..., help="Folders of PNG, JPEG or DICOM images (searched in depth)."),
        out: Path = typer.Option(..., "--out", help="The backbone weights file to write (e.g. runs/backbone.pt)."),
        preset: str = typer.Option("cpu", "--preset", help="paper, cpu or tiny: the backbone `train` will build."),
        sets: list[str] = typer.Option(
            [], "--set", help="Override a config field as for train, e.g. --set width=64 (backbone fields, seed, amp)."
        ),
        epochs: int = typer.Option(30, "--epochs", help="Epochs over all images (the cosine schedule ends here)."),
        batch_size: int = typer.Option(128, "--batch-size", help="Images per step (2 views each)."),
        lr: float = typer.Option(1e-3, "--lr", help="AdamW peak learning rate (1 epoch warm-up, then cosine)."),
        temperature: float = typer.Option(0.2, "--temperature", help="NT-Xent temperature."),
        crop: int = typer.Option(96, "--crop", help="Side in pixels of the random views (from image_size images)."),
        min_scale: float = typer.Option(0.3, "--min-scale", help="Smallest area share of a random crop."),
        hflip: bool = typer.Option(False, "--hflip", help="Also flip views left-right (off: keeps laterality)."),
        max_images: int = typer.Option(0, "--max-images", help="Use a seeded random sample of N images (0: all)."),
        work_dir: Path = typer.Option(None, "--work-dir", help="Checkpoint + history folder (default OUT-pretrain/)."),
        cache: Path = typer.Option(None, "--cache", help="Image cache (default WORK/cache); share it between runs."),
        resume: bool = typer.Option(False, "--resume", help="Continue from WORK/last.pt (only --epochs may change)."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar or epoch lines."),
    ) -> None:
        from cxrloc.data.pretrain_augment import ViewSpec
        from cxrloc.training.pretrain import PretrainOptions, pretrain

        opts = PretrainOptions(
            epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature,
            views=ViewSpec(crop=crop, min_scale=min_scale, hflip=hflip),
        )
        path = pretrain(
            image_dirs, out, preset=preset, overrides=sets, opts=opts, resume=resume, max_images=max_images,
            work_dir=work_dir, cache_dir=cache, progress=not quiet,
        )
        console.print(f"Backbone weights saved to {path}; start training from them with --set init={path}")
