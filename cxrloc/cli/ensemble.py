"""``cxrloc ensemble``: combine runs of several training seeds into one run (mean of their outputs)."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrloc.utils import console

EXAMPLE = """
Example (three seeds with the same validation images, then one run that averages them):

  for s in 0 1 2; do cxrloc train prepared/ --out runs/s$s --fold all --preset cpu --set seed=$s --set val_seed=0; done

  cxrloc ensemble runs/s0 runs/s1 runs/s2 --out runs/ens

  cxrloc evaluate runs/ens        # or fit-thresholds, predict, export: it is a run like any other
"""


def register(app: typer.Typer) -> None:
    """Add the ``ensemble`` command to ``app``."""

    @app.command(
        "ensemble",
        help="Combine trained runs (same folds and images, e.g. several seeds) into one run whose model "
        "averages theirs; writes OUT/fold_K/{run.json, checkpoints/best.pt}.\n" + EXAMPLE,
    )
    def ensemble(
        runs: list[Path] = typer.Argument(..., help="Two or more RUN_DIRs (or fold folders) to combine."),
        out: Path = typer.Option(..., "--out", "-o", help="The ensemble's RUN_DIR (must not hold these folds)."),
        fold: str = typer.Option("all", "--fold", help="Fold index N, or 'all' (every fold of the first run)."),
        which: str = typer.Option("best", "--which", help="Members' checkpoint: best or last."),
    ) -> None:
        from cxrloc.training.ensemble import make_ensemble

        paths = make_ensemble(runs, out, fold=fold, which=which)
        where = paths[0] if len(paths) == 1 else f"{out} ({len(paths)} folds)"
        console.print(f"Ensemble of {len(runs)} runs written. Results saved to {where}")
