"""Tests of ``cxrloc predict``: regions, coordinate mapping, backends, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NIH_DIR, REAL_FIXTURES, needs_shared
from PIL import Image
from typer.testing import CliRunner

from cxrloc.classes import CLASSES
from cxrloc.inference.postprocess import connected_components, make_record, regions_from_map
from cxrloc.inference.predict import predict_files

REPO = Path(__file__).resolve().parents[1]
NIH_IMAGE = NIH_DIR / "images" / "00013118_008.png"
NONSQUARE = REAL_FIXTURES / "rgb_nonsquare.jpg"
DICOM2 = REAL_FIXTURES / "cr_monochrome2_jpeg.dcm"
DICOM1 = REAL_FIXTURES / "cr_monochrome1_jpeg.dcm"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_run_factory) -> tuple[Path, torch.nn.Module]:
    # tau_hat = 20 of 64 patches makes some classes present and others absent.
    return tiny_run_factory(tmp_path_factory.mktemp("run"), bias_span=3.0, seed=0, tau_hat=20.0)


# --------------------------------------------------------------------------- pure functions


def test_connected_components_hand_grids() -> None:
    grid = np.array(
        [
            [1, 1, 0, 0, 1],
            [0, 1, 0, 1, 1],
            [0, 0, 0, 0, 0],
            [1, 0, 1, 0, 1],
            [1, 0, 1, 1, 1],
        ],
        dtype=bool,
    )
    # By hand, raster order of first cells; diagonal neighbours (e.g. (3,2)-(4,1)) do not connect.
    expected = np.array(
        [
            [1, 1, 0, 0, 2],
            [0, 1, 0, 2, 2],
            [0, 0, 0, 0, 0],
            [3, 0, 4, 0, 5],
            [3, 0, 4, 4, 4],
        ]
    )
    labels = connected_components(grid)
    # (3,4)-(4,4)-(4,3)-(4,2)-(3,2) is one U-shaped component: 4 and 5 must be merged.
    expected[expected == 5] = 4
    np.testing.assert_array_equal(labels, expected)
    # Diagonal only: four separate components.
    diag = np.eye(4, dtype=bool)
    assert connected_components(diag).max() == 4
    assert connected_components(np.zeros((3, 3), bool)).max() == 0
    assert set(np.unique(connected_components(np.ones((6, 6), bool)))) == {1}


def test_regions_map_to_nonsquare_pixels() -> None:
    z = np.zeros((4, 4), np.float32)
    z[1:3, 2:4] = [[0.6, 0.8], [0.5, 0.9]]  # one 2x2 component, 0.5 counts as positive
    z[0, 0] = 0.49  # below the threshold: no region
    z[3, 0] = 0.7  # a single patch
    regions = regions_from_map(z, width=1036, height=885)
    assert len(regions) == 2
    first, second = regions
    # Patch columns 2..3 of 4 -> x in [518, 1036]; rows 1..2 of 4 -> y in [221.25, 663.75].
    assert first.box == pytest.approx((518.0, 221.25, 1036.0, 663.75))
    assert first.score == pytest.approx((0.6 + 0.8 + 0.5 + 0.9) / 4)
    assert first.patches == 4
    assert second.box == pytest.approx((0.0, 663.75, 259.0, 885.0))
    assert second.box_normalised == pytest.approx((0.0, 0.75, 0.25, 1.0))


def test_make_record_decisions() -> None:
    z = np.zeros((14, 4, 4), np.float32)
    z[0, :2, :2] = 1.0  # 1'z = 4
    z[1] = 0.2  # 1'z = 3.2, but no patch >= 0.5
    tau_hat = np.full(14, 3.5)
    tau_hat[1] = 3.0
    rec = make_record(z, tau_hat, width=40, height=20)
    assert rec["present"] == ["Atelectasis", "Cardiomegaly"]
    assert rec["classes"][0]["score"] == pytest.approx(4.0)
    assert rec["classes"][0]["regions"][0]["box"] == [0.0, 0.0, 20.0, 10.0]
    assert rec["classes"][1]["regions"] == []  # present by count, no patch over 0.5
    assert not rec["classes"][2]["present"] and rec["classes"][2]["regions"] == []


# --------------------------------------------------------------------------- real files


def _independent_input(path: Path, size: int) -> torch.Tensor:
    """Training preprocessing written independently of cxrloc: PIL grey, box resize, u8 / 127.5 - 1."""
    im = Image.open(path).convert("L").resize((size, size), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1.0)[None, None]


def test_nonsquare_jpeg_maps_back_to_original(tiny_run, tmp_path: Path) -> None:
    run, model = tiny_run
    summary = predict_files(
        [str(NONSQUARE)], run, json_path=tmp_path / "r.json", save_maps=True, progress=False
    )
    rec = json.loads((tmp_path / "r.json").read_text())
    assert (rec["width"], rec["height"]) == (1036, 885)
    maps = np.load(tmp_path / "r.maps.npy")
    # The maps come from the same preprocessing as the training cache (within a grey level).
    with torch.no_grad():
        z_ref = model(_independent_input(NONSQUARE, 64))[0][0].numpy()
    np.testing.assert_allclose(maps, z_ref, atol=2e-2)
    assert summary.failures == []
    n_present = 0
    for k, cls in enumerate(rec["classes"]):
        assert cls["present"] == (maps[k].sum() >= 20.0)
        if not cls["present"]:
            continue
        n_present += 1
        pos = maps[k] >= 0.5
        assert sum(r["patches"] for r in cls["regions"]) == int(pos.sum())
        for r in cls["regions"]:
            x0, y0, x1, y1 = r["box"]
            # Corners fall on patch borders of the ORIGINAL frame: multiples of 1036/8 and 885/8.
            for v, step in ((x0, 1036 / 8), (x1, 1036 / 8), (y0, 885 / 8), (y1, 885 / 8)):
                assert abs(v / step - round(v / step)) < 1e-3
            c0, c1 = round(x0 / (1036 / 8)), round(x1 / (1036 / 8))
            r0, r1 = round(y0 / (885 / 8)), round(y1 / (885 / 8))
            inside = pos[r0:r1, c0:c1]
            assert inside.sum() >= r["patches"]
            # The box is tight: every border row/column holds a positive patch.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
    assert 0 < n_present < 14, "the test model should make some classes present and others absent"


def test_dicom_fixtures_map_back_to_their_frame(tiny_run, tmp_path: Path) -> None:
    import pydicom

    run, _ = tiny_run
    out = tmp_path / "out"
    files = [DICOM2, DICOM1]
    summary = predict_files([str(f) for f in files], run, out_dir=out, save_maps=True, overlays=False,
                            progress=False)
    assert summary.failures == []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rec = json.loads((out / f"{f.stem}.json").read_text())
        assert (rec["width"], rec["height"]) == (int(ds.Columns), int(ds.Rows))
        maps = np.load(out / f"{f.stem}.maps.npy")
        for k, cls in enumerate(rec["classes"]):
            assert cls["score"] == pytest.approx(float(maps[k].sum()), abs=1e-4)
            for r in cls["regions"]:
                assert all(0.0 <= v <= 1024.0 for v in r["box"])
                assert all(abs(v / 128.0 - round(v / 128.0)) < 1e-6 for v in r["box"])  # 1024 / P=8
    # The two files store the same pixel bytes; MONOCHROME1 is displayed inverted, so the network must see
    # the negative picture. Read through predict's own reader, the pictures are negatives of each other; and
    # the maps differ (with the inversion lost, the same input would give the same maps bit for bit). How
    # much they differ depends on how input-sensitive the tiny test model happens to be, so no size is asserted.
    from cxrloc.data.imageio import read_image

    a1, a2 = (read_image(f).astype(np.float64).ravel() for f in (DICOM1, DICOM2))
    assert np.corrcoef(a1, a2)[0, 1] < -0.99
    m2, m1 = (np.load(out / f"{f.stem}.maps.npy") for f in files)
    assert not np.array_equal(m1, m2)


def test_checkpoint_and_onnx_agree_on_real_image(tiny_run, tmp_path: Path) -> None:
    from cxrloc.inference.export import export_onnx

    run, _ = tiny_run
    image = needs_shared(NIH_IMAGE)
    onnx_path = export_onnx(run, tmp_path / "m.onnx", check_image=image).path
    a = predict_files([str(image)], run, json_path=tmp_path / "a.json", progress=False).records[0]
    b = predict_files([str(image)], onnx_path, json_path=tmp_path / "b.json", progress=False).records[0]
    assert (a["backend"], b["backend"]) == ("torch", "onnx")
    assert a["present"] == b["present"] and a["present"], "need at least one present class to compare regions"
    for ca, cb in zip(a["classes"], b["classes"], strict=True):
        assert ca["present"] == cb["present"]
        assert ca["score"] == pytest.approx(cb["score"], abs=1e-3)
        assert [r["box"] for r in ca["regions"]] == [r["box"] for r in cb["regions"]]
        assert [r["patches"] for r in ca["regions"]] == [r["patches"] for r in cb["regions"]]


# --------------------------------------------------------------------------- CLI and bad inputs


def test_bad_file_among_good_ones(tiny_run, tmp_path: Path) -> None:
    from cxrloc.cli import app

    run, _ = tiny_run
    good = tmp_path / "in"
    good.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (48, 64)), ("b.png", (40, 40))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(good / name)
    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # truncated PNG
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(good), str(tmp_path / "missing.png"), "--model", str(run),
                                      "--out-dir", str(out)])
    assert result.exit_code == 1, result.output
    assert "broken.png" in result.output and "missing.png" in result.output
    assert f"Results saved to {out}" in result.output.replace("\n", "")
    assert (out / "a.json").is_file() and (out / "b.json").is_file()
    assert (out / "a.overlay.png").is_file()
    assert not (out / "broken.json").exists()
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["count"] == 2 and summary["failed"] == 2
    assert {Path(f["image"]).name for f in summary["failures"]} == {"broken.png", "missing.png"}
    assert json.loads((out / "a.json").read_text())["width"] == 64


def test_real_entry_point_exit_codes(tiny_run, tmp_path: Path) -> None:
    run, _ = tiny_run
    img = tmp_path / "x.png"
    Image.fromarray(np.full((32, 48), 90, np.uint8)).save(img)
    cmd = [sys.executable, "-m", "cxrloc", "predict", str(img), "--model", str(run)]
    # The child imports this checkout's cxrloc (the one that wrote the run), whatever is installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    rec = json.loads(ok.stdout)  # one image without --json: the record goes to stdout
    assert [c["name"] for c in rec["classes"]] == list(CLASSES)
    bad = subprocess.run(
        cmd + [str(tmp_path / "nope.png")], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert bad.returncode == 1
    assert "nope.png" in bad.stderr
    wrong = subprocess.run(
        cmd[:-2] + ["--model", str(tmp_path / "no_run")], capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env=env,
    )
    assert wrong.returncode == 2 and "no_run" in wrong.stderr


def test_overlay_classes_gt_draws_only_the_ground_truth_classes(tiny_run, tmp_path: Path) -> None:
    from cxrloc.data.imageio import read_image
    from cxrloc.inference.overlay import gt_boxes_by_image, render_overlay

    run, _ = tiny_run
    csv_path = needs_shared(NIH_DIR / "BBox_List_2017.csv")
    image = needs_shared(NIH_DIR / "images" / "00013118_008.png")
    gts = gt_boxes_by_image(csv_path)[image.name]
    wanted = sorted({CLASSES.index(name) for name, *_ in gts})
    summary = predict_files(
        [str(image)], run, overlay=tmp_path / "gt.png", json_path=tmp_path / "r.json", boxes_csv=csv_path,
        overlay_classes="gt", progress=False,
    )
    assert summary.records and not summary.failures
    present = [k for k, c in enumerate(summary.records[0]["classes"]) if c["present"]]
    assert present != wanted  # otherwise "gt" and "present" would draw the same picture
    maps = predict_files(
        [str(image)], run, json_path=tmp_path / "m.json", save_maps=True, progress=False
    ).records[0]["maps"]
    record = summary.records[0]  # the legend lists the classes called present and their thresholds (tau_hat)
    expected = render_overlay(read_image(image), np.load(maps), wanted, gt_boxes=gts, called=present,
                              thresholds=[c["tau_hat"] for c in record["classes"]],
                              empty_message="No finding called present (1'z >= tau_hat)")
    got = np.asarray(Image.open(tmp_path / "gt.png"))
    assert np.array_equal(got, np.asarray(expected))
    from cxrloc.utils import CxrlocError

    with pytest.raises(CxrlocError, match="--boxes"):
        predict_files([str(image)], run, json_path=tmp_path / "x.json", overlay_classes="gt", progress=False)


# --------------------------------------------------------------------------- hardening (issue 11)


def _png(path: Path, shape: tuple[int, int], value: int = 90, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(value - 40, value + 40, shape, dtype=np.uint8)).save(path)
    return path


def test_thin_images_are_refused_and_the_batch_goes_on(tiny_run, tmp_path: Path) -> None:
    from conftest import one_line, run_cli

    run, _ = tiny_run
    thin = _png(tmp_path / "in" / "thin.png", (4, 3000))
    line = _png(tmp_path / "in" / "line.png", (1, 20000))
    good = _png(tmp_path / "in" / "good.png", (48, 64))
    out = tmp_path / "out"
    code, text = run_cli("predict", tmp_path / "in", "--model", run, "--out-dir", out)
    flat = one_line(text)
    assert code == 1 and "Traceback" not in text, text
    assert f"{thin}: image is 4 x 3000 pixels" in flat and "aspect ratio of 750:1" in flat
    assert f"{line}: image is 1 x 20000 pixels" in flat
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["count"] == 1 and summary["failed"] == 2
    assert [r["image"] for r in summary["predictions"]] == [str(good)]
    assert (out / "good.json").is_file() and (out / "good.overlay.png").is_file()
    assert not (out / "thin.json").exists()


def test_overlay_size_is_bounded_by_pixels() -> None:
    from cxrloc.inference.overlay import MAX_OVERLAY_PIXELS, overlay_scale, render_overlay

    # A strip at the aspect limit (10:1) is enlarged to min_side 512 on its short side: 512 x 5120.
    img = np.full((10, 100), 0.5, np.float32)
    z = np.zeros((14, 8, 8), np.float32)
    strip = render_overlay(img, z, [])  # the X-ray part (the legend panel is beside it)
    assert (int(strip.info["Image-Width"]), strip.size[1]) == (5120, 512)
    # Had it been 4 x 3000, the enlargement would be 128x: 512 x 384,000 pixels. Bounded instead.
    s = overlay_scale(4, 3000)
    assert 4 * 3000 * s * s <= MAX_OVERLAY_PIXELS * 1.0001 and s < 128
    # A large image is drawn below the bound too, keeping its aspect ratio.
    big = np.zeros((3000, 4000), np.float32)
    drawn = render_overlay(big, z, [], min_side=512)
    w, h = int(drawn.info["Image-Width"]), drawn.size[1]
    assert w * h <= MAX_OVERLAY_PIXELS and abs(w / h - 4000 / 3000) < 1e-2


def test_outputs_never_overwrite_each_other(tiny_run, tmp_path: Path) -> None:
    """a/x.png, b/x.png, c/x_2.dcm, d/x.png + d/x.jpg and predictions.png: every input its own outputs."""
    from conftest import run_cli

    from cxrloc.inference.inputs import output_names

    run, _ = tiny_run
    src = tmp_path / "src"
    shapes = {"a/x.png": (40, 48), "b/x.png": (50, 40), "d/x.png": (33, 35), "predictions.png": (61, 64)}
    files = [_png(src / rel, shape, seed=i) for i, (rel, shape) in enumerate(shapes.items())]
    jpg = src / "d" / "x.jpg"
    Image.fromarray(np.full((70, 72), 120, np.uint8)).save(jpg)
    dcm = src / "c" / "x_2.dcm"
    dcm.parent.mkdir(parents=True)
    dcm.write_bytes(DICOM2.read_bytes())
    files += [jpg, dcm]
    names = output_names(files)
    assert names == ["a/x", "b/x", "d/x.png", "predictions.png", "d/x.jpg", "c/x_2"]
    out = tmp_path / "out"
    code, text = run_cli("predict", src, "--model", run, "--out-dir", out, "--save-maps")
    assert code == 0, text
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["count"] == 6 and "predictions" in summary  # the batch summary, not an image's record
    expected_size = {str(src / k): (s[1], s[0]) for k, s in shapes.items()}
    expected_size.update({str(jpg): (72, 70), str(dcm): (1024, 1024)})
    overlays = set()
    for rec in summary["predictions"]:
        assert (rec["width"], rec["height"]) == expected_size[rec["image"]]
        own = json.loads(Path(rec["overlay"][: -len(".overlay.png")] + ".json").read_text())
        assert own["image"] == rec["image"]  # each per-image JSON holds its own image's record
        overlays.add(rec["overlay"])
        assert Image.open(rec["overlay"]).size[0] >= 512
    assert len(overlays) == 6
    assert (out / "predictions.png.json").is_file() and (out / "c" / "x_2.json").is_file()


def test_output_names_edge_cases() -> None:
    from cxrloc.inference.inputs import output_names

    assert output_names([Path("/d/scan.png")]) == ["scan"]
    assert output_names([Path("/d/a/X.png"), Path("/d/a/x.png")]) == ["X.png", "x.png~2"]  # case-blind file systems
    # A DICOM without extension named like the summary, beside an image named predictions.png.
    assert output_names([Path("/d/predictions"), Path("/d/predictions.png")]) == ["predictions~2", "predictions.png"]
    assert output_names([Path("/d/x.png"), Path("/d/x.png.jpg")]) == ["x", "x.png"]


def test_fifo_input_is_refused_not_read(tiny_run, tmp_path: Path) -> None:
    import os

    from conftest import one_line, run_cli

    from cxrloc.data.imageio import ImageReadError, read_image

    run, _ = tiny_run
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    # Held open with bytes in it: a regression that opens the FIFO fails on the message, never hangs.
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    os.write(fd, b"x" * 4096)
    try:
        with pytest.raises(ImageReadError, match="FIFO"):
            read_image(fifo)
        good = _png(tmp_path / "good.png", (40, 40))
        out = tmp_path / "out"
        code, text = run_cli("predict", fifo, good, "--model", run, "--out-dir", out)
        flat = one_line(text)
        assert code == 1 and f"{fifo}: is a FIFO (named pipe), not a regular file" in flat
        assert json.loads((out / "predictions.json").read_text())["count"] == 1
        # In a folder, a FIFO with an image name is reported too, never opened.
        code, text = run_cli("predict", tmp_path, "--model", run, "--out-dir", tmp_path / "out2")
        assert code == 1 and "FIFO" in one_line(text)
    finally:
        os.close(fd)


def test_overlay_format_follows_the_extension(tiny_run, tmp_path: Path) -> None:
    from conftest import one_line, run_cli

    run, _ = tiny_run
    img = _png(tmp_path / "x.png", (40, 48))
    for name, magic in (("o.jpg", b"\xff\xd8\xff"), ("o.JPEG", b"\xff\xd8\xff"), ("o.png", b"\x89PNG")):
        code, text = run_cli("predict", img, "--model", run, "--overlay", tmp_path / name, "--json", tmp_path / "j")
        assert code == 0, text
        assert (tmp_path / name).read_bytes().startswith(magic), name
    code, text = run_cli("predict", img, "--model", run, "--overlay", tmp_path / "o.bmp")
    assert code == 2 and "--overlay" in one_line(text) and ".png or .jpg" in one_line(text)
    assert not (tmp_path / "o.bmp").exists()
    code, text = run_cli("predict", img, "--model", run, "--threads", "0", "--json", tmp_path / "t.json")
    assert code == 2 and "--threads must be at least 1" in one_line(text) and "Traceback" not in text
    assert not (tmp_path / "t.json").exists()


def test_disk_full_mid_batch_records_it_and_goes_on(tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from conftest import one_line, run_cli

    run, _ = tiny_run
    for name in ("a", "b", "c"):
        _png(tmp_path / "in" / f"{name}.png", (40, 44))
    real = Path.write_text

    def full_for_b(self: Path, *args: object, **kwargs: object) -> int:
        if self.name.startswith(".b.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_for_b)
    out = tmp_path / "out"
    code, text = run_cli("predict", tmp_path / "in", "--model", run, "--out-dir", out)
    flat = one_line(text)
    assert code == 1 and "Traceback" not in text
    assert f"cannot write prediction {out / 'b.json'}" in flat and "disk full" in flat
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["count"] == 2 and summary["failed"] == 1
    assert (out / "a.json").is_file() and (out / "c.json").is_file() and not (out / "b.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_onnx_metadata_that_disagrees_with_its_graph(tmp_path: Path) -> None:
    """A hand-made graph (64 px in, 8 x 8 out) whose metadata says image_size 256: one message, no run."""
    import onnx
    from conftest import one_line, run_cli
    from onnx import TensorProto, helper

    from cxrloc.checkpoint import make_meta
    from cxrloc.config import make_config
    from cxrloc.inference.backends import meta_to_props
    from cxrloc.thresholds import Thresholds

    def model(image_size: int) -> Path:
        x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 64, 64])
        z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 14, 8, 8])
        u = helper.make_tensor_value_info("unary_logits", TensorProto.FLOAT, ["batch", 14, 8, 8])
        reps = helper.make_tensor("reps", TensorProto.INT64, [4], [1, 14, 1, 1])
        nodes = [
            helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
            helper.make_node("Tile", ["pooled", "reps"], ["unary_logits"]),
            helper.make_node("Sigmoid", ["unary_logits"], ["z"]),
        ]
        graph = helper.make_graph(nodes, "g", [x], [z, u], initializer=[reps])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        cfg = make_config("tiny")
        meta = make_meta(cfg, Thresholds.initial(cfg.patch_grid).to_json())
        meta["image_size"] = image_size
        for key, value in meta_to_props(meta).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        path = tmp_path / f"m{image_size}.onnx"
        onnx.save(proto, str(path))
        return path

    img = _png(tmp_path / "x.png", (40, 48))
    code, text = run_cli("predict", img, "--model", model(64), "--json", tmp_path / "ok.json")
    assert code == 0, text  # the same graph with honest metadata runs
    code, text = run_cli("predict", img, "--model", model(256), "--json", tmp_path / "bad.json")
    flat = one_line(text)
    assert code == 2 and "Traceback" not in text and len(text.strip().splitlines()) <= 3, text
    assert "m256.onnx" in flat and "image_size=256" in flat and "re-export" in flat
    assert not (tmp_path / "bad.json").exists()


# --------------------------------------------------------------------------- issue 22 (defects 5, 11, 12)


def test_damaged_onnx_models_are_refused_in_one_line(tiny_run, tmp_path: Path) -> None:
    import json

    import onnx
    from conftest import one_line, run_cli
    from onnx import numpy_helper

    from cxrloc.inference.export import export_onnx

    run, _ = tiny_run
    img = _png(tmp_path / "x.png", (40, 48))
    good = export_onnx(run, tmp_path / "m.onnx", check_image=img).path
    proto = onnx.load(str(good))
    init = next(i for i in proto.graph.initializer if numpy_helper.to_array(i).dtype == np.float32
                and numpy_helper.to_array(i).size > 1)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(tmp_path / "nan.onnx"))
    code, text = run_cli("predict", img, "--model", tmp_path / "nan.onnx", "--json", tmp_path / "a.json")
    assert code == 2 and "NaN or infinite" in one_line(text) and init.name in text, text
    assert not (tmp_path / "a.json").exists()
    proto = onnx.load(str(good))
    for entry in proto.metadata_props:
        if entry.key == "classes":
            names = json.loads(entry.value)
            entry.value = json.dumps([names[0], *names[:-1]])  # the first class twice
    onnx.save(proto, str(tmp_path / "dup.onnx"))
    code, text = run_cli("predict", img, "--model", tmp_path / "dup.onnx")
    flat = one_line(text)
    assert code == 2 and "is listed twice" in flat and "lacks classes" not in flat and "re-export" in flat, text


def test_a_non_finite_score_never_reaches_json(tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finite weights can still give NaN (a damaged ONNX graph, an overflow): that image fails, in one line,
    instead of a record with "score": NaN (not JSON) and "present": [] (a broken model read as "no finding")."""
    from conftest import one_line, run_cli

    from cxrloc.inference.backends import TorchPredictor

    run, _ = tiny_run
    a, b = _png(tmp_path / "in" / "a.png", (40, 48)), _png(tmp_path / "in" / "b.png", (40, 48), seed=1)
    real = TorchPredictor.run

    def nan_for_the_second(self, x):
        z, unary = real(self, x)
        z[1:] = np.nan
        return z, unary

    monkeypatch.setattr(TorchPredictor, "run", nan_for_the_second)
    code, text = run_cli("predict", a, b, "--model", run, "--out-dir", tmp_path / "out")
    assert code == 1 and "not finite" in one_line(text), text
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())  # strict JSON: no NaN
    assert summary["count"] == 1 and summary["failures"][0]["image"] == str(b)
    assert not (tmp_path / "out" / "b.json").exists() and (tmp_path / "out" / "a.json").exists()


