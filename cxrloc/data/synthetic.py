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
The pictures themselves come from :mod:`cxrloc.data.synthetic_drawing`; this module plans the
dataset and writes its formats. Everything is drawn from ``numpy.random.default_rng`` streams keyed
by ``(seed, patient, image)``: same arguments, byte-identical files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrloc.classes import BOXED_CLASSES, CLASSES, NO_FINDING
from cxrloc.data.domain import write_synthetic_marker
from cxrloc.data.nih import NIH_SIDE
from cxrloc.data.synthetic_drawing import (  # noqa: F401 (render, healthy_chest: imported from here too)
    Anatomy,
    Finding,
    ImageSpec,
    finding_box,
    healthy_chest,
    jitter,
    make_finding,
    patient_anatomy,
    render,
)
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


HEALTHY_FRACTION = 0.3
"""Share of the images without box that are healthy (``No Finding``)."""

IMAGE_FOLDERS = ("images_001", "images_002")

_BOXED_WEIGHT = 2.0
"""Boxed classes are drawn twice as often as the others among the findings of an image."""


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
        anatomy = patient_anatomy(seed, patient_id)
        for follow_up in range(images_per_patient):
            n = len(out)
            img_rng = np.random.default_rng([seed, 2, patient_id, follow_up])
            needs_box = n in annotated
            labels = _draw_labels(img_rng, needs_box)
            a = jitter(anatomy, img_rng)
            findings: list[Finding] = []
            for name in labels:
                findings += make_finding(name, img_rng, a, boxed=needs_box and name in BOXED_CLASSES)
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
            # compress_level=1: a third of the encoding time of the default, files ~15 % larger
            Image.fromarray(pixels, mode="L").save(tmp, format="PNG", compress_level=1)

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
