"""``cxrloc train``: train one fold or all folds of a prepared folder."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from cxrloc.utils import console

EXAMPLE = """
Examples:

  cxrloc train prepared/ --out runs/cpu --fold 0 --preset cpu

  cxrloc train prepared/ --out runs/paper --fold all --preset paper          # 5 folds, fold_0 .. fold_4

  cxrloc train prepared/ --out runs/cpu --fold 0 --resume                     # continue a stopped run

  cxrloc train prepared/ --out runs/alt --fold 0 --preset cpu --epochs 8 --alternate 3  # 3 x (train, fit)

  The whole recipe in one command (unary, then CRF, then joint fine-tune; runs/cpu/{unary,crf,joint}):

  cxrloc train prepared/ --out runs/cpu --fold all --preset cpu --stage all

  Stage by stage (train the base model, then only the CRF on top of it):

  cxrloc train prepared/ --out runs/unary --fold 0 --preset paper --stage unary

  cxrloc train prepared/ --out runs/crf --fold 0 --preset paper --stage crf --from runs/unary

  Paper ablations, one command each:

  cxrloc train prepared/ --out runs/li2018 --fold all --preset paper --set loss=li2018 --set crf=false

  cxrloc train prepared/ --out runs/no-crf --fold all --preset paper --set crf=false

  cxrloc train prepared/ --out runs/no-aa --fold all --preset paper --set antialias=false

  cxrloc train prepared/ --out runs/sigmoid --fold all --preset paper --set loss=threshold-sigmoid

  Multi-GPU (one process per GPU; batch_size is the global batch):

  torchrun --nproc_per_node 4 -m cxrloc train prepared/ --out runs/paper --fold 0 --preset paper
"""


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""

    @app.command(
        "train",
        help="Train the localization network on a prepared folder; writes RUN_DIR/fold_K/{config.json, run.json, "
        "metrics.csv, checkpoints/last.pt, checkpoints/best.pt}. See docs/training.md.\n" + EXAMPLE,
    )
    def train_command(
        prepared_dir: Path = typer.Argument(..., help="PREPARED_DIR written by `cxrloc prepare`."),
        out: Path = typer.Option(..., "--out", help="RUN_DIR: the run folder (fold_K/ inside)."),
        fold: str = typer.Option("0", "--fold", help="Fold index N, or 'all' to train every fold in turn."),
        preset: str = typer.Option(
            None, "--preset", help="paper, cpu or tiny (default: paper on a CUDA GPU, cpu otherwise, said in "
            "one line; on --resume, the run's saved config)."
        ),
        epochs: int = typer.Option(None, "--epochs", help="Number of epochs (overrides the preset)."),
        stage: str = typer.Option(
            "unary", "--stage", help="unary, crf (CRF only, needs --from), joint, or all: unary, then crf_epochs of "
            "crf and joint_epochs of joint (config fields, 5 each), into RUN_DIR/{unary,crf,joint}."
        ),
        init_from: Path = typer.Option(None, "--from", help="Run folder to start from (its fold_K best.pt)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from fold_K/checkpoints/last.pt."),
        sets: list[str] = typer.Option(
            [], "--set", help="Override a config field: --set key=value (repeatable), e.g. --set loss=li2018."
        ),
        alternate: int = typer.Option(
            0, "--alternate", help="N rounds of: train --epochs epochs, then fit thresholds (the paper's alternation)."
        ),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    ) -> None:
        from cxrloc.training.runner import run_training

        paths = run_training(
            prepared_dir,
            out,
            folds=fold,
            preset=preset,
            overrides=sets,
            epochs=epochs,
            stage=stage,
            resume=resume,
            init_from=init_from,
            progress=not quiet,
            alternate=alternate,
        )
        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun, rank 0 reports
        final = paths[0].parent
        where = paths[0] if len(paths) == 1 else f"{final} ({len(paths)} folds)"
        if stage == "all":
            where = f"{where}; use {final} (the last stage) with fit-thresholds, evaluate, predict and export"
        console.print(f"Results saved to {where}")
