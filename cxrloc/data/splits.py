"""Patient-grouped cross-validation folds, written to and read from ``splits.json``.

Format (a file users may read and edit; ``cxrloc prepare`` reuses it when it exists)::

    {"version": 1, "seed": S, "group_by": "patient", "unannotated_fraction": F,
     "folds": [{"fold": 0, "test": [ids], "train_annotated": [ids], "train_unannotated": [ids]}, ...]}

Rules of every splits file, hand-made or not (checked by :func:`check_splits`, the one check that
``cxrloc prepare`` and ``cxrloc train`` both run):
- every id is a usable image of the prepared folder: test and ``train_annotated`` ids annotated,
  ``train_unannotated`` ids unannotated; no list names an image twice;
- a fold's training lists contain no image and no patient of that fold's test set.

Rules of the cross-validation ``prepare`` makes (``"seed"`` an integer), checked too unless the file
says ``"seed": null`` (a **hand-made** split, e.g. train on one set of patients, test on another:
``prepare`` then reuses it whatever ``--folds``, ``--seed`` and ``--unannotated-fraction`` say):
- the folds' test sets partition the annotated images;
- ``train_annotated`` of fold k is every annotated image outside fold k's test set;
- ``train_unannotated`` of fold k is the unannotated pool minus the images of fold k's test patients,
  where the pool is a seed-sampled fraction F of the usable unannotated images.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrloc.utils import CxrlocError, read_json, write_text_atomic

SPLITS_VERSION = 1
SPLIT_KEYS: tuple[str, ...] = ("test", "train_annotated", "train_unannotated")


def sample_unannotated(unannotated_ids: Iterable[str], fraction: float, seed: int) -> list[str]:
    """Sample ``round(fraction * n)`` of the unannotated ids, deterministically by ``seed``.

    The result does not depend on the order of ``unannotated_ids`` (they are sorted first) and is
    returned sorted.
    """
    if not 0.0 <= fraction <= 1.0:
        raise CxrlocError(f"--unannotated-fraction must be in [0, 1], got {fraction}")
    ids = sorted(set(unannotated_ids))
    n = int(math.floor(fraction * len(ids) + 0.5))
    if n == 0:
        return []
    # A separate stream from the fold assignment, so changing F does not reshuffle the folds.
    rng = np.random.default_rng([seed, 1])
    pick = rng.choice(len(ids), size=n, replace=False)
    return sorted(ids[i] for i in pick)


def assign_folds(patient_of: Mapping[str, int], folds: int, seed: int) -> list[list[str]]:
    """Split annotated images into ``folds`` test sets grouped by patient, with balanced sizes.

    Patients are shuffled by ``seed``, then taken largest group first and each given to the fold
    with the fewest images so far (ties: lowest fold), which balances image counts to within the
    largest patient's size.

    Args:
        patient_of: annotated image id -> patient id.
        folds: number of folds (>= 2).
        seed: shuffling seed.

    Returns:
        ``folds`` sorted lists of image ids.
    """
    if folds < 2:
        raise CxrlocError(f"--folds must be at least 2, got {folds}")
    groups: dict[int, list[str]] = {}
    for image_id in sorted(patient_of):
        groups.setdefault(int(patient_of[image_id]), []).append(image_id)
    patients = sorted(groups)
    if len(patients) < 2:
        raise CxrlocError(
            f"only {len(patients)} annotated patient(s): patient-grouped folds need at least 2 (each fold tests "
            "patients the others train on); add annotated images"
        )
    if len(patients) < folds:
        raise CxrlocError(
            f"only {len(patients)} annotated patient(s) for {folds} folds; use --folds {len(patients)} or fewer"
        )
    rng = np.random.default_rng([seed, 0])
    order = [patients[i] for i in rng.permutation(len(patients))]
    # Stable sort keeps the seeded order among patients with the same number of images.
    order.sort(key=lambda p: -len(groups[p]))
    sizes = [0] * folds
    out: list[list[str]] = [[] for _ in range(folds)]
    for p in order:
        k = min(range(folds), key=lambda j: (sizes[j], j))
        out[k].extend(groups[p])
        sizes[k] += len(groups[p])
    return [sorted(f) for f in out]


def make_splits(
    annotated: Mapping[str, int],
    pool: Mapping[str, int],
    *,
    folds: int,
    seed: int,
    unannotated_fraction: float,
) -> dict[str, Any]:
    """Build the ``splits.json`` object.

    Args:
        annotated: annotated image id -> patient id (all usable annotated images).
        pool: sampled unannotated image id -> patient id (see :func:`sample_unannotated`).
        folds: number of folds.
        seed: the seed (recorded; used for the fold assignment).
        unannotated_fraction: recorded in the file.
    """
    tests = assign_folds(annotated, folds, seed)
    all_annotated = sorted(annotated)
    out_folds = []
    for k, test in enumerate(tests):
        test_set = set(test)
        test_patients = {annotated[i] for i in test}
        out_folds.append(
            {
                "fold": k,
                "test": test,
                "train_annotated": [i for i in all_annotated if i not in test_set],
                "train_unannotated": sorted(i for i in pool if pool[i] not in test_patients),
            }
        )
    return {
        "version": SPLITS_VERSION,
        "seed": int(seed),
        "group_by": "patient",
        "unannotated_fraction": float(unannotated_fraction),
        "folds": out_folds,
    }


def dumps_splits(splits: Mapping[str, Any]) -> str:
    """Serialise splits deterministically (2-space indent, one id per line, trailing newline)."""
    return json.dumps(splits, indent=2) + "\n"


def write_splits(path: str | os.PathLike[str], splits: Mapping[str, Any]) -> Path:
    """Write ``splits.json`` atomically."""
    return write_text_atomic(path, dumps_splits(splits))


HAND_MADE_HINT = 'or set "seed": null in it to use it as a hand-made split (docs/data.md, "Hand-made splits")'
"""The advice that makes an edited ``splits.json`` usable as it is."""


def is_hand_made(splits: Mapping[str, Any]) -> bool:
    """Whether a splits file is marked hand-made (``"seed": null``): not a cxrloc cross-validation."""
    return splits.get("seed", 0) is None


def load_splits(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``splits.json`` and check its structure (not its content; see :func:`check_splits`)."""
    path = Path(path)
    obj = read_json(path, "splits", hint="fix it or delete it to recompute")
    check_structure(obj, path)
    return obj


