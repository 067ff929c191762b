"""@triton.jit kernels of SRA attention (docs/SPEC.md §1). Launch logic lives in ``sra_attention.py``.

Conventions shared by every kernel:
- Scores are kept in the base-2 domain: ``s2 = scale·log2(e)·<q, k> + γ·log2(w)`` so that
  ``exp2(s2 - lse2)`` is the probability; ``lse`` is stored in natural log (``lse2 · ln 2``).
- A key is valid when it is in range, its mask bit is set and ``w > 0``; an invalid key gets
  ``s2 = -inf`` and so ``P = 0``. A row with no valid key has ``lse = -inf``; kernels that read the
  LSE turn it into ``+inf`` so every ``P`` of that row is 0 (never NaN).
- Head dims are padded to the power-of-two ``BLOCK_D`` / ``BLOCK_DV`` and masked.
- Every tensor is addressed through its strides. Batch/head offsets and the start row / column of a
  tile are computed in int64 (``_tile``): with the [B, N, H, D] layout the row stride is H·D, so
  row·stride passes 2^31 once N·H·D does. Offsets inside a tile stay int32; the host keeps them below
  2^31 (``sra_attention._tile_safe``).
- ``IEEE``: float32 inputs use exact float32 dot products (no TF32), half inputs use tensor cores
  (see ``_dot``).
- One binary per kernel, head dim, dtype, flags and tile, whatever N, M and B are: the sizes and every
  stride that depends on N, M or B are ``do_not_specialize`` (``NO_SPECIALIZE``), so Triton's JIT
  neither marks them divisible by 16 nor turns a 1 into a constant. The batch / head offsets of the
  large tensors get their 16-element alignment back from ``ALIGN`` (set by the host from the head
  dims and row strides, which do not change with N, M or B): aligned vector loads without a
  specialization that could flip with the sizes.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side (Python float)
LN2 = tl.constexpr(0.6931471805599453)  # inside kernels (a global must be a constexpr)

# integer arguments Triton must not specialise on (divisible by 16, equal to 1), because they change with
# N, M or B: the sizes, the batch / head / split strides of the large tensors (their alignment comes back
# through ALIGN) and the batch / head / row strides of the small ones (token weights [B,H,M], mask [B,M],
# map and map gradient [B,N,n_map], LSE gradient [B,H,N], dw partials). Row strides of Q, K, V, O, dO and
# the gradients (D or H·D) and the unit strides stay specialised: they are fixed by the head dims.
SIZE_ARGS = ("H", "N", "M", "map_start", "map_stop", "rows_per_split")
VARYING_STRIDES = ("sqb", "sqh", "skb", "skh", "svb", "svh", "sob", "soh", "sdob", "sdoh", "sdqb", "sdqh",
                   "sdks", "sdkb", "sdkh", "sdvs", "sdvb", "sdvh", "sdws", "swb", "swh", "smb",
                   "sab", "san", "sgb", "sgn", "sglb", "sglh")
NO_SPECIALIZE = SIZE_ARGS + VARYING_STRIDES


def no_specialize(fn) -> list[str]:
    """The arguments of kernel function ``fn`` that are in ``NO_SPECIALIZE``."""
    return [n for n in inspect.signature(fn).parameters if n in NO_SPECIALIZE]


def _kernel(fn):
    """``triton.jit`` with ``do_not_specialize`` set from ``NO_SPECIALIZE``."""
    return triton.jit(fn, do_not_specialize=no_specialize(fn))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """IEEE = 0: native tensor-core dot; 1: exact float32 (no TF32); 2: upcast to float32 first (the
    interpreter computes bfloat16 dots wrongly, Triton 3.7)."""
    if IEEE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile(base, r0, stride_r, c0, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pointers of the [BLOCK_R, BLOCK_C] tile at rows r0.., columns c0..: the start in int64, the
    in-tile offsets in int32 (cheap; bounded by the host)."""
    start = tl.cast(r0, tl.int64) * stride_r + tl.cast(c0, tl.int64) * stride_c
    return base + start + tl.arange(0, BLOCK_R)[:, None] * stride_r + tl.arange(0, BLOCK_C)[None, :] * stride_c