def test_symlink_loop_input_says_so(tiny_run, tmp_path: Path) -> None:
    from conftest import one_line, run_cli

    run, _ = tiny_run
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "gone.png")
    for link in (loop, dangling):
        code, text = run_cli("predict", link, "--model", run)
        assert "symbolic link that leads nowhere" in one_line(text) and "Traceback" not in text, text


def test_a_name_at_the_file_system_limit_gets_a_short_output_name(tiny_run, tmp_path: Path) -> None:
    from cxrloc.inference.inputs import NAME_MAX, fit_name, output_names

    run, _ = tiny_run
    stem = "x" * (NAME_MAX - len(".png"))  # a 255-byte input name, valid on the file system
    a = _png(tmp_path / "in" / f"{stem}.png", (40, 48))
    b = _png(tmp_path / "in" / f"{stem[:-1]}y.png", (40, 48), seed=1)  # shares its first 250 bytes
    names = output_names([a, b])
    assert len(set(names)) == 2 and all(len((n + ".overlay.png").encode()) <= NAME_MAX for n in names)
    assert fit_name("short") == "short" and fit_name("d/" + "é" * 200).startswith("d/é")
    assert len(fit_name("d/" + "é" * 200).split("/")[1].encode()) <= NAME_MAX - len(".overlay.png")
    from conftest import run_cli

    code, text = run_cli("predict", a, b, "--model", run, "--out-dir", tmp_path / "out")
    assert code == 0, text
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(written) == 5 and sum(p.endswith(".overlay.png") for p in written) == 2
