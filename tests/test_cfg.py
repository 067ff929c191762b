"""rectified_cfg (SPEC §2) on CPU: against the float64 reference, against diffusers' guiders, gradients,
out=, reduce_dims, bad inputs, custom-op checks and torch.compile."""

from __future__ import annotations

import warnings

import pytest
import torch

import dare_kernels as dk
from dare_kernels import backends
from dare_kernels.reference import rectified_cfg_ref

from conftest import tol

pytestmark = pytest.mark.skipif(backends.unsupported_reason("rectified_cfg", "cpu", "cpu", torch.float32) is not None,
                                reason="compiled extension not loaded")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPE_5D = (2, 4, 3, 6, 10)      # [B, C, F, H, W] video latent, N = 720 per sample
SHAPE_4D = (2, 4, 9, 13)         # [B, C, H, W] image latent, odd N = 468


def make_preds(K, shape, dtype=torch.float32, *, spread=0.3, seed=0):
    """K branches stacked [K*B, ...]: cond and degraded are correlated with uncond, as real predictions are."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    branches = [u] + [u + spread * torch.randn(shape, generator=g, dtype=torch.float64) + 0.05 * (k + 1)
                      for k in range(K - 1)]
    return torch.cat(branches).to(dtype)


def oracle(preds, s, **kw):
    """The reference in float64 on the (already rounded) inputs."""
    if isinstance(preds, torch.Tensor):
        return rectified_cfg_ref(preds.double(), s, **kw)
    return rectified_cfg_ref([p.double() for p in preds], s, **kw)


def assert_close_to(got, want, dtype, scale=1.0):
    """Compare against the float64 oracle with the dtype's tolerance (relative to the output's size)."""
    atol, rtol = tol(dtype)["atol"], tol(dtype)["rtol"]
    mag = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, atol=atol * max(1.0, mag) * scale, rtol=rtol * scale)


MODE_KW = {
    "cfg": {},
    "cfg_zero_star": {},
    "apg": {"eta": 0.3, "norm_threshold": 8.0},
}


# ---------------------------------------------------------------------------------------------
# against the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("mode", ["cfg", "cfg_zero_star", "apg"])
@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_matches_reference_5d(mode, K, dtype, phi):
    preds = make_preds(K, SHAPE_5D, dtype)
    kw = dict(num_branches=K, mode=mode, guidance_rescale=phi, rectify_scale=1.5 if K == 3 else 0.0, **MODE_KW[mode])
    got = dk.rectified_cfg(preds, 6.0, backend="cpu", **kw)
    assert got.dtype == dtype and got.shape == SHAPE_5D
    # low precision: the kernel rounds once at the end, like the oracle; a large s amplifies input ulps only
    assert_close_to(got, oracle(preds, 6.0, **kw), dtype, scale=1.0 if dtype == torch.float32 else 1.5)


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("mode", ["cfg", "cfg_zero_star", "apg"])
def test_matches_reference_4d_float64_exact(mode, K):
    preds = make_preds(K, SHAPE_4D, torch.float64, seed=3)
    kw = dict(num_branches=K, mode=mode, guidance_rescale=0.5, rectify_scale=-0.7 if K == 3 else 0.0, **MODE_KW[mode])
    got = dk.rectified_cfg(preds, 4.5, backend="cpu", **kw)
    torch.testing.assert_close(got, oracle(preds, 4.5, **kw), **tol(torch.float64))


def test_multi_chunk_and_tail_lengths():
    # N = 3 * 4099 = 12297: several 4096-element chunks and a ragged vector tail
    preds = make_preds(3, (3, 3, 4099), torch.float32, seed=5)
    for mode in ("cfg", "cfg_zero_star", "apg"):
        kw = dict(num_branches=3, mode=mode, guidance_rescale=0.7, rectify_scale=2.0, **MODE_KW[mode])
        assert_close_to(dk.rectified_cfg(preds, 7.5, backend="cpu", **kw), oracle(preds, 7.5, **kw), torch.float32)


def test_deterministic_across_thread_counts():
    preds = make_preds(2, (2, 4, 50, 101), torch.float32, seed=7)
    kw = dict(mode="apg", guidance_rescale=0.7, eta=0.0, norm_threshold=10.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dk.rectified_cfg(preds, 5.0, backend="cpu", **kw)
        torch.set_num_threads(max(2, threads))
        many = dk.rectified_cfg(preds, 5.0, backend="cpu", **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_non_contiguous_and_sequence_inputs():
    preds = make_preds(3, (2, 6, 5, 7), torch.float32, seed=9)
    u, c, d = (t.transpose(1, 3) for t in preds.chunk(3))  # strided views [2, 7, 5, 6]
    assert not u.is_contiguous()
    kw = dict(mode="cfg_zero_star", guidance_rescale=0.3, rectify_scale=0.5)
    got = dk.rectified_cfg([u, c, d], 3.0, backend="cpu", **kw)
    assert_close_to(got, oracle([u, c, d], 3.0, **kw), torch.float32)
    stacked = dk.rectified_cfg(torch.cat([u, c, d]), 3.0, num_branches=3, backend="cpu", **kw)
    torch.testing.assert_close(stacked, got, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("reduce_dims", [(1, 3, 4), (-1,), (2,), 4])
def test_custom_reduce_dims(reduce_dims):
    preds = make_preds(3, SHAPE_5D, torch.float32, seed=11)
    for mode in ("cfg", "cfg_zero_star", "apg"):
        kw = dict(num_branches=3, mode=mode, guidance_rescale=0.7, rectify_scale=1.0, reduce_dims=reduce_dims,
                  **MODE_KW[mode])
        got = dk.rectified_cfg(preds, 5.0, backend="cpu", **kw)
        assert got.shape == SHAPE_5D
        assert_close_to(got, oracle(preds, 5.0, **kw), torch.float32)


def test_out_argument():
    preds = make_preds(2, SHAPE_5D, torch.bfloat16, seed=13)
    kw = dict(mode="apg", guidance_rescale=0.7, eta=0.5)
    out = torch.full(SHAPE_5D, float("nan"), dtype=torch.bfloat16)
    res = dk.rectified_cfg(preds, 5.0, out=out, backend="cpu", **kw)
    assert res is out
    assert_close_to(out, oracle(preds, 5.0, **kw), torch.bfloat16, scale=1.5)
    # a strided out and custom reduce_dims
    big = torch.full((2, 4, 3, 6, 20), float("nan"), dtype=torch.float32)
    out2 = big[..., ::2]
    p32 = preds.float()
    res2 = dk.rectified_cfg(p32, 5.0, out=out2, reduce_dims=(1, 3), backend="cpu", **kw)
    assert res2 is out2
    assert_close_to(out2, oracle(p32, 5.0, reduce_dims=(1, 3), **kw), torch.float32)
    assert torch.isnan(big[..., 1::2]).all()


@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.bfloat16])
def test_apg_momentum_steps_match_reference(buf_dtype):
    b_ref = torch.zeros(SHAPE_4D, dtype=torch.float64)
    b_got = torch.zeros(SHAPE_4D, dtype=buf_dtype)
    for step in range(4):
        preds = make_preds(2, SHAPE_4D, torch.bfloat16, seed=20 + step)
        kw = dict(mode="apg", momentum=-0.5, eta=0.2, norm_threshold=6.0, guidance_rescale=0.4)
        want = oracle(preds, 5.0, momentum_buffer=b_ref, **kw)
        got = dk.rectified_cfg(preds, 5.0, momentum_buffer=b_got, backend="cpu", **kw)
        assert_close_to(got, want, torch.bfloat16, scale=2.0)
        assert_close_to(b_got, b_ref, buf_dtype, scale=2.0)
        b_ref = b_got.double()  # both sides continue from the state the kernel keeps (bf16 rounding)


# ---------------------------------------------------------------------------------------------
# against diffusers' guiders (K = 2). diffusers rounds CFG-Zero*'s α and the rescale statistics to the
# input dtype; dare_kernels keeps all statistics in float32, so low-precision inputs are compared with
# the guider run on their float64 upcast (what the math says), with the dtype's tolerance.
# ---------------------------------------------------------------------------------------------

def _guiders():
    pytest.importorskip("diffusers")
    import diffusers.guiders as G
    return G


def _guider_pred(guider, u, c, step=0, steps=10):
    guider.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(999 - step))
    guider.prepare_inputs({})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return guider.forward(pred_cond=c, pred_uncond=u).pred


# per K = 2 mode with a rescale: (its diffusers guider from diffusers.guiders, guidance scale, guidance_rescale, seed)
RESCALED_GUIDERS = {
    "cfg": (lambda G: G.ClassifierFreeGuidance(guidance_scale=7.0, guidance_rescale=0.7), 7.0, 0.7, 31),
    "cfg_zero_star": (lambda G: G.ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=0,
                                                                 guidance_rescale=0.5), 5.0, 0.5, 37),
}


@pytest.mark.parametrize("mode", list(RESCALED_GUIDERS))
@pytest.mark.parametrize("shape", [SHAPE_4D, SHAPE_5D])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rescaled_guidance_matches_diffusers(mode, shape, dtype):
    """CFG and CFG-Zero* with guidance_rescale against the guider on the float64 upcast of the inputs and, for
    float32 inputs, against the guider in its own float32 arithmetic."""
    G = _guiders()
    make_guider, s, phi, seed = RESCALED_GUIDERS[mode]
    preds = make_preds(2, shape, dtype, seed=seed)
    u, c = preds.double().chunk(2)
    want = _guider_pred(make_guider(G), u, c)
    got = dk.rectified_cfg(preds, s, mode=mode, guidance_rescale=phi, backend="cpu")
    assert_close_to(got, want, dtype, scale=1.5)
    if dtype == torch.float32:
        u32, c32 = preds.chunk(2)
        torch.testing.assert_close(got, _guider_pred(make_guider(G), u32, c32), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("shape", [SHAPE_4D, SHAPE_5D])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apg_momentum_norm_threshold_matches_diffusers_over_steps(shape, dtype):
    """diffusers' MomentumBuffer starts at 0 and keeps buf <- diff + β buf; a zero buffer here is the same."""
    G = _guiders()
    guider = G.AdaptiveProjectedGuidance(guidance_scale=6.0, adaptive_projected_guidance_momentum=-0.5,
                                         adaptive_projected_guidance_rescale=5.0, eta=0.25, guidance_rescale=0.3)
    buf = torch.zeros(shape, dtype=torch.float32)
    for step in range(4):
        preds = make_preds(2, shape, dtype, seed=40 + step)
        u, c = preds.double().chunk(2)
        want = _guider_pred(guider, u, c, step=step, steps=4)
        got = dk.rectified_cfg(preds, 6.0, mode="apg", momentum=-0.5, momentum_buffer=buf, norm_threshold=5.0,
                               eta=0.25, guidance_rescale=0.3, backend="cpu")
        assert_close_to(got, want, dtype, scale=1.5)
        assert_close_to(buf, guider.momentum_buffer.running_average, torch.float32)