@triton.jit
def _bh(b, sb, h, sh, ALIGN: tl.constexpr):
    """The int64 offset b·sb + h·sh of a (batch, head) slice; ``ALIGN``: the host guarantees both strides
    are multiples of 16 elements (restores what do_not_specialize hides from the vectoriser)."""
    off = b * sb + h * sh
    if ALIGN:
        off = tl.multiple_of(off, 16)
    return off


@triton.jit
def _key_bias2(W, MASK, w_base, mask_base, offs_m, M, stride_wm, stride_maskm, strength,
               HAS_W: tl.constexpr, HAS_MASK: tl.constexpr):
    """γ·log2(w_j) for valid keys, -inf otherwise; also returns w (1 where absent) and validity."""
    valid = offs_m < M
    w = tl.full(offs_m.shape, 1.0, tl.float32)
    if HAS_MASK:
        mk = tl.load(MASK + mask_base + offs_m.to(tl.int64) * stride_maskm, mask=valid, other=0)
        valid = valid & (mk != 0)
    if HAS_W:
        w = tl.load(W + w_base + offs_m.to(tl.int64) * stride_wm, mask=offs_m < M, other=1.0).to(tl.float32)
        valid = valid & (w > 0)
        w = tl.where(valid, w, 1.0)
        bias = strength * tl.log2(w)
    else:
        bias = tl.zeros(offs_m.shape, tl.float32)
    return tl.where(valid, bias, float("-inf")), w, valid


