"""Image reading: real PNG/JPEG/DICOM files and bad files, checked against independent decodes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import REAL_FIXTURES, SHARED_DATA, needs_shared
from conftest import write_dicom as _dicom
from PIL import Image

from cxrloc.data.imageio import ImageReadError, read_image, read_image_u8, resize_square, to_uint8

FIXTURES = REAL_FIXTURES
ORIGINALS = SHARED_DATA / "nih-originals" / "images"


def test_rgba_originals_read_as_grey() -> None:
    files = [p for p in sorted(needs_shared(ORIGINALS).glob("*.png")) if Image.open(p).mode == "RGBA"]
    assert len(files) == 4
    for p in files:
        img = read_image(p)
        raw = np.asarray(Image.open(p)).astype(np.float64)
        expected = (0.299 * raw[..., 0] + 0.587 * raw[..., 1] + 0.114 * raw[..., 2]) / 255.0
        assert img.shape == (1024, 1024) and img.dtype == np.float32
        assert np.abs(img - expected).max() < 1e-5


def test_grey_png_and_cache_path() -> None:
    p = sorted(needs_shared(ORIGINALS).glob("*.png"))[0]
    raw = np.asarray(Image.open(p)).astype(np.float64)
    img = read_image(p)
    assert np.abs(img - raw / 255).max() < 1e-6
    # Area filter 1024 -> 512 is the mean of 2x2 blocks, computed independently here.
    block = raw.reshape(512, 2, 512, 2).mean(axis=(1, 3))
    assert np.abs(resize_square(img, 512) * 255 - block).max() < 1e-3
    u8 = read_image_u8(p, 512)
    assert u8.shape == (512, 512) and u8.dtype == np.uint8
    assert np.abs(u8.astype(np.float64) - block).max() <= 0.5 + 1e-9  # exact mean rounded (ties either way)


def test_dicom_fixture_pair() -> None:
    m1 = read_image(FIXTURES / "cr_monochrome1_jpeg.dcm")
    m2 = read_image(FIXTURES / "cr_monochrome2_jpeg.dcm")
    assert m2.shape == (1024, 1024)
    # The two fixtures store the SAME JPEG bytes; only the label differs. DICOM says MONOCHROME1
    # displays low values white, so a correct reader shows the first as the negative of the second.
    assert (
        pydicom.dcmread(FIXTURES / "cr_monochrome1_jpeg.dcm").PixelData
        == pydicom.dcmread(FIXTURES / "cr_monochrome2_jpeg.dcm").PixelData
    )
    assert np.corrcoef(m1.ravel(), m2.ravel())[0, 1] <= -0.99
    assert np.abs(m1 - (1 - m2)).max() < 1e-6
    # Against an independent decode of the JPEG stream with pydicom: value / 255.
    raw = pydicom.dcmread(FIXTURES / "cr_monochrome2_jpeg.dcm").pixel_array.astype(np.float64)
    assert np.abs(m2 - raw / 255).max() < 1e-6


def test_monochrome1_inverted_pixels_look_like_monochrome2(tmp_path: Path) -> None:
    raw = pydicom.dcmread(FIXTURES / "cr_monochrome2_jpeg.dcm").pixel_array
    m2 = read_image(FIXTURES / "cr_monochrome2_jpeg.dcm")
    # A true MONOCHROME1 file of the same picture stores 255 - p.
    m1 = read_image(_dicom(tmp_path / "m1.dcm", 255 - raw.astype(np.int64), "MONOCHROME1", 8))
    assert np.corrcoef(m1.ravel(), m2.ravel())[0, 1] >= 0.99
    assert np.abs(m1 - m2).max() < 1e-6


def test_dicom_rescale_and_window(tmp_path: Path) -> None:
    stored = np.array([[0, 1000], [2000, 4095]], dtype=np.int64)
    # Rescale: HU-like v = 2 s - 1000; window centre 1000 width 2000 maps [0, 2000) linearly.
    p = _dicom(
        tmp_path / "w.dcm",
        stored,
        "MONOCHROME2",
        12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=1000,
        WindowWidth=2000,
    )
    v = stored * 2.0 - 1000
    # DICOM linear window (PS3.3 C.11.2.1.2.1) into the output range [lo, hi] of the rescale.
    lo, hi = -1000.0, 4095 * 2 - 1000.0
    c, w = 1000 - 0.5, 2000 - 1.0
    y = np.where(v <= c - w / 2, lo, np.where(v > c + w / 2, hi, ((v - c) / w + 0.5) * (hi - lo) + lo))
    assert np.allclose(read_image(p), (y - lo) / (hi - lo), atol=1e-6)
    # Without a window: normalised by BitsStored through the rescale.
    p2 = _dicom(tmp_path / "r.dcm", stored, "MONOCHROME2", 12, RescaleSlope=2, RescaleIntercept=-1000)
    assert np.allclose(read_image(p2), stored / 4095.0, atol=1e-6)


def test_nonsquare_rgb_jpeg() -> None:
    p = FIXTURES / "rgb_nonsquare.jpg"
    img = read_image(p)
    assert img.shape == (885, 1036)
    rgb = np.asarray(Image.open(p).convert("RGB")).astype(np.float64)
    assert np.abs(img - (rgb @ [0.299, 0.587, 0.114]) / 255).max() < 1e-5
    assert resize_square(img, 64).shape == (64, 64)


def test_sixteen_bit_png_and_content_detection(tmp_path: Path) -> None:
    values = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    p = tmp_path / "x16.jpg"  # wrong extension on purpose: the format comes from the bytes
    Image.fromarray(values).save(p, format="PNG")
    assert np.allclose(read_image(p), values / 65535.0, atol=1e-7)


def test_to_uint8_rounds() -> None:
    got = to_uint8(np.array([[0.0, 0.5 / 255, 1.6 / 255, 1.0, 1.7, -3.0]], dtype=np.float32))
    assert got.tolist() == [[0, 0, 2, 255, 255, 0]]


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_bad_files_raise_clear_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(100_000, 100_000) + b"\0" * 64)
    nopix = tmp_path / "nopix.dcm"
    _dicom(nopix, np.zeros((4, 4), np.int64), "MONOCHROME2", 8)
    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(nopix, enforce_file_format=True)
    cases = {
        truncated: "truncated",
        empty: "empty",
        text: "not a PNG, JPEG or DICOM",
        huge: "above the limit",
        nopix: "no pixel data",
        tmp_path / "absent.png": "cannot open",
    }
    for path, words in cases.items():
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        assert str(path) in str(info.value)
        if words != "truncated":
            assert words in str(info.value)
        with pytest.raises(ImageReadError):
            read_image_u8(path, 32)
    with pytest.raises(ImageReadError, match="above the limit"):
        read_image(good, max_pixels=100)


def test_truncated_dicom_says_truncated_without_a_raw_warning(tmp_path: Path) -> None:
    import warnings

    real = (FIXTURES / "cr_monochrome2_jpeg.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(real[: len(real) // 2])  # a copy interrupted half-way
    short = _dicom(tmp_path / "short.dcm", np.zeros((64, 64), np.uint8), "MONOCHROME2", 8)
    short.write_bytes(short.read_bytes()[:-2000])  # uncompressed pixels cut short
    for path in (cut, short):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a raw pydicom warning would fail here
            with pytest.raises(ImageReadError) as info:
                read_image(path)
        message = str(info.value)
        assert str(path) in message and "truncated" in message and "PixelData element missing" not in message


def test_absurd_aspect_ratios_are_refused_from_the_header(tmp_path: Path) -> None:
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((4, 3000), np.uint8)).save(thin)
    tall = tmp_path / "tall.jpg"
    Image.fromarray(np.zeros((2000, 150), np.uint8)).save(tall)
    tall_dcm = _dicom(tmp_path / "tall.dcm", np.zeros((300, 20), np.uint8), "MONOCHROME2", 8)
    for path, ratio in ((thin, "750:1"), (tall, "13:1"), (tall_dcm, "15:1")):
        with pytest.raises(ImageReadError, match=f"aspect ratio of {ratio}"):
            read_image(path)
        with pytest.raises(ImageReadError, match="aspect ratio"):
            read_image_u8(path, 32)
    at_limit = tmp_path / "limit.png"
    Image.fromarray(np.full((10, 100), 128, np.uint8)).save(at_limit)
    assert read_image(at_limit).shape == (10, 100)  # 10:1 is still read


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    # Hold the FIFO open with bytes in it, so that a regression that opens it fails on the message
    # instead of hanging the test suite.
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    os.write(fd, b"x" * 4096)
    try:
        for reader in (read_image, lambda p: read_image_u8(p, 32)):
            with pytest.raises(ImageReadError, match="FIFO .*not a regular file"):
                reader(fifo)
    finally:
        os.close(fd)
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path)
