"""SS2D routes, the strided (ES2D) variant, Mamba initialisation, and a VSS block that learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from iumad.model.mamba import SS2D, VSSBlock, cross_merge, cross_scan, selective_scan
from iumad.model.mamba.ss2d import strided_merge, strided_scan


def test_cross_scan_routes():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).view(2, 3, 4, 5)
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 3, 20)
    assert torch.equal(xs[:, 0], x.flatten(2))
    assert torch.equal(xs[:, 1], x.transpose(2, 3).flatten(2))
    assert torch.equal(xs[:, 2], x.flatten(2).flip(-1))
    assert torch.equal(xs[:, 3], x.transpose(2, 3).flatten(2).flip(-1))
    assert torch.equal(cross_merge(xs, 4, 5), 4 * x)  # every route puts each token back at its pixel


@pytest.mark.parametrize(("h", "w"), [(6, 8), (5, 7), (1, 4), (3, 3)])
def test_strided_scan_visits_every_pixel_once(h, w):
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    xs = strided_scan(x)
    assert xs.shape == (2, 4, 3, math.ceil(h / 2) * math.ceil(w / 2))
    assert torch.equal(strided_merge(xs, h, w), x)
    assert torch.equal(xs[:, 0], x[:, :, 0::2, 0::2].flatten(2))  # even/even never holds padding
    assert torch.equal(xs[:, 1], x[:, :, 1::2, 0::2].transpose(2, 3).flatten(2)) if h % 2 == 0 else True


def _swap_routes(module: SS2D) -> SS2D:
    """The same module with routes (0, 1) and (2, 3) exchanged: row-major <-> column-major."""
    other = copy.deepcopy(module)
    perm = [1, 0, 3, 2]
    k, d = 4, module.d_inner
    with torch.no_grad():
        other.x_proj_weight.copy_(module.x_proj_weight[perm])
        other.dt_projs_weight.copy_(module.dt_projs_weight[perm])
        other.dt_projs_bias.copy_(module.dt_projs_bias[perm])
        other.A_logs.copy_(module.A_logs.view(k, d, -1)[perm].reshape(k * d, -1))
        other.Ds.copy_(module.Ds.view(k, d)[perm].reshape(-1))
    return other


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_route_symmetry_under_transpose(backend):
    """SS2D(x^T) with the row/column routes' parameters swapped is SS2D(x)^T."""
    torch.manual_seed(0)
    ss = SS2D(12, d_state=4, backend=backend).double()
    with torch.no_grad():  # break the symmetry of the initial A and D so the test means something
        ss.A_logs.add_(torch.randn_like(ss.A_logs) * 0.3)
        ss.Ds.add_(torch.randn_like(ss.Ds))
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64)
    y = ss(x)
    y_t = _swap_routes(ss)(x.transpose(2, 3))
    assert y.shape == x.shape
    torch.testing.assert_close(y_t, y.transpose(2, 3), rtol=1e-10, atol=1e-12)
    # and without the swap the result differs: the routes really have their own parameters
    assert not torch.allclose(ss(x.transpose(2, 3)), y.transpose(2, 3), atol=1e-6)


def _route_orders(h: int, w: int, routes: str) -> list[list[tuple[int, int]]]:
    """Pixel visiting order of each route, written out independently of the module."""
    if routes == "cross":
        row = [(i, j) for i in range(h) for j in range(w)]
        col = [(i, j) for j in range(w) for i in range(h)]
        return [row, col, row[::-1], col[::-1]]
    grid = lambda p, q: [(i, j) for i in range(p, h, 2) for j in range(q, w, 2)]  # noqa: E731
    colmajor = lambda p, q: [(i, j) for j in range(q, w, 2) for i in range(p, h, 2)]  # noqa: E731
    return [grid(0, 0), colmajor(1, 0), grid(0, 1)[::-1], colmajor(1, 1)[::-1]]


