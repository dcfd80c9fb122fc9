"""What a model was trained on, and whether an image looks like it (out-of-domain warnings).

``train`` records :func:`training_domain` in every checkpoint's metadata (``meta["training_data"]``,
carried into the ONNX file by ``export``): the dataset's name and format, whether it is synthetic
(``cxrloc demo``'s data: :func:`cxrloc.data.synthetic` writes :data:`SYNTHETIC_MARKER` beside it),
the number of training images, and the intensity statistics of the training cache.

``predict`` compares each input, after the cache's exact preprocessing, with those statistics
(:func:`check_image`):

- **layout**: the Pearson correlation of the image's 16 x 16 thumbnail (each standardised) with the
  training images' mean thumbnail. A chest X-ray has a dark lung on each side of a bright
  mediastinum; an inverted image (MONOCHROME1 shown as stored, a negative) turns that pattern over and
  its correlation negative. Measured on 128 px caches (2-core VM, 2025): every one of the 704 boxed NIH
  images lies in [0.15, 0.95] (1st percentile 0.45), 300 unboxed NIH images >= 0.23, 300 of the
  non-NIH pretraining X-rays (children, COVID-19) >= 0.006, while all 200 inverted NIH images lie in
  [-0.79, -0.15] and the inverted DICOM fixture gives -0.85: :data:`LAYOUT_MIN` = 0 separates them.
- **intensity**: the mean, standard deviation and 5th / 50th / 95th percentiles of the grey levels;
  an image more than :data:`Z_MAX` training standard deviations from the training mean on any of them
  is flagged (the most extreme of the 2,479 real X-rays above reaches 6.7 on the 5th percentile). Global
  intensity alone does not catch an inverted X-ray (the inverted NIH images stay within 2.4): the layout
  does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SYNTHETIC_MARKER: str = "cxrloc_synthetic.json"
"""Written by the synthetic data generators into the dataset's folder."""

FEATURES: tuple[str, ...] = ("mean", "std", "p05", "p50", "p95")
"""Intensity statistics of an image (grey levels as fractions of 255)."""

THUMB: int = 16
"""Side of the layout thumbnail."""

LAYOUT_MIN: float = 0.0
"""An image whose layout correlation with the training images is below this is flagged."""

Z_MAX: float = 8.0
"""An image further than this many training standard deviations on an intensity statistic is flagged."""

MAX_MEASURED: int = 1000
"""Training images measured at most (evenly spaced over the training list)."""


def intensity_features(u8: np.ndarray) -> np.ndarray:
    """``FEATURES`` of a uint8 image (S, S): from its 256-bin histogram (fast at any size)."""
    hist = np.bincount(np.asarray(u8, np.uint8).ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256) / 255.0
    n = hist.sum()
    mean = float((hist * levels).sum() / n)
    std = float(np.sqrt(max((hist * (levels - mean) ** 2).sum() / n, 0.0)))
    cdf = np.cumsum(hist) / n
    pct = [float(levels[min(int(np.searchsorted(cdf, q)), 255)]) for q in (0.05, 0.5, 0.95)]
    return np.array([mean, std, *pct])


def thumbnail(u8: np.ndarray) -> np.ndarray:
    """The image's ``THUMB x THUMB`` box-filtered thumbnail, flattened and standardised (zero mean, unit std)."""
    t = np.asarray(Image.fromarray(np.asarray(u8, np.uint8)).resize((THUMB, THUMB), Image.Resampling.BOX),
                   np.float64).ravel()
    return (t - t.mean()) / (t.std() + 1e-6)


def is_synthetic(image_folders: Sequence[str | Path]) -> bool:
    """Whether any of a prepared folder's image folders (or a parent up to two levels) holds the marker."""
    for folder in image_folders:
        p = Path(folder)
        for d in (p, p.parent, p.parent.parent):
            if (d / SYNTHETIC_MARKER).is_file():
                return True
    return False


def write_synthetic_marker(out: Path) -> None:
    """Mark ``out`` as a synthetic dataset (read back through ``prepare``'s ``fingerprint.json``)."""
    from cxrloc.utils import write_json_atomic

    write_json_atomic(out / SYNTHETIC_MARKER, {"synthetic": True, "generator": "cxrloc.data.synthetic"})


