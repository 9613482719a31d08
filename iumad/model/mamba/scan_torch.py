"""Pure-PyTorch selective scan: a two-level (blocked) linear scan with a hand-written backward.

Used when the C++ kernel cannot be built, and on any device without mamba-ssm (it runs on CUDA
too).  The per-step decays a_t = exp(delta_t A) and inputs b_t = delta_t B_t u_t are materialised
time-major as (L, batch, dim, d_state).  The recurrence h_t = a_t h_{t-1} + b_t is then solved in
blocks of K ~ sqrt(L) steps: one in-place multiply-add per step scans all blocks at once from a
zero state, a loop over the blocks carries the block-end states, and one broadcast multiply-add
with the within-block cumulative decays (cumprod, values in [0, 1] for A < 0, so no division and
no overflow) adds the carried state everywhere.  That is about 2 sqrt(L) small Python steps
instead of L, with exact arithmetic (no straight-through tricks).

The backward recomputes the forward (only the inputs are saved) and solves the adjoint
recurrence g_t = a_{t+1} g_{t+1} + C_t dy_t with the same blocked scan run backwards; every
gradient is then a batched contraction.  Memory: a few tensors of L * batch * dim * d_state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import ScanShape, as4d, check_shapes, compute_dtype


def block_len(seqlen: int) -> int:
    """Block length K ~ sqrt(L): K - 1 in-block steps plus L / K carry steps is minimal there."""
    return max(1, math.isqrt(max(seqlen - 1, 0)) + 1)


def blocked_scan_(x: Tensor, a: Tensor, block: int, reverse: bool = False) -> Tensor:
    """In place: x_t <- a_t * x_{t-1} + x_t along dim 0 (or x_t <- a_t * x_{t+1} + x_t if reverse).

    x and a are contiguous with the same shape (Lp, ...) and Lp a multiple of `block`.  Each of the
    Python steps is one fused multiply-add over all blocks at once.
    """
    lp = x.shape[0]
    nc = lp // block
    xv = x.view(nc, block, -1)
    av = a.view(nc, block, -1)
    p = av.clone() if nc > 1 else None  # cumulative decay inside each block (towards its carry end)
    if not reverse:
        for k in range(1, block):
            xv[:, k].addcmul_(av[:, k], xv[:, k - 1])
            if p is not None:
                p[:, k].mul_(p[:, k - 1])
        if p is None:
            return x
        for c in range(1, nc):  # carry the block-end states
            xv[c, block - 1].addcmul_(p[c, block - 1], xv[c - 1, block - 1])
        if block > 1:
            xv[1:, : block - 1].addcmul_(p[1:, : block - 1], xv[:-1, block - 1:])
    else:
        for k in range(block - 2, -1, -1):
            xv[:, k].addcmul_(av[:, k], xv[:, k + 1])
            if p is not None:
                p[:, k].mul_(p[:, k + 1])
        if p is None:
            return x
        for c in range(nc - 2, -1, -1):
            xv[c, 0].addcmul_(p[c, 0], xv[c + 1, 0])
        if block > 1:
            xv[:-1, 1:].addcmul_(p[:-1, 1:], xv[1:, :1])
    return x


class _Prepared:
    """Time-major, padded tensors of one call (shared by forward and backward)."""

    def __init__(self, shape: ScanShape, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, softplus: bool,
                 block: int | None, dtype: torch.dtype) -> None:
        self.shape = shape
        d, L, g = shape.dim, shape.seqlen, shape.groups
        self.block = block or block_len(L)
        self.lp = -(-L // self.block) * self.block
        pad = self.lp - L
        cast = (lambda t: None if t is None else t.to(dtype))
        u, delta, A, B, C, D, z, delta_bias = map(cast, (u, delta, A, as4d(B), as4d(C), D, z, delta_bias))
        raw = delta if delta_bias is None else delta + delta_bias[:, None]
        self.raw = raw
        dt = F.softplus(raw) if softplus else raw
        self.u, self.dt, self.A, self.D, self.z = u, dt, A, D, z
        self.uT = F.pad(u, (0, pad)).permute(2, 0, 1).contiguous()    # (Lp, b, d)
        self.dtT = F.pad(dt, (0, pad)).permute(2, 0, 1).contiguous()  # (Lp, b, d)
        self.BT = F.pad(B, (0, pad)).permute(3, 0, 1, 2).contiguous()  # (Lp, b, g, n)
        self.CT = F.pad(C, (0, pad)).permute(3, 0, 1, 2).contiguous()
        self.hdim = d // g

    def decays(self) -> Tensor:
        """a_t = exp(delta_t A), (Lp, b, d, n) contiguous."""
        return torch.exp(self.dtT.unsqueeze(-1) * self.A).contiguous()

    def states(self, a: Tensor) -> Tensor:
        """h_t for every step, (Lp, b, d, n)."""
        s = self.shape
        lp, hd = self.lp, self.hdim
        dtu = (self.dtT * self.uT).reshape(lp, s.batch, s.groups, hd, 1)
        x = (dtu * self.BT.view(lp, s.batch, s.groups, 1, s.dstate)).reshape(lp, s.batch, s.dim, s.dstate)
        return blocked_scan_(x.contiguous(), a, self.block)

    def readout(self, h: Tensor) -> Tensor:
        """y_t = sum_n C_t h_t + D u_t as (b, d, L), before gating."""
        s = self.shape
        lp, hd = self.lp, self.hdim
        y = torch.matmul(h.view(lp, s.batch, s.groups, hd, s.dstate),
                         self.CT.view(lp, s.batch, s.groups, s.dstate, 1))
        y = y.view(lp, s.batch, s.dim)[: s.seqlen].permute(1, 2, 0)
        if self.D is not None:
            y = y + self.D[:, None] * self.u
        return y


def _gate(y: Tensor, z: Tensor | None) -> Tensor:
    return y if z is None else y * F.silu(z)


def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                 z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                 return_last_state: bool, block: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Forward only (no autograd graph): (out, last_state) in the compute dtype."""
    shape = check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    with torch.no_grad():
        prep = _Prepared(shape, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block, dtype)
        h = prep.states(prep.decays())
        out = _gate(prep.readout(h), prep.z)
        last = h[shape.seqlen - 1].clone() if return_last_state else None
    return out, last


