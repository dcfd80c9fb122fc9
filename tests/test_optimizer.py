"""The optimizer: torch's fused Adam/AdamW on CPU and CUDA (issue 20), checked against Adam's update
written out by hand, and old checkpoints (written by the per-tensor loop) resuming into it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxrloc.config import make_config
from cxrloc.training.runtime import fused_ok
from cxrloc.training.stage_setup import make_optimizer


def _adamw_by_hand(p: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float, decoupled: bool) -> torch.Tensor:
    """Adam (Kingma & Ba, alg. 1) with bias correction, eps = 1e-8, betas (0.9, 0.999), in float64;
    ``decoupled`` = AdamW (Loshchilov & Hutter: p -= lr * wd * p first), else L2 added to the gradient."""
    p = p.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        m_hat = m / (1 - 0.9**t)
        v_hat = v / (1 - 0.999**t)
        p = p - lr * m_hat / (v_hat.sqrt() + 1e-8)
    return p


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_the_fused_step_is_adams_update_worked_by_hand(name: str) -> None:
    cfg = make_config("tiny", [f"optimizer={name}", "weight_decay=0.01"])
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, 5, 5, generator=gen)
    p = nn.Parameter(start.clone().to(memory_format=torch.channels_last))
    opt = make_optimizer(cfg, [p], lr=0.01)
    assert opt.defaults["fused"] is True
    grads = [torch.randn(3, 4, 5, 5, generator=gen) * 10 ** (k % 3 - 1) for k in range(6)]
    for g in grads:
        p.grad = g.clone().to(memory_format=torch.channels_last)
        opt.step()
    want = _adamw_by_hand(start, grads, lr=0.01, wd=0.01, decoupled=name == "adamw")
    assert torch.allclose(p.detach().double(), want, rtol=0, atol=1e-6), (p.detach().double() - want).abs().max()
    assert p.is_contiguous(memory_format=torch.channels_last)


def test_fused_only_where_torch_has_the_kernel() -> None:
    assert fused_ok([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3, 3))])
    assert not fused_ok([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))])
    assert not fused_ok([nn.Parameter(torch.zeros(2, device="meta"))])
    cfg = make_config("tiny")
    meta = nn.Parameter(torch.zeros(2, device="meta"))
    assert make_optimizer(cfg, [meta], lr=0.1).defaults["fused"] is None


def test_a_run_resumes_with_the_optimizer_it_was_trained_with() -> None:
    """``last.pt`` of runs trained before the fused optimizer holds the per-tensor loop's state
    (``fused: None``); torch's ``load_state_dict`` restores the saved group, so such a run goes on with
    the loop and a resumed run stays bit-for-bit what it would have been. New runs save and resume fused."""
    cfg = make_config("tiny")
    p = nn.Parameter(torch.ones(4, 3))
    p.grad = torch.full((4, 3), 0.5)
    old = torch.optim.AdamW([p], lr=1e-3, weight_decay=cfg.weight_decay)
    old.step()
    resumed = make_optimizer(cfg, [p], lr=1e-3)
    resumed.load_state_dict(old.state_dict())
    assert resumed.param_groups[0]["fused"] is None
    new = make_optimizer(cfg, [p], lr=1e-3)
    new.step()
    again = make_optimizer(cfg, [p], lr=1e-3)
    again.load_state_dict(new.state_dict())
    assert again.param_groups[0]["fused"] is True
    before = p.detach().clone()
    again.step()
    assert not torch.equal(before, p.detach())
