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


def route_order(height: int, width: int, routes: str = "cross") -> Tensor:
    """(4, L) flat pixel indices (row * width + col) in the order each route visits them; the index
    height * width marks a padding step.

    cross: row-major, column-major, row-major reversed, column-major reversed (L = H * W).
    strided: sub-grid (0,0) row-major, (1,0) column-major, (0,1) row-major reversed, (1,1) column-major
    reversed (L = ceil(H/2) * ceil(W/2); the odd sizes' missing rows and columns are padding)."""
    pix = torch.arange(height * width).view(height, width)
    if routes == "cross":
        row, col = pix.flatten(), pix.t().flatten()
        return torch.stack([row, col, row.flip(0), col.flip(0)])
    padded = F.pad(pix, (0, width % 2, 0, height % 2), value=height * width)
    return torch.stack([padded[0::2, 0::2].flatten(), padded[1::2, 0::2].t().flatten(),
                        padded[0::2, 1::2].flatten().flip(0), padded[1::2, 1::2].t().flatten().flip(0)])


def to_routes(x: Tensor, order: Tensor) -> Tensor:
    """Channels-last (B, H, W, D) -> (B, 4, L, D): each route's tokens in its `route_order` (padding 0).
    One row gather: the per-route slices, flips and stacks it replaces copied the map four times."""
    b, h, w, d = x.shape
    flat = x.reshape(b, h * w, d)
    if bool((order == h * w).any()):
        flat = torch.cat([flat, flat.new_zeros(b, 1, d)], 1)
    return flat.index_select(1, order.flatten()).view(b, N_ROUTES, -1, d)


def from_routes(ys: Tensor, order: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`to_routes`: (B, 4, L, D) -> (B, H, W, D), each route's outputs summed at their
    pixels (the strided routes visit each pixel once; padding steps are dropped)."""
    b, _, _, d = ys.shape
    out = ys.new_zeros(b, height * width + 1, d).index_add(1, order.flatten(), ys.reshape(b, -1, d))
    return out[:, :-1].view(b, height, width, d)


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
        self._orders: dict[tuple[int, int, torch.device], Tensor] = {}

    def _order(self, height: int, width: int, device: torch.device) -> Tensor:
        """`route_order` of this module's routes, built once per map size."""
        key = (height, width, device)
        if key not in self._orders:
            self._orders[key] = route_order(height, width, self.routes).to(device)
        return self._orders[key]

    def forward(self, x: Tensor) -> Tensor:
        """(B, d_inner, H, W) -> (B, d_inner, H, W)."""
        return self.forward_channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_channels_last(self, x: Tensor) -> Tensor:
        """(B, H, W, d_inner) -> (B, H, W, d_inner), the layout of the VSS block around it."""
        b, height, width, d = x.shape
        if d != self.d_inner:
            raise ValueError(f"expected {self.d_inner} channels, got {d}")
        order = self._order(height, width, x.device)
        xs = to_routes(x, order)  # (b, k, l, d)
        length = xs.shape[2]
        x_dbl = torch.matmul(xs, self.x_proj_weight.transpose(1, 2)).transpose(2, 3)  # (b, k, c, l)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)  # (k, d, r) @ (b, k, r, l) -> (b, k, d, l)
        pad = order == height * width
        if bool(pad.any()):
            dts = dts.masked_fill(pad[None, :, None, :], -1e4)  # softplus(-1e4 + bias) == 0: an identity step

        def f32(p: Tensor) -> Tensor:  # scan parameters stay in (at least) float32 under autocast/half
            return p.to(torch.promote_types(p.dtype, torch.float32))

        ys = selective_scan(
            xs.transpose(2, 3).reshape(b, -1, length), dts.reshape(b, -1, length), -torch.exp(f32(self.A_logs)),
            bs.contiguous(), cs.contiguous(), f32(self.Ds), z=None,
            delta_bias=f32(self.dt_projs_bias).reshape(-1), delta_softplus=True, backend=self.backend,
        )
        return from_routes(ys.view(b, N_ROUTES, d, length).transpose(2, 3), order, height, width)
