"""``cxrloc demo``: synthetic data -> prepare -> train -> thresholds -> evaluate -> ONNX -> overlays."""

from __future__ import annotations

from pathlib import Path

import typer

EXAMPLE = """
Example:

  cxrloc demo --out demo_out            # about 65 s of CPU time (docs/demo.md)

  cxrloc demo --out /tmp/demo --quick   # a smoke run in well under a minute (accuracy not meaningful)

  cxrloc demo --out demo_coco --format coco   # the same data written as COCO, read by the COCO reader
"""


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to ``app``."""

    @app.command(
        "demo",
        help="Run the whole pipeline on a synthetic dataset (NIH or COCO format; generated, prepared, trained with "
        "the unary then the CRF stage, thresholds fitted, evaluated against the data-free prior, exported "
        "to ONNX, overlays drawn) and write DIR/summary.json.\n" + EXAMPLE,
    )
    def demo(
        out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for every output (must not hold a demo)."),
        size: int = typer.Option(96, "--size", help="Image side in pixels (a multiple of 32; 96 = demo.DEMO_SIZE)."),
        quick: bool = typer.Option(False, "--quick", help="Tiny data and network, 1-2 epochs: a smoke run."),
        seed: int = typer.Option(0, "--seed", help="Seed of the data, folds and training."),
        threads: int = typer.Option(
            1, "--threads", help="torch CPU threads (default 1: the demo's small network trains as fast on one thread "
            "as on two, and one thread gives the same result whatever the machine's core count; 0: torch's default)."
        ),
        data_format: str = typer.Option(
            "nih", "--format", help="How the synthetic data is written and read: nih (NIH's CSVs) or coco (a COCO "
            "file and a labels table)."
        ),
    ) -> None:
        from cxrloc.demo import run_demo

        run_demo(out, size=size, quick=quick, seed=seed, threads=threads or None, data_format=data_format)
