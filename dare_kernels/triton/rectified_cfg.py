"""Rectified CFG combine in Triton (docs/SPEC.md §2): statistics, coefficients and combine, all on the device.

Three launches, no host synchronisation:
1. ``_stats_kernel``  grid (G, chunks): each program reduces a fixed chunk of one sample into 14 float32
   partial statistics (layout in csrc/include/rectified_cfg_params.h), so the result does not depend
   on scheduling.
2. ``_coeff_kernel``  grid (G,): adds the partials of a sample in a fixed order (float64), writes the
   statistics and the coefficients γ (u, c, d, b_old) with the same math as ``rcfg::coefficients``.
3. ``_combine_kernel`` grid (G, chunks): out = Σ γ_k x_k, and with APG momentum b <- c - u + β b.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (slow: tests use small shapes).
The ops are registered as ``dare_kernels::rectified_cfg_{fused,stats,combine}_triton``; fake impls
and autograd come from dare_kernels/ops/rectified_cfg.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.rectified_cfg import NUM_COEFFS, NUM_STATS, register_backend_ops
from ..reference import CFG_MODE_ID as _MODES

_PART_STRIDE = 16      # partial statistics are padded to 16 floats
_MAX_CHUNKS = 1024     # chunks per sample (the coefficient kernel sums them in one block)
_BLOCK = 1024


@triton.jit
def _stats_kernel(u_ptr, c_ptr, d_ptr, b_ptr, part_ptr, N, CHUNK, n_chunks, beta,
                  K3: tl.constexpr, MOM: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    ch = tl.program_id(1)
    row = g.to(tl.int64) * N
    start = ch.to(tl.int64) * CHUNK
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    s0 = zero; s1 = zero; s2 = zero; s3 = zero
    g00 = zero; g01 = zero; g02 = zero; g03 = zero; g11 = zero
    g12 = zero; g13 = zero; g22 = zero; g23 = zero; g33 = zero
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        m = idx < N
        u = tl.load(u_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
        v1 = c - u
        if MOM:
            b = tl.load(b_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            v1 = v1 + beta * b
        s0 += u
        s1 += v1
        g00 += u * u
        g01 += u * v1
        g11 += v1 * v1
        if K3:
            e = c - tl.load(d_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            s2 += e
            g02 += u * e
            g12 += v1 * e
            g22 += e * e
            if MOM:
                g23 += e * c
        if MOM:
            s3 += c
            g03 += u * c
            g13 += v1 * c
            g33 += c * c
    base = part_ptr + (g.to(tl.int64) * n_chunks + ch) * 16
    tl.store(base + 0, tl.sum(s0, axis=0))
    tl.store(base + 1, tl.sum(s1, axis=0))
    tl.store(base + 2, tl.sum(s2, axis=0))
    tl.store(base + 3, tl.sum(s3, axis=0))
    tl.store(base + 4, tl.sum(g00, axis=0))
    tl.store(base + 5, tl.sum(g01, axis=0))
    tl.store(base + 6, tl.sum(g02, axis=0))
    tl.store(base + 7, tl.sum(g03, axis=0))
    tl.store(base + 8, tl.sum(g11, axis=0))
    tl.store(base + 9, tl.sum(g12, axis=0))
    tl.store(base + 10, tl.sum(g13, axis=0))
    tl.store(base + 11, tl.sum(g22, axis=0))
    tl.store(base + 12, tl.sum(g23, axis=0))
    tl.store(base + 13, tl.sum(g33, axis=0))


@triton.jit
def _coeff_kernel(part_ptr, stats_ptr, coef_ptr, n_chunks, n_elem, s, sr, phi, eta, tau, beta,
                  MODE: tl.constexpr, MOM: tl.constexpr, NEED_STATS: tl.constexpr, WRITE_COEFFS: tl.constexpr,
                  NP: tl.constexpr):
    g = tl.program_id(0)
    p = tl.arange(0, NP)
    pm = p < n_chunks
    base = part_ptr + (g.to(tl.int64) * n_chunks + p) * 16
    if NEED_STATS:
        S0 = tl.sum(tl.load(base + 0, mask=pm, other=0.0).to(tl.float64), axis=0)
        S1 = tl.sum(tl.load(base + 1, mask=pm, other=0.0).to(tl.float64), axis=0)
        S2 = tl.sum(tl.load(base + 2, mask=pm, other=0.0).to(tl.float64), axis=0)
        S3 = tl.sum(tl.load(base + 3, mask=pm, other=0.0).to(tl.float64), axis=0)
        G00 = tl.sum(tl.load(base + 4, mask=pm, other=0.0).to(tl.float64), axis=0)
        G01 = tl.sum(tl.load(base + 5, mask=pm, other=0.0).to(tl.float64), axis=0)
        G02 = tl.sum(tl.load(base + 6, mask=pm, other=0.0).to(tl.float64), axis=0)
        G03 = tl.sum(tl.load(base + 7, mask=pm, other=0.0).to(tl.float64), axis=0)
        G11 = tl.sum(tl.load(base + 8, mask=pm, other=0.0).to(tl.float64), axis=0)
        G12 = tl.sum(tl.load(base + 9, mask=pm, other=0.0).to(tl.float64), axis=0)
        G13 = tl.sum(tl.load(base + 10, mask=pm, other=0.0).to(tl.float64), axis=0)
        G22 = tl.sum(tl.load(base + 11, mask=pm, other=0.0).to(tl.float64), axis=0)
        G23 = tl.sum(tl.load(base + 12, mask=pm, other=0.0).to(tl.float64), axis=0)
        G33 = tl.sum(tl.load(base + 13, mask=pm, other=0.0).to(tl.float64), axis=0)
    else:
        z = tl.sum(tl.zeros([NP], dtype=tl.float64), axis=0)
        S0 = z; S1 = z; S2 = z; S3 = z; G00 = z; G01 = z; G02 = z; G03 = z; G11 = z
        G12 = z; G13 = z; G22 = z; G23 = z; G33 = z
    sb = stats_ptr + g.to(tl.int64) * 14
    tl.store(sb + 0, S0)
    tl.store(sb + 1, S1)
    tl.store(sb + 2, S2)
    tl.store(sb + 3, S3)
    tl.store(sb + 4, G00)
    tl.store(sb + 5, G01)
    tl.store(sb + 6, G02)
    tl.store(sb + 7, G03)
    tl.store(sb + 8, G11)
    tl.store(sb + 9, G12)
    tl.store(sb + 10, G13)
    tl.store(sb + 11, G22)
    tl.store(sb + 12, G23)
    tl.store(sb + 13, G33)
    if WRITE_COEFFS:
        # slot 3 (c) reconstructed as u + D without momentum
        if MOM:
            Sc = S3; Gcc = G33; G0c = G03; G1c = G13; G2c = G23
        else:
            Sc = S0 + S1
            Gcc = G00 + 2.0 * G01 + G11
            G0c = G00 + G01
            G1c = G01 + G11
            G2c = G02 + G12
        one = S0 * 0.0 + 1.0
        b0 = one
        b1 = one * s
        b2 = one * sr
        b3 = one * 0.0
        if MODE == 1:  # cfg_zero_star
            alpha = (G00 + G01) / (G00 + 1e-8)
            b0 = alpha + s * ((1e-8 - G01) / (G00 + 1e-8))
        if MODE == 2:  # apg
            rho = one
            if tau > 0.0:
                safe = tl.where(G11 > 0.0, G11, one)
                rho = tl.where(G11 > 0.0, tl.minimum(one, tau / tl.sqrt(safe)), one)
            cn = tl.maximum(tl.sqrt(Gcc), one * 1e-12)
            proj = G1c / (cn * cn)
            bb = s * rho * (eta - 1.0) * proj
            b1 = s * rho
            if MOM:
                b3 = bb
            else:
                b0 = b0 + bb
                b1 = b1 + bb
        lam = one
        if phi > 0.0:
            sg = b0 * S0 + b1 * S1 + b2 * S2 + b3 * Sc
            sgg = (b0 * b0 * G00 + b1 * b1 * G11 + b2 * b2 * G22 + b3 * b3 * Gcc
                   + 2.0 * (b0 * b1 * G01 + b0 * b2 * G02 + b0 * b3 * G0c + b1 * b2 * G12 + b1 * b3 * G1c
                            + b2 * b3 * G2c))
            var_g = tl.maximum(sgg - sg * sg / n_elem, 0.0) / (n_elem - 1.0)
            var_c = tl.maximum(Gcc - Sc * Sc / n_elem, 0.0) / (n_elem - 1.0)
            lam = phi * tl.sqrt(var_c) / tl.sqrt(var_g) + (1.0 - phi)
        cb = coef_ptr + g.to(tl.int64) * 4
        tl.store(cb + 0, (lam * (b0 - b1)).to(tl.float32))
        tl.store(cb + 1, (lam * (b1 + b2 + b3)).to(tl.float32))
        tl.store(cb + 2, (lam * (0.0 - b2)).to(tl.float32))
        if MOM:
            tl.store(cb + 3, (lam * beta * b1).to(tl.float32))
        else:
            tl.store(cb + 3, (lam * 0.0).to(tl.float32))


@triton.jit
def _combine_kernel(u_ptr, c_ptr, d_ptr, b_ptr, bnew_ptr, out_ptr, coef_ptr, N, CHUNK, beta,
                    K3: tl.constexpr, MOM: tl.constexpr, WRITE_BUF: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    ch = tl.program_id(1)
    row = g.to(tl.int64) * N
    start = ch.to(tl.int64) * CHUNK
    cb = coef_ptr + g.to(tl.int64) * 4
    gu = tl.load(cb + 0).to(tl.float32)
    gc = tl.load(cb + 1).to(tl.float32)
    gd = tl.load(cb + 2).to(tl.float32)
    gb = tl.load(cb + 3).to(tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        m = idx < N
        u = tl.load(u_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
        r = gu * u + gc * c
        if K3:
            r += gd * tl.load(d_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
        if MOM:
            b = tl.load(b_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            r += gb * b
            if WRITE_BUF:
                nb = (c - u) + beta * b
                tl.store(bnew_ptr + row + idx, nb.to(bnew_ptr.dtype.element_ty), mask=m)
        tl.store(out_ptr + row + idx, r.to(out_ptr.dtype.element_ty), mask=m)


def _layout(u: torch.Tensor, n_reduce: int):
    n = math.prod(u.shape[u.dim() - n_reduce:])
    groups = u.numel() // n if n > 0 else 0
    block = min(_BLOCK, max(16, triton.next_power_of_2(n)))
    chunk = max(block * 4, triton.cdiv(triton.cdiv(n, _MAX_CHUNKS), block) * block) if n > 0 else block
    chunk = min(chunk, triton.cdiv(n, block) * block) if n > 0 else block
    n_chunks = max(1, triton.cdiv(n, chunk))
    return groups, n, block, chunk, n_chunks


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _launch_stats(u, c, d, b, groups, n, block, chunk, n_chunks, beta):
    part = torch.empty((groups, n_chunks, _PART_STRIDE), dtype=torch.float32, device=u.device)
    _stats_kernel[(groups, n_chunks)](u, c, d if d is not None else u, b if b is not None else u, part,
                                      n, chunk, n_chunks, float(beta), K3=d is not None, MOM=b is not None,
                                      BLOCK=block)
    return part


def _launch_coeffs(part, groups, n, n_chunks, mode, s, sr, phi, eta, tau, beta, mom, need_stats, write_coeffs):
    dev = part.device
    stats = torch.empty((groups, NUM_STATS), dtype=torch.float64, device=dev)
    coeffs = torch.empty((groups, NUM_COEFFS), dtype=torch.float32, device=dev)
    _coeff_kernel[(groups,)](part, stats, coeffs, n_chunks, float(n), float(s), float(sr), float(phi), float(eta),
                             float(tau), float(beta), MODE=_MODES[mode], MOM=mom, NEED_STATS=need_stats,
                             WRITE_COEFFS=write_coeffs, NP=max(16, triton.next_power_of_2(n_chunks)))
    return stats, coeffs


def _launch_combine(u, c, d, b, b_new, out, coeffs, groups, n, block, chunk, n_chunks, beta):
    _combine_kernel[(groups, n_chunks)](u, c, d if d is not None else u, b if b is not None else u,
                                        b_new if b_new is not None else u, out, coeffs, n, chunk, float(beta),
                                        K3=d is not None, MOM=b is not None, WRITE_BUF=b_new is not None,
                                        BLOCK=block)


@torch.library.custom_op("dare_kernels::rectified_cfg_fused_triton", mutates_args=("momentum_buffer", "out"))
def rectified_cfg_fused_triton(u: torch.Tensor, c: torch.Tensor, d: Optional[torch.Tensor],
                               momentum_buffer: Optional[torch.Tensor], out: torch.Tensor, n_reduce: int,
                               guidance_mode: str, guidance_scale: float, rectify_scale: float,
                               guidance_rescale: float, eta: float, norm_threshold: float, momentum: float) -> None:
    groups, n, block, chunk, n_chunks = _layout(u, n_reduce)
    if groups == 0:
        return
    uf, cf, df, bf = _flat(u), _flat(c), _flat(d), _flat(momentum_buffer)
    mom = bf is not None
    sr = rectify_scale if df is not None else 0.0
    need_stats = guidance_mode != "cfg" or guidance_rescale > 0
    if need_stats:
        part = _launch_stats(uf, cf, df, bf, groups, n, block, chunk, n_chunks, momentum)
    else:
        part = torch.empty((groups, 1, _PART_STRIDE), dtype=torch.float32, device=u.device)
    _, coeffs = _launch_coeffs(part, groups, n, n_chunks if need_stats else 1, guidance_mode, guidance_scale, sr,
                               guidance_rescale, eta, norm_threshold, momentum, mom, need_stats, True)
    o = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    _launch_combine(uf, cf, df, bf, bf, o, coeffs, groups, n, block, chunk, n_chunks, momentum)
    if o is not out:
        out.copy_(o)
    if mom and bf is not momentum_buffer:
        momentum_buffer.copy_(bf)


@torch.library.custom_op("dare_kernels::rectified_cfg_stats_triton", mutates_args=())
def rectified_cfg_stats_triton(u: torch.Tensor, c: torch.Tensor, d: Optional[torch.Tensor],
                               momentum_buffer: Optional[torch.Tensor], n_reduce: int, momentum: float) -> torch.Tensor:
    groups, n, block, chunk, n_chunks = _layout(u, n_reduce)
    if groups == 0:
        return torch.zeros((0, NUM_STATS), dtype=torch.float32, device=u.device)
    uf, cf, df, bf = _flat(u), _flat(c), _flat(d), _flat(momentum_buffer)
    part = _launch_stats(uf, cf, df, bf, groups, n, block, chunk, n_chunks, momentum)
    stats, _ = _launch_coeffs(part, groups, n, n_chunks, "cfg", 0.0, 0.0, 0.0, 1.0, 0.0, momentum, bf is not None,
                              True, False)
    return stats.to(torch.float32)


@torch.library.custom_op("dare_kernels::rectified_cfg_combine_triton", mutates_args=())
def rectified_cfg_combine_triton(u: torch.Tensor, c: torch.Tensor, d: Optional[torch.Tensor],
                                 momentum_buffer: Optional[torch.Tensor], coeffs: torch.Tensor,
                                 n_reduce: int) -> torch.Tensor:
    groups, n, block, chunk, n_chunks = _layout(u, n_reduce)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    if groups == 0:
        return out
    uf, cf, df, bf = _flat(u), _flat(c), _flat(d), _flat(momentum_buffer)
    _launch_combine(uf, cf, df, bf, None, out, coeffs.to(torch.float32).contiguous(), groups, n, block, chunk,
                    n_chunks, 0.0)
    return out


register_backend_ops("dare_kernels::rectified_cfg_fused_triton", "dare_kernels::rectified_cfg_stats_triton",
                     "dare_kernels::rectified_cfg_combine_triton")
