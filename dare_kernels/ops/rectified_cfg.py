"""Rectified CFG custom ops: the schema every compiled backend follows, fake implementations, autograd.

Every mode is g = Σ_k γ_k x_k over x = (u, c, d, b_old) with per-sample γ computed from statistics
of a small basis of the branches (layout in csrc/include/rectified_cfg_params.h: sums of the slots
u, D = c - u (+ β b_old), E = c - d, c, then their Gram entries 00 01 02 03 11 12 13 22 23 33).
Each compiled backend is a triple of torch custom ops with one schema shape:

    <fused>(Tensor u, Tensor c, Tensor? d, Tensor(a!)? momentum_buffer, Tensor(b!) out, int n_reduce,
            str guidance_mode, float guidance_scale, float rectify_scale, float guidance_rescale, float eta,
            float norm_threshold, float momentum) -> ()
    <stats>(Tensor u, Tensor c, Tensor? d, Tensor? momentum_buffer, int n_reduce, float momentum) -> Tensor [G, 14]
    <combine>(Tensor u, Tensor c, Tensor? d, Tensor? momentum_buffer, Tensor coeffs [G, 4], int n_reduce) -> Tensor

All tensors share the shape [*groups, *reduced] (the last ``n_reduce`` dims are reduced). The fused op
is the inference path (statistics, coefficients and combine in the kernels, no host sync). When a
gradient is needed the function runs stats -> coefficients (PyTorch ops, so autograd sees how γ
depends on the statistics) -> combine; both ops have closed-form backward formulas below.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NUM_STATS", "NUM_COEFFS", "pair", "stats_dtype", "groups", "register_backend_ops", "coefficients_from_stats"]

NUM_STATS = 14
NUM_COEFFS = 4


def pair(i: int, j: int) -> int:
    """Index of the Gram entry (i, j), i <= j, in the statistics row."""
    return 4 + i * 4 - (i * (i - 1)) // 2 + (j - i)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def groups(shape, n_reduce: int):
    return math.prod(shape[: len(shape) - n_reduce])


def _fake_fused(u, c, d, momentum_buffer, out, n_reduce, guidance_mode, guidance_scale, rectify_scale, guidance_rescale,
                eta, norm_threshold, momentum):
    return None


def _fake_stats(u, c, d, momentum_buffer, n_reduce, momentum):
    return u.new_empty((groups(u.shape, n_reduce), NUM_STATS), dtype=stats_dtype(u.dtype))


def _fake_combine(u, c, d, momentum_buffer, coeffs, n_reduce):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


def _as_rows(t: torch.Tensor, n_reduce: int, dtype: torch.dtype) -> torch.Tensor:
    n = math.prod(t.shape[t.dim() - n_reduce:])
    return t.reshape(-1, n).to(dtype)


def _stats_setup(ctx, inputs, output):
    u, c, d, buf, n_reduce, momentum = inputs
    ctx.save_for_backward(u, c, d, buf)
    ctx.n_reduce = n_reduce
    ctx.momentum = momentum


def _stats_backward(ctx, g_stats):
    u, c, d, buf = ctx.saved_tensors
    acc = stats_dtype(u.dtype)
    nr = ctx.n_reduce
    U, C = _as_rows(u, nr, acc), _as_rows(c, nr, acc)
    D = C - U
    if buf is not None:
        D = D + ctx.momentum * _as_rows(buf, nr, acc)
    slots = [U, D, (C - _as_rows(d, nr, acc)) if d is not None else None, C if buf is not None else None]
    gs = g_stats.to(acc)
    gv = []
    for i, vi in enumerate(slots):
        if vi is None:
            gv.append(None)
            continue
        g = gs[:, i:i + 1].expand_as(vi)
        for j, vj in enumerate(slots):
            if vj is None:
                continue
            w = gs[:, pair(min(i, j), max(i, j))].unsqueeze(1)
            g = g + (2.0 * w if i == j else w) * vj
        gv.append(g)
    gu = gv[0] - gv[1]
    gc = gv[1] + (gv[2] if gv[2] is not None else 0) + (gv[3] if gv[3] is not None else 0)
    gd = -gv[2] if gv[2] is not None else None
    shape = u.shape
    return (gu.reshape(shape).to(u.dtype), gc.reshape(shape).to(c.dtype),
            gd.reshape(shape).to(d.dtype) if gd is not None else None, None, None, None)


def _combine_setup(ctx, inputs, output):
    u, c, d, buf, coeffs, n_reduce = inputs
    ctx.save_for_backward(u, c, d, buf, coeffs)
    ctx.n_reduce = n_reduce


def _combine_backward(ctx, g_out):
    u, c, d, buf, coeffs = ctx.saved_tensors
    acc = stats_dtype(u.dtype)
    nr = ctx.n_reduce
    go = _as_rows(g_out, nr, acc)
    gam = coeffs.to(acc)
    xs = [u, c, d, buf]
    grads = []
    g_coeffs = torch.zeros_like(gam)
    for k, x in enumerate(xs):
        if x is None:
            grads.append(None)
            continue
        if k < 3 and ctx.needs_input_grad[k]:
            grads.append((gam[:, k:k + 1] * go).reshape(x.shape).to(x.dtype))
        else:
            grads.append(None)
        if ctx.needs_input_grad[4]:
            g_coeffs[:, k] = (go * _as_rows(x, nr, acc)).sum(dim=1)
    return grads[0], grads[1], grads[2], None, g_coeffs.to(coeffs.dtype), None


def register_backend_ops(fused_name: str, stats_name: str, combine_name: str) -> None:
    """Give a (fused, stats, combine) triple of custom ops the shared fake impls and autograd."""
    torch.library.register_fake(fused_name)(_fake_fused)
    torch.library.register_fake(stats_name)(_fake_stats)
    torch.library.register_fake(combine_name)(_fake_combine)
    torch.library.register_autograd(stats_name, _stats_backward, setup_context=_stats_setup)
    torch.library.register_autograd(combine_name, _combine_backward, setup_context=_combine_setup)


# ---------------------------------------------------------------------------------------------
# coefficients from statistics (PyTorch ops: the differentiable mirror of rcfg::coefficients)
# ---------------------------------------------------------------------------------------------

def coefficients_from_stats(stats: torch.Tensor, n: int, *, K: int, mode: str, momentum: bool, guidance_scale: float,
                            rectify_scale: float = 0.0, guidance_rescale: float = 0.0, eta: float = 1.0,
                            norm_threshold: float = 0.0, beta: float = 0.0) -> torch.Tensor:
    """γ [G, 4] over (u, c, d, b_old) from statistics [G, 14]; same math as csrc/include/rectified_cfg_params.h."""
    st = stats

    def S(i):
        if i == 3 and not momentum:
            return st[:, 0] + st[:, 1]
        return st[:, i]

    def Gm(i, j):
        i, j = min(i, j), max(i, j)
        if j == 3 and not momentum:
            if i == 3:
                return st[:, pair(0, 0)] + 2.0 * st[:, pair(0, 1)] + st[:, pair(1, 1)]
            return Gm(i, 0) + Gm(i, 1)
        return st[:, pair(i, j)]

    s = float(guidance_scale)
    sr = float(rectify_scale) if K == 3 else 0.0
    zero = torch.zeros_like(st[:, 0])
    gb = [zero + 1.0, zero + s, zero + sr, zero]
    used = [True, True, K == 3, False]
    if mode == "cfg_zero_star":
        uu, ud = Gm(0, 0), Gm(0, 1)
        alpha = (uu + ud) / (uu + 1e-8)
        gb[0] = alpha + s * ((1e-8 - ud) / (uu + 1e-8))
    elif mode == "apg":
        dd = Gm(1, 1)
        rho = torch.ones_like(dd)
        if norm_threshold > 0:
            safe = torch.where(dd > 0, dd, torch.ones_like(dd))
            rho = torch.where(dd > 0, torch.clamp(norm_threshold / safe.sqrt(), max=1.0), rho)
        cnorm = Gm(3, 3).sqrt().clamp_min(1e-12)
        proj = Gm(1, 3) / (cnorm * cnorm)
        b = s * rho * (eta - 1.0) * proj
        gb[1] = s * rho
        if momentum:
            gb[3] = b
            used[3] = True
        else:
            gb[0] = gb[0] + b
            gb[1] = gb[1] + b
    lam = None
    if guidance_rescale > 0:
        idx = [i for i in range(4) if used[i]]
        sg = sum(gb[i] * S(i) for i in idx)
        sgg = sum(gb[i] * gb[j] * Gm(i, j) for i in idx for j in idx)
        sc = S(3)
        var_g = torch.clamp(sgg - sg * sg / n, min=0.0) / (n - 1)
        var_c = torch.clamp(Gm(3, 3) - sc * sc / n, min=0.0) / (n - 1)
        lam = guidance_rescale * var_c.sqrt() / var_g.sqrt() + (1.0 - guidance_rescale)
    gamma = [gb[0] - gb[1], gb[1] + gb[2] + gb[3], -gb[2], beta * gb[1] if momentum else zero]
    out = torch.stack(gamma, dim=1)
    return out if lam is None else out * lam.unsqueeze(1)
