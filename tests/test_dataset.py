"""Training data: validation split by patient, box-aware augmentation, targets and the batch sampler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrloc.classes import CLASSES
from cxrloc.config import make_config
from cxrloc.data.dataset import (
    _SALT_AUG,
    AffineParams,
    AnnotatedBatchSampler,
    LocalizationDataset,
    draw_affine,
    repeat_factors,
    split_train_val,
    transform_boxes,
    warp_batch,
    warp_image,
)
from cxrloc.data.prepared import Prepared
from cxrloc.utils import CxrlocError


@pytest.fixture()
def prepared(tmp_path: Path, prepared_writer: Callable[..., Path]) -> Prepared:
    return Prepared.open(prepared_writer(tmp_path / "prep"))


def test_validation_split_is_by_patient_and_holds_annotated_images(prepared: Prepared) -> None:
    for fold in (0, 1):
        lists = prepared.fold(fold)
        train, val = split_train_val(prepared, fold, 0.25, seed=3)
        assert sorted(train + val) == sorted(lists["train_annotated"] + lists["train_unannotated"])
        assert not set(val) & set(lists["test"]) and not set(train) & set(lists["test"])
        pat = prepared.manifest["patient_id"]
        assert not set(pat[train]) & set(pat[val]), "a patient on both sides"
        assert any(prepared.is_annotated(i) for i in val), "no annotated image for localization accuracy"
        assert any(prepared.is_annotated(i) for i in train)
        assert split_train_val(prepared, fold, 0.25, seed=3) == (train, val)
    assert split_train_val(prepared, 0, 0.0, seed=3)[1] == []


def test_shift_moves_pixels_and_boxes_by_hand_worked_amount() -> None:
    img = torch.full((1, 64, 64), -1.0)
    img[:, 16:32, 8:24] = 1.0  # box x in [8, 24), y in [16, 32) px -> (0.125, 0.25, 0.375, 0.5)
    params = AffineParams(scale=1.0, shift_x=0.25, shift_y=-0.125)
    out = warp_image(img, params)
    rows, cols = np.nonzero(out[0].numpy() > 0.5)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 23, 24, 39)
    assert transform_boxes([(3, 0.125, 0.25, 0.375, 0.5)], params) == [(3, 0.375, 0.125, 0.625, 0.375)]
    # zoom 2 about the centre: the box (0.375..0.625) becomes (0.25..0.75); one leaving the image is clipped
    zoom = transform_boxes([(0, 0.375, 0.375, 0.625, 0.625), (1, 0.0, 0.0, 0.2, 0.2)], AffineParams(scale=2.0))
    assert zoom == [(0, 0.25, 0.25, 0.75, 0.75)]
    flip = transform_boxes([(2, 0.1, 0.2, 0.3, 0.4)], AffineParams(flip=True))
    assert np.allclose(flip[0][1:], (0.7, 0.2, 0.9, 0.4))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_augmentation_keeps_boxes_on_their_pixels(seed: int) -> None:
    """The bright rectangle's pixels after warping lie where the transformed box says (within 1 px)."""
    cfg = make_config("tiny", ["aug_scale=0.3", "aug_translate=0.2", "hflip=true"])
    rng = np.random.default_rng(seed)
    from cxrloc.data.dataset import draw_affine

    params = draw_affine(rng, cfg)
    img = torch.full((1, 64, 64), -1.0)
    img[:, 20:36, 12:40] = 1.0
    out = warp_image(img, params)[0].numpy()
    (k, x0, y0, x1, y1), = transform_boxes([(5, 12 / 64, 20 / 64, 40 / 64, 36 / 64)], params)
    rows, cols = np.nonzero(out > 0)  # bilinear: > 0 means more than half covered by the rectangle
    assert abs(cols.min() - x0 * 64) <= 1 and abs(cols.max() + 1 - x1 * 64) <= 1
    assert abs(rows.min() - y0 * 64) <= 1 and abs(rows.max() + 1 - y1 * 64) <= 1


def _old_warp(image: torch.Tensor, params: AffineParams) -> torch.Tensor:
    """The per-item warp of cxrloc 0.1.0 (written out independently): affine_grid + grid_sample of one image."""
    s = params.scale
    fx = -1.0 if params.flip else 1.0
    theta = torch.tensor(
        [[fx / s, 0.0, -fx * 2.0 * params.shift_x / s], [0.0, 1.0 / s, -2.0 * params.shift_y / s]],
        dtype=image.dtype,
    ).unsqueeze(0)
    grid = torch.nn.functional.affine_grid(theta, [1, *image.shape], align_corners=False)
    return torch.nn.functional.grid_sample(
        image.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=False
    )[0]