class SelectiveScanTorch(torch.autograd.Function):
    """Autograd wrapper around the blocked scan; the backward recomputes the forward states."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,  # type: ignore[override]
                D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                return_last_state: bool, block: int | None) -> Tensor | tuple[Tensor, Tensor]:
        out, last = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, block)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.scan_meta = (delta_softplus, block)
        out = out.to(u.dtype)
        return (out, last) if return_last_state else out

    @staticmethod
    def backward(ctx, dout: Tensor, dlast: Tensor | None = None):  # type: ignore[override]
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        softplus, block = ctx.scan_meta
        shape = check_shapes(u, delta, A, B, C, D, z, delta_bias)
        dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        s = shape
        prep = _Prepared(shape, u, delta, A, B, C, D, z, delta_bias, softplus, block, dtype)
        lp, hd, L = prep.lp, prep.hdim, s.seqlen
        a = prep.decays()
        h = prep.states(a)
        dout = dout.to(dtype)
        dz = None
        if prep.z is not None:
            y = prep.readout(h)
            sg = torch.sigmoid(prep.z)
            dz = dout * y * sg * (1 + prep.z * (1 - sg))
            dy = dout * prep.z * sg
        else:
            dy = dout
        dyT = F.pad(dy, (0, lp - L)).permute(2, 0, 1).contiguous()  # (Lp, b, d)
        # Adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}  (+ dlast at t = L - 1).
        g = (dyT.reshape(lp, s.batch, s.groups, hd, 1) * prep.CT.view(lp, s.batch, s.groups, 1, s.dstate))
        g = g.reshape(lp, s.batch, s.dim, s.dstate).contiguous()
        if dlast is not None:
            g[L - 1] += dlast.to(dtype)
        alpha = torch.empty_like(a)
        alpha[:-1] = a[1:]
        alpha[-1] = 0
        blocked_scan_(g, alpha, prep.block, reverse=True)
        del alpha
        # ga_t = g_t * a_t * h_{t-1}: gradient wrt (delta_t * A) through the decay.
        ga = g * a
        ga[1:] *= h[:-1]
        ga[0] = 0
        del a
        gB = torch.matmul(g.view(lp, s.batch, s.groups, hd, s.dstate),
                          prep.BT.view(lp, s.batch, s.groups, s.dstate, 1)).view(lp, s.batch, s.dim)
        ddt = (ga * prep.A).sum(-1) + prep.uT * gB                       # (Lp, b, d)
        dA = ga.mul_(prep.dtT.unsqueeze(-1)).sum((0, 1))
        del ga
        dtu = (prep.dtT * prep.uT).reshape(lp, s.batch, s.groups, 1, hd)
        dB = torch.matmul(dtu, g.view(lp, s.batch, s.groups, hd, s.dstate)).view(lp, s.batch, s.groups, s.dstate)
        dC = torch.matmul(dyT.reshape(lp, s.batch, s.groups, 1, hd),
                          h.view(lp, s.batch, s.groups, hd, s.dstate)).view(lp, s.batch, s.groups, s.dstate)
        du = (prep.dtT * gB)[:L].permute(1, 2, 0)
        if prep.D is not None:
            du = du + prep.D[:, None] * dy
        dD = (dy * prep.u).sum((0, 2)) if prep.D is not None else None
        ddt = ddt[:L].permute(1, 2, 0)
        if softplus:
            ddt = ddt * torch.where(prep.raw > 20, torch.ones_like(prep.raw), torch.sigmoid(prep.raw))
        dbias = ddt.sum((0, 2)) if delta_bias is not None else None
        dB = dB[:L].permute(1, 2, 3, 0)
        dC = dC[:L].permute(1, 2, 3, 0)
        grads = []
        for gr, ref in ((du, u), (ddt, delta), (dA, A), (dB, B), (dC, C), (dD, D), (dz, z), (dbias, delta_bias)):
            grads.append(None if gr is None else gr.reshape(ref.shape).to(ref.dtype))
        return (*grads, None, None, None)
