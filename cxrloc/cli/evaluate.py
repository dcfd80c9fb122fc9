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
"""


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app``."""

    @app.command(
        "evaluate",
        help="Localization accuracy on each fold's test images beside the data-free prior and the paper's "
        "Table 1; writes RUN_DIR/eval/ (results.csv/.json/.md, per_image.csv; eval_val/ for --split val).\n"
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
    ) -> None:
        from cxrloc.evaluation.evaluate import evaluate as run_evaluate
        from cxrloc.evaluation.report import rich_tables

        choices = {"iou": ("iou",), "ior": ("ior",), "both": ("iou", "ior")}
        if metric not in choices:
            raise CxrlocError(f"--metric must be iou, ior or both, got {metric!r}.")
        result = run_evaluate(
            run_dir, metrics=choices[metric], ts=t, fold=fold, device=device, which=which, batch_size=batch_size,
            split=split, tta=tta,
        )
        for table in rich_tables(result, console.width):
            console.print(table)
        console.print(f"Results saved to {result['out_dir']}")