def test_batch_warp_is_the_per_item_warp_bit_for_bit(prepared: Prepared) -> None:
    """Items carry their warp; the batch warp on the training device gives, image by image, exactly what
    warping each item alone gave (the augmentation of 0.1.0), and the items' box targets follow it."""
    cfg = make_config("tiny", ["aug_scale=0.3", "aug_translate=0.2", "hflip=true"])
    ids = prepared.fold(0)["train_annotated"]
    ds = LocalizationDataset(prepared, ids, cfg)
    items = [ds[(i, 3)] for i in range(6)]
    assert all("theta" in it for it in items)
    warped = warp_batch(torch.stack([it["image"] for it in items]), torch.stack([it["theta"] for it in items]))
    for i, it in enumerate(items):
        params = ds.params(i, 3)
        raw = torch.from_numpy(prepared.image(ids[i]).astype(np.float32) / 127.5 - 1)[None]
        assert torch.equal(it["image"], raw)  # the item itself is not warped
        assert torch.equal(warped[i], _old_warp(raw, params))
        x, boxes = ds.sample(i, 3)
        assert torch.equal(x, warped[i]) and boxes == transform_boxes(prepared.boxes(ids[i]), params)
    assert "theta" not in LocalizationDataset(prepared, ids, make_config("tiny", ["augment=false"]))[0]


class _OneImage:
    """The part of ``Prepared`` the dataset reads, for one hand-made cached image with one box."""

    def __init__(self, image: np.ndarray, box: tuple[float, float, float, float]) -> None:
        self.root = Path("one-image")
        self.images = image[None]
        self._box = box

    def cache_index(self, image_id: str) -> int:
        return 0

    def labels(self, image_id: str) -> np.ndarray:
        return np.zeros(len(CLASSES), dtype=np.uint8)

    def boxes(self, image_id: str) -> list[tuple[int, float, float, float, float]]:
        return [(5, *self._box)]


@pytest.mark.parametrize("image_size", [64, 32])
def test_augmented_items_keep_each_box_on_its_pixels(image_size: int) -> None:
    """Through LocalizationDataset: the bright rectangle drawn into the cached image lies, after the
    augmentation, where the item's transformed box says (within one output pixel), for 40 draws."""
    u8 = np.full((64, 64), 10, dtype=np.uint8)
    u8[20:36, 12:40] = 250  # rows 20..35, columns 12..39: the box (12, 20, 40, 36) / 64 exactly
    cfg = make_config("tiny", ["aug_scale=0.3", "aug_translate=0.2", "hflip=true", f"image_size={image_size}",
                               "patch_grid=4"])
    ds = LocalizationDataset(_OneImage(u8, (12 / 64, 20 / 64, 40 / 64, 36 / 64)), ["a"], cfg)
    s = image_size
    flips = 0
    for epoch in range(40):
        x, boxes = ds.sample(0, epoch)
        assert x.shape == (1, s, s)
        (k, x0, y0, x1, y1), = boxes
        rows, cols = np.nonzero(x[0].numpy() > 0)  # bilinear: > 0 means more than half inside the rectangle
        assert abs(cols.min() - x0 * s) <= 1 and abs(cols.max() + 1 - x1 * s) <= 1, (epoch, boxes)
        assert abs(rows.min() - y0 * s) <= 1 and abs(rows.max() + 1 - y1 * s) <= 1, (epoch, boxes)
        flips += draw_affine(np.random.default_rng([cfg.seed, epoch, 0, _SALT_AUG]), cfg).flip
    assert 5 < flips < 35  # both orientations were exercised


