"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrloc.checkpoint import make_meta, save_checkpoint
from cxrloc.config import make_config
from cxrloc.model.net import build_model
from cxrloc.thresholds import Thresholds


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` when no CUDA device is present (``bench/gpu_check.sh`` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def save_tiny_run(
    root: Path,
    *,
    bias_span: float,
    seed: int,
    tau_hat: float | np.ndarray,
    thresholds_in_meta: bool = True,
) -> tuple[Path, torch.nn.Module]:
    """A ``tiny`` model with non-trivial outputs saved as ``root/fold_0/checkpoints/best.pt``.

    The head's last bias spans ``-bias_span..bias_span`` over the classes, so some classes have
    many patches with z >= 0.5 and others none; the CRF compatibility is random (``seed``) so the
    CRF changes the unaries; ``tau_hat`` (patches, one value or one per class) decides presence.
    """
    cfg = make_config("tiny")
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bias = model.unary.head.conv2.bias
        bias.copy_(torch.linspace(-bias_span, bias_span, bias.numel()))
        model.crf.compat.copy_(0.3 * torch.randn(model.crf.compat.shape, generator=gen))
    th = Thresholds.initial(cfg.patch_grid)
    th.tau_hat[:] = tau_hat
    model.thresholds.set(th)
    meta = make_meta(cfg, th.to_json() if thresholds_in_meta else None)
    save_checkpoint(
        root / "fold_0" / "checkpoints" / "best.pt",
        {"config": cfg.to_dict(), "model": model.state_dict(), "meta": meta},
    )
    return root, model


@pytest.fixture(scope="session")
def tiny_run_factory() -> Callable[..., tuple[Path, torch.nn.Module]]:
    """:func:`save_tiny_run`, for tests that need a saved run without training one."""
    return save_tiny_run
