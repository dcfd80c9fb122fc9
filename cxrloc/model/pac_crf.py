"""PAC-CRF on the patch grid (Su et al. 2019, as used by Rozenberg et al. 2019).

Each class k is a binary (present/absent) variable per patch; the classes are not mutually
exclusive, so there is no softmax across classes. Mean-field in logit form:

    q_0 = sigmoid(u)
    logits_{t+1}(k, j) = u(k, j) + sum_{l in Omega(j), l != j} G(f_j, f_l) sum_k' W[k, k', xi_l - xi_j] q_t(k', l)
    q_{t+1} = sigmoid(logits_{t+1})

with ``u`` the unary logits, ``G(f_j, f_l) = exp(-1/2 ||f_j - f_l||^2)`` a fixed Gaussian kernel on
learned guidance features ``f`` (from a small branch that reads the image), and ``W`` a learned
compatibility of shape ``(K, K, window^2)`` (one K x K matrix per offset), initialised to zero.
Finally two conv layers (conv -> ReLU -> BN, each; the paper's order) make a residual correction
of the logits; the last BN starts at weight = bias = 0, so a fresh CRF returns the unary
probabilities exactly. Plain torch ops only (``unfold``, ``matmul``, ``exp``): exports to ONNX.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class GuidanceBranch(nn.Module):
    """Image -> guidance features ``f`` of shape ``(B, feature_dim, P, P)``.

    ``n`` stride-2 conv/BN/ReLU stages with ``n = floor(log2(image_size / P))`` (so the last map is
    the smallest one still at least ``P`` wide: 512 px, P = 20 -> 4 stages, 32 x 32), a bilinear
    resize to ``P x P`` (a factor below 2, so little aliasing) and a 1x1 conv to ``feature_dim``.
    """

    def __init__(self, image_size: int, patch_grid: int, channels: int = 32, feature_dim: int = 16) -> None:
        super().__init__()
        n = max(1, int(math.floor(math.log2(max(image_size / patch_grid, 1.0)))))
        stages: list[nn.Module] = [_conv_bn_relu(1, channels, 2)]
        stages += [_conv_bn_relu(channels, channels, 2) for _ in range(n - 1)]
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Conv2d(channels, feature_dim, kernel_size=1)
        self.patch_grid = patch_grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(x)
        p = self.patch_grid
        if h.shape[-2:] != (p, p):
            h = F.interpolate(h, size=(p, p), mode="bilinear", align_corners=False)
        return self.proj(h)


class PacCrf(nn.Module):
    """Mean-field PAC-CRF over K binary labels on a ``P x P`` grid, plus a residual conv refinement.

    Args:
        num_classes: K.
        image_size: input side (to size the guidance branch).
        patch_grid: P.
        window: side of the neighbourhood Omega (odd).
        iterations: mean-field iterations (0: only the refinement convs).
        feature_dim: channels of the guidance features f.
        branch_channels: width of the guidance branch.

    ``forward(image, unary_logits)`` returns the probabilities ``z`` ``(B, K, P, P)``.
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        patch_grid: int,
        window: int = 19,
        iterations: int = 5,
        feature_dim: int = 16,
        branch_channels: int = 32,
    ) -> None:
        super().__init__()
        if window % 2 != 1:
            raise ValueError(f"CRF window must be odd, got {window}")
        self.num_classes = num_classes
        self.window = window
        self.iterations = iterations
        self.branch = GuidanceBranch(image_size, patch_grid, branch_channels, feature_dim)
        # Zero compatibility: a fresh CRF passes no messages.
        self.compat = nn.Parameter(torch.zeros(num_classes, num_classes, window * window))
        # A patch sends no message to itself (the centre offset would only re-weight the unary).
        centre = torch.ones(window * window)
        centre[(window * window) // 2] = 0.0
        self.register_buffer("offset_mask", centre, persistent=False)
        self.refine = nn.Sequential(
            nn.Conv2d(num_classes, num_classes, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(num_classes),
            nn.Conv2d(num_classes, num_classes, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(num_classes),
        )
        last_bn = self.refine[-1]
        nn.init.zeros_(last_bn.weight)
        nn.init.zeros_(last_bn.bias)

    def kernel(self, feats: torch.Tensor) -> torch.Tensor:
        """Gaussian affinities ``G`` of shape ``(B, window^2, P*P)`` (0 outside the image)."""
        b, d, p, _ = feats.shape
        w = self.window
        nb = F.unfold(feats, kernel_size=w, padding=w // 2).view(b, d, w * w, p * p)
        diff = nb - feats.reshape(b, d, 1, p * p)
        g = torch.exp(-0.5 * (diff * diff).sum(dim=1))
        # Neighbours beyond the border: unfold's zero padding is not a patch; mask them out.
        inside = F.unfold(torch.ones_like(feats[:, :1]), kernel_size=w, padding=w // 2)
        return g * inside

    def message(self, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Sum over neighbours l and classes k' of ``G(j,l) W[k,k',offset] q(k',l)``: ``(B, K, P*P)``."""
        b, k, p, _ = q.shape
        w = self.window
        nb = F.unfold(q, kernel_size=w, padding=w // 2).view(b, k, w * w, p * p)
        weighted = (nb * g.unsqueeze(1)).reshape(b, k * w * w, p * p)
        compat = (self.compat * self.offset_mask).reshape(k, k * w * w)
        return torch.matmul(compat, weighted)

    def forward(self, image: torch.Tensor, unary_logits: torch.Tensor) -> torch.Tensor:
        b, k, p, _ = unary_logits.shape
        logits = unary_logits
        if self.iterations > 0:
            g = self.kernel(self.branch(image).float())
            u = unary_logits.float()
            flat_u = u.reshape(b, k, p * p)
            q = torch.sigmoid(u)
            for _ in range(self.iterations):
                logits = flat_u + self.message(q, g)
                q = torch.sigmoid(logits).reshape(b, k, p, p)
            logits = logits.reshape(b, k, p, p)
        return torch.sigmoid(logits + self.refine(logits))