def test_item_targets_and_reproducible_augmentation(prepared: Prepared) -> None:
    cfg = make_config("tiny", ["augment=false"])  # tiny: 64 px, P = 8
    ids = prepared.fold(0)["train_annotated"] + prepared.fold(0)["train_unannotated"]
    ds = LocalizationDataset(prepared, ids, cfg)
    pos = ids.index("00008_000.png")
    (k, x0, y0, x1, y1), = prepared.boxes(ids[pos])
    item = ds[pos]
    assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
    expected = prepared.image(ids[pos]).astype(np.float32) / 127.5 - 1
    assert torch.equal(item["image"][0], torch.from_numpy(expected))
    assert item["annotated"].tolist() == [j == k for j in range(14)]
    assert item["labels"][k] == 1
    # Box mask by hand: patch (r, c) belongs iff its centre ((c + .5)/8, (r + .5)/8) is inside the box.
    centres = (np.arange(8) + 0.5) / 8
    want = ((centres[:, None] >= y0) & (centres[:, None] <= y1)) & ((centres[None] >= x0) & (centres[None] <= x1))
    assert np.array_equal(item["box_mask"][k].numpy().astype(bool), want)
    assert item["box_mask"].sum() == want.sum()
    unann = ds[ids.index(prepared.fold(0)["train_unannotated"][0])]
    assert not unann["annotated"].any() and unann["box_mask"].sum() == 0

    aug = LocalizationDataset(prepared, ids, make_config("tiny", ["aug_scale=0.2", "aug_translate=0.1"]))
    a1, a2, b1 = aug[(pos, 1)], aug[(pos, 1)], aug[(pos, 2)]
    assert torch.equal(a1["theta"], a2["theta"]) and torch.equal(a1["box_mask"], a2["box_mask"])
    assert not torch.equal(a1["theta"], b1["theta"]), "augmentation does not change with the epoch"
    assert not torch.equal(aug.sample(pos, 1)[0], aug.sample(pos, 2)[0])


def test_resize_on_the_fly_is_an_area_mean(prepared: Prepared) -> None:
    cfg = make_config("tiny", ["augment=false", "image_size=32", "patch_grid=4"])
    ds = LocalizationDataset(prepared, prepared.fold(0)["train_annotated"], cfg)
    u8 = prepared.image(ds.image_ids[0]).astype(np.float64) / 127.5 - 1
    want = u8.reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.allclose(ds[0]["image"][0].numpy(), want, atol=1e-5)


