"""Drawing one synthetic chest X-ray: the anatomy of a patient, the findings of each class (their
look, usual position and box) and :func:`render`, all in normalised coordinates (``u`` across,
``v`` down, both in [0, 1]) so the same seed gives the same picture and boxes at every size. A box
is the bounding box of where the lesion's opacity map exceeds :data:`BOX_LEVEL` on a fixed
:data:`REFERENCE_GRID` grid, padded by :data:`BOX_PAD`. :mod:`cxrloc.data.synthetic` plans a
dataset of such images and writes it in NIH's or COCO's format."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

REFERENCE_GRID = 256
"""Grid on which boxes are measured, so that they do not depend on the written ``size``."""

BOX_LEVEL = 0.3
"""A pixel belongs to a lesion when its opacity map exceeds this fraction of full strength."""

BOX_PAD = 0.01
"""Margin added around each lesion's extent (fraction of the side), like a reader's box."""


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


def make_finding(name: str, rng: np.random.Generator, a: Anatomy, boxed: bool) -> list[Finding]:
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
        anatomy=patient_anatomy(seed, 1),
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


def patient_anatomy(seed: int, patient: int) -> Anatomy:
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


def jitter(a: Anatomy, rng: np.random.Generator) -> Anatomy:
    """Small per-image changes of positioning and inspiration."""
    dx, dy = rng.normal(0, 0.01, size=2)
    return replace(a, cx=a.cx + dx, top=a.top + dy, base=a.base + dy + rng.normal(0, 0.008))
