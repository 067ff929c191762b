"""SRA consistency loss (SPEC §4) against the float64 transcription, gradients (also through sra_attention's map)."""

from __future__ import annotations

import pytest
import torch

from conftest import rand, tol
from dare_kernels import sra_attention, sra_consistency_loss
from dare_kernels.reference import sra_consistency_loss_ref


def random_maps(L, B, N, M, dtype=torch.float64, seed=0):
    """L head-averaged-map-like tensors: rows are probability distributions over M keys."""
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(B, N, M, generator=g, dtype=torch.float64) * 2, dim=-1).to(dtype)
            for _ in range(L)]


def direct_loss(maps, w, valid, eps):
    """SPEC §4 as nested Python loops over b, j, l (an independent third formulation)."""
    L = len(maps)
    B, N, M = maps[0].shape
    total = 0.0
    for b in range(B):
        wsum = sum(float(w[b, j]) for j in range(M) if valid[b, j])
        if wsum == 0:
            continue
        for j in range(M):
            if not valid[b, j]:
                continue
            a = [maps[l][b, :, j] / (maps[l][b, :, j].sum() + eps) for l in range(L)]
            abar = sum(a) / L
            total += float(w[b, j]) / wsum * sum(N * float(((x - abar) ** 2).sum()) for x in a) / L
    return total / B


@pytest.mark.parametrize("L,B,N,M", [(3, 2, 7, 5), (1, 1, 4, 3), (4, 3, 33, 77)])
def test_reference_matches_direct_loops(L, B, N, M):
    maps = random_maps(L, B, N, M)
    w = torch.rand(B, M, dtype=torch.float64) + 0.05
    w[0, 0] = 0.0
    valid = torch.rand(B, M) > 0.2
    valid[:, 1] = True
    ref = sra_consistency_loss_ref(maps, w, valid, eps=1e-6)
    if L <= 3 or M <= 5:
        assert float(ref) == pytest.approx(direct_loss(maps, w, valid, 1e-6), rel=1e-12, abs=1e-15)
    got = sra_consistency_loss(maps, w, valid, eps=1e-6)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, **tol(torch.float64))
    if L == 1:
        assert float(got) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_maps_against_float64(dtype):
    maps = random_maps(3, 2, 226, 77, dtype=dtype, seed=1)
    w = torch.rand(2, 77) + 0.1
    kpm = torch.ones(2, 77, dtype=torch.bool)
    kpm[1, 40:] = False
    got = sra_consistency_loss(maps, w, kpm)
    ref = sra_consistency_loss_ref([m.double() for m in maps], w.double(), kpm)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)


def test_stacked_tensor_input_and_invariances():
    maps = random_maps(3, 2, 9, 6, seed=2)
    w = torch.rand(2, 6, dtype=torch.float64) + 0.1
    a = sra_consistency_loss(maps, w)
    torch.testing.assert_close(sra_consistency_loss(torch.stack(maps), w), a, **tol(torch.float64))
    # per-sample rescaling of w changes nothing (ŵ is normalised)
    torch.testing.assert_close(sra_consistency_loss(maps, w * torch.tensor([[3.0], [0.5]], dtype=torch.float64)), a,
                               **tol(torch.float64))
    # identical layers -> 0; a sample with no valid weight contributes 0, never NaN
    assert float(sra_consistency_loss([maps[0]] * 3, w)) == pytest.approx(0.0, abs=1e-20)
    w0 = w.clone()
    w0[1] = 0
    single = sra_consistency_loss([m[:1] for m in maps], w[:1])
    torch.testing.assert_close(sra_consistency_loss(maps, w0), single / 2, **tol(torch.float64))
    # all-zero map columns stay finite (eps)
    z = [m.clone() for m in maps]
    for m in z:
        m[:, :, 2] = 0
    assert torch.isfinite(sra_consistency_loss(z, w))