def test_sampler_covers_every_image_and_puts_annotated_in_every_batch() -> None:
    annotated = np.zeros(103, dtype=bool)
    annotated[[3, 17, 50, 51, 90, 101, 102]] = True  # 7 annotated, 96 unannotated
    s = AnnotatedBatchSampler(annotated, 8, seed=5)
    assert s.per_batch_ann == 1  # round(8 * 7 / 103) = 1
    assert len(s) == max(-(-96 // 7), 7) == 14
    for epoch in (0, 1):
        s.set_epoch(epoch)
        batches = list(s)
        flat = [i for b in batches for i, e in b if e == epoch]
        assert len(flat) == 14 * 8 and all(len(b) == 8 for b in batches)
        assert set(flat) == set(range(103)), "an image was not seen in the epoch"
        assert all(sum(annotated[i] for i, _ in b) >= 1 for b in batches)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(AnnotatedBatchSampler(annotated, 8, seed=5)) == first, "order is not a function of (seed, epoch)"
    assert [i for b in list(s) for i, _ in b] != [i for b in first for i, _ in b]

    forced = AnnotatedBatchSampler(annotated, 8, annotated_per_batch=3, seed=5)
    assert all(sum(annotated[i] for i, _ in b) >= 3 for b in forced)
    only_ann = AnnotatedBatchSampler(np.ones(20, dtype=bool), 8, seed=1)
    assert len(only_ann) == 3 and {i for b in only_ann for i, _ in b} == set(range(20))


def test_sampler_ranks_split_each_global_batch() -> None:
    annotated = np.arange(50) % 5 == 0
    whole = list(AnnotatedBatchSampler(annotated, 8, seed=2))
    parts = [list(AnnotatedBatchSampler(annotated, 8, seed=2, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(parts[0], parts[1], strict=True)] == whole
    assert len(list(AnnotatedBatchSampler(annotated, 8, seed=2, max_batches=2))) == 2


def test_repeat_factors_by_hand() -> None:
    # 4 annotated items: classes {0}, {0}, {0, 5}, {5}... and one without boxes.
    boxes = [
        [(0, 0.1, 0.1, 0.2, 0.2)],
        [(0, 0.1, 0.1, 0.2, 0.2)],
        [(0, 0.1, 0.1, 0.2, 0.2), (5, 0.5, 0.5, 0.6, 0.6)],
        [(5, 0.5, 0.5, 0.6, 0.6), (5, 0.7, 0.7, 0.8, 0.8)],
        [],
    ]
    # f_0 = 3/4, f_5 = 2/4; t = 1: r = max(1, sqrt(1/f)) -> class 0: 1.1547, class 5: 1.4142.
    r = repeat_factors(boxes, 1.0)
    assert np.allclose(r, [np.sqrt(4 / 3), np.sqrt(4 / 3), np.sqrt(2), np.sqrt(2), 1.0])
    assert np.allclose(repeat_factors(boxes, 0.5), [1.0, 1.0, 1.0, 1.0, 1.0])  # sqrt(0.5/0.5) = 1, sqrt(0.5/0.75) < 1
    assert np.all(repeat_factors(boxes, 0.0) == 1.0)


def test_sampler_repeat_factors_oversample_and_keep_every_image() -> None:
    annotated = np.ones(10, dtype=bool)
    rf = np.ones(10)
    rf[3] = 3.0  # exactly 3 copies per epoch
    rf[7] = 1.5  # 1 or 2 copies, 1.5 on average
    s = AnnotatedBatchSampler(annotated, 4, seed=3, repeat_factors=rf)
    counts7 = []
    for epoch in range(200):
        s.set_epoch(epoch)
        flat = [i for b in s for i, _ in b]
        # The epoch's stream: 8 singles, item 3 three times, item 7 once or twice: 12 or 13 items,
        # so 3 or 4 batches of 4 (a short last batch is filled from a fresh permutation).
        assert len(flat) in (12, 16) and len(s) == len(flat) // 4
        assert set(flat) == set(range(10)), "repeat-factor sampling dropped an image"
        assert flat.count(3) >= 3
        counts7.append(1 if len(flat) == 12 else 2)
    assert 1.4 < np.mean(counts7) < 1.6
    with pytest.raises(CxrlocError):
        AnnotatedBatchSampler(annotated, 4, repeat_factors=np.full(10, 0.5))
    # Without factors > 1 the order is the plain sampler's (runs without the option are unchanged).
    plain = list(AnnotatedBatchSampler(annotated, 4, seed=3))
    assert list(AnnotatedBatchSampler(annotated, 4, seed=3, repeat_factors=np.ones(10))) == plain


def test_to_network_range_is_the_cache_convention() -> None:
    from cxrloc.data.prepared import to_network_range

    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = to_network_range(u8)
    assert x.dtype == np.float32 and x.shape == (16, 16)
    assert x[0, 0] == -1.0 and x[-1, -1] == 1.0
    want = torch.from_numpy(u8.astype(np.float32)) / 127.5 - 1.0  # the conversion it replaced
    assert np.array_equal(x, want.numpy())
    assert np.allclose(x, u8.astype(np.float64) / 127.5 - 1.0, atol=1e-7)


def _bilinear_2x(a: np.ndarray) -> np.ndarray:
    """Bilinear upsampling by 2 with half-pixel centres, worked by hand: output pixel 2i (2i + 1) is
    3/4 of input pixel i and 1/4 of pixel i - 1 (i + 1), edges repeated; rows, then columns."""

    def along(v: np.ndarray, axis: int) -> np.ndarray:
        v = np.moveaxis(v, axis, 0)
        before = np.concatenate([v[:1], v[:-1]])
        after = np.concatenate([v[1:], v[-1:]])
        out = np.empty((2 * v.shape[0], *v.shape[1:]))
        out[0::2], out[1::2] = 0.75 * v + 0.25 * before, 0.75 * v + 0.25 * after
        return np.moveaxis(out, 0, axis)

    return along(along(a, 0), 1)


def test_training_and_inference_see_the_same_pixels_from_a_smaller_cache(prepared: Prepared) -> None:
    """A 64 px cache with image_size=128: the training set and batched inference (evaluation,
    fit-thresholds, calibrate) upsample the same way, so a real network gives the same z."""
    from cxrloc.inference.batch import predict_prepared
    from cxrloc.model.net import build_model

    assert prepared.size == 64
    cfg = make_config("tiny", ["augment=false", "image_size=128"])
    ids = prepared.fold(0)["train_annotated"][:3]
    ds = LocalizationDataset(prepared, ids, cfg)
    x_train = torch.stack([ds[i]["image"] for i in range(len(ids))])
    assert x_train.shape == (3, 1, 128, 128)
    for i, image_id in enumerate(ids):
        want = _bilinear_2x(prepared.image(image_id).astype(np.float64) / 127.5 - 1)
        np.testing.assert_allclose(x_train[i, 0].numpy(), want, atol=1e-5)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(x_train)
    z_train = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
    z_infer = predict_prepared(model, prepared, ids, image_size=128, progress=False)
    np.testing.assert_allclose(z_infer, z_train, atol=1e-6)