def test_apg_norm_dim_matches_diffusers():
    G = _guiders()
    preds = make_preds(2, SHAPE_5D, torch.float32, seed=50)
    u, c = preds.double().chunk(2)
    guider = G.AdaptiveProjectedGuidance(guidance_scale=4.0, adaptive_projected_guidance_rescale=3.0,
                                         adaptive_projected_guidance_norm_dim=(1, 3, 4), eta=0.0)
    want = _guider_pred(guider, u, c)
    got = dk.rectified_cfg(preds, 4.0, mode="apg", norm_threshold=3.0, eta=0.0, reduce_dims=(1, 3, 4), backend="cpu")
    assert_close_to(got, want, torch.float32)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("mode", ["cfg", "cfg_zero_star", "apg"])
def test_gradcheck(mode, K):
    preds = make_preds(K, (2, 3, 7), torch.float64, seed=60).requires_grad_()
    kw = dict(num_branches=K, mode=mode, guidance_rescale=0.6, rectify_scale=0.8 if K == 3 else 0.0,
              **(dict(eta=0.3, norm_threshold=2.5) if mode == "apg" else {}))
    assert torch.autograd.gradcheck(lambda p: dk.rectified_cfg(p, 3.0, backend="cpu", **kw), (preds,))


def test_gradcheck_momentum_and_reduce_dims():
    preds = make_preds(3, (2, 3, 2, 4), torch.float64, seed=61).requires_grad_()
    buf0 = torch.randn(2, 3, 2, 4, dtype=torch.float64)

    def f(p):
        return dk.rectified_cfg(p, 3.0, num_branches=3, mode="apg", momentum=0.4, momentum_buffer=buf0.clone(),
                                norm_threshold=1.0, eta=-0.2, guidance_rescale=0.5, rectify_scale=0.3,
                                reduce_dims=(1, 3), backend="cpu")

    assert torch.autograd.gradcheck(f, (preds,))


