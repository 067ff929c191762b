"""Rectified CFG combine in Triton (docs/SPEC.md §2): statistics, coefficients and combine, all on the device.

The inference path (the fused op) is one or two launches, with no host work beyond them:

- plain CFG without rescale (no statistics): ONE launch, ``_combine_kernel`` with the coefficients computed
  from the scalars in its prologue: reads the branches once, writes the result once.
- every other mode: ``_stats_kernel`` grid (G, chunks) reduces a fixed chunk of one sample into float32
  partials of only the statistics the mode needs (constexpr flags: zero-star needs ⟨u,u⟩ ⟨u,D⟩, APG adds ⟨D,D⟩
  and with momentum ⟨·,c⟩, rescale adds the sums and the third branch's terms); then ``_combine_kernel``
  grid (G, chunks), whose prologue re-reduces its sample's partials (float64, fixed order, so every program
  computes bit-identical coefficients whatever the scheduling) and computes γ (u, c, d, b_old) with the math of
  ``rcfg::coefficients`` (csrc/include/rectified_cfg_params.h), then writes out = Σ γ_k x_k (and with APG
  momentum b <- c - u + β b). A separate coefficient launch, and its single-program float64 reduction of up
  to 1024 partials, are gone.

Partials are stored statistic-major, [G, 16, chunks], so a prologue reads each needed statistic's partials as
one contiguous row (≤ 1024 floats), in blocks of ``_PARTS_BLOCK`` whatever the number of chunks: the kernels
compile once per dtype and flag set, not per N, M or B.

Grid: about ``_WAVES`` waves of the device's SMs (528 programs on a 132-SM H100), chunks a multiple of
``_BLOCK`` = 2048 elements (8 warps x 32 threads x 8 contiguous elements: 16-byte loads of 16-bit types).

Bytes moved, Wan 81-frame latent [2,16,21,60,104] bf16, cfg + rescale (G = 1, n = 2,096,640 per branch,
4.19 MB per branch): statistics read u, c (8.39 MB); combine reads u, c (8.39 MB: they fit the H100's 50 MB
L2 after the first pass, so mostly L2 hits) and writes out (4.19 MB); partials 512 x 16 floats (32 KB, each
prologue reads 5 rows of 2 KB from L2). HBM traffic ≈ 12.6 MB when the second read hits L2 (21 MB when it does
not), against 16.8 MB for the copy of the same bytes the bench times as its floor (0.013 ms). Plain CFG is
one pass: 12.6 MB. UNMEASURED: no GPU has timed this design (the previous three-launch design took 0.390 ms
on the H100 for the case above; the CUDA kernel 0.021 ms).

Compiled for sm_90 and sm_80 with triton 3.7.1 (bf16 and fp32): 16-byte vector loads, no spills; 40-64
registers per thread on the cfg + rescale path (stats, combine), up to 163 with every statistic (APG momentum,
three branches, rescale).

Why the previous design took 0.390 ms on the H100 where eager PyTorch took 0.198 and the CUDA kernel 0.021
(Wan latent above; found by reading and by timing the host path on a CPU with the launches stubbed out; the
split on a GPU is unmeasured). The bench flushes L2 before each call (a 256 MB memset, ~80 µs of GPU time)
and times from the flush's end: host work up to that long is hidden, beyond it every microsecond shows.
1. Host: each call went through ``torch.library.custom_op``'s Python layers (argument defaults, ADInplaceOrView,
   the autograd wrapper, the aliasing check): 0.36-0.40 ms per call on a loaded 2-core host with the kernels
   stubbed out, 0.05 ms through ``fused_direct`` (below). The CUDA kernels are C++ ops and pay none of it.
2. Three Triton launches (each binds 10-17 arguments in Python) and three allocations, one of them a float64
   statistics tensor the fused path never read; now one launch for plain CFG, two otherwise, one allocation.
3. The coefficient kernel: one program per sample reducing up to 1024 partials x 14 statistics in float64
   while every other SM idled, between the two passes; now folded into the combine's prologue.
4. The grid was not the problem here: 512 programs of 4096 elements on 132 SMs (the new plan gives the same).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (slow: tests use small shapes).
The ops are registered as ``dare_kernels::rectified_cfg_{fused,stats,combine}_triton``; fake impls
and autograd come from dare_kernels/ops/rectified_cfg.py.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._direct import direct_ok
from ..ops.rectified_cfg import NUM_STATS, register_backend_ops
from ..reference import CFG_MODE_ID as _MODES

_SLOTS = 16          # partial statistics per chunk (14 used, layout of csrc/include/rectified_cfg_params.h)
_MAX_CHUNKS = 1024   # chunks per sample: bounds each prologue's re-reduction (≤ 1024 x 5-14 floats from L2)
_BLOCK = 2048        # elements per program step: 8 warps x 32 threads x 8 contiguous elements
_NUM_WARPS = 8
_PARTS_BLOCK = 256   # partials reduced per step of a prologue (fixed: no recompile across N)
_WAVES = 4           # programs per launch ≈ this many per SM
_CPU_SMS = 2         # the interpreter's stand-in: small, so modest test sizes get several chunks


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _stats_kernel(u_ptr, c_ptr, d_ptr, b_ptr, part_ptr, N, CHUNK, n_chunks, beta,
                  SUMS: tl.constexpr, E: tl.constexpr, C: tl.constexpr, MOM: tl.constexpr, BLOCK: tl.constexpr):
    """Partial statistics of chunk ``program_id(1)`` of sample ``program_id(0)`` into part[g, slot, chunk].

    Always ⟨u,u⟩ ⟨u,D⟩ ⟨D,D⟩ (D = c - u (+ β b)); SUMS: Σu ΣD (and ΣE, Σc with E / C); E: the third branch's
    E = c - d terms; C: with momentum, c's terms. Slots not computed are left unwritten (never read)."""
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
            v1 = v1 + beta * tl.load(b_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
        g00 += u * u
        g01 += u * v1
        g11 += v1 * v1
        if SUMS:
            s0 += u
            s1 += v1
        if E:
            e = c - tl.load(d_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            s2 += e
            g02 += u * e
            g12 += v1 * e
            g22 += e * e
            if C:
                g23 += e * c
        if C:
            s3 += c
            g03 += u * c
            g13 += v1 * c
            g33 += c * c
    base = part_ptr + g.to(tl.int64) * (16 * n_chunks) + ch
    tl.store(base + 4 * n_chunks, tl.sum(g00, axis=0))
    tl.store(base + 5 * n_chunks, tl.sum(g01, axis=0))
    tl.store(base + 8 * n_chunks, tl.sum(g11, axis=0))
    if SUMS:
        tl.store(base + 0 * n_chunks, tl.sum(s0, axis=0))
        tl.store(base + 1 * n_chunks, tl.sum(s1, axis=0))
    if E:
        tl.store(base + 2 * n_chunks, tl.sum(s2, axis=0))
        tl.store(base + 6 * n_chunks, tl.sum(g02, axis=0))
        tl.store(base + 9 * n_chunks, tl.sum(g12, axis=0))
        tl.store(base + 11 * n_chunks, tl.sum(g22, axis=0))
        if C:
            tl.store(base + 12 * n_chunks, tl.sum(g23, axis=0))
    if C:
        tl.store(base + 3 * n_chunks, tl.sum(s3, axis=0))
        tl.store(base + 7 * n_chunks, tl.sum(g03, axis=0))
        tl.store(base + 10 * n_chunks, tl.sum(g13, axis=0))
        tl.store(base + 13 * n_chunks, tl.sum(g33, axis=0))


@triton.jit
def _reduce_slot(row_ptr, n_chunks, ON: tl.constexpr, PB: tl.constexpr):
    """Σ of one statistic's partials (a contiguous row of n_chunks floats) in float64, fixed order; 0 if not ON."""
    acc = tl.zeros([PB], dtype=tl.float64)
    if ON:
        for p0 in range(0, n_chunks, PB):
            p = p0 + tl.arange(0, PB)
            acc += tl.load(row_ptr + p, mask=p < n_chunks, other=0.0).to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit
def _reduce_parts(part_ptr, g, n_chunks, SUMS: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                  PB: tl.constexpr):
    """The 14 statistics of sample g (float64) from its partials; those not computed are 0."""
    base = part_ptr + g.to(tl.int64) * (16 * n_chunks)
    S0 = _reduce_slot(base + 0 * n_chunks, n_chunks, SUMS, PB)
    S1 = _reduce_slot(base + 1 * n_chunks, n_chunks, SUMS, PB)
    S2 = _reduce_slot(base + 2 * n_chunks, n_chunks, E, PB)
    S3 = _reduce_slot(base + 3 * n_chunks, n_chunks, C, PB)
    G00 = _reduce_slot(base + 4 * n_chunks, n_chunks, True, PB)
    G01 = _reduce_slot(base + 5 * n_chunks, n_chunks, True, PB)
    G02 = _reduce_slot(base + 6 * n_chunks, n_chunks, E, PB)
    G03 = _reduce_slot(base + 7 * n_chunks, n_chunks, C, PB)
    G11 = _reduce_slot(base + 8 * n_chunks, n_chunks, True, PB)
    G12 = _reduce_slot(base + 9 * n_chunks, n_chunks, E, PB)
    G13 = _reduce_slot(base + 10 * n_chunks, n_chunks, C, PB)
    G22 = _reduce_slot(base + 11 * n_chunks, n_chunks, E, PB)
    G23 = _reduce_slot(base + 12 * n_chunks, n_chunks, E and C, PB)
    G33 = _reduce_slot(base + 13 * n_chunks, n_chunks, C, PB)
    return S0, S1, S2, S3, G00, G01, G02, G03, G11, G12, G13, G22, G23, G33


@triton.jit
def _coefficients(S0, S1, S2, S3, G00, G01, G02, G03, G11, G12, G13, G22, G23, G33, n_elem, s, sr, phi, eta,
                  tau, beta, MODE: tl.constexpr, MOM: tl.constexpr):
    """γ over (u, c, d, b_old) from the statistics (float64 scalars): the math of ``rcfg::coefficients``."""
    if MOM:  # slot 3 (c) is its own statistic with momentum, else reconstructed as u + D
        Sc = S3; Gcc = G33; G0c = G03; G1c = G13; G2c = G23
    else:
        Sc = S0 + S1
        Gcc = G00 + 2.0 * G01 + G11
        G0c = G00 + G01
        G1c = G01 + G11
        G2c = G02 + G12
    one = G00 * 0.0 + 1.0
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
    gu = (lam * (b0 - b1)).to(tl.float32)
    gc = (lam * (b1 + b2 + b3)).to(tl.float32)
    gd = (lam * (0.0 - b2)).to(tl.float32)
    if MOM:
        gb = (lam * beta * b1).to(tl.float32)
    else:
        gb = (lam * 0.0).to(tl.float32)
    return gu, gc, gd, gb


@triton.jit
def _finalize_kernel(part_ptr, stats_ptr, n_chunks, SUMS: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                     PB: tl.constexpr):
    """stats[g, :14] (float32) from the partials: the statistics op of the autograd path."""
    g = tl.program_id(0)
    st = _reduce_parts(part_ptr, g, n_chunks, SUMS, E, C, PB)
    sb = stats_ptr + g.to(tl.int64) * 14
    tl.store(sb + 0, st[0].to(tl.float32))
    tl.store(sb + 1, st[1].to(tl.float32))
    tl.store(sb + 2, st[2].to(tl.float32))
    tl.store(sb + 3, st[3].to(tl.float32))
    tl.store(sb + 4, st[4].to(tl.float32))
    tl.store(sb + 5, st[5].to(tl.float32))
    tl.store(sb + 6, st[6].to(tl.float32))
    tl.store(sb + 7, st[7].to(tl.float32))
    tl.store(sb + 8, st[8].to(tl.float32))
    tl.store(sb + 9, st[9].to(tl.float32))
    tl.store(sb + 10, st[10].to(tl.float32))
    tl.store(sb + 11, st[11].to(tl.float32))
    tl.store(sb + 12, st[12].to(tl.float32))
    tl.store(sb + 13, st[13].to(tl.float32))


@triton.jit
def _combine_kernel(u_ptr, c_ptr, d_ptr, b_ptr, bnew_ptr, out_ptr, coef_ptr, part_ptr, N, CHUNK, n_chunks,
                    n_elem, s, sr, phi, eta, tau, beta,
                    COEF: tl.constexpr, MODE: tl.constexpr, SUMS: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                    K3: tl.constexpr, MOM: tl.constexpr, WRITE_BUF: tl.constexpr, BLOCK: tl.constexpr,
                    PB: tl.constexpr):
    """out = Σ γ x over chunk ``program_id(1)`` of sample ``program_id(0)``.

    γ: COEF 0 loads coef[g, :4]; COEF 1 computes it from the scalars (plain CFG: no statistics); COEF 2
    re-reduces the sample's partials and computes it (every program of a sample gets the same bits)."""
    g = tl.program_id(0)
    ch = tl.program_id(1)
    row = g.to(tl.int64) * N
    start = ch.to(tl.int64) * CHUNK
    if COEF == 0:
        cb = coef_ptr + g.to(tl.int64) * 4
        gu = tl.load(cb + 0).to(tl.float32)
        gc = tl.load(cb + 1).to(tl.float32)
        gd = tl.load(cb + 2).to(tl.float32)
        gb = tl.load(cb + 3).to(tl.float32)
    else:
        if COEF == 2:
            st = _reduce_parts(part_ptr, g, n_chunks, SUMS, E, C, PB)
        else:
            z = tl.sum(tl.zeros([PB], dtype=tl.float64), axis=0)
            st = (z, z, z, z, z, z, z, z, z, z, z, z, z, z)
        gu, gc, gd, gb = _coefficients(st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7], st[8], st[9],
                                       st[10], st[11], st[12], st[13], n_elem, s, sr, phi, eta, tau,
                                       beta, MODE, MOM)
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


# ---------------------------------------------------------------------------------------------
# launch plan (host side: integer arithmetic only, cached per shape and device)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _sm_count(device_index: int | None) -> int:
    if device_index is None:  # CPU tensors: the interpreter
        return _CPU_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=1024)
