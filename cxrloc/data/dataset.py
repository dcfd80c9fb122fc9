"""Training data: validation carve-out, the dataset with box-aware augmentation, and the batch sampler.

- :func:`split_train_val` carves a validation part out of a fold's TRAINING images, by patient,
  so that model selection never sees the fold's test images.
- :class:`LocalizationDataset` turns cached uint8 images into network inputs in [-1, 1] with
  labels ``y``, the per-class annotation flags ``a`` and the box masks ``b`` on the P x P grid.
  The random zoom / shift (and optional flip) moves the boxes together with the pixels; its
  random numbers are a pure function of ``(seed, epoch, index)``, so a resumed run sees exactly
  the images an uninterrupted run would have seen, whatever the number of loader workers. Items
  carry the warp's matrix (``theta``) and the already moved box targets; the pixels are warped by
  the training step, a whole batch at once on the training device (:func:`warp_batch`, one
  ``affine_grid`` + ``grid_sample``), so loader workers only read and convert the cache.
- :class:`AnnotatedBatchSampler` guarantees annotated images in every batch and every annotated
  image in every epoch; its order is a pure function of ``(seed, epoch)`` and it splits each
  global batch between distributed ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from cxrloc.config import Config
from cxrloc.data.boxes import Box
from cxrloc.data.network_input import cache_to_input
from cxrloc.data.prepared import Prepared
from cxrloc.geometry import union_patch_mask
from cxrloc.utils import CxrlocError

MIN_BOX_SIDE: float = 1e-3
"""A box whose clipped side is shorter than this (fraction of the image) after augmentation is dropped."""

_SALT_AUG = 0x5EED_A06
_SALT_SAMPLER = 0x5A3B_1E5
_SALT_VAL = 0x7A1_1D


def split_train_val(prepared: Prepared, fold: int, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split fold ``fold``'s training images into training and validation ids, by patient.

    Patients are split in two groups, those with at least one annotated training image and the
    others; ``round(val_fraction * n)`` patients of each group (at least one annotated patient
    when ``val_fraction > 0``) go to validation, chosen by ``seed``. No patient has images on both
    sides and the fold's test images are never used.

    Args:
        prepared: an opened ``Prepared`` folder.
        fold: fold index.
        val_fraction: share of patients held out, in [0, 1).
        seed: random seed of the choice.

    Returns:
        ``(train_ids, val_ids)``, each in manifest order.
    """
    prepared.check_splits()  # the check prepare runs: an edited splits.json is checked before training
    lists = prepared.fold(fold)
    annotated = set(lists["train_annotated"])
    train_all = list(dict.fromkeys(lists["train_annotated"] + lists["train_unannotated"]))
    if not train_all:
        raise CxrlocError(f"Fold {fold} of {prepared.root / 'splits.json'} has no training images.")
    if val_fraction <= 0:
        return train_all, []
    patients = prepared.manifest.loc[train_all, "patient_id"].to_numpy()
    patient_of = dict(zip(train_all, patients.tolist(), strict=True))
    with_ann = sorted({patient_of[i] for i in train_all if i in annotated})
    without = sorted({patient_of[i] for i in train_all} - set(with_ann))
    rng = np.random.default_rng([seed, fold, _SALT_VAL])
    val_patients: set[Any] = set()
    for group, at_least in ((with_ann, 1), (without, 0)):
        n = min(len(group), max(at_least, round(val_fraction * len(group))))
        if group and n >= len(group) and group is with_ann and len(group) > 1:
            n = len(group) - 1  # keep annotated images for training too
        order = rng.permutation(len(group))
        val_patients.update(group[j] for j in order[:n])
    val = [i for i in train_all if patient_of[i] in val_patients]
    train = [i for i in train_all if patient_of[i] not in val_patients]
    if not train:
        raise CxrlocError(f"val_fraction={val_fraction} leaves no training image in fold {fold}; lower it, e.g. "
                          "--set val_fraction=0 (no validation images: the best checkpoint is then the one of "
                          "lowest training loss).")
    return train, val


@dataclass(frozen=True)
class AffineParams:
    """A zoom about the image centre, then a shift; optionally a left-right flip first.

    In normalised coordinates ``p in [0, 1]``: ``p_out = (flip(p_in) - 0.5) * scale + 0.5 + shift``.
    """

    scale: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    flip: bool = False


def draw_affine(rng: np.random.Generator, cfg: Config) -> AffineParams:
    """Draw augmentation parameters from ``rng`` within ``cfg``'s ranges."""
    scale = 1.0 + float(rng.uniform(-cfg.aug_scale, cfg.aug_scale))
    sx, sy = (float(v) for v in rng.uniform(-cfg.aug_translate, cfg.aug_translate, size=2))
    flip = bool(rng.random() < 0.5) if cfg.hflip else False
    return AffineParams(scale=scale, shift_x=sx, shift_y=sy, flip=flip)


