"""The 14 NIH ChestX-ray14 findings, in one canonical order, and the rules of any class list.

The order is the one of Wang et al. (2017) and of the paper's Table 1: the eight
classes that carry bounding boxes come first, so ``CLASSES[:8] == BOXED_CLASSES``.

NIH is the default dataset, not the only one: a prepared folder of another dataset stores its
own class list (``classes.json``, :mod:`cxrloc.data.prepared`), which the run's config, the
checkpoint and the ONNX metadata carry on. :func:`check_class_names` is the rule every list
must pass.
"""

from __future__ import annotations

from collections.abc import Sequence

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


MAX_CLASSES: int = 1000
"""Most classes a class list may hold (a dataset's list is a few to a few dozen findings; beyond
this a list is a mistake, e.g. image ids read as labels, and the network's head would be huge)."""

RESERVED_NAMES: frozenset[str] = frozenset(
    {"image_id", "patient_id", "patient", "follow_up", "view_position", "annotated", "cache_index", "boxes"}
)
"""Column names of a prepared folder's ``manifest.csv``: a class may not be called so (its labels
are a column of the manifest too)."""


def is_nih(classes: Sequence[str]) -> bool:
    """Whether ``classes`` is NIH's list of 14, in its order (the paper's Table 1 applies to it)."""
    return tuple(classes) == CLASSES


def check_class_names(names: Sequence[str], where: str) -> list[str]:
    """Return ``names`` as a list if they can be a class list, else raise :class:`CxrlocError`.

    A class name is a label of the data's tables and a column of ``manifest.csv``: it must be
    non-empty text without surrounding spaces, ``|`` (the label separator), control characters
    or a manifest column's name, and the names must be distinct.

    Args:
        names: the class names, in their order.
        where: the file or option they come from, for the message.
    """
    from cxrloc.utils import CxrlocError

    out = list(names)
    if not out:
        raise CxrlocError(f"{where}: no class found; a dataset needs at least one class")
    if len(out) > MAX_CLASSES:
        raise CxrlocError(f"{where}: {len(out)} classes, more than {MAX_CLASSES}; check the label column")
    seen: set[str] = set()
    for name in out:
        bad = (
            not isinstance(name, str)
            or not name
            or name != name.strip()
            or "|" in name
            or any(ord(c) < 32 for c in name)
        )
        if bad:
            raise CxrlocError(
                f"{where}: class name {name!r} cannot be used: a class is non-empty text without surrounding "
                "spaces, '|' or control characters; rename it in the data"
            )
        if name in RESERVED_NAMES:
            raise CxrlocError(
                f"{where}: class name {name!r} is a column of manifest.csv ({', '.join(sorted(RESERVED_NAMES))}); "
                "rename the class in the data"
            )
        if name in seen:
            raise CxrlocError(f"{where}: class {name!r} is listed twice")
        seen.add(name)
    return out
