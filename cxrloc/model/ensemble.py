"""An ensemble of trained cxrloc networks: the mean of their outputs.

``z`` (and the unary logits) of the members are averaged; the region rule ``z >= 0.5`` and every
score then apply to the mean, as to a single network. The members must share the input size and
the patch grid and the class list; they usually differ only in their training seed (``cxrloc ensemble``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cxrloc.model.net import CXRLocNet
from cxrloc.thresholds import ThresholdBuffers


class EnsembleNet(nn.Module):
    """Mean of several :class:`~cxrloc.model.net.CXRLocNet` outputs.

    ``forward(x)`` returns ``(z, unary_logits)`` like a single network: the mean of the members'
    ``z`` and the mean of their unary logits. ``thresholds`` are the ensemble's own (those of the
    first member until ``cxrloc fit-thresholds`` fits them on the ensemble).
    """

    def __init__(self, members: Sequence[CXRLocNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        grids = {m.patch_grid for m in members}
        if len(grids) != 1:
            raise ValueError(f"ensemble members have different patch grids {sorted(grids)}")
        if len({m.classes for m in members}) != 1:
            raise ValueError("ensemble members have different class lists")
        self.members = nn.ModuleList(members)
        self.patch_grid = members[0].patch_grid
        self.classes = members[0].classes
        self.thresholds = ThresholdBuffers(self.patch_grid, self.classes)
        self.thresholds.set(members[0].thresholds.get())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m(x) for m in self.members]
        z = torch.stack([o[0] for o in outs]).mean(dim=0)
        unary = torch.stack([o[1] for o in outs]).mean(dim=0)
        return z, unary