def transform_boxes(boxes: Sequence[Box], params: AffineParams) -> list[Box]:
    """Move boxes with :class:`AffineParams`, clip them to the image, drop those that leave it."""
    out: list[Box] = []
    for k, x0, y0, x1, y1 in boxes:
        if params.flip:
            x0, x1 = 1.0 - x1, 1.0 - x0
        nx0, nx1 = ((v - 0.5) * params.scale + 0.5 + params.shift_x for v in (x0, x1))
        ny0, ny1 = ((v - 0.5) * params.scale + 0.5 + params.shift_y for v in (y0, y1))
        nx0, nx1, ny0, ny1 = (min(max(v, 0.0), 1.0) for v in (nx0, nx1, ny0, ny1))
        if nx1 - nx0 >= MIN_BOX_SIDE and ny1 - ny0 >= MIN_BOX_SIDE:
            out.append((int(k), nx0, ny0, nx1, ny1))
    return out


def affine_theta(params: AffineParams) -> torch.Tensor:
    """The ``(2, 3)`` float32 matrix of ``F.affine_grid`` that applies :class:`AffineParams`.

    ``grid_sample`` maps each output pixel to its source; with ``align_corners=False`` the grid's
    -1 and 1 are the outer edges of the image, the same frame as the normalised box coordinates.
    Inverse map in [-1, 1] coordinates: ``g_in = flip((g_out - 2 t) / s)``.
    """
    s = params.scale
    fx = -1.0 if params.flip else 1.0
    return torch.tensor(
        [[fx / s, 0.0, -fx * 2.0 * params.shift_x / s], [0.0, 1.0 / s, -2.0 * params.shift_y / s]],
        dtype=torch.float32,
    )


