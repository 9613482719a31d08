"""SS2D: selective scan over a 2D feature map along four routes (VMamba's cross-scan / cross-merge).

A (B, D, H, W) map is flattened into four sequences of H*W tokens - row-major, column-major, and
both reversed - each scanned with its own parameters (x_proj, dt_proj, A, D) in one
`selective_scan` call (the four routes are the scan's four groups), then the four outputs are put
back at their pixels and summed.  Every token thus sees context from all four directions.

``routes="strided"`` is EfficientVMamba's efficient scan (ES2D, step 2): the map is split into its
four stride-2 sub-grids (row parity x column parity) and each sub-grid is scanned along one of
the four routes, so the scan is 4x shorter and every token is visited exactly once.  Odd sizes
are zero-padded; padded tokens are made exact identity steps (delta -> 0), so they change nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scan import selective_scan

ROUTES = ("cross", "strided")
N_ROUTES = 4


def cross_scan(x: Tensor) -> Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W): row-major, column-major, row-major reversed, column-major reversed."""
    row = x.flatten(2)
    col = x.transpose(2, 3).flatten(2)
    xs = torch.stack([row, col], dim=1)
    return torch.cat([xs, xs.flip(-1)], dim=1)


def cross_merge(ys: Tensor, height: int, width: int) -> Tensor:
    """(B, 4, D, H*W) -> (B, D, H, W): each route's outputs back at their pixels, summed."""
    b, _, d, length = ys.shape
    fwd, rev = ys.view(b, 2, 2, d, length).unbind(1)  # unbind, not slicing: no zero-filled grads
    row, col = (fwd + rev.flip(-1)).unbind(1)
    return row.reshape(b, d, height, width) + col.reshape(b, d, width, height).transpose(2, 3)


def strided_scan(x: Tensor) -> Tensor:
    """(B, D, H, W) -> (B, 4, D, ceil(H/2)*ceil(W/2)): sub-grid (0,0) row-major, (1,0) column-major,
    (0,1) row-major reversed, (1,1) column-major reversed (zero-padded to even sizes)."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, w % 2, 0, h % 2))
    r0 = x[:, :, 0::2, 0::2].flatten(2)
    r1 = x[:, :, 1::2, 0::2].transpose(2, 3).flatten(2)
    r2 = x[:, :, 0::2, 1::2].flatten(2).flip(-1)
    r3 = x[:, :, 1::2, 1::2].transpose(2, 3).flatten(2).flip(-1)
    return torch.stack([r0, r1, r2, r3], dim=1)


def strided_merge(ys: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`strided_scan`: (B, 4, D, L) -> (B, D, H, W), every pixel from its one route."""
    b, _, d, _ = ys.shape
    h2, w2 = -(-height // 2), -(-width // 2)
    g00 = ys[:, 0].reshape(b, d, h2, w2)
    g10 = ys[:, 1].reshape(b, d, w2, h2).transpose(2, 3)
    g01 = ys[:, 2].flip(-1).reshape(b, d, h2, w2)
    g11 = ys[:, 3].flip(-1).reshape(b, d, w2, h2).transpose(2, 3)
    grid = torch.stack([torch.stack([g00, g01], dim=-1), torch.stack([g10, g11], dim=-1)], dim=3)
    return grid.reshape(b, d, 2 * h2, 2 * w2)[:, :, :height, :width]


def dt_bias_init(d_inner: int, dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> Tensor:
    """Mamba's dt bias: softplus^-1 of dt drawn log-uniformly from [dt_min, dt_max] (floored)."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class SS2D(nn.Module):
    """Four-route 2D selective scan on (B, d_inner, H, W) maps; returns the same shape.

    Parameters per route as in Mamba: x_proj (d_inner -> dt_rank + 2 d_state, no bias), dt_proj
    (dt_rank -> d_inner, weight ~ U(+-dt_rank^-0.5 dt_scale), bias from :func:`dt_bias_init`),
    A = -exp(A_log) with A_log = log(1..d_state), D = 1.  ``dt_rank="auto"`` is ceil(d_inner / 32),
    i.e. Mamba's ceil(d_model / 16) at expansion 2.
    """

    def __init__(self, d_inner: int, d_state: int = 16, dt_rank: int | str = "auto", routes: str = "cross",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                 backend: str | None = None) -> None:
        super().__init__()
        if routes not in ROUTES:
            raise ValueError(f"routes must be one of {ROUTES}, got {routes!r}")
        self.d_inner, self.d_state, self.routes, self.backend = d_inner, d_state, routes, backend
        self.dt_rank = math.ceil(d_inner / 32) if dt_rank == "auto" else int(dt_rank)
        k, r = N_ROUTES, self.dt_rank
        bound = d_inner ** -0.5
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * d_state, d_inner).uniform_(-bound, bound))
        dt_std = r ** -0.5 * dt_scale
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, r).uniform_(-dt_std, dt_std))
        self.dt_projs_bias = nn.Parameter(torch.stack([dt_bias_init(d_inner, dt_min, dt_max, dt_init_floor)
                                                       for _ in range(k)]))
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(k * d_inner, 1)
        self.A_logs = nn.Parameter(a_log)
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        for p in (self.A_logs, self.Ds, self.dt_projs_bias):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self._pad_masks: dict[tuple[int, int, torch.device], Tensor] = {}

    def _pad_mask(self, height: int, width: int, device: torch.device) -> Tensor | None:
        """(1, 4, 1, L) True at the padding tokens of the strided routes (None when there are none)."""
        if self.routes != "strided" or (height % 2 == 0 and width % 2 == 0):
            return None
        key = (height, width, device)
        if key not in self._pad_masks:
            ones = torch.ones(1, 1, height, width, device=device)
            self._pad_masks[key] = strided_scan(ones) == 0
        return self._pad_masks[key]

    def forward(self, x: Tensor) -> Tensor:
        """(B, d_inner, H, W) -> (B, d_inner, H, W)."""
        b, d, height, width = x.shape
        if d != self.d_inner:
            raise ValueError(f"expected {self.d_inner} channels, got {d}")
        xs = cross_scan(x) if self.routes == "cross" else strided_scan(x)
        length = xs.shape[-1]
        x_dbl = torch.matmul(self.x_proj_weight, xs)  # (k, c, d) @ (b, k, d, l): batched, no copies
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)  # (k, d, r) @ (b, k, r, l) -> (b, k, d, l)
        mask = self._pad_mask(height, width, x.device)
        if mask is not None:
            dts = dts.masked_fill(mask, -1e4)  # softplus(-1e4 + bias) == 0: an exact identity step
        def f32(p: Tensor) -> Tensor:  # scan parameters stay in (at least) float32 under autocast/half
            return p.to(torch.promote_types(p.dtype, torch.float32))

        ys = selective_scan(
            xs.reshape(b, -1, length), dts.reshape(b, -1, length), -torch.exp(f32(self.A_logs)),
            bs.contiguous(), cs.contiguous(), f32(self.Ds), z=None,
            delta_bias=f32(self.dt_projs_bias).reshape(-1), delta_softplus=True, backend=self.backend,
        )
        ys = ys.view(b, N_ROUTES, d, length)
        return cross_merge(ys, height, width) if self.routes == "cross" else strided_merge(ys, height, width)
