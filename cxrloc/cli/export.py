"""``cxrloc export``: the whole network to ONNX, checked against torch with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrloc.inference.backends import DEFAULT_THREADS
from cxrloc.inference.export import DEFAULT_OPSET, DEFAULT_TOLERANCE
from cxrloc.utils import console

EXAMPLE = """
Example:

  cxrloc export runs/paper --out runs/paper/export/model.onnx

  cxrloc predict scan.dcm --model runs/paper/export/model.onnx --overlay scan.png
"""


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to ``app``."""

    @app.command("export", help="Export a trained model (backbone, head, CRF) to ONNX with its metadata.\n" + EXAMPLE)
    def export(
        run_dir: Path = typer.Argument(..., help="RUN_DIR, RUN_DIR/fold_K or a .pt checkpoint."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Output .onnx (default RUN_DIR/export/model.onnx)."),
        fold: int | None = typer.Option(None, "--fold", help="Fold of a multi-fold RUN_DIR."),
        opset: int = typer.Option(DEFAULT_OPSET, "--opset", help="ONNX opset (17 or newer)."),
        check_image: Path | None = typer.Option(
            None, "--check-image", help="Image for the torch/onnxruntime check (default: a real NIH image when "
            "../shared/data exists, else a generated synthetic chest)."
        ),
        device: str = typer.Option("cpu", "--device", help="onnxruntime device for the check: cpu or cuda."),
        threads: int = typer.Option(DEFAULT_THREADS, "--threads", help="onnxruntime CPU threads."),
        tolerance: float = typer.Option(DEFAULT_TOLERANCE, "--tolerance", help="Largest allowed |z_onnx - z_torch|."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace an existing --out file that cxrloc did not write (an input, such as "
            "the checkpoint or the check image, is never replaced)."
        ),
    ) -> None:
        from cxrloc.inference.export import export_onnx

        report = export_onnx(
            run_dir, out, fold=fold, opset=opset, check_image=check_image, device=device, threads=threads,
            tolerance=tolerance, overwrite=overwrite,
        )
        console.print(
            f"Exported {report.checkpoint} (opset {report.opset}, {report.size_bytes / 1e6:.1f} MB) in "
            f"{report.seconds:.1f} s; max |dz| {report.max_abs_diff_z:.2g} <= {report.tolerance:g}."
        )
        console.print(f"Calibration: {report.calibration}", highlight=False)
        console.print(f"Results saved to {report.path}")