def warp_batch(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp a batch ``(B, C, S, S)`` by per-image matrices ``(B, 2, 3)`` (:func:`affine_theta`).

    Bilinear, edge pixels repeated beyond the image. Training applies it on the training device to
    whole batches, so data-loader workers only read and convert the cache (``cxrloc train``).
    """
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def warp_image(image: torch.Tensor, params: AffineParams) -> torch.Tensor:
    """Apply :class:`AffineParams` to one image ``(1, S, S)``: :func:`warp_batch` of a batch of one."""
    return warp_batch(image.unsqueeze(0), affine_theta(params).unsqueeze(0))[0]


def targets_from_boxes(
    boxes: Sequence[Box], labels: np.ndarray, patch_grid: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels ``y``, annotation flags ``a`` and box masks ``b`` of one image.

    ``a_k = 1`` iff a box of class k is present; ``b_k`` is the union of the patch masks of the
    class's boxes (:func:`cxrloc.geometry.union_patch_mask`); a boxed class is always positive.

    Returns:
        ``(y (K,) float32, a (K,) bool, b (K, P, P) float32)``.
    """
    y = np.asarray(labels, dtype=np.float32).copy()
    a = np.zeros(y.shape[0], dtype=bool)
    mask = np.zeros((y.shape[0], patch_grid, patch_grid), dtype=np.float32)
    by_class: dict[int, list[tuple[float, float, float, float]]] = {}
    for k, x0, y0, x1, y1 in boxes:
        by_class.setdefault(int(k), []).append((x0, y0, x1, y1))
    for k, rects in by_class.items():
        a[k] = True
        y[k] = 1.0
        mask[k] = union_patch_mask(rects, patch_grid)
    return y, a, mask


class LocalizationDataset(Dataset):
    """Cached images of a prepared folder as training items.

    An item is ``{"image": (1, S, S) float32 in [-1, 1], "labels": (K,) float32, "annotated":
    (K,) bool, "box_mask": (K, P, P) float32, "index": int}`` where ``S = cfg.image_size`` and
    ``P = cfg.patch_grid``. With augmentation the item also holds ``"theta"`` ``(2, 3)``: the image
    is NOT warped yet (the training step warps whole batches on its device with :func:`warp_batch`,
    so loader workers only read the cache), while labels and box masks already describe the warped
    image. :meth:`sample` gives one warped image and its boxes. Keys may be a position ``i``
    (epoch = :attr:`epoch`) or a pair ``(i, epoch)`` as yielded by :class:`AnnotatedBatchSampler`;
    the augmentation of item ``i`` in epoch ``e`` depends only on ``(cfg.seed, e, i)``.

    Args:
        prepared: an opened ``Prepared`` folder.
        image_ids: the images, in item order.
        cfg: image_size, patch_grid, augment, aug_scale, aug_translate, hflip and seed are used.
        augment: apply the random affine (``cfg.augment`` must also be on).
    """

    def __init__(self, prepared: Prepared, image_ids: Sequence[str], cfg: Config, *, augment: bool = True) -> None:
        self.prepared = prepared
        self.image_ids = list(image_ids)
        self.image_size = cfg.image_size
        self.patch_grid = cfg.patch_grid
        self.augment = bool(augment and cfg.augment)
        self.cfg = cfg
        self.seed = cfg.seed
        self.epoch = 0
        self.cache_index = np.array([prepared.cache_index(i) for i in self.image_ids], dtype=np.int64)
        missing = [i for i, c in zip(self.image_ids, self.cache_index, strict=True) if c < 0]
        if missing:
            raise CxrlocError(
                f"{len(missing)} training images are not in the cache of {prepared.root} (first: {missing[0]}); "
                "run `cxrloc prepare` again."
            )
        self.labels = (
            np.stack([prepared.labels(i) for i in self.image_ids])
            if self.image_ids
            else np.zeros((0, len(prepared.classes)))
        )
        self.boxes: list[list[Box]] = [prepared.boxes(i) for i in self.image_ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer keys."""
        self.epoch = int(epoch)

    def is_annotated(self) -> np.ndarray:
        """``(N,)`` bool: the item has at least one box."""
        return np.array([bool(b) for b in self.boxes], dtype=bool)

    def _image(self, index: int) -> torch.Tensor:
        """The network input ``(1, S, S)`` of item ``index`` before augmentation."""
        return cache_to_input(self.prepared.images[self.cache_index[index]], self.image_size)[0].contiguous()

    def params(self, index: int, epoch: int) -> AffineParams | None:
        """The augmentation of item ``index`` in ``epoch`` (``None`` without augmentation)."""
        if not self.augment:
            return None
        return draw_affine(np.random.default_rng([self.seed, epoch, index, _SALT_AUG]), self.cfg)

    def sample(self, index: int, epoch: int) -> tuple[torch.Tensor, list[Box]]:
        """The augmented network input ``(1, S, S)`` and boxes of item ``index`` in ``epoch`` (one image;
        training items carry the warp instead, see :meth:`__getitem__`)."""
        params = self.params(index, epoch)
        x, boxes = self._image(index), list(self.boxes[index])
        if params is None:
            return x, boxes
        return warp_image(x, params), transform_boxes(boxes, params)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), self.epoch)
        params = self.params(index, epoch)
        boxes = list(self.boxes[index]) if params is None else transform_boxes(self.boxes[index], params)
        y, a, mask = targets_from_boxes(boxes, self.labels[index], self.patch_grid)
        item = {
            "image": self._image(index),
            "labels": torch.from_numpy(y),
            "annotated": torch.from_numpy(a),
            "box_mask": torch.from_numpy(mask),
            "index": index,
        }
        if params is not None:
            item["theta"] = affine_theta(params)
        return item


def repeat_factors(boxes: Sequence[Sequence[Box]], threshold: float) -> np.ndarray:
    """Repeat factors of repeat-factor sampling (Gupta et al., LVIS, CVPR 2019), per item.

    ``f_c`` is the share of the annotated items with a box of class ``c``; an item's factor is
    ``max(1, max over its box classes of sqrt(threshold / f_c))`` (1 for an item without boxes and
    for every item when ``threshold <= 0``). Items whose boxes belong to rare classes are shown
    more often per epoch; every item still appears at least once.
    """
    n = len(boxes)
    out = np.ones(n, dtype=np.float64)
    present = [sorted({int(r[0]) for r in bxs}) for bxs in boxes]
    n_ann = sum(1 for p in present if p)
    if threshold <= 0 or n_ann == 0:
        return out
    freq = np.zeros(max(k for p in present for k in p) + 1)
    for p in present:
        freq[p] += 1
    freq /= n_ann
    for i, p in enumerate(present):
        if p:
            out[i] = max(1.0, float(np.max(np.sqrt(threshold / freq[p]))))
    return out


class AnnotatedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches with annotated images in every batch; this rank's share of each global batch.

    With ``A`` annotated and ``U`` unannotated items, global batch ``B`` and ``a`` annotated per
    batch (``annotated_per_batch``, or their proportional share ``round(B |A| / (|A| + |U|))``,
    at least 1), an epoch has ``max(ceil(|U| / (B - a)), ceil(|A| / a))`` batches (``ceil(|A| / B)``
    without unannotated items). Each batch takes ``a`` items from the annotated stream and
    ``B - a`` from the unannotated stream; each stream is a permutation drawn from
    ``(seed, epoch)``, followed by fresh permutations when it runs out before the epoch ends.
    So every image is seen at least once per epoch, every batch has exactly ``B`` items and
    ``>= a`` annotated ones, and the order depends only on ``(seed, epoch)``.

    With ``repeat_factors`` (:func:`repeat_factors`), the annotated stream of an epoch holds each
    annotated item ``floor(r_i)`` times plus once more with probability ``r_i - floor(r_i)``, drawn
    from ``(seed, epoch)``; the number of batches then follows that stream's length.

    Under DDP, rank ``r`` of ``W`` receives items ``[r B/W, (r+1) B/W)`` of each global batch.
    Items are yielded as ``(index, epoch)`` so that workers know the augmentation epoch.
    """

    def __init__(
        self,
        annotated: np.ndarray,
        batch_size: int,
        *,
        annotated_per_batch: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int = 0,
        repeat_factors: np.ndarray | None = None,
    ) -> None:
        annotated = np.asarray(annotated, dtype=bool)
        self.ann = np.flatnonzero(annotated)
        self.unann = np.flatnonzero(~annotated)
        if len(annotated) == 0:
            raise CxrlocError("No training images: the fold's training lists are empty.")
        self.repeat = None
        if repeat_factors is not None:
            rf = np.asarray(repeat_factors, dtype=np.float64)
            if rf.shape != annotated.shape or not np.all(np.isfinite(rf)) or np.any(rf[annotated] < 1.0):
                raise CxrlocError("repeat_factors must be one finite value >= 1 per annotated item.")
            if np.any(rf[annotated] > 1.0):
                self.repeat = rf[self.ann]
        if batch_size % world_size:
            raise CxrlocError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size}).")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_batches = max_batches
        self.epoch = 0
        n_a, n_u = len(self.ann), len(self.unann)
        if n_a == 0:
            self.per_batch_ann = 0
        elif n_u == 0:
            self.per_batch_ann = batch_size
        else:
            share = annotated_per_batch or max(1, round(batch_size * n_a / (n_a + n_u)))
            self.per_batch_ann = min(share, batch_size - 1) if batch_size > 1 else 1
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def _num_batches(self, n_a: int) -> int:
        a, b, n_u = self.per_batch_ann, self.batch_size, len(self.unann)
        counts = []
        if n_u:
            counts.append(math.ceil(n_u / (b - a)) if b > a else 0)
        if n_a and a:
            counts.append(math.ceil(n_a / a))
        return max(1, max(counts))

    @property
    def num_batches(self) -> int:
        """Global batches in the current epoch (varies by epoch only under repeat-factor sampling)."""
        return len(self.global_batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Order of the next iteration (call before every epoch; a function of ``(seed, epoch)``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return min(self.num_batches, self.max_batches) if self.max_batches else self.num_batches

    def annotated_items(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """The annotated items of ``epoch``: each once, or, under repeat-factor sampling,
        ``floor(r_i)`` times plus once more with probability ``r_i - floor(r_i)`` (so at least once)."""
        if self.repeat is None:
            return self.ann
        whole = np.floor(self.repeat)
        copies = whole.astype(np.int64) + (rng.random(len(self.repeat)) < (self.repeat - whole))
        return np.repeat(self.ann, copies)

    @staticmethod
    def _stream(items: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        if count == 0 or len(items) == 0:
            return np.zeros(0, dtype=np.int64)
        reps = math.ceil(count / len(items))
        return np.concatenate([items[rng.permutation(len(items))] for _ in range(reps)])[:count]

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All global batches of ``epoch`` (the same on every rank)."""
        if self._cache is not None and self._cache[0] == epoch:
            return list(self._cache[1])
        rng = np.random.default_rng([self.seed, epoch, _SALT_SAMPLER])
        ann_items = self.annotated_items(epoch, rng)
        a, b = self.per_batch_ann, self.batch_size
        n = self._num_batches(len(ann_items))
        ann = self._stream(ann_items, a * n, rng).reshape(n, a)
        unann = self._stream(self.unann, (b - a) * n, rng).reshape(n, b - a)
        batches = np.concatenate([ann, unann], axis=1)
        # Mix annotated and unannotated items inside a batch so that ranks and micro-batches get both.
        for row in batches:
            rng.shuffle(row)
        self._cache = (epoch, list(batches))
        return list(batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.batch_size // self.world_size
        lo = self.rank * per_rank
        for batch in self.global_batches(self.epoch)[: len(self)]:
            yield [(int(i), self.epoch) for i in batch[lo : lo + per_rank]]
