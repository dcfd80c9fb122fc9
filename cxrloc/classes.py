"""The 14 NIH ChestX-ray14 findings, in one canonical order used everywhere.

The order is the one of Wang et al. (2017) and of the paper's Table 1: the eight
classes that carry bounding boxes come first, so ``CLASSES[:8] == BOXED_CLASSES``.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
"""All 14 classes, in canonical order. Index ``k`` everywhere means ``CLASSES[k]``."""

BOXED_CLASSES: tuple[str, ...] = CLASSES[:8]
"""The 8 classes that NIH's ``BBox_List_2017.csv`` annotates with boxes."""

NUM_CLASSES: int = len(CLASSES)

CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

LABEL_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}
"""Spellings found in NIH files that differ from ``CLASSES`` (the box list says ``Infiltrate``)."""

NO_FINDING: str = "No Finding"


def canonical_label(name: str) -> str | None:
    """Return the canonical class name for ``name`` or ``None`` if it is not one of the 14.

    Surrounding whitespace is ignored and aliases (``Infiltrate``) are mapped.
    """
    name = name.strip()
    name = LABEL_ALIASES.get(name, name)
    return name if name in CLASS_INDEX else None
