"""The compiled CPU selective scan: ctypes binding and autograd function with the C++ backward.

Tensors are made contiguous in the compute dtype (float32, or float64 when an input is float64)
and handed to the kernel as raw pointers; the GIL is released during the call (ctypes does that).
The forward used under autograd also saves the scan state at every chunk start, a tensor of
batch * dim * ceil(L / chunk) * d_state values, which is all the backward needs besides the inputs.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import _build
from ._common import ScanShape, as4d, check_shapes, compute_dtype

_PTR_FIELDS = (
    "u", "delta", "A", "B", "C", "D", "z", "bias", "out", "last_state", "ckpt",
    "dout", "dlast", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias",
)


class _Params(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("batch", "dim", "seqlen", "dstate", "groups", "chunk", "softplus", "nthreads")]
    _fields_ += [(name, ctypes.c_void_p) for name in _PTR_FIELDS]


def available() -> bool:
    """True when the C++ kernel is built (or can be built now) and loaded."""
    return _build.load_library() is not None


def _lib() -> ctypes.CDLL:
    lib = _build.load_library()
    if lib is None:
        raise RuntimeError(f"C++ selective scan unavailable: {_build.build_error()}")
    return lib


def tile_width(dtype: torch.dtype) -> int:
    """SIMD lanes (channels) per work item of the kernel for this dtype."""
    return int(_lib().iumad_scan_tile_width(1 if dtype == torch.float64 else 0))


def default_chunk(dstate: int, dtype: torch.dtype) -> int:
    """Steps per chunk: the backward's per-chunk state and decay buffers stay within ~128 KiB (L2)."""
    itemsize = 8 if dtype == torch.float64 else 4
    k = 65536 // max(1, dstate * tile_width(dtype) * itemsize)
    return int(min(128, max(8, k)))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _params(shape: ScanShape, chunk: int, softplus: bool, **tensors: Tensor | None) -> _Params:
    p = _Params(shape.batch, shape.dim, shape.seqlen, shape.dstate, shape.groups, chunk, int(softplus),
                max(1, torch.get_num_threads()))
    for name, t in tensors.items():
        setattr(p, name, _ptr(t))
    return p


def _run(name: str, p: _Params) -> None:
    rc = getattr(_lib(), name)(ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"{name} failed with code {rc} (2: bad arguments, 3: out of memory)")


def _prep(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.detach().to(dtype=dtype).contiguous()


def _n_ckpt(shape: ScanShape, chunk: int, dtype: torch.dtype) -> int:
    w = tile_width(dtype)
    tiles = -(-shape.dim // shape.groups // w)
    return shape.batch * shape.groups * tiles * (-(-shape.seqlen // chunk)) * shape.dstate * w


def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                 z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, return_last_state: bool,
                 save_ckpt: bool, chunk: int | None = None
                 ) -> tuple[Tensor, Tensor | None, Tensor | None, int]:
    """Run the kernel without autograd; returns (out, last_state, checkpoints, chunk) in compute dtype."""
    shape = check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    chunk = chunk or default_chunk(shape.dstate, dtype)
    u_, dl_, A_, B_, C_, D_, z_, b_ = (_prep(t, dtype) for t in (u, delta, A, as4d(B), as4d(C), D, z, delta_bias))
    out = torch.empty(u_.shape, dtype=dtype)
    last = torch.empty((shape.batch, shape.dim, shape.dstate), dtype=dtype) if return_last_state else None
    ckpt = torch.empty(_n_ckpt(shape, chunk, dtype), dtype=dtype) if save_ckpt else None
    p = _params(shape, chunk, delta_softplus, u=u_, delta=dl_, A=A_, B=B_, C=C_, D=D_, z=z_, bias=b_,
                out=out, last_state=last, ckpt=ckpt)
    _run("iumad_scan_fwd_f64" if dtype == torch.float64 else "iumad_scan_fwd_f32", p)
    return out, last, ckpt, chunk


class SelectiveScanCpp(torch.autograd.Function):
    """Autograd wrapper: C++ forward that saves chunk checkpoints, C++ backward (exact gradients)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,  # type: ignore[override]
                D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                return_last_state: bool, chunk: int | None) -> Tensor | tuple[Tensor, Tensor]:
        shape = check_shapes(u, delta, A, B, C, D, z, delta_bias)
        dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        out, last, ckpt, chunk = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                              return_last_state, True, chunk)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.scan_meta = (shape, dtype, chunk, delta_softplus)
        out = out.to(u.dtype)
        if return_last_state:
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout: Tensor, dlast: Tensor | None = None):  # type: ignore[override]
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        shape, dtype, chunk, softplus = ctx.scan_meta
        u_, dl_, A_, B_, C_, D_, z_, b_ = (_prep(t, dtype) for t in (u, delta, A, as4d(B), as4d(C), D, z, delta_bias))
        dout_ = _prep(dout, dtype)
        dlast_ = _prep(dlast, dtype)
        du = torch.empty_like(u_)
        ddelta = torch.empty_like(u_)
        dA = torch.empty_like(A_)
        dB = torch.empty_like(B_)
        dC = torch.empty_like(C_)
        dD = torch.empty_like(D_) if D_ is not None else None
        dz = torch.empty_like(z_) if z_ is not None else None
        dbias = torch.empty_like(b_) if b_ is not None else None
        p = _params(shape, chunk, softplus, u=u_, delta=dl_, A=A_, B=B_, C=C_, D=D_, z=z_, bias=b_, ckpt=ckpt,
                    dout=dout_, dlast=dlast_, du=du, ddelta=ddelta, dA=dA, dB=dB, dC=dC, dD=dD, dz=dz,
                    dbias=dbias)
        _run("iumad_scan_bwd_f64" if dtype == torch.float64 else "iumad_scan_bwd_f32", p)
        grads = []
        for g, ref in ((du, u), (ddelta, delta), (dA, A), (dB, B), (dC, C), (dD, D), (dz, z), (dbias, delta_bias)):
            grads.append(None if g is None else g.view(ref.shape).to(ref.dtype))
        return (*grads, None, None, None)
