"""Read a folder written by ``cxrloc prepare`` (the image cache, manifest and splits).

Layout (see docs/data.md)::

    PREPARED_DIR/
      images.u8         raw uint8 array (N, S, S), C order, opened with np.memmap (read-only)
      done.u8           (N,) uint8: 0 = not yet written, 1 = written, 2 = unreadable (skipped, never
                        referenced by the manifest; see fingerprint.json)
      cache.json        {"version": 1, "size": S, "count": N, "file": "images.u8", "dtype": "uint8"}
      classes.json      {"version": 1, "format": "nih" | "table" | "coco", "classes": [...], "boxed": [...]}
                        (absent in folders made before class lists: NIH's 14 classes, its 8 boxed ones)
      manifest.csv      one row per usable image (labels, annotated, cache_index, boxes as JSON)
      fingerprint.json  what prepare saw (CSV hashes, counts, parameters, skipped/missing images)
      splits.json       patient-grouped folds

Pixels are returned as stored (uint8, 0 = black); the network input is ``u8 / 127.5 - 1``,
computed by :func:`to_network_range` in the dataset, loader and predictor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrloc.classes import BOXED_CLASSES, CLASSES, check_class_names
from cxrloc.data.boxes import Box
from cxrloc.data.formats import FORMATS
from cxrloc.utils import CxrlocError, read_json

CACHE_VERSION = 1

CLASSES_FILE = "classes.json"
"""The class list of a prepared folder (written by ``prepare``; NIH's when absent)."""


def manifest_columns(classes: Sequence[str] = CLASSES) -> tuple[str, ...]:
    """The columns of ``manifest.csv`` for a class list, in order (one 0/1 column per class)."""
    return ("image_id", "patient_id", "follow_up", "view_position", *classes, "annotated", "cache_index", "boxes")


MANIFEST_COLUMNS: tuple[str, ...] = manifest_columns(CLASSES)
"""The columns of an NIH folder's ``manifest.csv``. Other datasets have their own class columns and a
``patient`` column (the patient id as their tables give it: text)."""


@dataclass(frozen=True)
class ClassList:
    """``classes.json``: the class list of a prepared folder and which of its classes carry boxes.

    Attributes:
        data_format: the format ``prepare`` read (``nih``, ``table`` or ``coco``).
        classes: every class, in the order of the manifest's columns and of the network's outputs.
        boxed: the classes whose boxes are scored and averaged in the reports' "mean" column:
            NIH's 8 for NIH data (the paper's), else the classes with at least one box.
    """

    data_format: str
    classes: tuple[str, ...]
    boxed: tuple[str, ...]

    @classmethod
    def nih(cls) -> ClassList:
        return cls("nih", CLASSES, BOXED_CLASSES)

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "format": self.data_format, "classes": list(self.classes), "boxed": list(self.boxed)}

    @classmethod
    def read(cls, root: Path) -> ClassList:
        """The folder's ``classes.json``; NIH's list for a folder made before class lists existed."""
        path = root / CLASSES_FILE
        if not path.is_file():
            return cls.nih()
        data = _read_json(path, CLASSES_FILE)
        try:
            classes = check_class_names(data["classes"], str(path))
            boxed = [str(c) for c in data.get("boxed", classes)]
            fmt = str(data.get("format", "table"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise CxrlocError(f"{path}: malformed class list ({exc!r}); run `cxrloc prepare` again") from None
        unknown = [c for c in boxed if c not in classes]
        if unknown or fmt not in FORMATS:
            raise CxrlocError(
                f"{path}: 'boxed' names {unknown} or 'format' {fmt!r} is unknown; run `cxrloc prepare` again"
            )
        return cls(fmt, tuple(classes), tuple(boxed))


def _read_json(path: Path, what: str) -> Any:
    return read_json(path, what, hint=f"is {path.parent} a folder written by `cxrloc prepare`?")


def read_manifest(path: str | os.PathLike[str], classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """Read ``manifest.csv`` with its types; index = ``image_id``; ``boxes`` stays a JSON string.

    Args:
        path: the file.
        classes: the folder's class list (its ``classes.json``): one 0/1 column each.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrlocError(f"{path}: manifest.csv missing; run `cxrloc prepare` first")
    dtypes: dict[str, Any] = {"image_id": str, "view_position": str, "boxes": str, "patient": str}
    dtypes.update({c: np.int64 for c in ("patient_id", "follow_up", "annotated", "cache_index")})
    dtypes.update({c: np.uint8 for c in classes})
    try:
        df = pd.read_csv(path, dtype=dtypes, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise CxrlocError(f"{path}: malformed manifest ({exc}); run `cxrloc prepare` again") from exc
    missing = [c for c in manifest_columns(classes) if c not in df.columns]
    if missing:
        raise CxrlocError(f"{path}: manifest lacks columns {missing}; run `cxrloc prepare` again")
    return df.set_index("image_id", drop=False)


def to_network_range(u8: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Cached uint8 pixels to the network's input range: ``u8 / 127.5 - 1`` in float32, in [-1, 1].

    The one place that defines the conversion (training, evaluation and prediction all use it);
    plain float32 numpy arithmetic, bit-identical to the same arithmetic on a torch tensor and
    faster per core (``bench/bench_loader.py`` measures both).
    ``out``: a float32 array (or view) of the same shape to write into (the augmentation writes a
    crop straight into its edge-padded window).
    """
    out = np.divide(np.asarray(u8, dtype=np.uint8), np.float32(127.5), out=out, dtype=np.float32)
    out -= np.float32(1.0)
    return out


@dataclass
class Prepared:
    """A prepared folder, opened read-only.

    Attributes:
        root: the folder.
        size: side S of the cached images.
        images: ``np.memmap`` (N, S, S) uint8, read-only.
        manifest: one row per usable image, indexed by ``image_id``.
        splits: parsed ``splits.json``.
        class_list: ``classes.json`` (NIH's list for a folder without one).
    """

    root: Path
    size: int
    images: np.memmap
    manifest: pd.DataFrame
    splits: dict[str, Any]
    class_list: ClassList = ClassList.nih()

    @property
    def classes(self) -> tuple[str, ...]:
        """The class list, in label-column and network-output order."""
        return self.class_list.classes

    @property
    def data_format(self) -> str:
        """``nih``, ``table`` or ``coco``: what ``prepare`` read."""
        return self.class_list.data_format

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Prepared:
        """Open ``path`` (a folder written by ``cxrloc prepare``) and check it is complete.

        Raises:
            CxrlocError: a file is missing or inconsistent, or the cache is unfinished.
        """
        root = Path(path)
        if not root.is_dir():
            raise CxrlocError(f"{root}: prepared folder not found; run `cxrloc prepare DATA_DIR --out {root}`")
        meta = _read_json(root / "cache.json", "cache.json")
        if meta.get("version") != CACHE_VERSION or meta.get("dtype") != "uint8":
            raise CxrlocError(f"{root / 'cache.json'}: unsupported cache version/dtype {meta}; run prepare again")
        size, count = int(meta["size"]), int(meta["count"])
        file = root / str(meta.get("file", "images.u8"))
        if Path(meta.get("file", "images.u8")).name != meta.get("file", "images.u8"):
            raise CxrlocError(f"{root / 'cache.json'}: 'file' must be a plain file name")
        expected = count * size * size
        if not file.is_file() or file.stat().st_size != expected:
            raise CxrlocError(f"{file}: missing or not {expected} bytes; run `cxrloc prepare` again to rebuild")
        done_path = root / "done.u8"
        done = np.fromfile(done_path, dtype=np.uint8) if done_path.is_file() else np.zeros(0, np.uint8)
        if done.shape != (count,) or bool(np.any(done == 0)):
            raise CxrlocError(
                f"{root}: the image cache is unfinished (prepare was interrupted); run `cxrloc prepare` again to finish"
            )
        images = (
            np.memmap(file, dtype=np.uint8, mode="r", shape=(count, size, size))
            if count
            else np.zeros((0, size, size), np.uint8).view(np.memmap)
        )
        class_list = ClassList.read(root)
        manifest = read_manifest(root / "manifest.csv", class_list.classes)
        ci = manifest["cache_index"].to_numpy()
        if len(ci) and (ci.max() >= count or ci.min() < -1):
            raise CxrlocError(f"{root / 'manifest.csv'}: cache_index outside 0..{count - 1}; run prepare again")
        splits = _read_json(root / "splits.json", "splits.json")
        obj = cls(root=root, size=size, images=images, manifest=manifest, splits=splits, class_list=class_list)
        obj._index()
        return obj

    def _index(self) -> None:
        m = self.manifest
        self._row = {image_id: i for i, image_id in enumerate(m.index)}
        self._labels = m.loc[:, list(self.classes)].to_numpy(dtype=np.float32)
        self._cache_index = m["cache_index"].to_numpy(dtype=np.int64)
        self._boxes_json = m["boxes"].tolist()
        self._boxes: dict[int, list[Box]] = {}

    def _pos(self, image_id: str) -> int:
        try:
            return self._row[image_id]
        except KeyError:
            raise CxrlocError(f"image {image_id!r} is not in {self.root / 'manifest.csv'}") from None

    @property
    def num_folds(self) -> int:
        """Number of folds in ``splits.json``."""
        return len(self.splits.get("folds", []))

    @property
    def ids(self) -> list[str]:
        """All usable image ids, in manifest order."""
        return list(self.manifest.index)

    def cache_index(self, image_id: str) -> int:
        """Row of ``image_id`` in :attr:`images` (``-1`` when not cached)."""
        return int(self._cache_index[self._pos(image_id)])

    def image(self, image_id: str) -> np.ndarray:
        """The cached image as a fresh ``uint8`` array (S, S); 0 = black, 255 = white."""
        i = self.cache_index(image_id)
        if i < 0:
            raise CxrlocError(
                f"image {image_id!r} is not in the cache: prepare caches only images that appear in a split"
            )
        return np.array(self.images[i])

    def labels(self, image_id: str) -> np.ndarray:
        """The image-level labels as ``float32`` 0/1, in :attr:`classes` order."""
        return self._labels[self._pos(image_id)].copy()

    def label_matrix(self, image_ids: Sequence[str]) -> np.ndarray:
        """``(N, K)`` float64 labels of ``image_ids`` (a boxed class is positive: ``prepare`` adds it)."""
        return np.stack([self.labels(i) for i in image_ids]).astype(np.float64)

    def boxes(self, image_id: str) -> list[Box]:
        """Boxes ``(class_index, x0, y0, x1, y1)`` (fractions of the side); ``[]`` when not annotated."""
        pos = self._pos(image_id)
        if pos not in self._boxes:
            raw = json.loads(self._boxes_json[pos] or "[]")
            self._boxes[pos] = [(int(b[0]), float(b[1]), float(b[2]), float(b[3]), float(b[4])) for b in raw]
        return list(self._boxes[pos])

    def is_annotated(self, image_id: str) -> bool:
        """Whether the image carries at least one box."""
        return bool(self.manifest["annotated"].iat[self._pos(image_id)])

    def check_splits(self) -> None:
        """Check ``splits.json`` against this folder's cached images, with the one check ``prepare``
        runs too (:func:`cxrloc.data.splits.check_splits`; a hand-made split, ``"seed": null``, needs
        only the rules of every split).

        Raises:
            CxrlocError: the first rule broken, naming the file, the fold and the image.
        """
        from cxrloc.data.splits import check_splits, check_structure

        path = self.root / "splits.json"
        check_structure(self.splits, path)
        m = self.manifest
        cached = m["cache_index"].to_numpy() >= 0
        annotated = m["annotated"].to_numpy().astype(bool)
        patients = m["patient_id"].tolist()
        ids = list(m.index)
        check_splits(
            self.splits,
            {i: p for i, p, a, c in zip(ids, patients, annotated, cached, strict=True) if a and c},
            {i: p for i, p, a, c in zip(ids, patients, annotated, cached, strict=True) if not a and c},
            where=str(path),
        )

    def fold(self, k: int) -> dict[str, list[str]]:
        """Fold ``k``'s lists: ``{"test": [...], "train_annotated": [...], "train_unannotated": [...]}``."""
        if not 0 <= k < self.num_folds:
            raise CxrlocError(f"fold {k} does not exist: {self.root / 'splits.json'} has folds 0..{self.num_folds - 1}")
        f = self.splits["folds"][k]
        return {key: list(f.get(key, [])) for key in ("test", "train_annotated", "train_unannotated")}
