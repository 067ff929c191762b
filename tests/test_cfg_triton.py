"""rectified_cfg's Triton kernels (SPEC §2): on CUDA when present, else on CPU tensors under TRITON_INTERPRET=1
(small shapes: the interpreter is slow)."""

from __future__ import annotations

import os

import pytest
import torch

# Without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set when they are
# decorated (the availability check below imports them) and while they run (the fixture below); it is
# restored in between so tests of other modules in this worker see the environment they expect.
_SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import dare_kernels as dk  # noqa: E402
from dare_kernels import backends  # noqa: E402
from dare_kernels.reference import rectified_cfg_ref  # noqa: E402

from conftest import tol  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY = backends.unsupported_reason("rectified_cfg", "triton", torch.device(DEVICE), torch.float32)
if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]
pytestmark = [
    pytest.mark.triton_interp,
    pytest.mark.skipif(_WHY is not None, reason=str(_WHY)),
]


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if _SET_INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield

MODE_KW = {"cfg": {}, "cfg_zero_star": {}, "apg": {"eta": 0.3, "norm_threshold": 6.0}}


def make_preds(K, shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    rest = [u + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.05 * (k + 1) for k in range(K - 1)]
    return torch.cat([u] + rest).to(dtype=dtype, device=DEVICE)


def check(got, want, dtype, scale=1.0):
    atol, rtol = tol(dtype)["atol"], tol(dtype)["rtol"]
    mag = want.abs().max().item()
    torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=atol * max(1.0, mag) * scale, rtol=rtol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("mode", ["cfg", "cfg_zero_star", "apg"])
def test_matches_reference(mode, K, dtype):
    preds = make_preds(K, (2, 3, 4, 5, 7), dtype)  # 5-D, N = 420 (ragged blocks)
    kw = dict(num_branches=K, mode=mode, guidance_rescale=0.7, rectify_scale=1.2 if K == 3 else 0.0, **MODE_KW[mode])
    got = dk.rectified_cfg(preds, 6.0, backend="triton", **kw)
    assert got.dtype == dtype
    check(got, rectified_cfg_ref(preds.double(), 6.0, **kw), dtype, scale=1.0 if dtype == torch.float32 else 1.5)


def test_plain_cfg_4d_and_many_chunks():
    preds = make_preds(2, (2, 4, 9, 13))
    check(dk.rectified_cfg(preds, 7.5, backend="triton"), rectified_cfg_ref(preds.double(), 7.5), torch.float32)
    # N = 9000 > 4 blocks of 1024: several chunks per sample, partials summed by the coefficient kernel
    big = make_preds(3, (1, 9000), seed=1)
    kw = dict(num_branches=3, mode="cfg_zero_star", guidance_rescale=0.7, rectify_scale=0.5)
    check(dk.rectified_cfg(big, 5.0, backend="triton", **kw), rectified_cfg_ref(big.double(), 5.0, **kw), torch.float32)


def test_apg_momentum_steps_match_cpu_reference():
    shape = (2, 3, 5, 6)
    b_ref = torch.zeros(shape, dtype=torch.float64)
    b_got = torch.zeros(shape, dtype=torch.float32, device=DEVICE)
    for step in range(3):
        preds = make_preds(2, shape, seed=10 + step)
        kw = dict(mode="apg", momentum=-0.5, eta=0.0, norm_threshold=4.0, guidance_rescale=0.5)
        want = rectified_cfg_ref(preds.double().cpu(), 5.0, momentum_buffer=b_ref, **kw)
        got = dk.rectified_cfg(preds, 5.0, momentum_buffer=b_got, backend="triton", **kw)
        check(got, want, torch.float32)
        check(b_got, b_ref, torch.float32)


def test_reduce_dims_out_and_strided_inputs():
    preds = make_preds(3, (2, 3, 4, 5, 6), seed=20)
    u, c, d = (t.transpose(2, 4) for t in preds.chunk(3))  # strided views
    kw = dict(mode="apg", guidance_rescale=0.7, rectify_scale=0.4, reduce_dims=(1, 3, 4), eta=0.5)
    out = torch.full(u.shape, float("nan"), device=DEVICE)
    res = dk.rectified_cfg([u, c, d], 4.0, out=out, backend="triton", **kw)
    assert res is out
    check(out, rectified_cfg_ref([t.double() for t in (u, c, d)], 4.0, **kw), torch.float32)


def test_grad_matches_reference_autograd():
    preds = make_preds(3, (2, 3, 40), seed=30)
    kw = dict(num_branches=3, mode="apg", guidance_rescale=0.6, rectify_scale=0.7, eta=0.2, norm_threshold=3.0)
    w = torch.randn(2, 3, 40, dtype=torch.float64)
    p1 = preds.clone().requires_grad_()
    p2 = preds.double().cpu().requires_grad_()
    (dk.rectified_cfg(p1, 4.0, backend="triton", **kw).double().cpu() * w).sum().backward()
    (rectified_cfg_ref(p2, 4.0, **kw) * w).sum().backward()
    torch.testing.assert_close(p1.grad.double().cpu(), p2.grad, atol=2e-4, rtol=2e-4)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    preds = make_preds(2, (2, 3, 4, 6), seed=40)

    def f(p):
        return dk.rectified_cfg(p, 5.0, mode="cfg_zero_star", guidance_rescale=0.7, backend="triton") + 1.0

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(preds), f(preds), atol=1e-5, rtol=1e-5)