@pytest.mark.parametrize("detach_target", [True, False])
def test_gradcheck_into_maps(detach_target):
    maps = [m.requires_grad_(True) for m in random_maps(3, 2, 5, 4, seed=3)]
    w = (torch.rand(2, 4, dtype=torch.float64) + 0.1).requires_grad_(True)
    kpm = torch.tensor([[True, True, False, True], [True, True, True, True]])

    def f(*args):
        return sra_consistency_loss(list(args[:-1]), args[-1], kpm, detach_target=detach_target)

    assert torch.autograd.gradcheck(f, (*maps, w))
    # the gradient equals the reference's (autograd through the SPEC transcription)
    g = torch.autograd.grad(f(*maps, w), maps)
    gr = torch.autograd.grad(sra_consistency_loss_ref(maps, w, kpm, detach_target=detach_target), maps)
    for x, y in zip(g, gr):
        torch.testing.assert_close(x, y, **tol(torch.float64))
    # the target is the mean of the layers, so Σ_l (a_l − ā) = 0 and detaching it leaves the gradient unchanged
    g_other = torch.autograd.grad(sra_consistency_loss(maps, w, kpm, detach_target=not detach_target), maps)
    for x, y in zip(g, g_other):
        torch.testing.assert_close(x, y, **tol(torch.float64))
    assert max(float(x.abs().max()) for x in g) > 0


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gradcheck_through_sra_attention_maps(backend):
    """loss(maps of two SRA layers) is differentiable into q, k, v and w through the map gradient."""
    B, H, N, M, D = 2, 2, 4, 5, 4
    g = torch.Generator().manual_seed(4)
    q = [rand(B, H, N, D, dtype=torch.float64, generator=g).requires_grad_(True) for _ in range(2)]
    k = rand(B, H, M, D, dtype=torch.float64, generator=g).requires_grad_(True)
    v = rand(B, H, M, D, dtype=torch.float64, generator=g).requires_grad_(True)
    w = (torch.rand(B, M, generator=g, dtype=torch.float64) + 0.2).requires_grad_(True)
    kpm = torch.tensor([[True] * 5, [True, True, True, False, True]])

    def f(q0, q1, k, v, w):
        maps = [sra_attention(qq, k, v, w, key_padding_mask=kpm, return_attn_map=True, backend=backend)[1]
                for qq in (q0, q1)]
        return sra_consistency_loss(maps, w, kpm)   # w both reweights attention and the loss

    # full Jacobians for the reference; the compiled op through random projections (fast mode) to keep CI short
    assert torch.autograd.gradcheck(f, (*q, k, v, w), fast_mode=(backend != "reference"))
    loss = f(*q, k, v, w)
    loss.backward()
    assert loss.item() > 0 and q[0].grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_sra_maps_loss_matches_reference_maps():
    """The loss of the compiled backend's maps equals the loss of the reference maps (odd shapes, float32)."""
    B, H, N, M, D = 2, 3, 37, 77, 40
    q = [rand(B, H, N, D) for _ in range(3)]
    k, v = rand(B, H, M, D), rand(B, H, M, D)
    w = torch.rand(B, M) + 0.05
    maps = [sra_attention(x, k, v, w, return_attn_map=True)[1] for x in q]
    ref_maps = [sra_attention(x.double(), k.double(), v.double(), w.double(), return_attn_map=True,
                              backend="reference")[1] for x in q]
    torch.testing.assert_close(sra_consistency_loss(maps, w).double(),
                               sra_consistency_loss_ref(ref_maps, w.double()), atol=1e-6, rtol=1e-5)


def test_compiles_fullgraph():
    maps = random_maps(2, 2, 8, 5, dtype=torch.float32)
    w = torch.rand(2, 5) + 0.1
    f = torch.compile(sra_consistency_loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(maps, w), sra_consistency_loss(maps, w))


def test_bad_input():
    maps = random_maps(2, 2, 4, 3, dtype=torch.float32)
    w = torch.rand(2, 3)
    with pytest.raises(ValueError, match="non-empty"):
        sra_consistency_loss([], w)
    with pytest.raises(ValueError, match="one shape"):
        sra_consistency_loss([maps[0], maps[1][:, :3]], w)
    with pytest.raises(ValueError, match=r"\[B, N, M\]"):
        sra_consistency_loss([maps[0][0]], w)
    with pytest.raises(TypeError, match="maps\\[1\\]"):
        sra_consistency_loss([maps[0], "x"], w)
    with pytest.raises(ValueError, match="token_weight must be"):
        sra_consistency_loss(maps, torch.rand(2, 4))
    with pytest.raises(ValueError, match="non-negative"):
        sra_consistency_loss(maps, -w)
    with pytest.raises(TypeError, match="key_padding_mask"):
        sra_consistency_loss(maps, w, torch.ones(2, 3))
    with pytest.raises(ValueError, match="key_padding_mask"):
        sra_consistency_loss(maps, w, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="eps"):
        sra_consistency_loss(maps, w, eps=-1.0)
    with pytest.raises(TypeError, match="floating"):
        sra_consistency_loss([m.long() for m in maps], w)


def test_custom_op_opcheck():
    """The per-token distance op passes torch.library.opcheck (schema, fake impl, autograd registration)."""
    from dare_kernels.losses import _consistency_dist

    maps = [m.requires_grad_(True) for m in random_maps(3, 2, 7, 5, dtype=torch.float32, seed=5)]
    torch.library.opcheck(_consistency_dist, (maps, 1e-6))
    bf = [m.detach().bfloat16() for m in maps]
    torch.library.opcheck(_consistency_dist, (bf, 1e-6), test_utils=("test_schema", "test_faketensor"))
