"""Triton SRA attention vs the float64 reference (SPEC.md §1): forward, map, LSE and every gradient.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: this module sets
``TRITON_INTERPRET=1`` before anything imports the kernels (Triton reads it when ``@triton.jit``
decorates them, i.e. at the first import of ``dare_kernels.triton.sra_attention``). With a GPU the same
tests run the compiled kernels on CUDA tensors. Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dare_kernels import sra_attention  # noqa: E402
from dare_kernels.reference import sra_attention_ref  # noqa: E402

from conftest import rand  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

try:
    import triton  # noqa: F401

    from dare_kernels.triton import sra_attention as triton_sra  # noqa: E402

    _SKIP = None
    if DEVICE == "cpu" and not triton_sra._INTERPRET_AT_IMPORT:
        _SKIP = "the Triton kernels were imported before TRITON_INTERPRET=1 was set in this process"
    elif DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        _SKIP = "TRITON_INTERPRET is set to something other than 1"
except ImportError as exc:  # triton missing
    triton_sra = None
    _SKIP = f"triton is not importable: {exc}"

pytestmark = [pytest.mark.triton_interp, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


@pytest.fixture(autouse=True, scope="module")
def _one_config_per_kernel():
    # on GPUs: one heuristic launch config per kernel (autotuning every small test shape would take minutes)
    if triton_sra is None:
        yield
        return
    previous = triton_sra.set_autotune(False)
    yield
    triton_sra.set_autotune(previous)

# tolerances vs float64 for (outputs, gradients): the gradients sum over more terms
FWD_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 5e-2), torch.float16: (1e-2, 1e-2)}


def _inputs(B, H, N, M, D, Dv=None, dtype=torch.float32, w_shape="bhm", mask=True, zero_w=True,
            layout="bhnd", w_scale=1.0):
    Dv = Dv or D
    g = torch.Generator().manual_seed(B * 1000 + N * 31 + M * 7 + D)
    if layout == "bnhd":  # SDPA-from-[B, N, H, D] layout: non-contiguous views
        q = rand(B, N, H, D, dtype=dtype, generator=g).transpose(1, 2)
        k = rand(B, M, H, D, dtype=dtype, generator=g).transpose(1, 2)
        v = rand(B, M, H, Dv, dtype=dtype, generator=g).transpose(1, 2)
    elif layout == "sliced":  # every stride odd: slices of a wider buffer
        q = rand(B, H, N, D + 3, dtype=dtype, generator=g)[..., 1:D + 1]
        k = rand(B, H, M + 2, D, dtype=dtype, generator=g)[:, :, 2:]
        v = rand(B, H, M, Dv * 2, dtype=dtype, generator=g)[..., ::2]
    else:
        q = rand(B, H, N, D, dtype=dtype, generator=g)
        k = rand(B, H, M, D, dtype=dtype, generator=g)
        v = rand(B, H, M, Dv, dtype=dtype, generator=g)
    w = None
    if w_shape is not None:
        shape = {"m": (M,), "bm": (B, M), "bhm": (B, H, M)}[w_shape]
        w = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 + 0.05) * w_scale
        if zero_w and M > 1:
            w[..., 1] = 0.0  # dropped key
        w = w.to(dtype=torch.float32)
    msk = None
    if mask:
        msk = torch.rand(B, M, generator=g) > 0.25
        msk[:, 0] = True
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(q), to(k), to(v), to(w), to(msk)


def _run_and_compare(q, k, v, w, msk, *, strength=0.8, map_keys=None, want_map=True, want_lse=True,
                     grads=True, scale=None, extra_check=None):
    dtype = q.dtype
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    wl = None if w is None else w.detach().clone().requires_grad_(grads)
    kw = dict(key_padding_mask=msk, strength=strength, scale=scale, return_attn_map=want_map,
              attn_map_keys=map_keys, return_lse=True)
    o, a, lse = _unpack(sra_attention(*leaves, wl, backend="triton", **kw), want_map)
    ref_leaves = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    rw = None if w is None else w.detach().double().requires_grad_(grads)
    ro, ra, rlse = _unpack(sra_attention_ref(*ref_leaves, rw, **kw), want_map)

    atol, rtol = FWD_TOL[dtype]
    assert o.dtype == dtype and o.shape == ro.shape
    torch.testing.assert_close(o.double(), ro, atol=atol, rtol=rtol)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), rlse, atol=atol * 10, rtol=rtol)  # -inf rows must match too
    if want_map:
        assert a.dtype == torch.float32 and a.shape == ra.shape
        torch.testing.assert_close(a.double(), ra, atol=atol, rtol=rtol)
    if extra_check is not None:
        extra_check(o, a, lse)
    if not grads:
        return
    g = torch.Generator().manual_seed(7)
    go = torch.randn(ro.shape, generator=g, dtype=torch.float64)
    ga = torch.randn(ra.shape, generator=g, dtype=torch.float64) if want_map else None
    gl = torch.randn(rlse.shape, generator=g, dtype=torch.float64) if want_lse else None

    def loss(o_, a_, l_):
        total = (o_.double() * go.to(o_.device)).sum()
        if want_map:
            total = total + (a_.double() * ga.to(a_.device)).sum()
        if want_lse:
            total = total + (torch.where(torch.isfinite(l_), l_, 0).double() * gl.to(l_.device)).sum()
        return total

    loss(o, a, lse).backward()
    loss(ro, ra, rlse).backward()
    atol, rtol = GRAD_TOL[dtype]
    for name, got, want in zip("qkvw", leaves + [wl], ref_leaves + [rw]):
        if want is None:
            continue
        assert got.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(got.grad).all(), f"non-finite gradient for {name}"
        # scale the tolerance by the gradient's magnitude (sums over N or M terms)
        mag = max(1.0, want.grad.abs().max().item())
        torch.testing.assert_close(got.grad.double(), want.grad, atol=atol * mag, rtol=rtol,
                                   msg=lambda m: f"gradient of {name}: {m}")


def _unpack(res, want_map):
    if want_map:
        o, a, lse = res
    else:
        (o, lse), a = res, None
    return o, a, lse


# ---------------------------------------------------------------------------------------------
# forward + backward, float32, across the shapes and options that change the kernel path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("M", [1, 13, 77, 226])
def test_key_lengths_with_map_lse_and_grads(M):
    # M ≤ 64: fused head-loop map kernel in the interpreter; 77/226: online softmax + separate map kernel
    q, k, v, w, msk = _inputs(2, 2, 19, M, 32)
    _run_and_compare(q, k, v, w, msk)


@pytest.mark.parametrize("D,Dv", [(40, 40), (80, 80), (160, 160), (24, 40)])
def test_head_dims(D, Dv):
    q, k, v, w, msk = _inputs(1, 2, 17, 37, D, Dv, w_shape="bm")
    _run_and_compare(q, k, v, w, msk)


@pytest.mark.parametrize("w_shape", ["m", "bm", "bhm", None])
def test_token_weight_shapes(w_shape):
    q, k, v, w, msk = _inputs(2, 2, 16, 21, 16, w_shape=w_shape, mask=False)
    _run_and_compare(q, k, v, w, msk, strength=1.0)


@pytest.mark.parametrize("layout", ["bnhd", "sliced"])
def test_strided_inputs(layout):
    q, k, v, w, msk = _inputs(2, 2, 18, 45, 16, layout=layout)
    assert not q.is_contiguous()
    _run_and_compare(q, k, v, w, msk, map_keys=(4, 40))


@pytest.mark.parametrize("M,map_keys", [(30, (5, 17)), (90, (70, 90)), (90, (0, 1))])
def test_map_key_range(M, map_keys):
    # joint attention: the map covers a sub-range while every key attends (both map kernels)
    q, k, v, w, msk = _inputs(1, 3, 36, M, 16, mask=False)
    _run_and_compare(q, k, v, w, msk, map_keys=map_keys)


def test_no_map_no_lse_grad():
    q, k, v, w, msk = _inputs(1, 2, 33, 50, 16)
    _run_and_compare(q, k, v, w, msk, want_map=False, want_lse=False)


def test_strength_zero_and_custom_scale():
    q, k, v, w, msk = _inputs(1, 2, 16, 20, 16, mask=False, zero_w=False)
    _run_and_compare(q, k, v, w, msk, strength=0.0, scale=0.37)


def test_weights_invariant_to_row_scaling():
    # multiplying all weights by a constant changes nothing (SPEC §1, γ = 1)
    q, k, v, w, msk = _inputs(1, 2, 16, 24, 16, w_shape="bm", mask=False, zero_w=False)
    o1 = sra_attention(q, k, v, w, backend="triton")
    o2 = sra_attention(q, k, v, w * 37.0, backend="triton")
    torch.testing.assert_close(o1, o2, atol=2e-6, rtol=2e-6)


# ---------------------------------------------------------------------------------------------
# empty rows: every key masked or dropped for a batch, or for one head
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("M", [20, 70])
def test_empty_rows(M):
    q, k, v, w, msk = _inputs(2, 2, 37, M, 16)  # N > 32: the dk/dv kernel splits the queries
    msk[1] = False  # batch 1: no key at all
    w[0, 1] = 0.0  # batch 0, head 1: every weight zero
    def check(o, a, lse):
        assert torch.isfinite(o).all()
        assert (o[1] == 0).all() and (o[0, 1] == 0).all()
        assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, 1]).all()
        assert (a[1] == 0).all()
    _run_and_compare(q, k, v, w, msk, extra_check=check)


# ---------------------------------------------------------------------------------------------
# half precision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [40, 77])
def test_half_precision(dtype, M):
    q, k, v, w, msk = _inputs(1, 2, 20, M, 32, dtype=dtype)
    _run_and_compare(q, k, v, w, msk)


# ---------------------------------------------------------------------------------------------
# op registration: fake impl strides, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------

def test_fake_matches_real_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, w, msk = _inputs(1, 2, 16, 20, 16, layout="bnhd")
    from dare_kernels.reference import expand_token_weight
    wx = expand_token_weight(w, 1, 2, 20)
    op = torch.ops.dare_kernels.sra_attention_fwd_triton.default
    real = op(q, k, v, wx, msk, 0.5, 0.25, 2, 9)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*(mode.from_tensor(t) for t in (q, k, v, wx, msk)), 0.5, 0.25, 2, 9)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype
    bwd = torch.ops.dare_kernels.sra_attention_bwd_triton.default
    go = torch.randn_like(real[0])
    real_b = bwd(go, None, None, q, k, v, wx, msk, real[0], real[1], 0.5, 0.25, 2, 9)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        ft = lambda t: mode.from_tensor(t)  # noqa: E731
        fake_b = bwd(ft(go), None, None, ft(q), ft(k), ft(v), ft(wx), ft(msk), ft(real[0]), ft(real[1]),
                     0.5, 0.25, 2, 9)
    for r, f in zip(real_b, fake_b):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype


def test_opcheck():
    q, k, v, w, msk = _inputs(1, 2, 16, 20, 16, w_shape="bhm")
    args = (q, k, v, w, msk, 0.7, 0.25, 3, 11)
    torch.library.opcheck(torch.ops.dare_kernels.sra_attention_fwd_triton.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    o, lse, amap = torch.ops.dare_kernels.sra_attention_fwd_triton.default(*args)
    bargs = (torch.randn_like(o), torch.randn_like(amap), torch.randn_like(lse), q, k, v, w, msk, o, lse,
             0.7, 0.25, 3, 11)
    torch.library.opcheck(torch.ops.dare_kernels.sra_attention_bwd_triton.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    q, k, v, w, msk = _inputs(1, 2, 16, 20, 16, w_shape="bm")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]

    def f(q_, k_, v_, w_):
        o, a = sra_attention(q_, k_, v_, w_, key_padding_mask=msk, return_attn_map=True, backend="triton")
        return o.float().square().sum() + a.sum() * 0.5

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    loss = compiled(*leaves)
    loss.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    f(*ref_leaves).backward()
    torch.testing.assert_close(loss, f(*[t.detach() for t in ref_leaves]))
    for a_, b_ in zip(leaves, ref_leaves):
        torch.testing.assert_close(a_.grad, b_.grad)


def test_deterministic_map_and_gradients():
    # the head average and the split dk/dv/dw reductions run in a fixed order: bitwise repeatable
    q, k, v, w, msk = _inputs(1, 3, 40, 70, 16)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
        o, a = sra_attention(*leaves, key_padding_mask=msk, return_attn_map=True, backend="triton")
        (o.square().sum() + a.sum()).backward()
        runs.append([a.detach()] + [t.grad for t in leaves])
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_selftest_script_runs_in_the_interpreter():
    # the GPU self-check's tiny CPU version: model-shaped cases vs the chunked float64 reference
    if DEVICE != "cpu":
        pytest.skip("on GPUs run `python -m dare_kernels.selftest --device cuda` instead")
    from dare_kernels import selftest

    lines = []
    assert selftest.run("cpu", bench=False, small=False, log=lines.append) == 0, "\n".join(lines)
    assert any("cogvideox-tiny" in line and " ok " in line for line in lines)


def test_chunked_reference_matches_whole_reference():
    # the selftest's chunked oracle must equal the unchunked one (it is what the GPU run trusts)
    from dare_kernels.selftest import chunked_reference

    q, k, v, w, msk = (t.cpu() if t is not None else None for t in _inputs(1, 2, 23, 30, 16))
    go = torch.randn(1, 2, 23, 16, dtype=torch.float64)
    ga = torch.randn(1, 23, 12, dtype=torch.float64)
    (o, a, lse), grads = chunked_reference(q, k, v, w, msk, strength=0.7, map_keys=(3, 15), want_map=True,
                                           go=go, ga=ga, max_bytes=8 * 2 * 30 * 5)  # 5 rows a chunk
    leaves = [t.double().requires_grad_() for t in (q, k, v, w)]
    ro, ra, rl = sra_attention_ref(*leaves, key_padding_mask=msk, strength=0.7, return_attn_map=True,
                                   attn_map_keys=(3, 15), return_lse=True)
    ((ro * go).sum() + (ra * ga).sum()).backward()
    torch.testing.assert_close(o, ro.detach())
    torch.testing.assert_close(a, ra.detach())
    torch.testing.assert_close(lse, rl.detach())
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


def test_kernels_compile_for_hopper_without_a_gpu():
    # the interpreter accepts code the compiler rejects (e.g. non-constexpr globals): compile for sm_90
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"triton's NVIDIA backend is not importable: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "dare_kernels.triton.aot_check", "--arch", "90", "--quick"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("shared=") == 6, res.stdout
