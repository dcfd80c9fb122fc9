"""Read chest X-ray images (PNG, JPEG, DICOM) into one grey-scale convention.

Intensity convention (used everywhere in cxrloc):
    ``read_image`` returns a 2-D ``float32`` array in ``[0, 1]``, grey scale, ``0`` = black and
    ``1`` = white *as displayed*, i.e. the MONOCHROME2 convention in which dense tissue (bone,
    heart) is bright. MONOCHROME1 DICOMs are inverted to match. The prepared cache stores
    ``to_uint8(resize_square(img, S))`` and the data loader turns it into the network input
    ``x = u8 / 127.5 - 1`` in ``[-1, 1]`` (see ``cxrloc.checkpoint.NORMALISATION``).

The format is detected from the file's first bytes, never from its extension, so a text file
named ``.png`` or a DICOM named ``.jpg`` is handled for what it is. Every failure (empty,
truncated, not an image, too large, DICOM without pixels) raises :class:`ImageReadError` naming
the file, so one bad file never stops a whole run.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from cxrloc.utils import CxrlocError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
"""File extensions taken for images when folders are searched (lower case; extensionless DICOM
files are recognised by :func:`looks_like_dicom`)."""

MAX_PIXELS: int = 50_000_000
"""Largest image (rows x columns) accepted, checked from the header before decoding.

The largest chest radiographs are about 4,300 x 4,300 (18.5 million pixels); 50 million
(e.g. 7,000 x 7,000) leaves room for any real radiograph while refusing a decompression bomb.
It is also below Pillow's own bomb warning (89 million), so no warning is ever emitted.
"""

MAX_ASPECT_RATIO: float = 10.0
"""Largest ratio of the longer to the shorter image side accepted, checked from the header.

Radiographs are near square (NIH 1:1, detector plates up to about 1:1.2, long-leg and spine
stitches about 1:3); a 4 x 3000 strip is not an X-ray, and enlarging it for an overlay would need
gigabytes.
"""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_MAGIC_OFFSET = 128
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's "L" conversion


class ImageReadError(CxrlocError):
    """A file could not be read as an image; the message names the file and the reason."""


def detect_format(path: str | os.PathLike[str]) -> str:
    """Return ``"png"``, ``"jpeg"`` or ``"dicom"`` from the file's magic bytes.

    Raises:
        ImageReadError: the file is missing, empty or none of the three formats.
    """
    path = Path(path)
    check_regular_file(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    if not head:
        raise ImageReadError(f"{path}: empty file (0 bytes); re-download or remove it")
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if _is_dicom_head(head):
        return "dicom"
    raise ImageReadError(
        f"{path}: not a PNG, JPEG or DICOM file (first bytes {head[:8]!r}); check the file or remove it"
    )


def special_file_kind(path: str | os.PathLike[str]) -> str | None:
    """What a path that exists but is neither a regular file nor a folder is (else ``None``).

    Reading a FIFO (named pipe) blocks until something writes to it, and a device may never end:
    cxrloc reads regular files only.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def not_regular_message(path: str | os.PathLike[str], kind: str) -> str:
    """The one message for a path that is not a regular file."""
    return f"{path}: is {kind}, not a regular file; cxrloc reads only regular image files"


def check_regular_file(path: Path) -> None:
    """Refuse a FIFO, socket, device or folder before opening it (a missing file is left to ``open``).

    Raises:
        ImageReadError: ``path`` exists and is not a regular file.
    """
    kind = "a folder" if path.is_dir() else special_file_kind(path)
    if kind is not None:
        raise ImageReadError(not_regular_message(path, kind))