def training_domain(prepared: Any, ids: Sequence[str]) -> dict[str, Any]:
    """What a model trained on ``ids`` of ``prepared`` (a :class:`cxrloc.data.prepared.Prepared`) saw."""
    root = Path(prepared.root)
    folders: list[str] = []
    try:
        fp = json.loads((root / "fingerprint.json").read_text())
        folders = list(fp.get("inputs", {}).get("image_folders", []))
    except (OSError, ValueError):
        pass
    ids = list(ids)
    step = max(1, -(-len(ids) // MAX_MEASURED))
    measured = ids[::step]
    feats = np.array([intensity_features(prepared.image(i)) for i in measured])
    thumbs = np.array([thumbnail(prepared.image(i)) for i in measured])
    mean_thumb = thumbs.mean(axis=0)
    mean_thumb = (mean_thumb - mean_thumb.mean()) / (mean_thumb.std() + 1e-12)
    corr = thumbs @ mean_thumb / mean_thumb.size
    return {
        "dataset": root.name,
        "format": prepared.data_format,
        "synthetic": is_synthetic(folders),
        "images": len(ids),
        "annotated": int(sum(bool(prepared.is_annotated(i)) for i in ids)),
        "cache_size": int(prepared.size),
        "intensity": {
            "features": list(FEATURES),
            "mean": [round(float(v), 5) for v in feats.mean(axis=0)],
            "std": [round(float(v), 5) for v in feats.std(axis=0)],
            "images_measured": len(measured),
            "thumbnail": [round(float(v), 4) for v in mean_thumb],
            "layout_min": round(float(corr.min()), 4),
            "layout_q01": round(float(np.quantile(corr, 0.01)), 4),
        },
    }


def describe(domain: dict[str, Any] | None) -> str:
    """One line: what the model was trained on."""
    if not domain:
        return "unknown training data (a model trained before cxrloc recorded it)"
    kind = "synthetic" if domain.get("synthetic") else "real"
    return (f"{domain.get('images', '?')} {kind} training images of '{domain.get('dataset', '?')}' "
            f"({domain.get('format', '?')} format)")


def synthetic_warning(domain: dict[str, Any] | None) -> str | None:
    """The run's warning for a model trained on synthetic images (``None`` otherwise)."""
    if domain and domain.get("synthetic"):
        return (f"this model was trained on {describe(domain)}, not on X-rays: its findings on real images "
                "are not meaningful (train on your data: see docs/data.md)")
    return None


def check_image(u8: np.ndarray, domain: dict[str, Any] | None) -> str | None:
    """A warning when the preprocessed image ``u8`` falls far outside the training images' statistics
    (see the module docstring), else ``None`` (also for a model without recorded statistics)."""
    stats = (domain or {}).get("intensity")
    if not stats or "thumbnail" not in stats:
        return None
    reasons = []
    mean_thumb = np.asarray(stats["thumbnail"], np.float64)
    corr = float(thumbnail(u8) @ mean_thumb / mean_thumb.size)
    if corr < LAYOUT_MIN:
        reasons.append(f"its layout is anti-correlated with the training images' (r = {corr:.2f}; they were >= "
                       f"{stats.get('layout_min', 0):.2f}): an inverted image (MONOCHROME1 shown as stored, a "
                       "negative) or not a frontal chest X-ray")
    feats = intensity_features(u8)
    mu, sd = np.asarray(stats["mean"], float), np.maximum(np.asarray(stats["std"], float), 1e-3)
    z = (feats - mu) / sd
    far = [f"{name} {v:.2f} (training {m:.2f} ± {s:.2f})"
           for name, v, m, s, zz in zip(stats["features"], feats, mu, sd, z, strict=True) if abs(zz) > Z_MAX]
    if far:
        reasons.append(f"its grey levels are more than {Z_MAX:g} standard deviations from the training images': "
                       + ", ".join(far))
    if not reasons:
        return None
    return "out of domain: " + "; ".join(reasons) + ". Its findings are not to be trusted."
