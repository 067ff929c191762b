"""Triton-specific SRA attention tests: op registration, torch.compile, determinism, the self-check script.

The case families against the float64 reference (key lengths, head dims, weights, layouts, map ranges,
empty rows, half precision) run for every backend in test_sra_conformance.py.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``_triton_interp`` sets
``TRITON_INTERPRET=1`` before the kernels are first imported). With a GPU the same
tests run the compiled kernels on CUDA tensors. Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
import torch

from _triton_interp import DEVICE, load_sra_triton  # before dare_kernels: sets TRITON_INTERPRET without CUDA

from dare_kernels import sra_attention  # noqa: E402
from dare_kernels.reference import sra_attention_ref  # noqa: E402

from conftest import rand  # noqa: E402

triton_sra, _SKIP = load_sra_triton()

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


def test_the_eager_forward_skips_the_custom_op_only_where_nothing_needs_it(monkeypatch):
    """backends.ops_for hands sra_attention the forward's dispatcher-free twin: same outputs as the registered
    op; the op itself (counted) whenever a gradient is to be recorded or a dispatch mode is active."""
    from torch.utils.flop_counter import FlopCounterMode

    from dare_kernels import backends

    fwd = backends.ops_for("sra_attention", "triton")[0]
    assert fwd is triton_sra.fwd_direct
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, device="cpu").to(DEVICE) for n in (20, 9, 9))
    w = (torch.rand(1, 2, 9, generator=g) + 0.1).to(DEVICE)
    args = (q, k, v, w, None, 1.0, 0.25, 0, 9)
    calls = []
    real_op = triton_sra.sra_attention_fwd_triton
    monkeypatch.setattr(triton_sra, "sra_attention_fwd_triton", lambda *a: calls.append(1) or real_op(*a))
    direct = fwd(*args)
    assert calls == []  # eager, no grad: the body ran without the op
    for got, want in zip(direct, real_op(*args)):
        assert torch.equal(got, want)
    with FlopCounterMode(display=False):
        fwd(*args)
    assert calls == [1]
    qg = q.detach().requires_grad_(True)
    fwd(qg, k, v, w, None, 1.0, 0.25, 0, 9)
    assert calls == [1, 1]
    with torch.no_grad():
        fwd(qg, k, v, w, None, 1.0, 0.25, 0, 9)
    assert calls == [1, 1]
    # through the public function: outputs and gradients as the float64 reference says
    out = sra_attention(qg, k, v, w, backend="triton")
    ref = sra_attention_ref(qg.double(), k.double(), v.double(), w.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all() and qg.grad.abs().max() > 0