def test_grad_matches_reference_autograd_float32():
    preds = make_preds(2, SHAPE_5D, torch.float32, seed=62)
    kw = dict(mode="cfg_zero_star", guidance_rescale=0.7)
    p1 = preds.clone().requires_grad_()
    p2 = preds.double().requires_grad_()
    w = torch.randn(SHAPE_5D, dtype=torch.float64)
    (dk.rectified_cfg(p1, 5.0, backend="cpu", **kw).double() * w).sum().backward()
    (rectified_cfg_ref(p2, 5.0, **kw) * w).sum().backward()
    torch.testing.assert_close(p1.grad.double(), p2.grad, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def _bad_cases():
    x = make_preds(2, (2, 3, 4))
    x3 = make_preds(3, (2, 3, 4))
    u, c = x.chunk(2)
    yield "batch not divisible", dict(preds=torch.randn(5, 3, 4)), ValueError, "divisible"
    yield "num_branches 4", dict(preds=x, num_branches=4), ValueError, "num_branches"
    yield "shape mismatch", dict(preds=[u, c[:, :2]]), ValueError, "shape"
    yield "dtype mismatch", dict(preds=[u, c.double()]), TypeError, "dtype"
    yield "device mismatch", dict(preds=[u, c.to("meta")]), ValueError, "device"
    yield "int dtype", dict(preds=x.long()), TypeError, "float"
    yield "not a tensor", dict(preds=[u, 3.0]), TypeError, "preds"
    yield "one branch", dict(preds=[u]), ValueError, "2 or 3"
    yield "1-D preds", dict(preds=torch.randn(4)), ValueError, "non-batch"
    yield "unknown mode", dict(preds=x, mode="pag"), ValueError, "mode"
    yield "phi > 1", dict(preds=x, guidance_rescale=1.5), ValueError, "guidance_rescale"
    yield "phi < 0", dict(preds=x, guidance_rescale=-0.1), ValueError, "guidance_rescale"
    yield "nan scale", dict(preds=x, guidance_scale=float("nan")), ValueError, "guidance_scale"
    yield "tensor scale", dict(preds=x, guidance_scale=torch.tensor(2.0)), TypeError, "guidance_scale"
    yield "momentum without buffer", dict(preds=x, mode="apg", momentum=0.5), ValueError, "momentum_buffer"
    yield "buffer wrong shape", dict(preds=x, mode="apg", momentum=0.5, momentum_buffer=torch.zeros(2, 3)), \
        ValueError, "momentum_buffer"
    yield "buffer wrong dtype", dict(preds=x, mode="apg", momentum=0.5,
                                     momentum_buffer=torch.zeros(2, 3, 4, dtype=torch.float64)), TypeError, "momentum_buffer"
    yield "buffer without momentum", dict(preds=x, mode="apg", momentum_buffer=torch.zeros(2, 3, 4)), \
        ValueError, "momentum"
    yield "momentum outside apg", dict(preds=x, momentum=0.5, momentum_buffer=torch.zeros(2, 3, 4)), \
        ValueError, "apg"
    yield "rectify with K=2", dict(preds=x, rectify_scale=1.0), ValueError, "rectify_scale"
    yield "negative threshold", dict(preds=x, mode="apg", norm_threshold=-1.0), ValueError, "norm_threshold"
    yield "reduce batch dim", dict(preds=x, reduce_dims=(0, 1)), ValueError, "batch"
    yield "reduce dim out of range", dict(preds=x, reduce_dims=(5,)), ValueError, "range"
    yield "reduce dims repeated", dict(preds=x, reduce_dims=(1, -2)), ValueError, "twice"
    yield "reduce dims empty", dict(preds=x, reduce_dims=()), ValueError, "at least one"
    yield "rescale over one element", dict(preds=make_preds(2, (2, 3, 1)), reduce_dims=(2,), guidance_rescale=0.5), \
        ValueError, "2 elements"
    yield "out wrong shape", dict(preds=x, out=torch.empty(2, 3)), ValueError, "out"
    yield "out wrong dtype", dict(preds=x, out=torch.empty(2, 3, 4, dtype=torch.float64)), ValueError, "out"
    yield "out aliases preds", dict(preds=x, out=x[:2]), ValueError, "share memory"
    yield "unknown backend", dict(preds=x, backend="metal"), ValueError, "backend"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_input(case):
    _, kw, exc, words = case
    kw = dict(kw)
    preds = kw.pop("preds")
    s = kw.pop("guidance_scale", 5.0)
    with pytest.raises(exc, match=words):
        dk.rectified_cfg(preds, s, **kw)


def test_out_with_grad_is_rejected():
    x = make_preds(2, (2, 3, 4)).requires_grad_()
    with pytest.raises(ValueError, match="autograd"):
        dk.rectified_cfg(x, 2.0, out=torch.empty(2, 3, 4))


def test_explicit_unavailable_backend_raises_and_auto_prefers_the_validated_cuda_kernel():
    x = make_preds(2, (2, 3, 4))
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        dk.rectified_cfg(x, 2.0, backend="cuda")
    # measured on the H100 (tuning.AUTO_EVIDENCE): CUDA 0.021 ms, Triton 0.390 ms
    assert backends.auto_order("rectified_cfg", torch.device("cuda")) == ("cuda", "triton")
    assert backends.choose("rectified_cfg", "auto", torch.device("cpu"), torch.float32) == "cpu"


# ---------------------------------------------------------------------------------------------
# custom ops: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

def test_opcheck_cpu_ops():
    fused, stats, combine = backends.ops_for("rectified_cfg", "cpu")
    u, c, d = make_preds(3, (2, 3, 5, 6), seed=70).chunk(3)
    buf = torch.randn(2, 3, 5, 6)
    out = torch.empty(2, 3, 5, 6)
    torch.library.opcheck(fused, (u, c, d, buf, out, 2, "apg", 3.0, 0.5, 0.7, 0.2, 4.0, 0.5))
    torch.library.opcheck(fused, (u, c, None, None, out, 3, "cfg_zero_star", 3.0, 0.0, 0.7, 1.0, 0.0, 0.0))
    ur, cr, dr = (t.clone().requires_grad_() for t in (u, c, d))
    torch.library.opcheck(stats, (ur, cr, dr, None, 2, 0.0))
    torch.library.opcheck(stats, (ur, cr, None, buf, 3, 0.3))
    coeffs = torch.randn(2, 4, requires_grad=True)
    torch.library.opcheck(combine, (ur, cr, dr, None, coeffs, 3))
    torch.library.opcheck(combine, (ur, cr, None, buf, torch.randn(6, 4, requires_grad=True), 2))


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    preds = make_preds(2, (2, 4, 3, 5, 6), seed=80)

    def step(p, buf):
        g = dk.rectified_cfg(p, 5.0, mode="apg", momentum=-0.5, momentum_buffer=buf, guidance_rescale=0.7,
                             norm_threshold=4.0)
        return g * 2.0

    b_eager, b_comp = torch.zeros(2, 4, 3, 5, 6), torch.zeros(2, 4, 3, 5, 6)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for _ in range(2):
        want = step(preds, b_eager)
        got = compiled(preds, b_comp)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b_comp, b_eager)

    def loss(p):
        return (dk.rectified_cfg(p, 5.0, mode="cfg_zero_star", guidance_rescale=0.7) ** 2).sum()

    p1 = preds.clone().requires_grad_()
    p2 = preds.clone().requires_grad_()
    loss(p1).backward()
    torch.compile(loss, fullgraph=True, backend="inductor")(p2).backward()
    torch.testing.assert_close(p2.grad, p1.grad, atol=1e-4, rtol=1e-4)


