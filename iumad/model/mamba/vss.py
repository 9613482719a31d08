"""VSS block: the visual state-space block of VMamba around :class:`SS2D`."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .ss2d import SS2D


class VSSBlock(nn.Module):
    """x + out_proj(LN(SS2D(SiLU(dwconv3x3(x_in)))) * SiLU(gate)), with (x_in, gate) = in_proj(LN(x)).

    Input and output are channels-last maps (B, H, W, d_model), the layout LayerNorm and Linear
    want (use ``x.permute(0, 2, 3, 1)`` on a (B, C, H, W) map).  d_inner = expand * d_model,
    dt_rank "auto" = ceil(d_model / 16), d_state 16, as in Mamba / VMamba.  ``routes`` selects the
    SS2D cross scan ("cross") or EfficientVMamba's strided scan ("strided").
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: float = 2.0, dt_rank: int | str = "auto",
                 d_conv: int = 3, routes: str = "cross", backend: str | None = None) -> None:
        super().__init__()
        d_inner = int(expand * d_model)
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_model, self.d_inner = d_model, d_inner
        self.norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        self.ss2d = SS2D(d_inner, d_state=d_state, dt_rank=rank, routes=routes, backend=backend)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, d_model) -> (B, H, W, d_model)."""
        xi, gate = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        xi = F.silu(self.conv(xi.permute(0, 3, 1, 2)))
        y = self.ss2d(xi).permute(0, 2, 3, 1)
        y = self.out_norm(y) * F.silu(gate)
        return x + self.out_proj(y)
