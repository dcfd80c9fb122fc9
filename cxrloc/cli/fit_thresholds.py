"""``cxrloc fit-thresholds``: per-class tau, rho, tau_hat, rho_hat with the network frozen."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrloc.utils import console

EXAMPLE = """
Example:

  cxrloc fit-thresholds runs/paper --fold all

  cxrloc train ... --resume    # continues training with fold_K/thresholds.json
"""


def register(app: typer.Typer) -> None:
    """Add the ``fit-thresholds`` command to ``app``."""

    @app.command(
        "fit-thresholds",
        help="Fit per-class thresholds on a fold's training images (criterion in docs/evaluation.md) and write "
        "fold_K/thresholds.json.\n" + EXAMPLE,
    )
    def fit_thresholds(
        run_dir: Path = typer.Argument(..., help="RUN_DIR (with fold_K/ folders) or one fold folder."),
        fold: str = typer.Option("all", "--fold", help="Fold index N, or 'all'."),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
        which: str = typer.Option("best", "--which", help="Checkpoint: best or last."),
        batch_size: int = typer.Option(16, "--batch-size", help="Images per forward pass."),
    ) -> None:
        from cxrloc.evaluation.fit_thresholds import fit_thresholds_run

        paths = fit_thresholds_run(run_dir, fold=fold, device=device, which=which, batch_size=batch_size)
        where = paths[0] if len(paths) == 1 else f"{run_dir}/fold_*/thresholds.json ({len(paths)} folds)"
        console.print(f"Results saved to {where}")
