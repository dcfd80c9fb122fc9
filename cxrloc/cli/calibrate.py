"""``cxrloc calibrate``: a probability per class and the operating point, fitted on validation images."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrloc.calibration import MIN_POSITIVES
from cxrloc.utils import console

EXAMPLE = """
Example:

  cxrloc calibrate runs/paper --fold all                    # count-matched operating point (default)

  cxrloc calibrate runs/paper --fold all --rule youden      # Youden's J

  cxrloc calibrate runs/paper --fold all --sensitivity 0.9  # the most specific cut with sensitivity >= 0.9

  cxrloc predict scan.dcm --model runs/paper --fold 0       # probabilities, present at that operating point
"""


def register(app: typer.Typer) -> None:
    """Add the ``calibrate`` command to ``app``."""

    @app.command(
        "calibrate",
        help="Fit per-class probabilities (Platt scaling of 1'z) and the operating point that calls a class "
        "present, on each fold's validation images (method in docs/evaluation.md); writes "
        "fold_K/calibration.json, which predict, evaluate and export then use.\n" + EXAMPLE,
    )
    def calibrate(
        run_dir: Path = typer.Argument(..., help="RUN_DIR (with fold_K/ folders) or one fold folder."),
        fold: str = typer.Option("all", "--fold", help="Fold index N, or 'all'."),
        rule: str = typer.Option(
            None, "--rule", help="matched (default: each class called present as often as it is labelled on "
            "validation images, never below p = 0.1), youden (Youden's J) or sensitivity (with --sensitivity)."
        ),
        sensitivity: float | None = typer.Option(
            None, "--sensitivity", help="Operating point reaching this sensitivity on validation (e.g. 0.9); "
            "implies --rule sensitivity."
        ),
        min_positives: int = typer.Option(
            MIN_POSITIVES, "--min-positives", help="Validation positives and negatives a class needs to be "
            "calibrated on validation images alone (else training images are added)."
        ),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
        which: str = typer.Option("best", "--which", help="Checkpoint: best or last."),
        batch_size: int = typer.Option(16, "--batch-size", help="Images per forward pass."),
    ) -> None:
        from cxrloc.evaluation.calibrate import calibrate_run

        paths = calibrate_run(run_dir, fold=fold, sensitivity=sensitivity, min_positives=min_positives,
                              device=device, which=which, batch_size=batch_size, rule=rule)
        where = paths[0] if len(paths) == 1 else f"{run_dir}/fold_*/calibration.json ({len(paths)} folds)"
        console.print(f"Results saved to {where}")