def check_structure(obj: Any, path: str | os.PathLike[str]) -> None:
    """Check the structure of a parsed splits file (version, folds numbered 0.., lists of ids)."""
    if not isinstance(obj, dict) or obj.get("version") != SPLITS_VERSION or not isinstance(obj.get("folds"), list):
        raise CxrlocError(f"{path}: not a version-{SPLITS_VERSION} splits file; fix it or delete it to recompute")
    for k, f in enumerate(obj["folds"]):
        if not isinstance(f, dict) or f.get("fold") != k:
            raise CxrlocError(f'{path}: folds[{k}] must be an object with "fold": {k}')
        for key in SPLIT_KEYS:
            if not isinstance(f.get(key), list) or not all(isinstance(i, str) for i in f[key]):
                raise CxrlocError(f"{path}: folds[{k}][{key!r}] must be a list of image ids")
    if not obj["folds"]:
        raise CxrlocError(f"{path}: no fold; fix it or delete it to recompute")
    if not (obj.get("seed") is None or isinstance(obj.get("seed"), int)):
        raise CxrlocError(f'{path}: "seed" must be an integer, or null for a hand-made split')


def check_splits(
    splits: Mapping[str, Any],
    annotated: Mapping[str, int],
    unannotated: Mapping[str, int],
    *,
    where: str = "splits.json",
) -> None:
    """Check splits against the usable images; raise :class:`CxrlocError` on the first violation.

    The rules of every split, and those of a cross-validation unless the file is hand-made
    (``"seed": null``; see the module docstring). ``cxrloc prepare`` and ``cxrloc train`` both call it.

    Args:
        splits: parsed splits.
        annotated: usable annotated image id -> patient id.
        unannotated: usable unannotated image id -> patient id (every one, pooled or not).
        where: name used in messages.
    """
    hint = "; fix it or delete it to recompute the folds"
    cv_hint = f"; fix it, {HAND_MADE_HINT}, or delete it to recompute the folds"
    hand_made = is_hand_made(splits)
    seen: dict[str, int] = {}
    for f in splits["folds"]:
        k = f["fold"]
        for key in SPLIT_KEYS:
            if len(set(f[key])) != len(f[key]):
                raise CxrlocError(f"{where}: fold {k} {key} lists an image twice{hint}")
        for i in f["test"]:
            if i not in annotated:
                raise CxrlocError(f"{where}: fold {k} test image {i!r} is not a usable annotated image{hint}")
            if i in seen and not hand_made:
                raise CxrlocError(f"{where}: image {i!r} is in the test sets of folds {seen[i]} and {k}{cv_hint}")
            seen[i] = k
    missing = sorted(set(annotated) - set(seen))
    if missing and not hand_made:
        raise CxrlocError(
            f"{where}: {len(missing)} annotated image(s) are in no test set (first {missing[0]!r}){cv_hint}"
        )
    for f in splits["folds"]:
        k = f["fold"]
        if not f["test"]:
            raise CxrlocError(f"{where}: fold {k} has no test image{hint}")
        test_patients = {annotated[i] for i in f["test"]}
        for i in f["train_annotated"]:
            if i not in annotated:
                raise CxrlocError(
                    f"{where}: fold {k} train_annotated image {i!r} is not a usable annotated image{hint}"
                )
        for i in f["train_unannotated"]:
            if i not in unannotated:
                raise CxrlocError(
                    f"{where}: fold {k} train_unannotated image {i!r} is not a usable unannotated image{hint}"
                )
        for key, table in (("train_annotated", annotated), ("train_unannotated", unannotated)):
            leak = [i for i in f[key] if table[i] in test_patients]
            if leak:
                raise CxrlocError(
                    f"{where}: fold {k} {key} image {leak[0]!r} belongs to a test patient of that fold{hint}"
                )
        overlap = set(f["test"]) & (set(f["train_annotated"]) | set(f["train_unannotated"]))
        if overlap:
            raise CxrlocError(f"{where}: fold {k} image {sorted(overlap)[0]!r} is both test and train{hint}")


def split_image_ids(splits: Mapping[str, Any]) -> set[str]:
    """Every image id named anywhere in the splits (these are the images ``prepare`` caches)."""
    return {i for f in splits["folds"] for key in SPLIT_KEYS for i in f[key]}
