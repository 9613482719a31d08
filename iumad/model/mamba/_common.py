"""Shape checks and dtype policy shared by the selective-scan backends."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ScanShape:
    """Sizes of one selective-scan call: batch, channels (d_inner), length, d_state, groups."""

    batch: int
    dim: int
    seqlen: int
    dstate: int
    groups: int


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (exactness tests), else float32 (half/bfloat16 are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                 z: Tensor | None, delta_bias: Tensor | None) -> ScanShape:
    """Validate mamba-ssm's `selective_scan_fn` shapes; B and C may be (b, n, l) or (b, g, n, l)."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, seqlen), got {tuple(u.shape)}")
    batch, dim, seqlen = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must match u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.is_complex() or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be real (dim, dstate) with dim={dim}, got {tuple(A.shape)} {A.dtype}")
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.is_complex() or t.dim() not in (3, 4):
            raise ValueError(f"{name} must be real (batch, [groups,] dstate, seqlen), got {tuple(t.shape)}")
    groups = B.shape[1] if B.dim() == 4 else 1
    for name, t in (("B", B), ("C", C)):
        want = (batch, groups, dstate, seqlen) if t.dim() == 4 else (batch, dstate, seqlen)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must be {want}, got {tuple(t.shape)}")
    if C.dim() != B.dim():
        raise ValueError("B and C must both be 3-D or both 4-D")
    if dim % groups != 0:
        raise ValueError(f"dim {dim} is not a multiple of the number of groups {groups}")
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f"D must be ({dim},), got {tuple(D.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise ValueError(f"delta_bias must be ({dim},), got {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must match u {tuple(u.shape)}, got {tuple(z.shape)}")
    return ScanShape(batch, dim, seqlen, dstate, groups)


def as4d(t: Tensor) -> Tensor:
    """(b, n, l) -> (b, 1, n, l); 4-D unchanged."""
    return t.unsqueeze(1) if t.dim() == 3 else t