def _is_dicom_head(head: bytes) -> bool:
    return head[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"


def looks_like_dicom(path: str | os.PathLike[str]) -> bool:
    """Whether a file starts like a DICOM Part 10 file ("DICM" at byte 128); ``False`` if unreadable."""
    try:
        with open(path, "rb") as fh:
            return _is_dicom_head(fh.read(_DICOM_MAGIC_OFFSET + 4))
    except OSError:
        return False


def _check_size(path: Path, rows: int, cols: int, frames: int, max_pixels: int) -> None:
    if rows <= 0 or cols <= 0:
        raise ImageReadError(f"{path}: image has no pixels ({rows} x {cols})")
    if rows * cols * frames > max_pixels:
        raise ImageReadError(
            f"{path}: image is {rows} x {cols}"
            + (f" x {frames} frames" if frames > 1 else "")
            + f" = {rows * cols * frames:,} pixels, above the limit of {max_pixels:,} (cxrloc.data.imageio.MAX_PIXELS)"
        )
    ratio = max(rows, cols) / min(rows, cols)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageReadError(
            f"{path}: image is {rows} x {cols} pixels (rows x columns), an aspect ratio of {ratio:.0f}:1; "
            f"a radiograph is at most {MAX_ASPECT_RATIO:g}:1 (cxrloc.data.imageio.MAX_ASPECT_RATIO), so it was not read"
        )


def _png_bit_depth(path: Path) -> int:
    # IHDR is always the first chunk: signature (8) + length (4) + "IHDR" (4) + w (4) + h (4) + depth (1).
    with open(path, "rb") as fh:
        head = fh.read(25)
    return head[24] if len(head) >= 25 else 8


def _open_pil(path: Path, fmt: str, max_pixels: int) -> Image.Image:
    """Open with Pillow, check the size from the header, then decode (``load``)."""
    if fmt == "png":
        # Read the size from IHDR ourselves: Pillow refuses bombs only with a vague "cannot identify".
        with open(path, "rb") as fh:
            head = fh.read(24)
        if len(head) == 24 and head[12:16] == b"IHDR":
            _check_size(path, int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big"), 1, max_pixels)
    im = Image.open(path)
    expected = "PNG" if fmt == "png" else "JPEG"
    if im.format != expected:
        raise ImageReadError(f"{path}: looks like {fmt.upper()} but Pillow reads it as {im.format}")
    width, height = im.size
    _check_size(path, height, width, 1, max_pixels)
    im.load()
    return im


def _pil_to_float(path: Path, im: Image.Image, fmt: str) -> np.ndarray:
    mode = im.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grey PNG: normalise by the bit depth stored in the header, not by the maximum value.
        depth = _png_bit_depth(path) if fmt == "png" else 16
        arr = np.asarray(im).astype(np.float32)
        return np.clip(arr / float(2**depth - 1), 0.0, 1.0)
    if mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
    if mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa", "RGBX"):
        im = im.convert("RGB")
        mode = "RGB"
    arr = np.asarray(im)
    if mode == "L":
        return arr.astype(np.float32) * np.float32(1 / 255)
    if mode == "LA":
        # Alpha is ignored: NIH's RGBA/LA images are fully opaque; a radiograph has no transparency.
        return arr[..., 0].astype(np.float32) * np.float32(1 / 255)
    if mode in ("RGB", "RGBA"):
        rgb = arr[..., :3].astype(np.float32)
        return (rgb @ _LUMA) * np.float32(1 / 255)
    raise ImageReadError(f"{path}: unsupported image mode {mode!r}")


def _read_dicom(path: Path, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    # pydicom warns (and stops) on a file that ends early; the warning becomes this file's message.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path)
    ended = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if ended:
        raise ImageReadError(
            f"{path}: DICOM file is truncated (it ends before its pixel data is complete: {ended[0]}); "
            "copy or export it again"
        )
    if "PixelData" not in ds:
        hint = "; the file may be truncated" if "Rows" in ds else ""
        raise ImageReadError(f"{path}: DICOM file has no pixel data (PixelData element missing{hint})")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    _check_size(path, rows, cols, frames, max_pixels)
    if frames > 1:
        raise ImageReadError(f"{path}: multi-frame DICOM ({frames} frames) is not a radiograph; not supported")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a decoder's warnings; a real failure raises below
        try:
            arr = ds.pixel_array
        except ValueError as exc:
            if "less than expected" in str(exc):
                raise ImageReadError(
                    f"{path}: DICOM pixel data is shorter than its header says ({exc}); the file is truncated or "
                    "damaged, copy or export it again"
                ) from None
            raise
    if int(ds.get("SamplesPerPixel", 1)) == 3 or arr.ndim == 3:
        # Colour (pydicom converts YBR to RGB): LUTs are defined for grey images only.
        rgb = arr[..., :3].astype(np.float32)
        return np.clip((rgb @ _LUMA) / float(2**bits_stored - 1), 0.0, 1.0)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(f"{path}: unsupported PhotometricInterpretation {photometric!r}")

    # Range of the stored values, carried through the modality LUT, is the range we normalise by.
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0, 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    elif ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    values = apply_modality_lut(arr, ds)
    if ds.get("VOILUTSequence"):
        # apply_voi needs integer input; the modality output is integral for real data.
        values = apply_voi_lut(np.rint(values).astype(np.int64), ds)
        lut = ds.VOILUTSequence[0]
        lo, hi = 0, 2 ** int(lut.LUTDescriptor[2]) - 1
        if int(lut.LUTDescriptor[2]) not in (8, 16):
            # 10-15 bit LUTs are stored in 16-bit words; their real range is the data's.
            data = np.asarray(values)
            lo, hi = 0, max(int(data.max()), 1)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # pydicom's windowing maps into the modality output range [lo, hi] computed above.
        values = apply_voi_lut(values, ds)
    out = (np.asarray(values, dtype=np.float64) - lo) / max(hi - lo, 1e-12)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def read_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a PNG (8/16-bit; L, LA, RGB, RGBA, palette), JPEG or DICOM file as a grey image.

    Args:
        path: the image file; its format is detected from its content.
        max_pixels: refuse images with more pixels than this (checked before decoding).

    Returns:
        2-D ``float32`` array (rows, columns) in ``[0, 1]``; 0 = black, 1 = white as displayed.

    Raises:
        ImageReadError: the file is missing, empty, truncated, not an image, too large or
            a DICOM without pixel data. The message names the file.
    """
    path = Path(path)
    fmt = detect_format(path)
    try:
        if fmt == "dicom":
            img = _read_dicom(path, max_pixels)
        else:
            with _open_pil(path, fmt, max_pixels) as im:
                img = _pil_to_float(path, im, fmt)
    except ImageReadError:
        raise
    except Exception as exc:  # any decoder failure is this file's problem, never the run's
        raise ImageReadError(f"{path}: cannot decode {fmt.upper()} ({type(exc).__name__}: {exc})") from exc
    if img.ndim != 2:
        raise ImageReadError(f"{path}: decoded to shape {img.shape}, expected a 2-D grey image")
    return np.ascontiguousarray(img, dtype=np.float32)


def image_size(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` in pixels of a PNG, JPEG or DICOM file, read from its header only.

    Boxes of a plain table are in the pixels of their image file; ``prepare`` needs each boxed
    image's size to normalise them, long before (and without) decoding the pixels. The same
    checks as :func:`read_image` apply to the size (``max_pixels``, the aspect ratio).

    Raises:
        ImageReadError: the file is missing, not an image, or its header is unreadable or refused.
    """
    path = Path(path)
    fmt = detect_format(path)
    try:
        if fmt == "dicom":
            import pydicom

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a short file warns; its missing size is reported below
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns", "NumberOfFrames"])
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        else:
            with Image.open(path) as im:  # lazy: reads the header, not the pixels
                (cols, rows), frames = im.size, 1
    except Exception as exc:  # any header failure is this file's problem
        raise ImageReadError(f"{path}: cannot read the {fmt.upper()} header ({type(exc).__name__}: {exc})") from exc
    _check_size(path, rows, cols, frames, max_pixels)
    return cols, rows


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image to ``(size, size)`` with an area (box) filter.

    A non-square image is stretched, not padded or cropped: box coordinates are fractions of the
    image's width and height, so stretching keeps them valid (NIH images are square anyway).
    """
    if img.ndim != 2:
        raise ValueError(f"resize_square expects a 2-D image, got shape {img.shape}")
    if img.shape == (size, size):
        return np.asarray(img, dtype=np.float32).copy()
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    return np.asarray(im.resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Quantise a ``[0, 1]`` image to ``uint8`` as ``round(img * 255)`` (values outside are clipped)."""
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_image_u8(path: str | os.PathLike[str], size: int, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read, resize to ``(size, size)`` and quantise one image for the prepared cache.

    Equal to ``to_uint8(resize_square(read_image(path), size))`` within one grey level. For 8-bit
    PNG/JPEG sources (all of NIH) it stays in 8 bits: Pillow's grey conversion and box
    reduction in integer arithmetic, which keeps ``prepare`` close to the PNG decode speed.
    Rounding of exact halves may differ by 1 from the float path.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt != "dicom":
        try:
            with _open_pil(path, fmt, max_pixels) as im:
                if im.mode in ("L", "LA", "RGB", "RGBA"):
                    grey = im if im.mode == "L" else im.convert("L") if im.mode != "LA" else im.getchannel(0)
                    w, h = grey.size
                    if w == h and w % size == 0:
                        out = grey.reduce(w // size) if w != size else grey
                    else:
                        out = grey.resize((size, size), Image.Resampling.BOX)
                    return np.array(out, dtype=np.uint8)
                img = _pil_to_float(path, im, fmt)
        except ImageReadError:
            raise
        except Exception as exc:
            raise ImageReadError(f"{path}: cannot decode {fmt.upper()} ({type(exc).__name__}: {exc})") from exc
        return to_uint8(resize_square(img, size))
    return to_uint8(resize_square(read_image(path, max_pixels=max_pixels), size))
