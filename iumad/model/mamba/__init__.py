"""Mamba (selective state-space) building blocks that run fast on the CPU.

* :func:`selective_scan` - mamba-ssm's `selective_scan_fn`, dispatched to mamba-ssm on CUDA and to
  a compiled C++ kernel (or a pure-PyTorch blocked scan) elsewhere; exact gradients.
* :class:`SS2D` - the 2D selective scan over four routes (VMamba cross-scan / cross-merge), or the
  strided variant (EfficientVMamba ES2D).
* :class:`VSSBlock` - LayerNorm, projections, depthwise conv, SS2D, gating, residual.

Importing this package compiles nothing; the C++ kernel is built on first use.
"""

from .scan import resolve_backend, selective_scan
from .ss2d import SS2D, cross_merge, cross_scan
from .vss import VSSBlock

__all__ = ["SS2D", "VSSBlock", "cross_merge", "cross_scan", "resolve_backend", "selective_scan"]
