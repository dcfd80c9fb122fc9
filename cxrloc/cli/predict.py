"""``cxrloc predict``: findings, scores and regions on any chest X-ray files."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from cxrloc.inference.backends import DEFAULT_THREADS
from cxrloc.utils import console

EXAMPLE = """
Example:

  cxrloc predict scan.dcm --model runs/paper --overlay scan.png --json scan.json

  cxrloc predict xrays/ "more/*.png" --model runs/paper/export/model.onnx --out-dir preds --save-maps

  cxrloc predict 00013118_008.png --model runs/paper --overlay o.png --boxes BBox_List_2017.csv
"""


def register(app: typer.Typer) -> None:
    """Add the ``predict`` command to ``app``."""

    @app.command("predict", help="Predict findings and their regions on PNG, JPEG or DICOM files.\n" + EXAMPLE)
    def predict(
        inputs: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or glob patterns."),
        model: Path = typer.Option(..., "--model", "-m", help="RUN_DIR, a .pt checkpoint or an exported MODEL.onnx."),
        overlay: Path | None = typer.Option(
            None, "--overlay", help="Overlay of ONE image (Figure 1 style); .png or .jpg, as the extension says."
        ),
        json_out: Path | None = typer.Option(None, "--json", help="JSON record of ONE image (default: stdout)."),
        out_dir: Path | None = typer.Option(
            None, "--out-dir", help="Folder for per-image JSON + overlays + predictions.json (default for several "
            "inputs: ./predictions)."
        ),
        overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write overlays in --out-dir."),
        overlay_classes: str = typer.Option(
            "present", "--overlay-classes", help="Blobs for: the 'present' classes (at the operating point chosen on "
            "validation), 'all' classes, or 'gt': the classes of the --boxes."
        ),
        boxes: Path | None = typer.Option(
            None, "--boxes", help="NIH BBox_List_2017.csv, a COCO annotation file (.json) or a boxes table (columns "
            "image, label, x, y, w, h in pixels): draw the ground-truth boxes of each image (found by its path's "
            "trailing part, e.g. pat01/scan0.dcm)."
        ),
        save_maps: bool = typer.Option(
            False, "--save-maps", help="Also save the raw (K, P, P) maps z as .npy (K: the model's classes)."
        ),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda (falls back to cpu when unavailable)."),
        fold: int | None = typer.Option(None, "--fold", help="Fold of a multi-fold RUN_DIR."),
        threads: int = typer.Option(DEFAULT_THREADS, "--threads", help="onnxruntime CPU threads."),
        batch_size: int = typer.Option(8, "--batch-size", help="Images per forward pass."),
        thresholds: Path | None = typer.Option(
            None, "--thresholds", help="thresholds.json overriding the thresholds stored with the model."
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace existing output files that cxrloc did not write (an input, such as "
            "an image or the model, is never replaced)."
        ),
    ) -> None:
        from cxrloc.inference.predict import predict_files

        summary = predict_files(
            inputs, model, out_dir=out_dir, overlay=overlay, json_path=json_out, boxes_csv=boxes,
            save_maps=save_maps, overlays=overlays, overlay_classes=overlay_classes, device=device, fold=fold,
            threads=threads,
            batch_size=batch_size, thresholds_file=thresholds, overwrite=overwrite,
        )
        n_ok, n_bad = len(summary.records), len(summary.failures)
        status = f"{n_ok} image(s) predicted" + (f", {n_bad} failed" if n_bad else "")
        if summary.operating_point:
            status += f". {summary.operating_point.rstrip('.')}"
        where = f"Results saved to {summary.location}" if summary.location else "Nothing was written"
        console.print(f"{status}. {where}", soft_wrap=True)
        if n_bad:
            sys.exit(1)
