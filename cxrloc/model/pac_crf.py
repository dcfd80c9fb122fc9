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
probabilities exactly.

Computation: ``G`` is evaluated once per forward: the dot products of all patch pairs as one
batched Gram matrix in float64, the ``window x window`` neighbourhood of every patch picked from it
with a fixed index, then the squared distances and ``exp`` (float32) on those entries only; each
mean-field step multiplies ``G`` with the neighbours' ``q`` (windows taken as a strided view of the
zero-padded grid, channels last) and contracts offsets and classes with ``W`` in one product (a
``matmul`` on CUDA, a oneDNN 1x1 convolution on a CPU), in float32 also under autocast (only the
guidance branch runs in the autocast dtype: bf16 messages moved z by up to 0.12 on a GPU). Plain
torch ops only (``bmm``, ``index_select``, ``pad``, ``unfold``, ``matmul``, ``conv2d``, ``exp``). ONNX export
traces the ``F.unfold`` layout instead (:meth:`PacCrf.kernel_cols`, :meth:`PacCrf.message_cols`):
float32 differences of the neighbours' features, the formulation of cxrloc 0.1.0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _windows_last(x: torch.Tensor, window: int) -> torch.Tensor:
    """The ``window x window`` neighbourhoods of every position, channels last, as a strided view.

    ``x`` ``(B, C, P, P)`` -> ``(B, P, P, window, window, C)`` with zeros beyond the border:
    element ``[b, i, j, dy, dx, c]`` is ``x[b, c, i + dy - r, j + dx - r]`` (``r = window // 2``).
    Only the zero-padded ``(B, P + 2r, P + 2r, C)`` copy is materialised; ``Tensor.unfold`` makes the
    windows a view, whose gradient is ``unfold_backward``: neither ``im2col`` nor ``col2im`` runs.
    """
    r = window // 2
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, r, r, r, r))
    return padded.unfold(1, window, 1).unfold(2, window, 1).permute(0, 1, 2, 4, 5, 3)


