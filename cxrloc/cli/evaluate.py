"""``cxrloc evaluate``: the paper's IoU / IoR accuracy, the prior and Table 1, AUROC."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrloc.evaluation.evaluate import DEFAULT_TS
from cxrloc.utils import CxrlocError, console

EXAMPLE = """
Example:

  cxrloc evaluate runs/paper --metric both --t 0.1 --t 0.3 --t 0.5 --fold all

  cxrloc evaluate runs/paper --split val      # validation images: choose settings without test folds

  cxrloc evaluate runs/paper --tta 5          # average 5 shifted views per image

  cxrloc evaluate runs/paper --data prepared/other_site   # an external test set -> runs/paper/eval_on_other_site/

  cxrloc evaluate runs/paper --geometry both  # also the patch-grid tables, beside the paper's Table 1
"""


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app``."""

    @app.command(
        "evaluate",
        help="Localization accuracy on each fold's test images (or an external test set, --data) beside the "
        "data-free prior and, on NIH data, the paper's Table 1 (beside the grid tables); writes RUN_DIR/eval/ "
        "(results.csv/.json/.md, per_image.csv, report.html: a self-contained page with curves, ROC, reliability and "
        "a gallery; eval_val/ for --split val, eval_on_NAME/ for --data; a folder holding an evaluation with other "
        "options is never replaced: use --out).\n"
        + EXAMPLE,
    )
    def evaluate(
        run_dir: Path = typer.Argument(..., help="RUN_DIR (with fold_K/ folders) or one fold folder."),
        metric: str = typer.Option("both", "--metric", help="iou, ior or both."),
        t: list[float] = typer.Option(list(DEFAULT_TS), "--t", help="Threshold T (repeat for several)."),
        fold: str = typer.Option("all", "--fold", help="Fold index N, or 'all'."),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
        which: str = typer.Option("best", "--which", help="Checkpoint: best or last."),
        batch_size: int = typer.Option(16, "--batch-size", help="Images per forward pass."),
        split: str = typer.Option("test", "--split", help="test (each fold's test images) or val (its validation "
                                  "images, carved out of the training patients)."),
        tta: int = typer.Option(1, "--tta", help="Test-time views averaged per image (1: none; up to 9)."),
        data: Path | None = typer.Option(
            None, "--data", help="An external test set: a PREPARED_DIR (same --size as the run's). Every fold's model "
            "(with --fold N: fold N's) scores every boxed image of it, whatever its folds; classes are matched by "
            "name. Writes RUN_DIR/eval_on_NAME/."
        ),
        geometry: str = typer.Option(
            "exact", "--geometry", help="Tables shown: exact (box areas exactly, the default), grid (the box rounded "
            "onto the patch grid as in the public Li et al. code: compare these with published tables) or both. "
            "Both are always saved."
        ),
        out: Path | None = typer.Option(
            None, "--out", help="Evaluation folder (default RUN_DIR/eval, eval_val, eval_on_NAME, +_ttaN)."
        ),
    ) -> None:
        from cxrloc.evaluation.evaluate import evaluate as run_evaluate
        from cxrloc.evaluation.report import rich_tables

        choices = {"iou": ("iou",), "ior": ("ior",), "both": ("iou", "ior")}
        if metric not in choices:
            raise CxrlocError(f"--metric must be iou, ior or both, got {metric!r}.")
        geometries = {"exact": ("exact",), "grid": ("grid",), "both": ("exact", "grid")}
        if geometry not in geometries:
            raise CxrlocError(f"--geometry must be exact, grid or both, got {geometry!r}.")
        result = run_evaluate(
            run_dir, metrics=choices[metric], ts=t, fold=fold, device=device, which=which, batch_size=batch_size,
            split=split, tta=tta, data=data, out_dir=out,
        )
        for table in rich_tables(result, console.width, geometries=geometries[geometry]):
            console.print(table)
        console.print(f"Results saved to {result['out_dir']}")
