"""Synthetic chest X-rays in exactly the NIH ChestX-ray14 layout, for the demo and for tests.

:func:`generate_synthetic_nih` writes a small dataset that every step of cxrloc reads unchanged:

- 8-bit grey PNGs ``images_001/images/00000001_000.png`` ... spread over ``images_001`` and
  ``images_002`` like the official download (sorted by image index, first half in ``images_001``);
- ``Data_Entry_2017.csv`` with the original header (its trailing comma included), CRLF line
  endings, ``|``-separated labels and ``No Finding`` for healthy images;
- ``BBox_List_2017.csv`` with the split header ``Image Index,Finding Label,Bbox [x,y,w,h],,,``, the
  label spelled ``Infiltrate`` and box coordinates in the 1024 x 1024 pixel frame of the released
  PNGs whatever the size of the written images.

The pictures are drawn in normalised coordinates (``u`` across, ``v`` down, both in [0, 1]), so the
same seed gives the same anatomy, lesions and boxes at every ``size``. Each of the 8 boxed classes
has its own look and usual position (see ``docs/demo.md``); a box is the bounding box of where the
lesion's opacity map exceeds :data:`BOX_LEVEL` on a fixed 256 x 256 reference grid, padded by
:data:`BOX_PAD`. The 6 other classes change the picture subtly and globally (no box).
Everything is drawn from ``numpy.random.default_rng`` streams keyed by ``(seed, patient, image)``:
same arguments, byte-identical files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrloc.classes import BOXED_CLASSES, CLASSES, NO_FINDING
from cxrloc.data.domain import write_synthetic_marker
from cxrloc.data.nih import NIH_SIDE
from cxrloc.utils import CxrlocError, atomic_path, progress_bar

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
"""The header line of NIH's ``Data_Entry_2017.csv``, byte for byte (trailing comma included)."""

BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
"""The header line of NIH's ``BBox_List_2017.csv`` (the x,y,w,h cell split, three empty columns)."""

BBOX_LABEL_SPELLING: dict[str, str] = {"Infiltration": "Infiltrate"}
"""Labels that NIH's box list spells differently from ``Data_Entry_2017.csv``."""


REFERENCE_GRID = 256
"""Grid on which boxes are measured, so that they do not depend on the written ``size``."""

BOX_LEVEL = 0.3
"""A pixel belongs to a lesion when its opacity map exceeds this fraction of full strength."""

BOX_PAD = 0.01
"""Margin added around each lesion's extent (fraction of the side), like a reader's box."""

HEALTHY_FRACTION = 0.3
"""Share of the images without box that are healthy (``No Finding``)."""

IMAGE_FOLDERS = ("images_001", "images_002")

_BOXED_WEIGHT = 2.0
"""Boxed classes are drawn twice as often as the others among the findings of an image."""


# ----------------------------------------------------------------------------------------------
# Geometry of one chest
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """Normalised geometry of one chest (per patient, jittered per image)."""

    cx: float
    """Midline (spine) position across."""
    top: float
    """Lung apex height."""
    base: float
    """Diaphragm height at the costophrenic angles."""
    lung_hw: float
    """Half width of each lung."""
    lung_gap: float
    """Half width of the mediastinum between the lungs."""
    heart_dx: float
    """Heart centre offset to the image right (the patient's left) of the midline."""
    heart_ax: float
    heart_ay: float
    rib_step: float
    rib_phase: float
    gender: str
    age: int

    def lung_x(self, side: int) -> float:
        """Centre across of lung ``side`` (0: image left = patient's right, 1: image right)."""
        offset = self.lung_gap + self.lung_hw
        return self.cx - offset if side == 0 else self.cx + offset

    @property
    def lung_y(self) -> float:
        return (self.top + self.base) / 2 + 0.05

    @property
    def lung_ay(self) -> float:
        return self.lung_y - self.top

    @property
    def heart_x(self) -> float:
        return self.cx + self.heart_dx

    @property
    def heart_y(self) -> float:
        return self.base - 0.13


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(U, V)`` of a ``size`` x ``size`` image, each (size, size)."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(c, c)  # U varies across columns, V down rows


def _interp_weights(coords: np.ndarray, cells: int) -> np.ndarray:
    """Smooth-step interpolation weights from a ``cells + 1`` lattice to ``coords`` in [0, 1]."""
    g = np.clip(coords, 0.0, 1.0) * cells
    i0 = np.minimum(np.floor(g).astype(int), cells - 1)
    f = g - i0
    s = f * f * (3.0 - 2.0 * f)
    w = np.zeros((coords.shape[0], cells + 1))
    rows = np.arange(coords.shape[0])
    w[rows, i0] = 1.0 - s
    w[rows, i0 + 1] = s
    return w