def test_opcheck_triton_ops():
    from dare_kernels.ops import resolve_op

    # the registered ops (ops_for hands eager callers the fused op's dispatcher-free twin)
    fused, stats, combine = (resolve_op(n) for n in backends.capability("rectified_cfg", "triton").op_names)
    u, c, d = make_preds(3, (2, 3, 40), seed=50).chunk(3)
    buf = torch.randn(2, 3, 40, device=DEVICE)
    out = torch.empty(2, 3, 40, device=DEVICE)
    torch.library.opcheck(fused, (u, c, d, buf, out, 1, "apg", 3.0, 0.5, 0.7, 0.2, 4.0, 0.5))
    ur, cr = (t.clone().requires_grad_() for t in (u, c))
    torch.library.opcheck(stats, (ur, cr, None, buf, 2, 0.3))
    torch.library.opcheck(combine, (ur, cr, d, None, torch.randn(6, 4, device=DEVICE, requires_grad=True), 1))


# ---------------------------------------------------------------------------------------------
# the one-/two-launch design: every statistic subset, odd sizes, many chunks, many samples, determinism
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("mode,rescale", [("cfg", 0.0), ("cfg_zero_star", 0.0), ("apg", 0.0), ("cfg", 0.7)])
@pytest.mark.parametrize("shape", [(2, 1), (2, 7), (1, 2049), (3, 5, 3)], ids=["n1", "n7", "n2049", "n15"])
def test_each_statistic_subset_at_odd_sizes(mode, rescale, K, shape):
    """Plain CFG is one launch (γ from the scalars); zero-star / APG without rescale reduce only their Gram
    entries; rescale adds the sums (and the third branch's terms): each subset against the float64 reference."""
    if rescale and shape == (2, 1):
        shape = (2, 2)  # a variance needs two elements per sample
    preds = make_preds(K, shape, seed=60 + K)
    kw = dict(num_branches=K, mode=mode, guidance_rescale=rescale, rectify_scale=0.8 if K == 3 else 0.0,
              **MODE_KW[mode])
    check(dk.rectified_cfg(preds, 4.5, backend="triton", **kw), rectified_cfg_ref(preds.double(), 4.5, **kw),
          torch.float32)


@pytest.mark.parametrize("K", [2, 3])
def test_apg_momentum_with_rescale_and_many_chunks(K):
    """APG momentum (c's statistics), a third branch (E's, and ⟨E, c⟩) and rescale (the sums) over several
    chunks per sample (N = 9000: five partials re-reduced in every combine program's prologue)."""
    from dare_kernels.triton import rectified_cfg as tr

    shape = (1, 9000)
    assert tr._plan(1, 9000, tr._CPU_SMS)[1] >= 4
    b_ref = torch.zeros(shape, dtype=torch.float64)
    b_got = torch.zeros(shape, dtype=torch.float32, device=DEVICE)
    for step in range(2):
        preds = make_preds(K, shape, seed=70 + step)
        kw = dict(num_branches=K, mode="apg", momentum=-0.5, eta=0.2, norm_threshold=20.0, guidance_rescale=0.6,
                  rectify_scale=0.9 if K == 3 else 0.0)
        want = rectified_cfg_ref(preds.double().cpu(), 5.0, momentum_buffer=b_ref, **kw)
        got = dk.rectified_cfg(preds, 5.0, momentum_buffer=b_got, backend="triton", **kw)
        check(got, want, torch.float32)
        check(b_got, b_ref, torch.float32)


