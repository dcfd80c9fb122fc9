"""The dataset formats, behind one small protocol: a registry that ``prepare`` and ``predict --boxes`` share.

A :class:`Reader` knows two things about its format:

- :meth:`Reader.open`: the dataset's tables as a :class:`~cxrloc.data.source.Source` (what
  ``prepare`` needs), from a data folder and the options of ``prepare`` (each reader refuses the
  options that are not its own, with one message);
- :meth:`Reader.claims` and :meth:`Reader.read_boxes`: whether a box file given to
  ``predict --boxes`` is of this format, and its boxes as a :class:`~cxrloc.data.boxes.BoxFile`.

:data:`READERS` lists them in the order a box file is tried; :data:`FORMATS` (the ``--format``
choices of ``prepare``) is taken from it. Adding a format = one reader class here (and its module).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cxrloc.classes import CLASSES
from cxrloc.data.boxes import BoxFile, BoxKey, add_box
from cxrloc.data.coco import coco_source, read_coco
from cxrloc.data.nih import nih_source, open_text, read_bbox_list
from cxrloc.data.source import Columns, Source
from cxrloc.data.table import BOX_TABLE_COLUMNS, read_box_table, table_source
from cxrloc.utils import CxrlocError


@dataclass(frozen=True)
class SourceOptions:
    """The options of ``prepare`` that say where a dataset's tables are and how to read them."""

    data_entry: str | os.PathLike[str] | None = None
    bbox_list: str | os.PathLike[str] | None = None
    labels: str | os.PathLike[str] | None = None
    boxes: str | os.PathLike[str] | None = None
    columns: Columns = Columns()
    classes: Sequence[str] | None = None


class Reader(Protocol):
    """One dataset format (module docstring)."""

    name: str
    summary: str
    """What the format reads, for ``--format``'s help."""

    def open(self, data_dir: Path, options: SourceOptions) -> Source: ...

    def claims(self, path: Path, header: list[str]) -> bool:
        """Whether the box file ``path`` (its first line split at commas: ``header``) is of this format."""
        ...

    def read_boxes(self, path: Path) -> BoxFile: ...


def _not_nih(data_format: str, options: SourceOptions) -> None:
    if options.data_entry or options.bbox_list:
        raise CxrlocError(f"--data-entry and --bbox-list are NIH's tables; --format {data_format} reads --labels "
                          "and --boxes")


class NihReader:
    """NIH ChestX-ray14's ``Data_Entry_2017.csv`` and ``BBox_List_2017.csv`` (:mod:`cxrloc.data.nih`)."""

    name = "nih"
    summary = "nih (Data_Entry + BBox_List CSVs)"

    def open(self, data_dir: Path, options: SourceOptions) -> Source:
        for option, value in (("--labels", options.labels), ("--boxes", options.boxes),
                              ("--classes", options.classes)):
            if value:
                raise CxrlocError(f"{option} is for --format table or coco; NIH's tables are --data-entry and "
                                  "--bbox-list, and its classes are fixed")
        if options.columns.names:
            raise CxrlocError("--column is for --format table or coco (NIH's columns are known)")
        return nih_source(data_dir, options.data_entry, options.bbox_list)

    def claims(self, path: Path, header: list[str]) -> bool:
        return header[:1] == ["Image Index"]

    def read_boxes(self, path: Path) -> BoxFile:
        return BoxFile(list(CLASSES), read_bbox_list(path))


class TableReader:
    """A labels table and a boxes table in pixels of each image file (:mod:`cxrloc.data.table`)."""

    name = "table"
    summary = "table (--labels + --boxes tables)"

    def open(self, data_dir: Path, options: SourceOptions) -> Source:
        _not_nih(self.name, options)
        if options.labels is None or options.boxes is None:
            raise CxrlocError("--format table needs --labels TABLE (one row per image) and --boxes TABLE (one row "
                              "per box)")
        return table_source(Path(options.labels), Path(options.boxes), options.columns, options.classes)

    def claims(self, path: Path, header: list[str]) -> bool:
        return path.suffix.lower() != ".json" and all(c in header for c in BOX_TABLE_COLUMNS)

    def read_boxes(self, path: Path) -> BoxFile:
        rows, parsed = read_box_table(path, Columns())
        out = BoxFile(list(CLASSES), parsed)
        for raw in rows:
            out.pixels.setdefault(raw.image_id, []).append((raw.label, *raw.xywh))
        return out