def _plan(groups: int, n: int, sms: int) -> tuple[int, int]:
    """(chunk, chunks per sample): about _WAVES programs per SM in all, a chunk a multiple of _BLOCK, at most
    _MAX_CHUNKS chunks per sample."""
    per_sample = max(1, (_WAVES * sms) // max(1, groups))
    chunk = triton.cdiv(triton.cdiv(n, per_sample), _BLOCK) * _BLOCK
    chunk = max(chunk, triton.cdiv(triton.cdiv(n, _MAX_CHUNKS), _BLOCK) * _BLOCK, _BLOCK)
    return chunk, triton.cdiv(n, chunk)


def _layout(u: torch.Tensor, n_reduce: int) -> tuple[int, int, int, int]:
    """(groups G, elements per sample n, chunk, chunks per sample) of ``u`` reduced over its last n_reduce dims."""
    n = math.prod(u.shape[u.dim() - n_reduce:])
    groups = u.numel() // n if n > 0 else 0
    if groups == 0:
        return 0, n, _BLOCK, 1
    dev = u.device.index if u.device.type == "cuda" else None
    if u.device.type == "cuda" and dev is None:
        dev = torch.cuda.current_device()
    return (groups, n) + _plan(groups, n, _sm_count(dev))


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _flags(mode: str, rescale: bool, k3: bool, mom: bool) -> dict:
    """Which statistics the coefficients of ``mode`` need (see _stats_kernel)."""
    return dict(SUMS=rescale, E=k3 and rescale, C=mom and (mode == "apg" or rescale))


def _launch_stats(u, c, d, b, groups, n, chunk, n_chunks, beta, flags):
    part = torch.empty((groups, _SLOTS, n_chunks), dtype=torch.float32, device=u.device)
    _stats_kernel[(groups, n_chunks)](u, c, d if d is not None else u, b if b is not None else u, part,
                                      n, chunk, n_chunks, float(beta), MOM=b is not None, BLOCK=_BLOCK,
                                      num_warps=_NUM_WARPS, **flags)
    return part


def _launch_combine(u, c, d, b, b_new, out, coeffs, part, groups, n, chunk, n_chunks, coef_src, mode="cfg",
                    s=0.0, sr=0.0, phi=0.0, eta=1.0, tau=0.0, beta=0.0, flags=None):
    flags = flags or dict(SUMS=False, E=False, C=False)
    _combine_kernel[(groups, n_chunks)](
        u, c, d if d is not None else u, b if b is not None else u, b_new if b_new is not None else u, out,
        coeffs if coeffs is not None else u, part if part is not None else u, n, chunk, n_chunks, float(n),
        float(s), float(sr), float(phi), float(eta), float(tau), float(beta),
        COEF=coef_src, MODE=_MODES[mode], K3=d is not None, MOM=b is not None, WRITE_BUF=b_new is not None,
        BLOCK=_BLOCK, PB=_PARTS_BLOCK, num_warps=_NUM_WARPS, **flags)


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------

def _fused(u: torch.Tensor, c: torch.Tensor, d: Optional[torch.Tensor], momentum_buffer: Optional[torch.Tensor],
           out: torch.Tensor, n_reduce: int, guidance_mode: str, guidance_scale: float, rectify_scale: float,
           guidance_rescale: float, eta: float, norm_threshold: float, momentum: float) -> None:
    """The fused op's body: out (and the momentum buffer) from the branches, in one or two launches."""
    groups, n, chunk, n_chunks = _layout(u, n_reduce)
    if groups == 0:
        return
    uf, cf, df, bf = _flat(u), _flat(c), _flat(d), _flat(momentum_buffer)
    mom = bf is not None
    sr = rectify_scale if df is not None else 0.0
    rescale = guidance_rescale > 0
    o = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    coef = dict(mode=guidance_mode, s=guidance_scale, sr=sr, phi=guidance_rescale, eta=eta, tau=norm_threshold,
                beta=momentum)
    if guidance_mode == "cfg" and not rescale:  # one pass: γ from the scalars
        _launch_combine(uf, cf, df, bf, bf, o, None, None, groups, n, chunk, n_chunks, 1, **coef)
    else:
        flags = _flags(guidance_mode, rescale, df is not None, mom)
        part = _launch_stats(uf, cf, df, bf, groups, n, chunk, n_chunks, momentum, flags)
        _launch_combine(uf, cf, df, bf, bf, o, None, part, groups, n, chunk, n_chunks, 2, flags=flags, **coef)
    if o is not out:
        out.copy_(o)
    if mom and bf is not momentum_buffer:
        momentum_buffer.copy_(bf)


rectified_cfg_fused_triton = torch.library.custom_op("dare_kernels::rectified_cfg_fused_triton",
                                                     mutates_args=("momentum_buffer", "out"))(_fused)


def fused_direct(u, c, d, momentum_buffer, out, n_reduce, guidance_mode, guidance_scale, rectify_scale,
                 guidance_rescale, eta, norm_threshold, momentum) -> None:
    """The fused op for eager inference calls, without the custom-op round trip.

    ``torch.library.custom_op``'s Python layers (argument defaults, ADInplaceOrView, the autograd wrapper, the
    aliasing check) cost more host time per call than the kernels take on a GPU (about 0.4 ms per call on a
    loaded 2-core CPU host, against 12.6 MB of traffic, i.e. ~10 µs, on an H100). The inference path (no
    gradient: dare_kernels/cfg.py calls the fused op only then) calls the body directly and bumps the version
    counters of what it wrote, as the op would. Under torch.compile, a fake or subclass tensor, a dispatch or
    function mode, or a functorch transform, it goes through the registered op."""
    args = (u, c, d, momentum_buffer, out, n_reduce, guidance_mode, guidance_scale, rectify_scale, guidance_rescale,
            eta, norm_threshold, momentum)
    if not direct_ok((u, c, d, momentum_buffer, out)):
        return rectified_cfg_fused_triton(*args)
    _fused(*args)
    torch.autograd.graph.increment_version(out)
    if momentum_buffer is not None:
        torch.autograd.graph.increment_version(momentum_buffer)
    return None


@torch.library.custom_op("dare_kernels::rectified_cfg_stats_triton", mutates_args=())
def rectified_cfg_stats_triton(u: torch.Tensor, c: torch.Tensor, d: Optional[torch.Tensor],
                               momentum_buffer: Optional[torch.Tensor], n_reduce: int, momentum: float) -> torch.Tensor:
    groups, n, chunk, n_chunks = _layout(u, n_reduce)
    stats = torch.zeros((groups, NUM_STATS), dtype=torch.float32, device=u.device)
    if groups == 0:
        return stats
    uf, cf, df, bf = _flat(u), _flat(c), _flat(d), _flat(momentum_buffer)
    flags = dict(SUMS=True, E=df is not None, C=bf is not None)  # every statistic the inputs define
    part = _launch_stats(uf, cf, df, bf, groups, n, chunk, n_chunks, momentum, flags)
    _finalize_kernel[(groups,)](part, stats, n_chunks, PB=_PARTS_BLOCK, num_warps=4, **flags)
    return stats


@torch.library.custom_op("dare_kernels::rectified_cfg_combine_triton", mutates_args=())
def rectified_cfg_combine_triton(u: torch.Tensor, c: torch.Tensor, d: Optional[torch.Tensor],
                                 momentum_buffer: Optional[torch.Tensor], coeffs: torch.Tensor,
                                 n_reduce: int) -> torch.Tensor:
    groups, n, chunk, n_chunks = _layout(u, n_reduce)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    if groups == 0:
        return out
    uf, cf, df, bf = _flat(u), _flat(c), _flat(d), _flat(momentum_buffer)
    _launch_combine(uf, cf, df, bf, None, out, coeffs.to(torch.float32).contiguous(), None, groups, n, chunk,
                    n_chunks, 0)
    return out


# what dare_kernels/backends.py hands the public function instead of the registered op (same call signature)
DIRECT_OPS = {"dare_kernels::rectified_cfg_fused_triton": fused_direct}

register_backend_ops("dare_kernels::rectified_cfg_fused_triton", "dare_kernels::rectified_cfg_stats_triton",
                     "dare_kernels::rectified_cfg_combine_triton")
