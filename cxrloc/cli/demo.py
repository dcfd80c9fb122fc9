"""``cxrloc demo``: synthetic data -> prepare -> train -> thresholds -> evaluate -> ONNX -> overlays."""

from __future__ import annotations

from pathlib import Path

import typer

EXAMPLE = """
Example:

  cxrloc demo --out demo_out            # about 5-10 minutes on 2 CPU cores

  cxrloc demo --out /tmp/demo --quick   # a smoke run in well under a minute (accuracy not meaningful)
"""


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to ``app``."""

    @app.command(
        "demo",
        help="Run the whole pipeline on a synthetic NIH-format dataset (generated, prepared, trained with "
        "the unary then the CRF stage, thresholds fitted, evaluated against the data-free prior, exported "
        "to ONNX, overlays drawn) and write DIR/summary.json.\n" + EXAMPLE,
    )
    def demo(
        out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for every output (must not hold a demo)."),
        size: int = typer.Option(128, "--size", help="Image side in pixels (a multiple of 32)."),
        quick: bool = typer.Option(False, "--quick", help="Tiny data and network, 1-2 epochs: a smoke run."),
        seed: int = typer.Option(0, "--seed", help="Seed of the data, folds and training."),
        threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default)."),
    ) -> None:
        from cxrloc.demo import run_demo

        run_demo(out, size=size, quick=quick, seed=seed, threads=threads or None)