@pytest.mark.parametrize(("routes", "h", "w"), [("cross", 3, 4), ("strided", 4, 6), ("strided", 5, 3)])
def test_ss2d_matches_a_per_route_recurrence(routes, h, w):
    """Each route: its own projections, a float64 step-by-step scan along its pixel order, outputs
    summed back at their pixels (the strided routes skip padding entirely)."""
    torch.manual_seed(3)
    d, n = 6, 3
    ss = SS2D(d, d_state=n, dt_rank=2, routes=routes).double()
    with torch.no_grad():
        ss.A_logs.add_(torch.randn_like(ss.A_logs) * 0.3)
        ss.Ds.add_(torch.randn_like(ss.Ds))
    x = torch.randn(2, d, h, w, dtype=torch.float64)
    expected = torch.zeros_like(x)
    for k, order in enumerate(_route_orders(h, w, routes)):
        seq = torch.stack([x[:, :, i, j] for i, j in order], dim=-1)  # (b, d, L)
        proj = torch.einsum("cd,bdl->bcl", ss.x_proj_weight[k], seq)
        dt_low, bs, cs = proj.split([2, n, n], dim=1)
        delta = F.softplus(torch.einsum("dr,brl->bdl", ss.dt_projs_weight[k], dt_low) + ss.dt_projs_bias[k][:, None])
        a = -torch.exp(ss.A_logs.view(4, d, n)[k])
        state = torch.zeros(2, d, n, dtype=torch.float64)
        for t, (i, j) in enumerate(order):
            state = torch.exp(delta[:, :, t, None] * a) * state + (delta[:, :, t] * seq[:, :, t])[..., None] * bs[:, None, :, t]
            expected[:, :, i, j] += (state * cs[:, None, :, t]).sum(-1) + ss.Ds.view(4, d)[k] * seq[:, :, t]
    with torch.no_grad():
        torch.testing.assert_close(ss(x), expected, rtol=1e-10, atol=1e-12)


def test_identity_steps_leave_the_scan_unchanged():
    """The strided variant pads odd maps with steps whose raw delta is -1e4: they must be no-ops."""
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 8, 4, 30
    u, delta = torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g)
    bs, cs = torch.randn(b, 1, n, length, generator=g), torch.randn(b, 1, n, length, generator=g)
    a = -torch.rand(d, n, generator=g) - 0.1
    bias = torch.randn(d, generator=g)
    keep = torch.ones(length, dtype=torch.bool)
    keep[[0, 7, 8, 29]] = False
    pad_u, pad_delta = u.clone(), delta.clone()
    pad_u[..., ~keep] = 0
    pad_delta[..., ~keep] = -1e4
    for backend in ("cpp", "torch"):
        full = selective_scan(pad_u, pad_delta, a, bs, cs, None, None, bias, True, backend=backend)
        short = selective_scan(u[..., keep], delta[..., keep], a, bs[..., keep], cs[..., keep], None, None, bias,
                               True, backend=backend)
        torch.testing.assert_close(full[..., keep], short, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("routes", ["cross", "strided"])
@pytest.mark.parametrize(("h", "w"), [(6, 8), (5, 7)])
def test_ss2d_backends_agree(routes, h, w):
    torch.manual_seed(1)
    ss = SS2D(16, d_state=8, routes=routes).double()
    x = torch.randn(2, 16, h, w, dtype=torch.float64, requires_grad=True)
    grads = []
    outs = []
    for backend in ("cpp", "torch"):
        ss.backend = backend
        ss.zero_grad(set_to_none=True)
        x.grad = None
        y = ss(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in ss.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-9, atol=1e-11)


def test_strided_padding_gets_no_gradient_and_keeps_shape():
    ss = SS2D(8, d_state=4, routes="strided")
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    y = ss(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in ss.parameters())


def test_mamba_initialisation():
    block = VSSBlock(40, d_state=16)
    ss = block.ss2d
    assert block.d_inner == 80 and ss.dt_rank == math.ceil(40 / 16)
    a = -torch.exp(ss.A_logs)
    torch.testing.assert_close(a, -torch.arange(1, 17, dtype=torch.float32).expand(4 * 80, 16))
    assert torch.equal(ss.Ds, torch.ones(4 * 80))
    dt = F.softplus(ss.dt_projs_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    bound = ss.dt_rank ** -0.5
    assert ss.dt_projs_weight.abs().max() <= bound
    assert ss.x_proj_weight.shape == (4, ss.dt_rank + 32, 80)


@pytest.mark.parametrize("routes", ["cross", "strided"])
def test_vss_block_learns_a_toy_reconstruction(routes):
    """Denoise a smooth map from its noisy version: needs spatial context, which SS2D provides.

    One thread: these small ops gain nothing from two, and a shared CI box cannot stall them."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = _train_toy(routes)
    finally:
        torch.set_num_threads(threads)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses[::10]


def _train_toy(routes: str) -> list[float]:
    block = VSSBlock(16, d_state=8, routes=routes)
    head = torch.nn.Linear(16, 16)
    opt = torch.optim.Adam(list(block.parameters()) + list(head.parameters()), lr=3e-3)
    clean = F.avg_pool2d(torch.randn(32, 16, 12, 12), 3, stride=1, padding=1).permute(0, 2, 3, 1) * 3
    noisy = clean + 0.5 * torch.randn_like(clean)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(head(block(noisy)), clean)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
