"""Mamba (selective state-space) building blocks that run fast on the CPU.

* :func:`selective_scan` - mamba-ssm's `selective_scan_fn`, dispatched to mamba-ssm on CUDA and to
  a compiled C++ kernel (or a pure-PyTorch blocked scan) elsewhere; exact gradients.
* :class:`SS2D` - the 2D selective scan over four routes (VMamba cross-scan / cross-merge), or the
  strided variant (EfficientVMamba ES2D).
* :class:`VSSBlock` - LayerNorm, projections, depthwise conv, SS2D, gating, residual.

Importing this package compiles nothing; the C++ kernel is built on first use.
"""

from .scan import resolve_backend, selective_scan
from .ss2d import SS2D, from_routes, route_order, to_routes
from .vss import VSSBlock

__all__ = ["SS2D", "VSSBlock", "from_routes", "resolve_backend", "route_order", "selective_scan", "to_routes"]
