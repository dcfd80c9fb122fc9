"""Typed training configuration, named presets and ``key=value`` overrides.

One flat dataclass holds every knob of a run, so that ``--set key=value`` can
change any of them and the fully resolved config can be written into the run
folder. Unknown keys are rejected with a close-match suggestion. The presets' values and the
default preset are in :mod:`cxrloc.presets` (``PRESETS`` and ``default_preset`` stay importable
from here).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrloc.classes import CLASSES, check_class_names
from cxrloc.presets import PRESETS
from cxrloc.presets import default_preset as default_preset
from cxrloc.utils import CxrlocError

OUTPUT_STRIDES: tuple[int, ...] = (8, 16, 32)
"""Supported backbone output strides (``Config.output_stride``)."""


@dataclass
class Config:
    """Every setting of a cxrloc model and training run.

    The defaults are the paper's (the ``paper`` preset); other presets change a few fields.
    """

    # --- network -------------------------------------------------------------
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    """The class list, in output order: one output map per class. Not a setting: ``train`` takes it
    from the prepared folder (``classes.json``; NIH's 14 for NIH data and for configs written
    before class lists existed)."""
    arch: str = "resnet50"
    """Backbone: ``resnet18``, ``resnet34`` or ``resnet50`` (torchvision layout)."""
    width: int = 64
    """Channels of the backbone stem (64 is torchvision's; smaller makes narrow test models)."""
    antialias: bool = True
    """Blur-pool before every downsampling of the backbone (Zhang 2019)."""
    blur_size: int = 3
    """Size of the binomial anti-aliasing filter (3 to 5)."""
    output_stride: int = 32
    """Subsampling of the backbone: 32 (the paper's ResNet), 16 or 8 (the last one or two stages at
    stride 1, for small inputs whose stride-32 map would be far coarser than the P x P grid)."""
    init: str = "imagenet"
    """``scratch``, ``imagenet`` (torchvision weights) or a path to a weights file."""
    image_size: int = 512
    """Input side in pixels; must match the prepared cache (resized on the fly otherwise)."""
    patch_grid: int = 20
    """P: the output is a P x P grid of patches per class."""
    head_channels: int = 512
    """Channels of the first of the two head convolutions."""
    init_prob: float = 0.0
    """Initial patch probability set by the head's last bias (0: 1/P^2, one expected positive patch)."""
    head_coords: bool = False
    """Give the patch head each patch's (x, y) position as two extra channels (CoordConv); not in the paper."""
    position_bias: bool = False
    """A learned per-class, per-patch logit offset, started from the training boxes' coverage; not in the paper."""
    crf: bool = True
    """Use the PAC-CRF on the patch grid."""
    crf_window: int = 19
    """Side of the PAC-CRF window Omega, in patches (odd)."""
    crf_iterations: int = 5
    """Mean-field iterations."""
    crf_feature_dim: int = 16
    """Channels of the guidance features f of the CRF's second branch."""
    crf_branch_channels: int = 32
    """Width of the CRF's small image branch."""

    # --- loss ----------------------------------------------------------------
    loss: str = "threshold"
    """``threshold`` (eq. 12), ``threshold-sigmoid`` (eqs. 5 and 8) or ``li2018``."""
    lambda_ann: float = 70.0
    """Weight of annotated terms (lambda_ann)."""
    gamma: str = "per-class"
    """Negative-example weight gamma of eq. 11: ``per-class``, ``global`` or ``none`` (gamma = 1)."""
    sigmoid_temperature: float = 1.0
    """Temperature (in patches) of the sigmoids of ``threshold-sigmoid``."""
    li2018_rescale: bool = False
    """Li et al.'s heuristic: squeeze patch probabilities into [0.98, 1] (faithful reproduction)."""
    rho_hat_box_fraction: float = 0.0
    """When > 0, the initial rho_hat of each class is this share of its median box size (patches);
    0 keeps the default of 1 patch (see cxrloc.thresholds.Thresholds.initial)."""
    image_bce: float = 0.0
    """Weight of a BCE on the image score ``1'z`` of every class without a box in the image (logit
    ``(1'z - m) / s`` from tau_hat and rho_hat; ``cxrloc.training.losses.image_score_bce_terms``).
    0: off (the paper's losses only); not in the paper."""
    thresholds_file: str = ""
    """A ``thresholds.json`` to start from (empty: initial values from the training boxes)."""

    # --- optimisation --------------------------------------------------------
    epochs: int = 30
    batch_size: int = 48
    optimizer: str = "adam"
    """``adam`` (L2 weight decay as in the paper) or ``adamw`` (decoupled)."""
    lr: float = 1e-3
    lr_decay: float = 0.95
    """Exponential learning-rate decay per epoch."""
    weight_decay: float = 0.01
    accum_steps: int = 1
    """Gradient-accumulation micro-batches per optimizer step (``batch_size`` is the global batch)."""
    joint_lr_factor: float = 0.1
    """Stage ``joint``: learning rate = ``lr * joint_lr_factor`` (fine-tuning both parts)."""
    crf_epochs: int = 5
    """``--stage all``: epochs of its ``crf`` stage (0 skips it; so does ``crf=false``)."""
    joint_epochs: int = 5
    """``--stage all``: epochs of its ``joint`` stage (0 skips it)."""
    annotated_per_batch: int = 0
    """Minimum annotated images in every batch (0: their share of the training set, at least 1)."""
    repeat_threshold: float = 0.0
    """Repeat-factor sampling of annotated images (Gupta et al. 2019): an image whose rarest boxed
    class is on a share f of the annotated images is shown max(1, sqrt(repeat_threshold / f)) times
    per epoch on average (0: off, every image once); not in the paper."""
    val_fraction: float = 0.1
    """Share of the fold's training patients held out for model selection (never test images)."""
    val_seed: int = -1
    """Seed of the validation carve-out (-1: ``seed``). Fix it to compare or ensemble runs of several
    training seeds on the same validation images."""
    augment: bool = True
    aug_scale: float = 0.1
    """Random zoom range (+/-) of the augmentation; boxes move with the pixels."""
    aug_translate: float = 0.05
    """Random shift range (+/-, fraction of the side)."""
    hflip: bool = False
    """Left-right flips (off: anatomy is not symmetric)."""

    # --- execution -----------------------------------------------------------
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    amp: str = "auto"
    """``auto`` (bf16 on CUDA when supported, fp16 otherwise; bf16 on a CPU with native bf16 instructions,
    AVX-512 BF16 or AMX, float32 on other CPUs), ``bf16``, ``fp16`` (CUDA only) or ``off`` (float32).
    The PAC-CRF's mean field and the losses are float32 in every case (``cxrloc.precision``)."""
    channels_last: str = "auto"
    """Channels-last memory format: ``auto`` (on CUDA and on CPUs with oneDNN, i.e. x86), ``on`` or
    ``off``. Configs written before it took a value read ``true`` as ``auto`` and ``false`` as ``off``."""
    compile: bool = False
    """Run the training forward through ``torch.compile`` (default mode). Off by default: compiling
    takes minutes at the first step and its gain is to be measured on each GPU (``bench/bench_train.py
    --compile``); results agree with eager to float rounding, not bit for bit."""
    sync_bn: bool = True
    """Under multi-GPU DDP on CUDA, convert BatchNorm to SyncBatchNorm (statistics over the global batch)."""
    workers: int = 2
    seed: int = 0
    deterministic: bool = False
    """Deterministic algorithms (bit-exact resume on CPU)."""
    eval_threshold: float = 0.1
    """T of the validation localization accuracy used for model selection."""
    max_steps_per_epoch: int = 0
    """Stop an epoch after this many steps (0: full epoch); for quick tests."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes carried into the run folder (not used by the code)."""

    def __post_init__(self) -> None:
        # channels_last was a bool (true: the default, then CUDA only): old config.json files and
        # checkpoints keep loading, and --set channels_last=true/false keeps working.
        if isinstance(self.channels_last, bool):
            self.channels_last = "auto" if self.channels_last else "off"
        elif isinstance(self.channels_last, str) and self.channels_last.strip().lower() in _BOOL_WORDS:
            self.channels_last = _BOOL_WORDS[self.channels_last.strip().lower()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """A validated config from a dict (``config.json``, a checkpoint's ``config``).

        Raises:
            CxrlocError: not a dict, an unknown key, a value of the wrong type or out of bounds.
        """
        if not isinstance(data, dict):
            raise CxrlocError(f"A config must be a JSON object of settings, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CxrlocError(_unknown_key_message(unknown[0], names))
        cfg = cls(**data)
        validate(cfg)
        return cfg


_BOOL_WORDS: dict[str, str] = {
    "true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off",
}
"""Boolean spellings a ``--set channels_last=...`` may still use (it was a bool)."""




def _unknown_key_message(key: str, names: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(names), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown config key {key!r}.{hint} Valid keys: {', '.join(sorted(names - {'extra', 'classes'}))}."


def _parse_value(key: str, raw: str, current: Any) -> Any:
    kind = type(current)
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is dict:
            return json.loads(raw)
        return raw
    except (ValueError, json.JSONDecodeError):
        raise CxrlocError(
            f"Bad value for '{key}': {raw!r} is not a valid {kind.__name__}."
        ) from None


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (strings are parsed by type)."""
    names = {f.name for f in dataclasses.fields(Config)}
    data = cfg.to_dict()
    items: list[tuple[str, Any]]
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise CxrlocError(f"Bad --set {item!r}: use key=value, e.g. --set epochs=5.")
            key, raw = item.split("=", 1)
            items.append((key.strip(), raw))
    for key, value in items:
        if key not in names:
            raise CxrlocError(_unknown_key_message(key, names))
        if key == "classes" and isinstance(value, str):
            raise CxrlocError(
                "--set classes: the class list comes from the prepared folder (its classes.json), not from an option."
            )
        if isinstance(value, str) and not isinstance(data[key], str):
            value = _parse_value(key, value, data[key])
        data[key] = value
    new = Config(**data)
    validate(new)
    return new


def make_config(preset: str = "paper", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build the config of a named preset with optional ``key=value`` overrides.

    Example:
        >>> make_config("tiny", ["epochs=1"]).epochs
        1
    """
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, list(PRESETS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise CxrlocError(f"Unknown preset '{preset}'.{hint} Presets: {', '.join(PRESETS)}.")
    cfg = apply_overrides(Config(), PRESETS[preset])
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


_CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ("resnet18", "resnet34", "resnet50"),
    "loss": ("threshold", "threshold-sigmoid", "li2018"),
    "gamma": ("per-class", "global", "none"),
    "optimizer": ("adam", "adamw"),
    "device": ("auto", "cpu", "cuda"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "channels_last": ("auto", "on", "off"),
}


SIZE_BOUNDS: dict[str, tuple[int, int]] = {
    "width": (1, 256),
    "image_size": (32, 4096),
    "patch_grid": (1, 256),
    "head_channels": (1, 4096),
    "crf_window": (1, 63),
    "crf_iterations": (0, 50),
    "crf_feature_dim": (1, 256),
    "crf_branch_channels": (1, 1024),
}
"""Bounds of the fields that size the network: a ResNet-50 of width 256 is 16 times the paper's
(about 1.6 GB of weights); beyond these a config is a typo or a damaged file, and building it
would try to allocate terabytes."""


def _check_types(cfg: Config) -> None:
    """Every field holds a value of its declared type (a damaged ``config.json`` may not)."""
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING:
            kind = type(f.default)
        else:
            kind = type(f.default_factory())  # type: ignore[misc]
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise CxrlocError(f"Invalid {f.name}={value!r}: expected a value of type {kind.__name__}.")
        if kind is float and not math.isfinite(value):
            raise CxrlocError(f"Invalid {f.name}={value!r}: it must be a finite number.")


def validate(cfg: Config) -> None:
    """Raise ``CxrlocError`` naming the first invalid field of ``cfg``."""
    _check_types(cfg)
    check_class_names(cfg.classes, "config 'classes'")
    for key, (lo, hi) in SIZE_BOUNDS.items():
        value = getattr(cfg, key)
        if not lo <= value <= hi:
            raise CxrlocError(f"Invalid {key}={value}: use {lo} to {hi}.")
    if cfg.patch_grid > cfg.image_size:
        raise CxrlocError(f"Invalid patch_grid={cfg.patch_grid}: at most image_size={cfg.image_size}.")
    for key, choices in _CHOICES.items():
        value = getattr(cfg, key)
        if value not in choices:
            raise CxrlocError(f"Invalid {key}={value!r}: choose one of {', '.join(choices)}.")
    if cfg.crf_window % 2 == 0 or cfg.crf_window < 1:
        raise CxrlocError(f"Invalid crf_window={cfg.crf_window}: it must be a positive odd number.")
    if cfg.output_stride not in OUTPUT_STRIDES:
        raise CxrlocError(f"Invalid output_stride={cfg.output_stride}: use 32 (the paper), 16 or 8.")
    if not 2 <= cfg.blur_size <= 7:
        raise CxrlocError(f"Invalid blur_size={cfg.blur_size}: use 2 to 7 (the paper uses 3 to 5).")
    if cfg.patch_grid < 1 or cfg.image_size < 32:
        raise CxrlocError("patch_grid must be >= 1 and image_size >= 32.")
    if cfg.val_seed < -1:
        raise CxrlocError(f"Invalid val_seed={cfg.val_seed}: use -1 (same as seed) or a seed >= 0.")
    if not 0 <= cfg.val_fraction < 1:
        raise CxrlocError(f"Invalid val_fraction={cfg.val_fraction}: use a value in [0, 1).")
    if cfg.batch_size < 1:
        raise CxrlocError(f"Invalid batch_size={cfg.batch_size}: it must be >= 1.")
    if cfg.crf_epochs < 0 or cfg.joint_epochs < 0:
        raise CxrlocError(f"crf_epochs and joint_epochs must be >= 0 (0 skips that stage of --stage all), got "
                          f"{cfg.crf_epochs} and {cfg.joint_epochs}.")
    if cfg.epochs < 1:
        raise CxrlocError(f"Invalid epochs={cfg.epochs}: train at least 1 epoch (with 0 nothing would be trained).")
    if cfg.accum_steps < 1 or cfg.batch_size % cfg.accum_steps:
        raise CxrlocError(
            f"Invalid accum_steps={cfg.accum_steps}: it must be >= 1 and divide batch_size={cfg.batch_size}."
        )
    if not 0.0 <= cfg.repeat_threshold <= 1.0:
        raise CxrlocError(f"Invalid repeat_threshold={cfg.repeat_threshold}: use 0 (off) to 1.")
    if not 0 <= cfg.annotated_per_batch <= cfg.batch_size:
        raise CxrlocError(f"Invalid annotated_per_batch={cfg.annotated_per_batch}: use 0..batch_size.")
    if cfg.image_bce < 0:
        raise CxrlocError(f"Invalid image_bce={cfg.image_bce}: use 0 (off) or a positive weight.")
    if cfg.lr <= 0 or not 0 < cfg.lr_decay <= 1 or cfg.weight_decay < 0 or cfg.joint_lr_factor <= 0:
        raise CxrlocError("lr and joint_lr_factor must be > 0, lr_decay in (0, 1], weight_decay >= 0.")
    if cfg.aug_scale < 0 or cfg.aug_scale >= 1 or cfg.aug_translate < 0 or cfg.aug_translate >= 0.5:
        raise CxrlocError("aug_scale must be in [0, 1) and aug_translate in [0, 0.5).")
    if cfg.workers < 0 or cfg.max_steps_per_epoch < 0:
        raise CxrlocError("workers and max_steps_per_epoch must be >= 0.")
    _check_loss_ranges(cfg)


LOSS_RANGES: dict[str, tuple[float, float, str]] = {
    "lambda_ann": (0.0, math.inf, "a weight >= 0 (a negative one rewards wrong boxes)"),
    "sigmoid_temperature": (0.0, math.inf, "a temperature > 0"),
    "rho_hat_box_fraction": (0.0, math.inf, "a share >= 0 (0: the default of 1 patch)"),
    "init_prob": (0.0, 1.0, "a probability in [0, 1) (0: 1/P^2)"),
    "eval_threshold": (0.0, 1.0, "a threshold T in (0, 1]"),
}
"""Allowed ranges of the loss and selection settings: (low, high, what the value is, for the message)."""


def _check_loss_ranges(cfg: Config) -> None:
    for key, (lo, hi, what) in LOSS_RANGES.items():
        value = getattr(cfg, key)
        low_ok = value > lo if key in ("sigmoid_temperature", "eval_threshold") else value >= lo
        high_ok = value < hi if key == "init_prob" else value <= hi
        if not (low_ok and high_ok):
            raise CxrlocError(f"Invalid {key}={value!r}: it must be {what}; set it with --set {key}=VALUE.")


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the fully resolved config as JSON (atomically)."""
    from cxrloc.utils import write_json_atomic

    return write_json_atomic(path, cfg.to_dict())


def load_config(path: str | Path) -> Config:
    """Read a config written by ``save_config``."""
    from cxrloc.utils import read_json

    return Config.from_dict(read_json(path, "config"))
