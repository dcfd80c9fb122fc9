"""`cxrloc pretrain`: NT-Xent by hand, the views, the cache of real images, exact resume, and `train` starting
from the written weights."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrloc.config import make_config
from cxrloc.data.imageio import read_image, resize_square, to_uint8
from cxrloc.data.pretrain_augment import ViewSpec, crop_affines, gaussian_blur, make_views
from cxrloc.model.backbone import ResNetBackbone
from cxrloc.training import pretrain as pt
from cxrloc.training.pretrain import PretrainOptions, build_simclr, nt_xent, pretrain
from cxrloc.utils import CxrlocError
from tests.conftest import REAL_FIXTURES, SHARED_DATA, needs_shared, one_line, run_cli

DATA = SHARED_DATA
TINY = ["--preset", "tiny", "--batch-size", "8", "--crop", "32", "--quiet"]


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """8 NIH PNGs (512 px) and 8 JPEGs of cxr-pretrain (other hospitals, not square), in two folders."""
    nih = sorted(needs_shared(DATA / "nih" / "images").glob("*.png"))[:8]
    other = sorted(needs_shared(DATA / "cxr-pretrain" / "pediatric").rglob("*.jp*g"))[:4]
    other += sorted(needs_shared(DATA / "cxr-pretrain" / "hannover").rglob("*.jp*g"))[:4]
    root = tmp_path_factory.mktemp("pretrain_images")
    dirs = [root / "nih", root / "other" / "deeper"]
    for folder, files in zip(dirs, (nih, other), strict=True):
        folder.mkdir(parents=True)
        for f in files:
            shutil.copy(f, folder / f.name)
    return [root / "nih", root / "other"]


def test_nt_xent_matches_a_hand_computation() -> None:
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[3.0, 3.0], [-1.0, 0.0]])
    t = 0.5
    views = [v / np.linalg.norm(v) for v in np.array([[1, 0], [0, 2], [3, 3], [-1, 0]], dtype=float)]
    total = 0.0
    for i in range(4):
        partner = (i + 2) % 4
        logits = {j: float(views[i] @ views[j]) / t for j in range(4) if j != i}
        total += -logits[partner] + math.log(sum(math.exp(v) for v in logits.values()))
    assert float(nt_xent(z1, z2, t)) == pytest.approx(total / 4, rel=1e-6)
    # Identical, mutually orthogonal pairs: each view's partner has logit 1/t, the others 0.
    eye = torch.eye(3)
    assert float(nt_xent(eye, eye, 1.0)) == pytest.approx(-1 + math.log(math.e + 4), rel=1e-6)


def test_views_are_seeded_in_range_and_inside_the_image() -> None:
    images = torch.randint(0, 256, (6, 64, 64), dtype=torch.uint8)
    spec = ViewSpec(crop=32)
    a = make_views(images, spec, torch.Generator().manual_seed(3))
    b = make_views(images, spec, torch.Generator().manual_seed(3))
    c = make_views(images, spec, torch.Generator().manual_seed(4))
    assert a.shape == (6, 1, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    theta = crop_affines(1000, ViewSpec(min_scale=0.3, max_rotation=0.0), torch.Generator().manual_seed(0))
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1].abs()
    assert float((w * h).min()) >= 0.3 * 3 / 4 - 1e-6 and float((w * h).max()) <= 1 + 1e-6
    # Without rotation every crop lies inside the image: |centre| + half side <= 1 (normalised coordinates).
    assert float((theta[:, 0, 2].abs() + w).max()) <= 1 + 1e-6 and float((theta[:, 1, 2].abs() + h).max()) <= 1 + 1e-6
    flat = torch.full((3, 1, 16, 16), 0.4)
    assert torch.allclose(gaussian_blur(flat, ViewSpec(blur_prob=1.0), torch.Generator()), flat, atol=1e-6)
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[0, 0, 7, 7] = 1.0
    blurred = gaussian_blur(impulse, ViewSpec(blur_prob=1.0), torch.Generator().manual_seed(1))
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-5) and float(blurred.max()) < 1.0


def test_loss_goes_down_on_a_repeated_batch(real_dirs: list[Path], tmp_path: Path) -> None:
    from cxrloc.data.pretrain_images import build_cache, find_pretrain_images

    cfg = make_config("tiny")
    cache = build_cache(find_pretrain_images(real_dirs), tmp_path / "cache", 64, progress=False)
    assert len(cache.paths) == 16
    torch.manual_seed(0)
    opts = PretrainOptions(batch_size=8)
    model = build_simclr(cfg, opts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.from_numpy(np.array(cache.images[:8]))
    g = torch.Generator().manual_seed(0)
    views = torch.cat([make_views(batch, ViewSpec(crop=32), g), make_views(batch, ViewSpec(crop=32), g)])
    losses = []
    for _ in range(8):
        loss = nt_xent(*model(views).split(8), opts.temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses


def test_cache_reads_png_jpeg_and_dicom_as_prepare_does(real_dirs: list[Path], tmp_path: Path) -> None:
    dicom = REAL_FIXTURES / "cr_monochrome1_jpeg.dcm"
    folder = tmp_path / "dicom"
    folder.mkdir()
    shutil.copy(dicom, folder / "scan")  # extensionless: found by its DICOM header
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "w.pt"
    code, text = run_cli("pretrain", *real_dirs, folder, "--out", out, "--epochs", "1", *TINY)
    assert code == 0, text
    from cxrloc.data.pretrain_images import build_cache, find_pretrain_images

    paths = find_pretrain_images([*real_dirs, folder])
    cache = build_cache(paths, tmp_path / "w-pretrain" / "cache", 64, progress=False)  # reused, not rebuilt
    assert len(cache.paths) == 17 and cache.paths[-1] == folder / "scan"
    for i in (0, 12, 16):  # a NIH PNG, a non-square JPEG, the MONOCHROME1 DICOM (inverted)
        expected = to_uint8(resize_square(read_image(cache.paths[i]), 64))
        assert np.abs(cache.images[i].astype(int) - expected.astype(int)).max() <= 1


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_resume_gives_the_weights_of_an_uninterrupted_run(
    real_dirs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = ["--set", "deterministic=true"]
    full = tmp_path / "full.pt"
    assert run_cli("pretrain", *real_dirs, "--out", full, "--epochs", "2", *TINY, *sets)[0] == 0
    history = (tmp_path / "full-pretrain" / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss") and len(history) == 3

    stopped = tmp_path / "stopped.pt"
    save = pt._save_epoch

    def save_then_die(run: pt._Run, epochs_done: int) -> None:
        save(run, epochs_done)
        raise KeyboardInterrupt  # killed right after epoch 1 was written

    monkeypatch.setattr(pt, "_save_epoch", save_then_die)
    opts = PretrainOptions(epochs=2, batch_size=8, views=ViewSpec(crop=32))
    with pytest.raises(KeyboardInterrupt):
        pretrain(real_dirs, stopped, preset="tiny", overrides=["deterministic=true"], opts=opts, progress=False)
    monkeypatch.setattr(pt, "_save_epoch", save)
    after_one = _weights(stopped)
    assert not torch.equal(after_one["conv1.weight"], _weights(full)["conv1.weight"])
    code, text = run_cli("pretrain", *real_dirs, "--out", stopped, "--epochs", "2", *TINY, *sets)
    assert code == 2 and "already holds a pretraining run; pass --resume" in one_line(text)
    code, text = run_cli("pretrain", *real_dirs, "--out", stopped, "--epochs", "2", "--resume", *TINY, *sets,
                         "--lr", "0.01")
    assert code == 2 and "--resume: lr was 0.001" in one_line(text)
    code, text = run_cli("pretrain", *real_dirs, "--out", stopped, "--epochs", "2", "--resume", *TINY, *sets,
                         "--set", "width=4")
    assert code == 2 and "--resume: width was 8" in one_line(text)
    # A checkpoint written by an earlier version: a config field it did not know yet (image_bce) and the
    # old boolean channels_last must not block the resume; fields pretraining does not use are not compared.
    last = tmp_path / "stopped-pretrain" / "last.pt"
    old = torch.load(last, map_location="cpu", weights_only=True)
    del old["config"]["image_bce"]
    old["config"]["channels_last"] = True
    torch.save(old, last)
    assert run_cli("pretrain", *real_dirs, "--out", stopped, "--epochs", "2", "--resume", *TINY, *sets)[0] == 0
    a, b = _weights(full), _weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(tmp_path / "stopped-pretrain" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2


def test_train_starts_from_the_weights(real_dirs: list[Path], tmp_path: Path, prepared_writer) -> None:
    """Antialiased, output stride 16 as in the cpu preset: the file holds the backbone `train` builds."""
    weights = tmp_path / "backbone.pt"
    backbone = ["--set", "output_stride=16", "--set", "antialias=true"]
    assert run_cli("pretrain", *real_dirs, "--out", weights, "--epochs", "1", *TINY, *backbone)[0] == 0
    state = _weights(weights)
    plain = ResNetBackbone("resnet18", 8, 16).state_dict()
    assert state.keys() == plain.keys()
    meta = torch.load(weights, map_location="cpu", weights_only=True)["cxrloc_pretrain"]
    assert meta["method"] == "simclr" and meta["backbone"]["output_stride"] == 16 and meta["images"] == 16

    prep = prepared_writer(tmp_path / "prep", n_images=16, n_annotated=8)
    run = tmp_path / "run"
    code, text = run_cli(
        "train", prep, "--out", run, "--preset", "tiny", "--epochs", "1", "--quiet", *backbone,
        "--set", f"init={weights}", "--set", "max_steps_per_epoch=1", "--set", "lr=1e-9", "--set", "weight_decay=0",
        "--set", "device=cpu",
    )
    assert code == 0, text
    trained = torch.load(run / "fold_0" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    for key in ("conv1.weight", "layer3.0.conv2.weight", "layer4.1.conv2.weight"):
        # One Adam step of lr 1e-9 moves a weight by about 1e-9: it must still be the file's.
        assert torch.allclose(trained[f"unary.backbone.{key}"], state[key], atol=1e-6), key
        assert not torch.allclose(plain[key], state[key], atol=1e-3)


def test_unreadable_images_are_skipped_with_a_warning(real_dirs: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    jpeg = next(real_dirs[1].rglob("*.jp*g"))
    (bad / "truncated.jpg").write_bytes(jpeg.read_bytes()[:300])
    (bad / "text.png").write_text("this is not a PNG")
    code, text = run_cli("pretrain", *real_dirs, bad, "--out", tmp_path / "w.pt", "--epochs", "1",
                         "--preset", "tiny", "--batch-size", "8", "--crop", "32")
    assert code == 0, text
    message = one_line(text)
    assert "Warning: skipped 2 unreadable image file(s) of 18" in message
    assert "text.png: not a PNG, JPEG or DICOM file" in message
    skipped = (tmp_path / "w-pretrain" / "cache" / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 2 and str(bad / "truncated.jpg") in skipped[1]
    assert "SimCLR on 16 images" in message

    code, text = run_cli("pretrain", bad, "--out", tmp_path / "w2.pt", *TINY)
    assert code == 2
    assert "Error: none of the 2 image files could be read" in one_line(text)
    assert "Traceback" not in text
    code, text = run_cli("pretrain", real_dirs[0], "--out", tmp_path / "w3.pt", *TINY[:2], "--batch-size", "64")
    assert code == 2 and "only 8 readable images for --batch-size 64" in one_line(text)


def test_help_and_bad_options(tmp_path: Path) -> None:
    code, text = run_cli("pretrain", "--help", env={"COLUMNS": "200"})
    assert code == 0 and "cxrloc pretrain ~/xrays/hospital_a" in text and "--set init=runs/backbone.pt" in text
    (tmp_path / "imgs").mkdir()
    code, text = run_cli("pretrain", tmp_path / "imgs", "--out", tmp_path / "w.pt", "--resume")
    assert code == 2 and "--resume: " in one_line(text) and "last.pt not found" in one_line(text)
    code, text = run_cli("pretrain", tmp_path / "imgs", "--out", tmp_path / "w.pt")
    assert code == 2 and "no image file found" in one_line(text)
    code, text = run_cli("pretrain", tmp_path / "nowhere", "--out", tmp_path / "w.pt")
    assert code == 2 and "image folder not found" in one_line(text)
    code, text = run_cli("pretrain", tmp_path / "imgs", "--out", tmp_path / "w.pt", "--crop", "4")
    assert code == 2 and "--crop must be between 8 and 4096" in one_line(text)
    assert not (tmp_path / "w.pt").exists() and not (tmp_path / "w-pretrain").exists()


@pytest.mark.parametrize("native", [False, True])
def test_precision_follows_train_rule(native: bool, monkeypatch) -> None:
    """``amp=auto`` picks bf16 exactly where ``train`` does (a CPU with native bf16 dot products), so a
    CPU with AVX-512 but no AVX-512 BF16 (where oneDNN emulates bf16, and torch's own
    ``_is_mkldnn_bf16_supported`` says yes) trains in float32; ``fp16`` is refused with its fix. The
    CPU's answer is set both ways, so the rule is tested whatever this machine has."""
    import cxrloc.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert pt.autocast_dtype(make_config("tiny", {"amp": "auto"}), cpu) == (torch.bfloat16 if native else None)
    assert pt.autocast_dtype(make_config("tiny", {"amp": "off"}), cpu) is None
    assert pt.autocast_dtype(make_config("tiny", {"amp": "bf16"}), cpu) == torch.bfloat16
    with pytest.raises(CxrlocError, match="amp=bf16"):
        pt.autocast_dtype(make_config("tiny", {"amp": "fp16"}), cpu)