def test_auto_on_a_cuda_device_follows_the_measurements(monkeypatch):
    """With every kernel loadable (a mocked CUDA machine), auto takes the CUDA CFG kernel and Triton SRA."""
    from dare_kernels import tuning

    monkeypatch.setattr(backends, "_load_reason", lambda cap, device: None)
    monkeypatch.setattr(backends, "_import_triton_module", lambda op: None)
    cuda = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert backends.choose("rectified_cfg", "auto", cuda, dtype) == "cuda"
        assert backends.choose("sra_attention", "auto", cuda, dtype) == "triton"
    # the evidence is cited where the order is set, and the file it cites is committed
    assert "0.021 ms" in tuning.AUTO_EVIDENCE["rectified_cfg"]["cuda"]
    from pathlib import Path

    run = Path(__file__).resolve().parents[1] / tuning.FIRST_GPU_RUN
    assert (run / "bench.csv").is_file() and (run / "README.md").is_file()
    # CUDA SRA stays out until its sanitizers pass and a bench row shows it ahead of Triton
    monkeypatch.setattr(tuning, "CUDA_SRA_VALIDATED_ON_GPU", True)
    assert "cuda" not in backends.auto_order("sra_attention", cuda)


def test_info_says_why_cuda_sra_is_not_in_auto(capsys):
    from dare_kernels import cli

    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("cuda on a GPU: not in auto"))
    assert "sanitizer" in line and "ahead of Triton" in line and "bench/results/" in line
    assert any("cuda on a GPU: first on CUDA" in ln and "0.021 ms" in ln for ln in text.splitlines())