class CocoReader:
    """A COCO annotation file, optionally with a labels table (:mod:`cxrloc.data.coco`)."""

    name = "coco"
    summary = "coco (--boxes COCO.json, optional --labels)"

    def open(self, data_dir: Path, options: SourceOptions) -> Source:
        _not_nih(self.name, options)
        if options.boxes is None:
            raise CxrlocError("--format coco needs --boxes ANNOTATIONS.json (the COCO file)")
        if options.classes:
            raise CxrlocError("--classes: a COCO file's classes are its categories")
        labels = Path(options.labels) if options.labels is not None else None
        return coco_source(Path(options.boxes), labels, options.columns)

    def claims(self, path: Path, header: list[str]) -> bool:
        return path.suffix.lower() == ".json"

    def read_boxes(self, path: Path) -> BoxFile:
        classes, _, frames, rows, parsed = read_coco(path)
        out = BoxFile(classes, parsed)
        seen: dict[BoxKey, int] = {}
        for raw in rows:
            if raw.image_id in frames:
                add_box(parsed, seen, line=raw.line, where=raw.where, image_id=raw.image_id, k=raw.k,
                        label=raw.label, xywh=raw.xywh, frame=frames[raw.image_id])
            else:
                out.pixels.setdefault(raw.image_id, []).append((raw.label, *raw.xywh))
        return out


READERS: dict[str, Reader] = {r.name: r for r in (NihReader(), TableReader(), CocoReader())}
"""Every format, by ``--format`` name."""

FORMATS: tuple[str, ...] = tuple(READERS)
"""The datasets ``prepare`` reads: NIH ChestX-ray14's CSVs, a plain labels + boxes table, COCO JSON."""


def format_help() -> str:
    """``--format``'s help: each format and what it reads."""
    summaries = [r.summary for r in READERS.values()]
    return f"{', '.join(summaries[:-1])} or {summaries[-1]}."


def open_source(data_format: str, data_dir: Path, options: SourceOptions = SourceOptions()) -> Source:
    """Read a dataset's tables in ``data_format`` (one of :data:`FORMATS`).

    Raises:
        CxrlocError: an unknown format, an option that does not belong to the format, a missing or
            malformed table.
    """
    if data_format not in READERS:
        raise CxrlocError(f"--format {data_format!r}: use {', '.join(FORMATS)}")
    return READERS[data_format].open(data_dir, options)


def read_box_file(path: str | os.PathLike[str]) -> BoxFile:
    """The boxes of a file given to ``predict --boxes``, by the first reader that claims it.

    Raises:
        CxrlocError: the file cannot be read, or no reader claims it.
    """
    path = Path(path)
    header: list[str] = []
    if path.suffix.lower() != ".json":
        if not path.is_file():
            raise CxrlocError(f"--boxes {path}: file not found")
        try:
            with open_text(path) as fh:
                header = [c.strip() for c in fh.readline().split(",")]
        except (OSError, UnicodeDecodeError, EOFError) as exc:
            raise CxrlocError(f"--boxes {path}: cannot read it ({exc})") from None
    for reader in READERS.values():
        if reader.claims(path, header):
            return reader.read_boxes(path)
    raise CxrlocError(
        f"--boxes {path}: neither NIH's box list (header 'Image Index,Finding Label,...'), a COCO file "
        f"(.json) nor a boxes table with the columns {', '.join(BOX_TABLE_COLUMNS)} (found {header[:8]})"
    )