def _window_index(p: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the window entries of :meth:`PacCrf.kernel` sit in the flattened ``(P*P, P*P)`` matrix.

    Returns a ``(P*P * window^2,)`` index (``j * P*P + l`` for offset ``o`` of patch ``j``, clamped
    into the grid) and a ``(P*P, window^2)`` bool mask, False where ``l`` falls outside the grid.
    """
    r = window // 2
    rows, cols = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    dy, dx = torch.meshgrid(torch.arange(window) - r, torch.arange(window) - r, indexing="ij")
    ny = rows.reshape(-1, 1) + dy.reshape(1, -1)
    nx = cols.reshape(-1, 1) + dx.reshape(1, -1)
    inside = (ny >= 0) & (ny < p) & (nx >= 0) & (nx < p)
    flat = ny.clamp(0, p - 1) * p + nx.clamp(0, p - 1)
    return (torch.arange(p * p).reshape(-1, 1) * (p * p) + flat).reshape(-1), inside


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``; no op (and no ONNX ``Cast`` node) when it already is."""
    return x if x.dtype == dtype else x.to(dtype)


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
        index, inside = _window_index(patch_grid, window)
        self.register_buffer("window_index", index, persistent=False)
        self.register_buffer("window_inside", inside, persistent=False)
        self.register_buffer("window_neighbour", index % (patch_grid * patch_grid), persistent=False)
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
        """Gaussian affinities ``G`` of shape ``(B, P*P, window^2)`` in float32 (0 outside the image).

        Row ``j`` holds ``G(f_j, f_{j+o})`` for the ``window^2`` offsets ``o`` in row-major order.
        The squared distances come from one batched Gram matrix of all ``P^2 x P^2`` pairs,
        ``|f_j|^2 + |f_l|^2 - 2 f_j . f_l``, in float64 on features centred per image (distances do
        not change; the cancellation stays far below float32 rounding, and TF32 matmul settings do
        not apply to float64); its window entries are picked with a fixed index before the
        element-wise work (half the time of doing it on all pairs, on a CPU). This replaces the
        ``(B, P, P, window, window, d)`` difference tensor (about 5x less time on a CPU, see
        ``docs/results.md``).
        """
        b, d, p, _ = feats.shape
        w = self.window
        f = feats.double().reshape(b, d, p * p)
        f = f - f.mean(dim=2, keepdim=True)
        sq = f.square().sum(dim=1)
        # Only the window entries of the Gram matrix go on: the element-wise work (and its backward)
        # runs on (B, P*P, window^2) rather than (B, P*P, P*P), with the same arithmetic per entry.
        dots = torch.bmm(f.transpose(1, 2), f).flatten(1).index_select(1, self.window_index)
        neighbour_sq = sq.index_select(1, self.window_neighbour).view(b, p * p, w * w)
        d2 = sq[:, :, None] + neighbour_sq - 2.0 * dots.view(b, p * p, w * w)
        return torch.exp(-0.5 * d2.clamp_min(0.0).float()) * self.window_inside

    def message(self, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Sum over neighbours l and classes k' of ``G(j,l) W[k,k',offset] q(k',l)``: ``(B, K, P*P)``.

        ``g`` is :meth:`kernel`'s output, possibly cast to a lower compute dtype (autocast); the
        arithmetic runs in ``g.dtype``.
        """
        b, k, p, _ = q.shape
        w = self.window
        # G times the neighbours' q, laid out (B, P, P, w, w, K'): channels last for the contraction.
        weighted = g.view(b, p, p, w, w, 1) * _windows_last(_as(q, g.dtype), w)
        compat = _as((self.compat * self.offset_mask).permute(0, 2, 1).reshape(k, w * w * k), g.dtype)
        if weighted.device.type != "cpu":
            # One GEMM (float32 stays float32: cuBLAS matmul has TF32 off by default, cuDNN convs not).
            return torch.matmul(weighted.reshape(b, p * p, w * w * k), compat.t()).transpose(1, 2)
        # On a CPU the same contraction as a 1x1 convolution of the (B*P, w^2 K', 1, P) channels-last
        # view: oneDNN's kernels, forward and both backward products, instead of MKL's GEMM with an
        # outer dimension of K (2-4x slower on this shape on AMD CPUs, docs/results.md); a batch of
        # B*P >= 16 keeps torch off its slow 1x1 path on one thread.
        out = F.conv2d(weighted.view(b * p, 1, p, w * w * k).permute(0, 3, 1, 2), compat.view(k, -1, 1, 1))
        return out.view(b, p, k, p).transpose(1, 2).reshape(b, k, p * p)

    def kernel_cols(self, feats: torch.Tensor) -> torch.Tensor:
        """:meth:`kernel` in the ``F.unfold`` layout ``(B, window^2, P*P)``, for ONNX export.

        The exporter cannot translate ``Tensor.unfold`` with a dynamic batch axis, and onnxruntime
        runs this layout faster than the permuted windows (no large transposes).
        """
        b, d, p, _ = feats.shape
        w = self.window
        feats = feats.float()
        nb = F.unfold(feats, kernel_size=w, padding=w // 2).view(b, d, w * w, p * p)
        diff = nb - feats.reshape(b, d, 1, p * p)
        g = torch.exp(-0.5 * (diff * diff).sum(dim=1))
        return g * F.unfold(torch.ones_like(feats[:, :1]), kernel_size=w, padding=w // 2)

    def message_cols(self, q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """:meth:`message` for :meth:`kernel_cols`'s layout (ONNX export), ``(B, K, P*P)``."""
        b, k, p, _ = q.shape
        w = self.window
        nb = F.unfold(_as(q, g.dtype), kernel_size=w, padding=w // 2).view(b, k, w * w, p * p)
        weighted = (nb * g.unsqueeze(1)).reshape(b, k * w * w, p * p)
        compat = _as((self.compat * self.offset_mask).reshape(k, k * w * w), g.dtype)
        return torch.matmul(compat, weighted)

    @torch.compiler.disable
    def _mean_field(self, feats: torch.Tensor, unary_logits: torch.Tensor, export: bool) -> torch.Tensor:
        """G and the mean-field steps (``iterations`` >= 1) in float32 with autocast off: ``(B, K, P, P)`` logits.

        Kept out of ``torch.compile`` (it runs eagerly in a compiled model): torch 2.11's Inductor
        failed on this float32 graph at the paper's size (``CantSplit``, on an H200).
        """
        b, k, p, _ = unary_logits.shape
        kernel, message = (self.kernel_cols, self.message_cols) if export else (self.kernel, self.message)
        with torch.autocast(device_type=unary_logits.device.type, enabled=False):
            g = kernel(feats.float())
            u = unary_logits.float()
            flat_u = u.reshape(b, k, p * p)
            q = torch.sigmoid(u)
            for _ in range(self.iterations):
                logits = flat_u + message(q, g)
                q = torch.sigmoid(logits).reshape(b, k, p, p)
            return logits.reshape(b, k, p, p)

    def forward(self, image: torch.Tensor, unary_logits: torch.Tensor) -> torch.Tensor:
        logits = unary_logits
        if self.iterations > 0:
            # The guidance branch runs in the autocast dtype; G and the mean-field steps in float32
            # with autocast off. Each message sums window^2 x K terms (5,054 for the paper's
            # 19 x 19 x 14): in bf16 z moved by up to 0.12 against float32 on an H200 (test_pac_crf).
            export = torch.onnx.is_in_onnx_export()
            logits = self._mean_field(self.branch(image), unary_logits, export)
        return torch.sigmoid(logits + self.refine(logits))
