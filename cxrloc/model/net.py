"""The full cxrloc network: anti-aliased ResNet + patch head (unary) and an optional PAC-CRF."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from cxrloc.classes import CLASSES
from cxrloc.config import Config
from cxrloc.model.backbone import create_backbone
from cxrloc.model.head import PatchHead
from cxrloc.model.pac_crf import PacCrf
from cxrloc.thresholds import ThresholdBuffers


class UnaryModel(nn.Module):
    """Backbone + patch head: image ``(B, 1, S, S)`` -> unary logits ``(B, K, P, P)``."""

    def __init__(self, backbone: nn.Module, head: PatchHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class CXRLocNet(nn.Module):
    """Patch-grid localization network.

    ``forward(x)`` with ``x`` of shape ``(B, 1, S, S)`` in [-1, 1] returns ``(z, unary_logits)``,
    both ``(B, K, P, P)`` float32: ``z`` the CRF output probabilities (``sigmoid(unary_logits)``
    without a CRF) and the base model's logits.

    Attributes:
        unary: backbone + patch head (the base model of Li et al.).
        crf: the PAC-CRF, or ``None``.
        thresholds: :class:`~cxrloc.thresholds.ThresholdBuffers` (tau, rho, tau_hat, rho_hat).
        classes: the K class names, in output order.
    """

    def __init__(
        self, unary: UnaryModel, crf: PacCrf | None, patch_grid: int, classes: Sequence[str] = CLASSES
    ) -> None:
        super().__init__()
        self.unary = unary
        self.crf = crf
        self.patch_grid = patch_grid
        self.classes: tuple[str, ...] = tuple(classes)
        self.thresholds = ThresholdBuffers(patch_grid, self.classes)
        self.use_crf = True
        """When False, ``forward`` skips the CRF (``z = sigmoid(unary_logits)``): the unary
        training stage sets it, since its loss never reads the CRF's output."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unary_logits = self.unary(x).float()
        if self.crf is None or not self.use_crf:
            z = torch.sigmoid(unary_logits)
        else:
            z = self.crf(x, unary_logits).float()
        return z, unary_logits

    def unary_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the base model (trained in stage ``unary``)."""
        return self.unary.parameters()

    def crf_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the CRF (trained in stage ``crf``); empty without a CRF."""
        return iter(()) if self.crf is None else self.crf.parameters()


def build_model(cfg: Config) -> CXRLocNet:
    """Build the network described by ``cfg`` (classes, arch, width, antialias, blur_size, init, head, CRF).

    Example:
        >>> from cxrloc.config import make_config
        >>> net = build_model(make_config("tiny"))
        >>> z, u = net(torch.zeros(2, 1, 64, 64))
        >>> tuple(z.shape)
        (2, 14, 8, 8)
    """
    backbone, channels = create_backbone(cfg.arch, cfg.width, cfg.antialias, cfg.blur_size, cfg.init, cfg.output_stride)
    num_classes = len(cfg.classes)
    head = PatchHead(
        channels, cfg.patch_grid, cfg.head_channels, num_classes, init_prob=cfg.init_prob, coords=cfg.head_coords,
        position_bias=cfg.position_bias,
    )
    crf = None
    if cfg.crf:
        crf = PacCrf(
            num_classes,
            cfg.image_size,
            cfg.patch_grid,
            window=cfg.crf_window,
            iterations=cfg.crf_iterations,
            feature_dim=cfg.crf_feature_dim,
            branch_channels=cfg.crf_branch_channels,
        )
    return CXRLocNet(UnaryModel(backbone, head), crf, cfg.patch_grid, cfg.classes)