def _smooth(lattice: np.ndarray, U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Evaluate a random lattice (``(n+1, n+1)`` values) smoothly at the grid ``(U, V)``.

    The lattice lives in normalised coordinates, so the texture is the same at every image size.
    """
    cells = lattice.shape[0] - 1
    wy = _interp_weights(V[:, 0], cells)
    wx = _interp_weights(U[0, :], cells)
    return wy @ lattice @ wx.T


def _lung_ellipse(a: Anatomy, side: int, U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Normalised radial distance of every pixel in lung ``side``'s ellipse (1 on its border)."""
    du = (U - a.lung_x(side)) / a.lung_hw
    dv = (V - a.lung_y) / a.lung_ay
    return np.sqrt(du * du + dv * dv)


def _dome(a: Anatomy, side: int, U: np.ndarray) -> np.ndarray:
    """Diaphragm height under lung ``side``: highest mid-lung, lowest at the costophrenic angle."""
    t = np.clip((U - a.lung_x(side)) / a.lung_hw, -1.0, 1.0)
    right_higher = 0.015 if side == 0 else 0.0  # the liver lifts the right hemidiaphragm
    return a.base - 0.05 * (1.0 - t * t) - right_higher


def _lung(a: Anatomy, side: int, U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Soft mask in [0, 1] of lung ``side``."""
    r = _lung_ellipse(a, side, U, V)
    return _sigmoid((1.0 - r) / 0.03) * _sigmoid((_dome(a, side, U) - V) / 0.006)


def _heart(a: Anatomy, U: np.ndarray, V: np.ndarray, scale_x: float = 1.0, scale_y: float = 1.0) -> np.ndarray:
    """Soft mask of the heart (optionally enlarged, its base kept on the diaphragm)."""
    ax, ay = a.heart_ax * scale_x, a.heart_ay * scale_y
    cy = a.heart_y - (ay - a.heart_ay) * 0.6
    cx = a.heart_x + (ax - a.heart_ax) * 0.35  # an enlarged heart grows mostly to the patient's left
    r = np.sqrt(((U - cx) / ax) ** 2 + ((V - cy) / ay) ** 2)
    return _sigmoid((1.0 - r) / 0.03)


# ----------------------------------------------------------------------------------------------
# Findings: each is a function of the grid returning an opacity map in [0, 1]
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One drawn finding: its class, how it changes the picture, and whether it gets a box."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    boxed: bool = False


def _sample_in_lung(
    rng: np.random.Generator, a: Anatomy, side: int, v_range: tuple[float, float], max_radius: float = 0.75
) -> tuple[float, float]:
    """A point well inside lung ``side`` with ``v`` (as a fraction of the lung's height) in ``v_range``."""
    lx, ly, hw, ay = a.lung_x(side), a.lung_y, a.lung_hw, a.lung_ay
    for _ in range(200):
        u = lx + rng.uniform(-max_radius, max_radius) * hw
        frac = rng.uniform(*v_range)
        v = a.top + frac * (a.base - a.top)
        r = math.hypot((u - lx) / hw, (v - ly) / ay)
        in_heart = side == 1 and math.hypot((u - a.heart_x) / a.heart_ax, (v - a.heart_y) / a.heart_ay) < 1.15
        if r < max_radius and v < a.base - 0.08 and not in_heart:
            return u, v
    return lx, ly - 0.1 * ay  # unreachable in practice: the lung centre is always inside


def _make_finding(name: str, rng: np.random.Generator, a: Anatomy, boxed: bool) -> list[Finding]:
    """Draw the parameters of a finding of class ``name`` (a class may give several lesions)."""
    side = int(rng.integers(2))
    if name == "Cardiomegaly":
        p = {"sx": rng.uniform(1.5, 1.65), "sy": rng.uniform(1.2, 1.35)}
        return [Finding(name, p, boxed)]
    if name == "Effusion":
        sides = [0, 1] if rng.random() < 0.2 else [side]
        return [Finding(name, {"side": s, "height": rng.uniform(0.11, 0.18)}, boxed) for s in sides]
    if name == "Pneumothorax":
        p = {"side": side, "extent": rng.uniform(0.22, 0.32), "drop": rng.uniform(0.1, 0.16)}
        return [Finding(name, p, boxed)]
    if name == "Nodule":
        count = 2 if rng.random() < 0.3 else 1
        out = []
        for _ in range(count):
            u, v = _sample_in_lung(rng, a, int(rng.integers(2)), (0.15, 0.8))
            out.append(Finding(name, {"u": u, "v": v, "r": rng.uniform(0.03, 0.04)}, boxed))
        return out
    if name == "Mass":
        u, v = _sample_in_lung(rng, a, side, (0.2, 0.6), max_radius=0.55)
        p = {"u": u, "v": v, "r": rng.uniform(0.06, 0.08), "phase": rng.uniform(0, 2 * math.pi, size=2).tolist()}
        return [Finding(name, p, boxed)]
    if name == "Atelectasis":
        u, v = _sample_in_lung(rng, a, side, (0.62, 0.78), max_radius=0.6)
        p = {
            "side": side,
            "u": u,
            "v": v,
            "half_length": rng.uniform(0.07, 0.1),
            "half_thick": rng.uniform(0.018, 0.028),
            "angle": rng.uniform(-0.45, 0.45),
            "wedge": bool(rng.random() < 0.5),
        }
        return [Finding(name, p, boxed)]
    if name == "Infiltration":
        u, v = _sample_in_lung(rng, a, side, (0.35, 0.6), max_radius=0.45)
        p = {
            "side": side,
            "u": u,
            "v": v,
            "ax": rng.uniform(0.06, 0.085),
            "ay": rng.uniform(0.055, 0.08),
            "lattice": rng.standard_normal((41, 41)),
        }
        return [Finding(name, p, boxed)]
    if name == "Pneumonia":
        u, v = _sample_in_lung(rng, a, side, (0.45, 0.72), max_radius=0.5)
        blobs = [
            (u + rng.uniform(-0.035, 0.035), v + rng.uniform(-0.03, 0.03), rng.uniform(0.03, 0.042)) for _ in range(3)
        ]
        return [Finding(name, {"side": side, "blobs": blobs, "lattice": rng.standard_normal((17, 17))}, boxed)]
    # The six classes without boxes: subtle, global changes.
    if name == "Fibrosis":
        return [Finding(name, {"lattice": rng.standard_normal((61, 61))})]
    if name in {"Consolidation", "Pleural_Thickening"}:
        return [Finding(name, {"side": side})]
    return [Finding(name, {})]  # Edema, Emphysema, Hernia


def _finding_map(f: Finding, a: Anatomy, U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Opacity map in [0, 1] of a finding (for dark findings: how much the picture is darkened)."""
    p = f.params
    if f.name == "Cardiomegaly":
        # The box covers the whole enlarged heart silhouette above the diaphragm, as NIH's do.
        big = _heart(a, U, V, p["sx"], p["sy"])
        return big * _sigmoid((a.base + 0.01 - V) / 0.006)
    if f.name == "Effusion":
        s = p["side"]
        lx = a.lung_x(s)
        lateral = np.clip((U - lx) / a.lung_hw * (1.0 if s == 1 else -1.0), 0.0, 1.0)
        level = a.base - p["height"] - 0.07 * lateral**2  # the meniscus climbs the lateral wall
        return _sigmoid((V - level) / 0.008) * _lung(a, s, U, V)
    if f.name == "Pneumothorax":
        return _sigmoid((_pneumothorax_edge(a, p, U) - V) / 0.008) * _lung(a, p["side"], U, V)
    if f.name == "Nodule":
        d = np.hypot(U - p["u"], V - p["v"])
        return _sigmoid((p["r"] - d) / 0.004)
    if f.name == "Mass":
        du, dv = U - p["u"], V - p["v"]
        theta = np.arctan2(dv, du)
        r = p["r"] * (1.0 + 0.14 * np.sin(3 * theta + p["phase"][0]) + 0.08 * np.sin(5 * theta + p["phase"][1]))
        return _sigmoid((r - np.hypot(du, dv)) / 0.005)
    if f.name == "Atelectasis":
        c, s_ = math.cos(p["angle"]), math.sin(p["angle"])
        along = (U - p["u"]) * c + (V - p["v"]) * s_
        across = -(U - p["u"]) * s_ + (V - p["v"]) * c
        hl, ht = p["half_length"], p["half_thick"]
        if p["wedge"]:  # a wedge: thin at one end, thick at the other
            ht = ht * (0.35 + 0.65 * np.clip((along + hl) / (2 * hl), 0.0, 1.0)) * 1.3
        band = _sigmoid((hl - np.abs(along)) / 0.006) * _sigmoid((ht - np.abs(across)) / 0.005)
        return band * _lung(a, p["side"], U, V)
    if f.name == "Infiltration":
        e = np.sqrt(((U - p["u"]) / p["ax"]) ** 2 + ((V - p["v"]) / p["ay"]) ** 2)
        patchy = np.clip(0.75 + 0.6 * _smooth(p["lattice"], U, V), 0.0, 1.0)
        return _sigmoid((1.0 - e) / 0.08) * patchy * _lung(a, p["side"], U, V)
    if f.name == "Pneumonia":
        acc = np.zeros_like(U)
        for bu, bv, sigma in p["blobs"]:
            acc += np.exp(-((U - bu) ** 2 + (V - bv) ** 2) / (2 * sigma * sigma))
        fluffy = 0.85 + 0.15 * np.tanh(_smooth(p["lattice"], U, V))
        return np.clip(1.3 * acc, 0.0, 1.0) * fluffy * _lung(a, p["side"], U, V)
    lungs = _lung(a, 0, U, V) + _lung(a, 1, U, V)
    if f.name == "Consolidation":
        return _lung(a, p["side"], U, V) * _sigmoid((V - a.lung_y) / 0.05)
    if f.name == "Edema":
        hila = sum(
            np.exp(
                -(
                    ((U - a.lung_x(s) + (0.6 if s == 1 else -0.6) * a.lung_hw) / 0.09) ** 2
                    + ((V - a.lung_y) / 0.12) ** 2
                )
            )
            for s in (0, 1)
        )
        return np.clip(hila, 0.0, 1.0) * lungs
    if f.name == "Emphysema":
        return lungs
    if f.name == "Fibrosis":
        return np.abs(np.tanh(1.5 * _smooth(p["lattice"], U, V))) * lungs * _sigmoid((V - a.lung_y + 0.1) / 0.05)
    if f.name == "Pleural_Thickening":
        r = _lung_ellipse(a, p["side"], U, V)
        return np.exp(-(((r - 0.96) / 0.03) ** 2)) * _sigmoid((_dome(a, p["side"], U) - V) / 0.006)
    if f.name == "Hernia":
        d = np.hypot(U - a.cx - 0.01, V - a.base + 0.05)
        return _sigmoid((0.055 - d) / 0.006)
    raise ValueError(f"no drawing for class {f.name!r}")


def _pneumothorax_edge(a: Anatomy, p: dict[str, Any], U: np.ndarray) -> np.ndarray:
    """Upper edge of the collapsed lung: air above it, reaching lower along the lateral wall."""
    s = p["side"]
    lateral = np.clip((U - a.lung_x(s)) / a.lung_hw * (1.0 if s == 1 else -1.0) * 0.5 + 0.5, 0.0, 1.0)
    return a.top + p["extent"] * (a.base - a.top) + p["drop"] * lateral**2


# How each finding changes the grey levels: (mode, amount). "add": + amount x map;
# "blend": towards grey level `amount` by the map (opaque fluid or air).
_EFFECT: dict[str, tuple[str, float]] = {
    "Nodule": ("add", 0.32),
    "Mass": ("add", 0.30),
    "Atelectasis": ("add", 0.26),
    "Infiltration": ("add", 0.24),
    "Pneumonia": ("add", 0.26),
    "Effusion": ("blend", 0.60),
    "Pneumothorax": ("blend", 0.06),
    "Consolidation": ("add", 0.06),
    "Edema": ("add", 0.07),
    "Emphysema": ("add", -0.05),
    "Fibrosis": ("add", 0.06),
    "Pleural_Thickening": ("add", 0.09),
    "Hernia": ("add", 0.08),
}


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to draw one image."""

    anatomy: Anatomy
    findings: tuple[Finding, ...]
    markings: np.ndarray
    gain: float
    offset: float
    gamma: float
    noise_seed: int


def render(spec: ImageSpec, size: int) -> np.ndarray:
    """Draw ``spec`` as a float image ``(size, size)`` in [0, 1] (0 black, bone and fluid bright)."""
    a = spec.anatomy
    U, V = _grid(size)
    names = {f.name for f in spec.findings}
    lungs = np.clip(_lung(a, 0, U, V) + _lung(a, 1, U, V), 0.0, 1.0)

    body = _sigmoid((1.0 - np.sqrt(((U - a.cx) / 0.44) ** 2 + ((V - 0.62) / 0.62) ** 2)) / 0.03)
    lateral = np.abs(U - a.cx) / 0.44
    img = 0.05 + body * (0.40 + 0.16 * V + 0.10 * lateral**2)  # soft tissue, denser low and at the sides
    img = img - 0.27 * lungs
    spine = _sigmoid((0.045 - np.abs(U - a.cx)) / 0.008) * body
    img = img + 0.12 * spine

    # Ribs: posterior arcs, rising from the spine then falling laterally, over both lungs.
    dist = np.abs(U - a.cx)
    ribs = np.zeros_like(U)
    for i in range(10):
        y0 = a.top - 0.02 + a.rib_phase + i * a.rib_step
        centre = y0 - 0.35 * dist + 1.2 * dist**2
        ribs += np.exp(-(((V - centre) / 0.011) ** 2))
    img = img + ribs * (0.085 * lungs + 0.03 * body * (1 - lungs))
    # Clavicles: two bright bars rising from the midline towards the shoulders.
    clav_line = a.top - 0.015 + 0.25 * (dist - 0.06)
    clav = np.exp(-(((V - clav_line) / 0.012) ** 2)) * _sigmoid((dist - 0.05) / 0.01) * _sigmoid((0.3 - dist) / 0.01)
    img = img + 0.12 * clav

    # Vessels and lung markings: a smooth random texture, stronger near the hila.
    hilum = np.exp(-(((np.abs(U - a.cx) - 0.1) / 0.12) ** 2 + ((V - a.lung_y) / 0.2) ** 2))
    marking_gain = 0.4 if "Emphysema" in names else 1.0
    img = img + marking_gain * (0.025 + 0.04 * hilum) * np.tanh(_smooth(spec.markings, U, V)) * lungs

    heart_sx, heart_sy = 1.0, 1.0
    for f in spec.findings:
        if f.name == "Cardiomegaly":
            heart_sx, heart_sy = f.params["sx"], f.params["sy"]
    heart = _heart(a, U, V, heart_sx, heart_sy)
    img = img * (1 - heart) + heart * (0.60 + 0.04 * V)

    for f in spec.findings:
        if f.name == "Cardiomegaly":
            continue
        mode, amount = _EFFECT[f.name]
        m = _finding_map(f, a, U, V)
        if mode == "add":
            img = img + amount * m
        else:
            if f.name == "Pneumothorax":
                # The collapsed lung's edge: a thin bright pleural line below the air.
                line = np.exp(-(((V - _pneumothorax_edge(a, f.params, U) - 0.008) / 0.006) ** 2))
                img = img + 0.12 * line * _lung(a, f.params["side"], U, V)
            img = img * (1 - m) + amount * m

    img = np.clip(img * spec.gain + spec.offset, 0.0, 1.0) ** spec.gamma
    noise = np.random.default_rng(spec.noise_seed).standard_normal((size, size))
    return np.clip(img + 0.012 * noise, 0.0, 1.0).astype(np.float32)


def healthy_chest(size: int = 512, seed: int = 0) -> np.ndarray:
    """One synthetic chest without findings, ``(size, size)`` float32 in [0, 1] (``read_image``'s
    convention): for checks that need a radiograph-like input when no real image is at hand."""
    rng = np.random.default_rng([seed, 3])
    spec = ImageSpec(
        anatomy=_patient_anatomy(seed, 1),
        findings=(),
        markings=rng.standard_normal((33, 33)),
        gain=1.0,
        offset=0.0,
        gamma=1.0,
        noise_seed=int(rng.integers(2**31)),
    )
    return render(spec, size)


def finding_box(f: Finding, a: Anatomy) -> tuple[float, float, float, float] | None:
    """Normalised ``(x0, y0, x1, y1)`` box of a finding, measured on the reference grid."""
    U, V = _grid(REFERENCE_GRID)
    m = _finding_map(f, a, U, V)
    rows = np.flatnonzero((m > BOX_LEVEL).any(axis=1))
    cols = np.flatnonzero((m > BOX_LEVEL).any(axis=0))
    if rows.size == 0:
        return None
    x0 = max(cols[0] / REFERENCE_GRID - BOX_PAD, 0.0)
    x1 = min((cols[-1] + 1) / REFERENCE_GRID + BOX_PAD, 1.0)
    y0 = max(rows[0] / REFERENCE_GRID - BOX_PAD, 0.0)
    y1 = min((rows[-1] + 1) / REFERENCE_GRID + BOX_PAD, 1.0)
    return x0, y0, x1, y1


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticImage:
    """One row of the synthetic Data_Entry (and its boxes)."""

    image_index: str
    patient_id: int
    follow_up: int
    labels: tuple[str, ...]
    view: str
    original_size: tuple[int, int]
    spacing: float
    spec: ImageSpec
    boxes: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()


def _patient_anatomy(seed: int, patient: int) -> Anatomy:
    rng = np.random.default_rng([seed, 1, patient])
    return Anatomy(
        cx=0.5 + rng.normal(0, 0.012),
        top=0.13 + rng.normal(0, 0.012),
        base=0.80 + rng.normal(0, 0.015),
        lung_hw=0.165 + rng.normal(0, 0.008),
        lung_gap=0.045 + rng.normal(0, 0.004),
        heart_dx=0.04 + rng.normal(0, 0.008),
        heart_ax=0.125 + rng.normal(0, 0.006),
        heart_ay=0.095 + rng.normal(0, 0.005),
        rib_step=0.066 + rng.normal(0, 0.003),
        rib_phase=rng.uniform(0, 0.03),
        gender="M" if rng.random() < 0.55 else "F",
        age=int(rng.integers(18, 86)),
    )


def _jitter(a: Anatomy, rng: np.random.Generator) -> Anatomy:
    """Small per-image changes of positioning and inspiration."""
    dx, dy = rng.normal(0, 0.01, size=2)
    return replace(a, cx=a.cx + dx, top=a.top + dy, base=a.base + dy + rng.normal(0, 0.008))


def _draw_labels(rng: np.random.Generator, needs_box: bool) -> list[str]:
    """Findings of one image; an image meant to carry a box gets at least one boxed class."""
    if not needs_box and rng.random() < HEALTHY_FRACTION:
        return []
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    weights = np.array([_BOXED_WEIGHT if c in BOXED_CLASSES else 1.0 for c in CLASSES])
    chosen = list(rng.choice(len(CLASSES), size=count, replace=False, p=weights / weights.sum()))
    if needs_box and not any(CLASSES[k] in BOXED_CLASSES for k in chosen):
        chosen[0] = int(rng.integers(len(BOXED_CLASSES)))
    return [CLASSES[k] for k in sorted(set(int(k) for k in chosen))]


def plan_dataset(*, n_patients: int, images_per_patient: int, box_fraction: float, seed: int) -> list[SyntheticImage]:
    """Decide every image's patient, labels, lesions and boxes (no pixels drawn).

    Exactly ``round(box_fraction * N)`` images carry boxes: they are chosen first (by seed) and
    each gets at least one boxed finding, every boxed finding of such an image has its box.
    """
    total = n_patients * images_per_patient
    rng = np.random.default_rng([seed, 0])
    annotated = set(rng.choice(total, size=int(round(box_fraction * total)), replace=False).tolist())
    views = ("PA", "AP")
    sizes = ((2500, 2048), (2048, 2500), (3056, 2544), (2992, 2991), (2682, 2749))
    spacings = (0.143, 0.168, 0.139)
    out: list[SyntheticImage] = []
    for p in range(n_patients):
        patient_id = p + 1
        anatomy = _patient_anatomy(seed, patient_id)
        for follow_up in range(images_per_patient):
            n = len(out)
            img_rng = np.random.default_rng([seed, 2, patient_id, follow_up])
            needs_box = n in annotated
            labels = _draw_labels(img_rng, needs_box)
            a = _jitter(anatomy, img_rng)
            findings: list[Finding] = []
            for name in labels:
                findings += _make_finding(name, img_rng, a, boxed=needs_box and name in BOXED_CLASSES)
            boxes = []
            for f in findings:
                if f.boxed:
                    box = finding_box(f, a)
                    if box is not None:
                        boxes.append((f.name, box))
            spec = ImageSpec(
                anatomy=a,
                findings=tuple(findings),
                markings=img_rng.standard_normal((33, 33)),
                gain=float(img_rng.uniform(0.93, 1.07)),
                offset=float(img_rng.uniform(-0.03, 0.03)),
                gamma=float(img_rng.uniform(0.9, 1.1)),
                noise_seed=int(img_rng.integers(2**31)),
            )
            out.append(
                SyntheticImage(
                    image_index=f"{patient_id:08d}_{follow_up:03d}.png",
                    patient_id=patient_id,
                    follow_up=follow_up,
                    labels=tuple(labels),
                    view=views[int(img_rng.random() < 0.3)],
                    original_size=sizes[int(img_rng.integers(len(sizes)))],
                    spacing=spacings[int(img_rng.integers(len(spacings)))],
                    spec=spec,
                    boxes=tuple(boxes),
                )
            )
    return out


def _fmt(x: float) -> str:
    """A coordinate the way NIH writes them (up to 15 significant digits)."""
    return f"{x:.15g}"


def data_entry_text(images: list[SyntheticImage]) -> str:
    """``Data_Entry_2017.csv`` content: original header, 11 fields a row, CRLF line endings."""
    lines = [DATA_ENTRY_HEADER]
    for im in images:
        a = im.spec.anatomy
        lines.append(
            ",".join(
                [
                    im.image_index,
                    "|".join(im.labels) if im.labels else NO_FINDING,
                    str(im.follow_up),
                    str(im.patient_id),
                    str(min(a.age + im.follow_up // 2, 99)),
                    a.gender,
                    im.view,
                    str(im.original_size[0]),
                    str(im.original_size[1]),
                    f"{im.spacing:g}",
                    f"{im.spacing:g}",
                ]
            )
        )
    return "\r\n".join(lines) + "\r\n"


def bbox_list_text(images: list[SyntheticImage]) -> str:
    """``BBox_List_2017.csv`` content: split header, ``Infiltrate``, 1024-frame ``x,y,w,h``."""
    rows: list[tuple[int, str, str]] = []
    for im in images:
        for name, (x0, y0, x1, y1) in im.boxes:
            x, y, w, h = (v * NIH_SIDE for v in (x0, y0, x1 - x0, y1 - y0))
            label = BBOX_LABEL_SPELLING.get(name, name)
            rows.append(
                (
                    BOXED_CLASSES.index(name),
                    im.image_index,
                    f"{im.image_index},{label},{_fmt(x)},{_fmt(y)},{_fmt(w)},{_fmt(h)}",
                )
            )
    rows.sort(key=lambda r: (r[0], r[1]))  # grouped by finding, like the official file
    return "\n".join([BBOX_HEADER] + [r[2] for r in rows]) + "\n"


def _checked_plan(
    n_patients: int, images_per_patient: int, size: int, box_fraction: float, seed: int
) -> list[SyntheticImage]:
    """:func:`plan_dataset` after checking the generators' arguments (one clear error per bad value)."""
    if not 1 <= n_patients <= 99_999_999:
        raise CxrlocError(f"n_patients={n_patients}: use 1 to 99,999,999 (8-digit NIH patient ids).")
    if not 1 <= images_per_patient <= 1000:
        raise CxrlocError(f"images_per_patient={images_per_patient}: use 1 to 1000 (3-digit follow-up numbers).")
    if not 32 <= size <= 4096:
        raise CxrlocError(f"size={size}: use an image side of 32 to 4096 pixels.")
    if not 0.0 <= box_fraction <= 1.0:
        raise CxrlocError(f"box_fraction={box_fraction}: use a fraction in [0, 1].")
    return plan_dataset(
        n_patients=n_patients, images_per_patient=images_per_patient, box_fraction=box_fraction, seed=seed
    )


def generate_synthetic_nih(
    out_dir: str | Path,
    *,
    n_patients: int = 40,
    images_per_patient: int = 4,
    size: int = 256,
    box_fraction: float = 0.25,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a synthetic NIH ChestX-ray14-format dataset and return its folder.

    Args:
        out_dir: folder to write (created; files of the same names are replaced).
        n_patients: patients ``00000001`` ... ; each has ``images_per_patient`` follow-ups.
        images_per_patient: images per patient (follow-up numbers ``000`` ...).
        size: side of the written PNGs in pixels (boxes stay in the 1024 frame).
        box_fraction: share of all images that carry boxes (each of them has a boxed finding).
        seed: same seed and arguments give byte-identical files.
        progress: show a progress bar on the console.

    Returns:
        ``out_dir`` as a ``Path``; the CSVs are written last, so a folder with CSVs is complete.

    Example:
        >>> generate_synthetic_nih("synthetic_nih", n_patients=10, size=128)  # doctest: +SKIP
    """
    images = _checked_plan(n_patients, images_per_patient, size, box_fraction, seed)
    out = Path(out_dir)
    first_half = (len(images) + 1) // 2
    folders = [out / IMAGE_FOLDERS[int(i >= first_half)] / "images" for i in range(len(images))]
    _draw(images, [folder / im.image_index for folder, im in zip(folders, images, strict=True)], size, progress)
    write_synthetic_marker(out)  # a model trained on it records that it is synthetic (cxrloc.data.domain)

    with atomic_path(out / "Data_Entry_2017.csv") as tmp:
        tmp.write_bytes(data_entry_text(images).encode("ascii"))
    with atomic_path(out / "BBox_List_2017.csv") as tmp:
        tmp.write_bytes(bbox_list_text(images).encode("ascii"))
    return out


def _draw(images: list[SyntheticImage], targets: list[Path], size: int, progress: bool) -> None:
    """Render every image as an 8-bit grey PNG at its target path (atomically)."""
    for folder in sorted({t.parent for t in targets}):
        folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        pixels = np.round(render(images[i].spec, size) * 255.0).astype(np.uint8)
        with atomic_path(targets[i]) as tmp:
            Image.fromarray(pixels, mode="L").save(tmp, format="PNG")

    _run_with_progress(write, len(images), "Drawing synthetic X-rays", progress)


COCO_IMAGES = "images"
"""The folder of the synthetic COCO dataset's images (their ``file_name`` is ``images/NAME.png``)."""


def coco_dict(images: list[SyntheticImage], size: int) -> dict[str, Any]:
    """The COCO annotation file of a synthetic dataset: the 14 NIH classes as categories (ids 1..14),
    every image with its width and height (``size``), one annotation per box in pixels of the image."""
    annotations = []
    for n, im in enumerate(images):
        for name, (x0, y0, x1, y1) in im.boxes:
            x, y, w, h = (v * size for v in (x0, y0, x1 - x0, y1 - y0))
            annotations.append({
                "id": len(annotations) + 1, "image_id": n + 1, "category_id": CLASSES.index(name) + 1,
                "bbox": [round(x, 4), round(y, 4), round(w, 4), round(h, 4)], "area": round(w * h, 4), "iscrowd": 0,
            })
    return {
        "info": {"description": "cxrloc synthetic chest X-rays (cxrloc.data.synthetic)"},
        "categories": [{"id": k + 1, "name": name, "supercategory": "finding"} for k, name in enumerate(CLASSES)],
        "images": [{"id": n + 1, "file_name": f"{COCO_IMAGES}/{im.image_index}", "width": size, "height": size}
                   for n, im in enumerate(images)],
        "annotations": annotations,
    }


def labels_table_text(images: list[SyntheticImage]) -> str:
    """A labels table (``prepare --labels``) of a synthetic dataset: image, patient, findings."""
    lines = ["image,patient,labels"]
    for im in images:
        lines.append(f"{COCO_IMAGES}/{im.image_index},{im.patient_id},{'|'.join(im.labels) or NO_FINDING}")
    return "\n".join(lines) + "\n"


def generate_synthetic_coco(
    out_dir: str | Path,
    *,
    n_patients: int = 40,
    images_per_patient: int = 4,
    size: int = 256,
    box_fraction: float = 0.25,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the same synthetic dataset as :func:`generate_synthetic_nih` in COCO form.

    ``out_dir/images/*.png``, ``out_dir/annotations.json`` (COCO: 14 categories, boxes in pixels of
    the ``size`` px images) and ``out_dir/labels.csv`` (the image-level labels and patients, which
    COCO cannot hold). Same arguments, same pictures, labels and boxes as the NIH form.
    """
    import json

    images = _checked_plan(n_patients, images_per_patient, size, box_fraction, seed)
    out = Path(out_dir)
    _draw(images, [out / COCO_IMAGES / im.image_index for im in images], size, progress)
    write_synthetic_marker(out)
    with atomic_path(out / "labels.csv") as tmp:
        tmp.write_text(labels_table_text(images), encoding="ascii")
    with atomic_path(out / "annotations.json") as tmp:
        tmp.write_text(json.dumps(coco_dict(images, size), indent=1) + "\n", encoding="ascii")
    return out


def _run_with_progress(fn: Callable[[int], None], count: int, label: str, progress: bool) -> None:
    if not progress:
        for i in range(count):
            fn(i)
        return
    with progress_bar() as bar:
        task = bar.add_task(label, total=count)
        for i in range(count):
            fn(i)
            bar.advance(task)
