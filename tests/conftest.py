"""Shared test helpers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxrloc.checkpoint import make_meta, save_checkpoint
from cxrloc.classes import CLASSES
from cxrloc.config import make_config
from cxrloc.model.net import build_model
from cxrloc.thresholds import Thresholds


def run_cli(*args: object, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``cxrloc ARGS`` through the real entry point (``cxrloc.cli.main``) in this process.

    Returns ``(exit code, stdout and stderr together)``. Unlike ``CliRunner().invoke(app)``, the
    entry point's own error handling runs, so a test sees what a user sees; an exception that
    escapes it (a traceback for the user) fails the test.
    """
    from typer.testing import CliRunner

    from cxrloc.cli import main

    runner = CliRunner()
    with runner.isolation(env=env) as (_out, _err, mixed):
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        text = mixed.getvalue().decode("utf-8", "replace")
    return code, text


def one_line(text: str) -> str:
    """Terminal output with rich's line wrapping undone (for matching messages)."""
    return " ".join(text.split())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` when no CUDA device is present (``bench/gpu_check.sh`` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def save_tiny_run(
    root: Path,
    *,
    bias_span: float,
    seed: int,
    tau_hat: float | np.ndarray,
    thresholds_in_meta: bool = True,
) -> tuple[Path, torch.nn.Module]:
    """A ``tiny`` model with non-trivial outputs saved as ``root/fold_0/checkpoints/best.pt``.

    The head's last bias spans ``-bias_span..bias_span`` over the classes, so some classes have
    many patches with z >= 0.5 and others none; the CRF compatibility is random (``seed``) so the
    CRF changes the unaries; ``tau_hat`` (patches, one value or one per class) decides presence.
    """
    cfg = make_config("tiny")
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bias = model.unary.head.conv2.bias
        bias.copy_(torch.linspace(-bias_span, bias_span, bias.numel()))
        model.crf.compat.copy_(0.3 * torch.randn(model.crf.compat.shape, generator=gen))
    th = Thresholds.initial(cfg.patch_grid)
    th.tau_hat[:] = tau_hat
    model.thresholds.set(th)
    meta = make_meta(cfg, th.to_json() if thresholds_in_meta else None)
    save_checkpoint(
        root / "fold_0" / "checkpoints" / "best.pt",
        {"config": cfg.to_dict(), "model": model.state_dict(), "meta": meta},
    )
    return root, model


@pytest.fixture(scope="session")
def tiny_run_factory() -> Callable[..., tuple[Path, torch.nn.Module]]:
    """:func:`save_tiny_run`, for tests that need a saved run without training one."""
    return save_tiny_run


def write_prepared(root: Path, *, n_images: int = 40, size: int = 64, n_annotated: int = 16, seed: int = 0) -> Path:
    """Write a tiny prepared folder by hand, in the format ``cxrloc prepare`` writes (docs/data.md).

    Images are dark noise with one bright rectangle per box (a learnable lesion); patients hold
    two images each; two patient-grouped folds over the annotated images.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    images = (rng.random((n_images, size, size)) * 60).astype(np.uint8)
    rows = []
    for i in range(n_images):
        labels = np.zeros(len(CLASSES), dtype=int)
        boxes = []
        if i < n_annotated:
            k = [0, 1, 4, 7][i % 4]  # Atelectasis, Cardiomegaly, Infiltration, Pneumothorax
            x0, y0 = rng.uniform(0.05, 0.5, size=2)
            w, h = rng.uniform(0.2, 0.4, size=2)
            box = [k, round(float(x0), 4), round(float(y0), 4), round(float(x0 + w), 4), round(float(y0 + h), 4)]
            boxes.append(box)
            labels[k] = 1
            c0, r0, c1, r1 = (int(round(v * size)) for v in box[1:])
            images[i, r0:r1, c0:c1] = 220
        elif i % 3 == 0:
            labels[2] = 1  # an unboxed positive (Effusion)
        rows.append(
            {
                "image_id": f"{i:05d}_000.png",
                "patient_id": i // 2,
                "follow_up": i % 2,
                "view_position": "PA",
                **{c: int(v) for c, v in zip(CLASSES, labels, strict=True)},
                "annotated": int(bool(boxes)),
                "cache_index": i,
                "boxes": json.dumps(boxes),
            }
        )
    images.tofile(root / "images.u8")
    np.ones(n_images, dtype=np.uint8).tofile(root / "done.u8")
    (root / "cache.json").write_text(
        json.dumps({"version": 1, "size": size, "count": n_images, "file": "images.u8", "dtype": "uint8"})
    )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    ids = [r["image_id"] for r in rows]
    ann, unann = ids[:n_annotated], ids[n_annotated:]
    half = n_annotated // 2  # patients hold images 2j, 2j+1: an even cut keeps them together
    folds = []
    for f, (test, train) in enumerate(((ann[:half], ann[half:]), (ann[half:], ann[:half]))):
        folds.append({"fold": f, "test": test, "train_annotated": train, "train_unannotated": unann})
    splits = {"version": 1, "seed": 0, "group_by": "patient", "unannotated_fraction": 1.0, "folds": folds}
    (root / "splits.json").write_text(json.dumps(splits))
    return root


@pytest.fixture(scope="session")
def prepared_writer() -> Callable[..., Path]:
    """:func:`write_prepared`, for tests that need a tiny prepared folder."""
    return write_prepared


HAND_SIZE = 64

# The hand-worked run: boxes (class, x0, y0, x1, y1) per image; images "a", "b" are the test set of fold 0.
BOXES: dict[str, list[tuple[int, float, float, float, float]]] = {
    "a": [(0, 0.0, 0.0, 0.5, 0.5), (1, 0.25, 0.25, 0.75, 0.75)],
    "b": [(0, 0.0, 0.0, 0.25, 0.25), (0, 0.5, 0.5, 1.0, 1.0), (4, 0.1, 0.1, 0.2, 0.2)],
    "c": [(0, 0.0, 0.0, 0.5, 0.5), (1, 0.25, 0.25, 0.75, 0.75)],
    "d": [(0, 0.0, 0.0, 0.5, 0.5)],
    "e": [(4, 0.5, 0.5, 0.75, 0.75)],
    "f": [(0, 0.0, 0.0, 0.5, 0.5)],
}
EXTRA_LABELS = {"a": [5], "c": [5]}  # Nodule label without a box


def _write_prepared(root: Path) -> None:
    ids = list(BOXES)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(ids), HAND_SIZE, HAND_SIZE), dtype=np.uint8)
    root.mkdir(parents=True)
    images.tofile(root / "images.u8")
    np.ones(len(ids), dtype=np.uint8).tofile(root / "done.u8")
    (root / "cache.json").write_text(
        json.dumps({"version": 1, "size": HAND_SIZE, "count": len(ids), "file": "images.u8", "dtype": "uint8"})
    )
    rows = []
    for i, image_id in enumerate(ids):
        row = {"image_id": image_id, "patient_id": i, "follow_up": 0, "view_position": "PA"}
        present = {b[0] for b in BOXES[image_id]} | set(EXTRA_LABELS.get(image_id, []))
        row.update({c: int(k in present) for k, c in enumerate(CLASSES)})
        row.update({"annotated": 1, "cache_index": i, "boxes": json.dumps([list(b) for b in BOXES[image_id]])})
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    folds = [{"fold": 0, "test": ["a", "b"], "train_annotated": ["c", "d", "e", "f"], "train_unannotated": []}]
    (root / "splits.json").write_text(json.dumps({"version": 1, "seed": 0, "group_by": "patient", "folds": folds}))


def _write_fold(run: Path, fold: int, prepared: Path, test_ids: list[str]) -> None:
    cfg = make_config("tiny")
    cfg.crf = False  # z = sigmoid(logits): set exactly through the head's last bias
    model = build_model(cfg)
    conv = model.unary.head.conv2
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(-20.0)
        conv.bias[0] = 20.0
        conv.bias[4] = 20.0
    fold_dir = run / f"fold_{fold}"
    save_checkpoint(
        fold_dir / "checkpoints" / "best.pt",
        {"config": cfg.to_dict(), "model": model.state_dict(), "meta": make_meta(cfg)},
    )
    (fold_dir / "run.json").write_text(
        json.dumps(
            {
                "prepared_dir": str(prepared),
                "fold": fold,
                "stage": "unary",
                "train_ids": ["c", "d", "e"],
                "val_ids": ["f"],
                "test_ids": test_ids,
            }
        )
    )


def write_hand_run(root: Path) -> Path:
    """A prepared folder and a two-fold run whose z is known exactly (see tests/test_evaluate.py)."""
    prepared = root / "prepared"
    _write_prepared(prepared)
    run = root / "run"
    _write_fold(run, 0, prepared, ["a", "b"])
    _write_fold(run, 1, prepared, ["a"])
    return run


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """:func:`write_hand_run` in a fresh folder."""
    return write_hand_run(tmp_path)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, bits: int, **extra: object) -> Path:
    """Write an uncompressed grey DICOM with the given stored pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


OWN_CLASSES: tuple[str, ...] = ("Cavity", "Miliary", "Calcification")
"""The class list of the tests' own datasets: not NIH's (and not in NIH's order)."""


def write_own_dataset(root: Path, *, n_patients: int = 12, boxed_patients: int = 8) -> dict[str, object]:
    """A small dataset of one's own: images in patient folders, with the truth to check readers against.

    ``root/images/pat{p}/scan{f}.png`` (every patient folder reuses the names ``scan0``, ``scan1``, as
    DICOM archives do), non-square 72 x 60 px grey PNGs, and ``pat00/scan0`` as a 64 x 56 DICOM.
    The first ``boxed_patients`` patients' images carry one box each (class ``i % 3`` of
    :data:`OWN_CLASSES`), drawn as a bright rectangle; every third unboxed image is labelled
    ``Miliary`` without a box. Patient ids are text (``P00``...).

    Returns:
        ``{"images": folder, "records": [{"image", "patient", "labels", "width", "height", "box":
        (label, x, y, w, h) in pixels or None}]}`` in image order.
    """
    rng = np.random.default_rng(7)
    images = root / "images"
    records = []
    for p in range(n_patients):
        for f in range(2):
            i = 2 * p + f
            dicom = i == 0
            width, height = (64, 56) if dicom else (72, 60)
            pixels = (rng.random((height, width)) * 50).astype(np.uint8)
            box = None
            labels: list[str] = []
            if p < boxed_patients:
                label = OWN_CLASSES[i % 3]
                w, h = int(rng.integers(14, 26)), int(rng.integers(12, 22))
                x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
                pixels[y:y + h, x:x + w] = 230
                box, labels = (label, x, y, w, h), [label]
            elif i % 3 == 0:
                labels = ["Miliary"]
            name = f"pat{p:02d}/scan{f}.{'dcm' if dicom else 'png'}"
            target = images / name
            if dicom:
                write_dicom(target, pixels, "MONOCHROME2", 8)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, mode="L").save(target)
            records.append({"image": name, "patient": f"P{p:02d}", "labels": labels, "width": width,
                            "height": height, "box": box})
    return {"images": images, "records": records}


def write_own_tables(root: Path, records: list[dict]) -> tuple[Path, Path]:
    """``labels.csv`` and ``boxes.csv`` of :func:`write_own_dataset`'s records (the plain table format)."""
    labels = root / "labels.csv"
    labels.write_text("image,patient,labels\n" + "".join(
        f"{r['image']},{r['patient']},{'|'.join(r['labels'])}\n" for r in records))
    boxes = root / "boxes.csv"
    boxes.write_text("image,label,x,y,w,h\n" + "".join(
        f"{r['image']},{','.join(map(str, r['box']))}\n" for r in records if r["box"]))
    return labels, boxes


def write_own_coco(root: Path, records: list[dict]) -> Path:
    """A COCO file of :func:`write_own_dataset`'s records: category ids 30, 10, 20 (not in class order)."""
    ids = {"Cavity": 10, "Miliary": 20, "Calcification": 30}
    coco = {
        "categories": [{"id": ids[c], "name": c} for c in ("Calcification", "Cavity", "Miliary")],
        "images": [{"id": 100 + n, "file_name": r["image"], "width": r["width"], "height": r["height"]}
                   for n, r in enumerate(records)],
        "annotations": [{"id": n + 1, "image_id": 100 + n, "category_id": ids[r["box"][0]], "bbox": list(r["box"][1:]),
                         "iscrowd": 0} for n, r in enumerate(records) if r["box"]],
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""The real data beside the repository (``../shared/data``, see its README); absent in a plain clone,
so the tests that read it call :func:`needs_shared`."""

NIH_DIR = SHARED_DATA / "nih"
"""The real NIH images and tables (``../shared/data/nih``); tests skip when absent."""

REAL_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "real"
"""Small real files kept in the repository (DICOM pair, RGB JPEG, one TBX11K image and its COCO file;
origin and licence in its README.md): the tests that read them run in a plain clone, never skip."""


def needs_shared(path: Path, why: str = "") -> Path:
    """``path`` when it exists; else the test is skipped, the reason naming ``path``.

    For the real data under ``../shared/data`` (the NIH images and tables, ``nih-originals``,
    ``cxr-pretrain``...), which is not part of the repository: a user's clone runs without it.
    ``why`` adds what the skip loses (e.g. "byte comparison skipped").
    """
    if not Path(path).exists():
        pytest.skip(f"real data {path} is absent (needs ../shared/data beside the repository)"
                    + (f"; {why}" if why else ""))
    return Path(path)


def nih_subset(root: Path, names: list[str]) -> Path:
    """A folder with the real NIH images ``names`` (linked) and the rows of both CSVs that name them."""
    (root / "images").mkdir(parents=True)
    for name in names:
        (root / "images" / name).symlink_to(NIH_DIR / "images" / name)
    keep = set(names)
    for table in ("Data_Entry_2017.csv", "BBox_List_2017.csv"):
        lines = (NIH_DIR / table).read_text().splitlines()
        (root / table).write_text("\n".join([lines[0], *(x for x in lines[1:] if x.split(",", 1)[0] in keep)]) + "\n")
    return root