# ---------------------------------------------------------------------------------------------
# forward: online softmax over key blocks, one program per (query block, b·h)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_block(q, k_base, v_base, W, MASK, w_off, mask_off, start, M, skm, skd, svm, svd, swm, smm,
               m_i, l_i, acc, qk_scale, strength,
               D: tl.constexpr, DV: tl.constexpr, HAS_W: tl.constexpr, HAS_MASK: tl.constexpr,
               IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key block [start, start + BLOCK_M) of the online softmax (base 2, no division)."""
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    bias2, _w, _valid = _key_bias2(W, MASK, w_off, mask_off, offs_m, M, swm, smm, strength, HAS_W, HAS_MASK)
    kt = tl.load(_tile(k_base, 0, skd, start, skm, BLOCK_D, BLOCK_M),
                 mask=(offs_m[None, :] < M) & (offs_d[:, None] < D), other=0.0)
    v = tl.load(_tile(v_base, start, svm, 0, svd, BLOCK_M, BLOCK_DV),
                mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV), other=0.0)
    # base-2 scores: qk_scale = scale·log2(e) (host), bias2 = γ·log2(w) once per key block
    s = _dot(q, kt, IEEE) * qk_scale + bias2[None, :]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@_kernel
def sra_fwd_kernel(
    Q, K, V, W, MASK, O, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skm, skd,
    svb, svh, svm, svd,
    swb, swh, swm,
    smb, smm,
    sob, soh, son, sod,
    H, N, M, D: tl.constexpr, DV: tl.constexpr,
    qk_scale, strength,
    HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_n < N

    n0 = pid_n * BLOCK_N
    q = tl.load(_tile(Q + _bh(b, sqb, h, sqh, ALIGN), n0, sqn, 0, sqd, BLOCK_N, BLOCK_D),
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + _bh(b, skb, h, skh, ALIGN)
    v_base = V + _bh(b, svb, h, svh, ALIGN)
    w_off = b * swb + h * swh
    mask_off = b * smb

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # one loop, every block masked: peeling the tail block so that the others load unmasked (the
    # tutorial's layout) took sm_90 (128, 64, 8 warps, 3 stages) at D=128 from 243 registers to 255 and
    # 16 B of spill under Triton 3.6 (aot_check); the masks cost a few predicates per load
    for start in range(0, M, BLOCK_M):
        m_i, l_i, acc = _fwd_block(q, k_base, v_base, W, MASK, w_off, mask_off, start, M, skm, skd, svm, svd,
                                   swm, smm, m_i, l_i, acc, qk_scale, strength, D, DV, HAS_W, HAS_MASK, IEEE,
                                   BLOCK_M, BLOCK_D, BLOCK_DV)

    has_key = l_i > 0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc * (1.0 / l_safe)[:, None]  # one reciprocal per row, no per-element division
    tl.store(_tile(O + _bh(b, sob, h, soh, ALIGN), n0, son, 0, sod, BLOCK_N, BLOCK_DV),
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    m_safe = tl.where(has_key, m_i, 0.0)
    lse = tl.where(has_key, (m_safe + tl.log2(l_safe)) * LN2, float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_n, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# forward with the map, all keys in one block: one program per (query block, b), loop over heads
# ---------------------------------------------------------------------------------------------

@_kernel
def sra_fwd_map_kernel(
    Q, K, V, W, MASK, O, LSE, AMAP,
    sqb, sqh, sqn, sqd,
    skb, skh, skm, skd,
    svb, svh, svm, svd,
    swb, swh, swm,
    smb, smm,
    sob, soh, son, sod,
    sab, san, sam,
    H, N, M, D: tl.constexpr, DV: tl.constexpr, map_start, map_stop,
    qk_scale, strength, inv_heads,
    HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The map tile stays in registers while the heads are summed in order: deterministic, no atomics."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_n < N

    n0 = pid_n * BLOCK_N
    amap = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for hh in range(0, H):
        h = b * 0 + hh  # int64
        q = tl.load(_tile(Q + _bh(b, sqb, h, sqh, ALIGN), n0, sqn, 0, sqd, BLOCK_N, BLOCK_D),
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        bias2, _w, _valid = _key_bias2(W, MASK, b * swb + h * swh, b * smb, offs_m, M, swm, smm, strength,
                                       HAS_W, HAS_MASK)
        kt = tl.load(_tile(K + _bh(b, skb, h, skh, ALIGN), 0, skd, 0, skm, BLOCK_D, BLOCK_M),
                     mask=(offs_m[None, :] < M) & (offs_d[:, None] < D), other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale + bias2[None, :]
        m = tl.max(s, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m_safe[:, None])
        l = tl.sum(p, 1)
        has_key = l > 0
        l_safe = tl.where(has_key, l, 1.0)
        p = p * (1.0 / l_safe)[:, None]
        v = tl.load(_tile(V + _bh(b, svb, h, svh, ALIGN), 0, svm, 0, svd, BLOCK_M, BLOCK_DV),
                    mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV), other=0.0)
        out = _dot(p.to(v.dtype), v, IEEE)
        tl.store(_tile(O + _bh(b, sob, h, soh, ALIGN), n0, son, 0, sod, BLOCK_N, BLOCK_DV),
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
        lse = tl.where(has_key, (m_safe + tl.log2(l_safe)) * LN2, float("-inf"))
        tl.store(LSE + (b * H + h) * N + offs_n, lse, mask=row_ok)
        amap += p

    amap = amap * inv_heads
    in_map = (offs_m >= map_start) & (offs_m < map_stop)
    tl.store(_tile(AMAP + b * sab, n0, san, -map_start, sam, BLOCK_N, BLOCK_M), amap,
             mask=row_ok[:, None] & in_map[None, :])


# ---------------------------------------------------------------------------------------------
# map from the final LSE (keys beyond one block): one program per (query block, map key block, b)
# ---------------------------------------------------------------------------------------------

@_kernel
def sra_map_kernel(
    Q, K, W, MASK, LSE, AMAP,
    sqb, sqh, sqn, sqd,
    skb, skh, skm, skd,
    swb, swh, swm,
    smb, smm,
    sab, san, sam,
    H, N, M, D: tl.constexpr, map_start, map_stop,
    qk_scale, strength, inv_heads,
    HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Recomputes the scores of the map's keys only, head by head in order (deterministic)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n0 = pid_n * BLOCK_N
    m0 = map_start + pid_m * BLOCK_M
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    col_ok = offs_m < map_stop

    amap = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for hh in range(0, H):
        h = b * 0 + hh  # int64
        q = tl.load(_tile(Q + _bh(b, sqb, h, sqh, ALIGN), n0, sqn, 0, sqd, BLOCK_N, BLOCK_D),
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        bias2, _w, _valid = _key_bias2(W, MASK, b * swb + h * swh, b * smb, offs_m, map_stop, swm, smm,
                                       strength, HAS_W, HAS_MASK)
        kt = tl.load(_tile(K + _bh(b, skb, h, skh, ALIGN), 0, skd, m0, skm, BLOCK_D, BLOCK_M),
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale + bias2[None, :]
        lse = tl.load(LSE + (b * H + h) * N + offs_n, mask=row_ok, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        amap += tl.exp2(s - lse2[:, None])

    amap = amap * inv_heads
    tl.store(_tile(AMAP + b * sab, n0, san, m0 - map_start, sam, BLOCK_N, BLOCK_M), amap,
             mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

@_kernel
def sra_bwd_delta_kernel(
    Q, K, W, MASK, O, DO, LSE, GLSE, GMAP, DELTA,
    sqb, sqh, sqn, sqd,
    skb, skh, skm, skd,
    swb, swh, swm,
    smb, smm,
    sob, soh, son, sod,
    sdob, sdoh, sdon, sdod,
    sglb, sglh, sgln,
    sgb, sgn, sgm,
    H, N, M, D: tl.constexpr, DV: tl.constexpr, map_start, map_stop,
    qk_scale, strength, inv_heads,
    HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GLSE: tl.constexpr, HAS_GMAP: tl.constexpr,
    IEEE: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Δ_i = dO_i·O_i + Σ_{j in map} P_ij dA_ij / H − grad_lse_i (float32 [B, H, N])."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_n < N
    dv_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
    o = tl.load(_tile(O + _bh(b, sob, h, soh, ALIGN), n0, son, 0, sod, BLOCK_N, BLOCK_DV), mask=dv_mask,
                other=0.0)
    do = tl.load(_tile(DO + _bh(b, sdob, h, sdoh, ALIGN), n0, sdon, 0, sdod, BLOCK_N, BLOCK_DV), mask=dv_mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_GLSE:
        delta -= tl.load(GLSE + b * sglb + h * sglh + offs_n.to(tl.int64) * sgln, mask=row_ok,
                         other=0.0).to(tl.float32)
    if HAS_GMAP:
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(_tile(Q + _bh(b, sqb, h, sqh, ALIGN), n0, sqn, 0, sqd, BLOCK_N, BLOCK_D),
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_n, mask=row_ok, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        for start in range(map_start, map_stop, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            col_ok = offs_m < map_stop
            bias2, _w, _valid = _key_bias2(W, MASK, b * swb + h * swh, b * smb, offs_m, map_stop, swm, smm,
                                           strength, HAS_W, HAS_MASK)
            kt = tl.load(_tile(K + _bh(b, skb, h, skh, ALIGN), 0, skd, start, skm, BLOCK_D, BLOCK_M),
                         mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            p = tl.exp2(_dot(q, kt, IEEE) * qk_scale + bias2[None, :] - lse2[:, None])
            da = tl.load(_tile(GMAP + b * sgb, n0, sgn, start - map_start, sgm, BLOCK_N, BLOCK_M),
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            delta += tl.sum(p * da, 1) * inv_heads
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_n, delta, mask=row_ok)


@_kernel
def sra_bwd_dkdv_kernel(
    Q, K, V, W, MASK, DO, LSE, DELTA, GMAP, DK, DV_, DW,
    sqb, sqh, sqn, sqd,
    skb, skh, skm, skd,
    svb, svh, svm, svd,
    swb, swh, swm,
    smb, smm,
    sdob, sdoh, sdon, sdod,
    sgb, sgn, sgm,
    sdks, sdkb, sdkh, sdkm, sdkd,
    sdvs, sdvb, sdvh, sdvm, sdvd,
    sdws,
    H, N, M, D: tl.constexpr, DV: tl.constexpr, map_start, map_stop, rows_per_split,
    qk_scale, sm_scale, strength, inv_heads,
    HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GMAP: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dk, dv and dw of one key block over the queries [split·rows_per_split, +rows_per_split).

    With one split the results are final; with several, each split writes float32 partials (slot
    ``split`` of DK/DV_/DW, strides ``sdks``...) that the host sums in a fixed order (deterministic).
    Splitting keeps the GPU busy when M is short (cross-attention: few key blocks, many queries).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_m < M
    bias2, w, valid = _key_bias2(W, MASK, b * swb + h * swh, b * smb, offs_m, M, swm, smm, strength,
                                 HAS_W, HAS_MASK)
    k = tl.load(_tile(K + _bh(b, skb, h, skh, ALIGN), m0, skm, 0, skd, BLOCK_M, BLOCK_D),
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(_tile(V + _bh(b, svb, h, svh, ALIGN), m0, svm, 0, svd, BLOCK_M, BLOCK_DV),
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    in_map = (offs_m >= map_start) & (offs_m < map_stop)

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    colsum = tl.zeros([BLOCK_M], tl.float32)
    q_base = Q + _bh(b, sqb, h, sqh, ALIGN)
    do_base = DO + _bh(b, sdob, h, sdoh, ALIGN)
    row_base = pid_bh.to(tl.int64) * N
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, N)
    for start in range(row_start, row_stop, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        row_ok = offs_n < row_stop
        q = tl.load(_tile(q_base, start, sqn, 0, sqd, BLOCK_N, BLOCK_D),
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(_tile(do_base, start, sdon, 0, sdod, BLOCK_N, BLOCK_DV),
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + row_base + offs_n, mask=row_ok, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + row_base + offs_n, mask=row_ok, other=0.0)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale + bias2[:, None]       # [BLOCK_M, BLOCK_N]
        pt = tl.exp2(st - lse2[None, :])
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        if HAS_GMAP:
            dat = tl.load(_tile(GMAP + b * sgb, m0 - map_start, sgm, start, sgn, BLOCK_M, BLOCK_N),
                          mask=in_map[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
            dpt += dat * inv_heads
        dst = pt * (dpt - delta[None, :])
        colsum += tl.sum(dst, 1)
        dk += _dot(dst.to(q.dtype), q, IEEE)

    dk = dk * sm_scale
    slot = split.to(tl.int64)
    tl.store(_tile(DK + _bh(slot, sdks, b, sdkb, ALIGN) + _bh(h, sdkh, 0, 0, ALIGN), m0, sdkm, 0, sdkd,
                   BLOCK_M, BLOCK_D),
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(_tile(DV_ + _bh(slot, sdvs, b, sdvb, ALIGN) + _bh(h, sdvh, 0, 0, ALIGN), m0, sdvm, 0, sdvd,
                   BLOCK_M, BLOCK_DV),
             dv.to(DV_.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))
    if HAS_W:
        dw = tl.where(valid, strength * colsum / w, 0.0)
        tl.store(DW + slot * sdws + pid_bh.to(tl.int64) * M + offs_m, dw, mask=col_ok)


@_kernel
def sra_bwd_dq_kernel(
    Q, K, V, W, MASK, DO, LSE, DELTA, GMAP, DQ,
    sqb, sqh, sqn, sqd,
    skb, skh, skm, skd,
    svb, svh, svm, svd,
    swb, swh, swm,
    smb, smm,
    sdob, sdoh, sdon, sdod,
    sgb, sgn, sgm,
    sdqb, sdqh, sdqn, sdqd,
    H, N, M, D: tl.constexpr, DV: tl.constexpr, map_start, map_stop,
    qk_scale, sm_scale, strength, inv_heads,
    HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GMAP: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dq of one query block, looping over all keys."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_n < N
    q = tl.load(_tile(Q + _bh(b, sqb, h, sqh, ALIGN), n0, sqn, 0, sqd, BLOCK_N, BLOCK_D),
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(_tile(DO + _bh(b, sdob, h, sdoh, ALIGN), n0, sdon, 0, sdod, BLOCK_N, BLOCK_DV),
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    row_base = pid_bh.to(tl.int64) * N
    lse = tl.load(LSE + row_base + offs_n, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + row_base + offs_n, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    k_base = K + _bh(b, skb, h, skh, ALIGN)
    v_base = V + _bh(b, svb, h, svh, ALIGN)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        col_ok = offs_m < M
        bias2, _w, _valid = _key_bias2(W, MASK, b * swb + h * swh, b * smb, offs_m, M, swm, smm, strength,
                                       HAS_W, HAS_MASK)
        kt = tl.load(_tile(k_base, 0, skd, start, skm, BLOCK_D, BLOCK_M),
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(_tile(v_base, 0, svd, start, svm, BLOCK_DV, BLOCK_M),
                     mask=col_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        p = tl.exp2(_dot(q, kt, IEEE) * qk_scale + bias2[None, :] - lse2[:, None])
        dp = _dot(do, vt, IEEE)
        if HAS_GMAP:
            in_map = (offs_m >= map_start) & (offs_m < map_stop)
            da = tl.load(_tile(GMAP + b * sgb, n0, sgn, start - map_start, sgm, BLOCK_N, BLOCK_M),
                         mask=row_ok[:, None] & in_map[None, :], other=0.0).to(tl.float32)
            dp += da * inv_heads
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)

    dq = dq * sm_scale
    tl.store(_tile(DQ + _bh(b, sdqb, h, sdqh, ALIGN), n0, sdqn, 0, sdqd, BLOCK_N, BLOCK_D),
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