def test_many_samples_and_deterministic_bits():
    """G = 24 samples (one chunk each), per-channel statistics; two calls give the same bits."""
    preds = make_preds(3, (2, 12, 9, 11), seed=80)
    kw = dict(num_branches=3, mode="cfg_zero_star", guidance_rescale=0.5, rectify_scale=0.6, reduce_dims=(2, 3))
    a = dk.rectified_cfg(preds, 6.0, backend="triton", **kw)
    b = dk.rectified_cfg(preds, 6.0, backend="triton", **kw)
    assert torch.equal(a, b)
    check(a, rectified_cfg_ref(preds.double(), 6.0, **kw), torch.float32)


def test_stats_op_matches_float64_statistics():
    """The autograd path's statistics op (partials -> finalize) against float64 sums of the basis."""
    from dare_kernels.ops.rectified_cfg import pair

    fused, stats_op, combine = backends.ops_for("rectified_cfg", "triton")
    u, c, d = make_preds(3, (3, 5000), seed=90).chunk(3)
    buf = torch.randn(1, 5000, generator=torch.Generator().manual_seed(91)).to(DEVICE)
    st = stats_op(u, c, d, buf, 1, 0.4).double().cpu()
    U, C, Dd, B = (t.double().cpu()[0] for t in (u, c, d, buf))
    slots = [U, C - U + 0.4 * B, C - Dd, C]
    want = torch.zeros(14, dtype=torch.float64)
    for i in range(4):
        want[i] = slots[i].sum()
        for j in range(i, 4):
            want[pair(i, j)] = (slots[i] * slots[j]).sum()
    torch.testing.assert_close(st[0], want, rtol=1e-5, atol=1e-3)


def test_launch_plan_fills_the_device_and_bounds_the_partials():
    from dare_kernels.triton import rectified_cfg as tr

    # Wan 81-frame latent, one sample per branch on a 132-SM H100: 512 programs of 4096 elements (3.9 per SM)
    assert tr._plan(1, 16 * 21 * 60 * 104, 132) == (4096, 512)
    # per-channel statistics (G = 32): 16 chunks each, still about 4 programs per SM
    chunk, n_chunks = tr._plan(32, 21 * 60 * 104, 132)
    assert chunk % tr._BLOCK == 0 and 32 * n_chunks == 32 * 16
    # a huge sample: the chunk grows so that a prologue never re-reduces more than _MAX_CHUNKS partials
    assert tr._plan(1, 10 ** 9, 132)[1] <= tr._MAX_CHUNKS
    assert tr._plan(10 ** 5, 100, 132) == (tr._BLOCK, 1)


def test_eager_inference_skips_the_dispatcher_and_modes_still_see_the_op():
    """The fused op's eager twin (no custom-op round trip) bumps the version of what it writes like the op; a
    dispatch mode (here a recorder) still sees the registered op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dare_kernels.triton import rectified_cfg as tr

    fused = backends.ops_for("rectified_cfg", "triton")[0]
    assert fused is tr.fused_direct
    preds = make_preds(2, (2, 3, 50), seed=95)
    kw = dict(mode="apg", guidance_rescale=0.5, momentum=0.3, norm_threshold=5.0)
    buf = torch.zeros(2, 3, 50, device=DEVICE)
    out = torch.empty(2, 3, 50, device=DEVICE)
    v_out, v_buf = out._version, buf._version
    dk.rectified_cfg(preds, 4.0, out=out, momentum_buffer=buf, backend="triton", **kw)
    assert out._version > v_out and buf._version > v_buf
    check(out, rectified_cfg_ref(preds.double().cpu(), 4.0, momentum_buffer=torch.zeros(2, 3, 50, dtype=torch.float64),
                                 **kw), torch.float32)

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as rec:
        got = dk.rectified_cfg(preds, 4.0, mode="cfg_zero_star", backend="triton")
    assert any("rectified_cfg_fused_triton" in n for n in rec.names), rec.names
    check(got, rectified_cfg_ref(preds.double(), 4.0, mode="cfg_zero_star"), torch.float32)
