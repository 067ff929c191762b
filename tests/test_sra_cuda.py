"""backend="cuda"-specific SRA attention tests (GPU only; skipped without a CUDA device and a CUDA build of
the extension): the forced forward paths, determinism of the map and the gradients, float32 rejected
clearly, the auto order, opcheck, and CUDA against Triton at model shapes.

The case families against the float64 reference (head dims, key lengths, no map, strided layouts, masks
and empty rows, map key ranges, Dv != D, strength, model shapes) run for every backend in
test_sra_conformance.py.
"""

from __future__ import annotations

import pytest
import torch

import dare_kernels as dk
from dare_kernels import _ext, backends
from dare_kernels.benchmarking.shapes import TEST_CUT_SHAPES
from dare_kernels.benchmarking.tolerances import assert_close
from dare_kernels.reference import sra_attention_ref

_CUDA_OK = torch.cuda.is_available() and _ext.has_cuda_kernels()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _CUDA_OK, reason="needs a CUDA device and the extension built with CUDA kernels"),
]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, kind: str = "out"):
    """The catalog's per-dtype check: maps by relative error, outputs and gradients relative to their size."""
    assert_close(actual, expected, dtype, kind, what)


def _inputs(B, H, N, M, D, Dv, dtype, layout="contiguous", weight="bm", mask=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(n_rows, d):
        if layout == "bnhd":  # [B, N, H, D] memory viewed [B, H, N, D] (diffusers' layout)
            t = torch.randn(B, n_rows, H, d, generator=g, dtype=torch.float64).transpose(1, 2)
        elif layout == "padded":  # last dim not contiguous
            t = torch.randn(B, H, n_rows, d, 2, generator=g, dtype=torch.float64)[..., 0]
        else:
            t = torch.randn(B, H, n_rows, d, generator=g, dtype=torch.float64)
        return t.to(device="cuda", dtype=dtype)

    q, k, v = make(N, D), make(M, D), make(M, Dv)
    w = None
    if weight == "bm":
        w = (torch.rand(B, M, generator=g, dtype=torch.float64) * 1.5 + 0.05)
        w[:, ::7] = 0.0  # dropped keys
    elif weight == "bhm":
        w = torch.rand(B, H, M, generator=g, dtype=torch.float64) + 0.1
    if w is not None:
        w = w.to(device="cuda", dtype=torch.float32)
    kpm = None
    if mask:
        kpm = torch.rand(B, M, generator=g) > 0.3
        kpm[:, 0] = True
        if B > 1:
            kpm[1] = False  # a batch with no valid key: out 0, lse -inf, no NaN
        kpm = kpm.to("cuda")
    return q, k, v, w, kpm


@pytest.mark.parametrize("path", ["exact", "online"])
def test_forward_paths_agree(monkeypatch, path):
    # DARE_KERNELS_CUDA_SRA_PATH forces the forward's key loop (the map always takes the exact one)
    monkeypatch.setenv("DARE_KERNELS_CUDA_SRA_PATH", path)  # reloaded by conftest.monkeypatch
    q, k, v, w, _ = _inputs(1, 2, 130, 300, 128, 128, torch.float16)
    o = dk.sra_attention(q, k, v, w, backend="cuda")
    o64 = sra_attention_ref(q.double(), k.double(), v.double(), w.double(), compute_dtype=torch.float64)
    _close(o, o64, torch.float16, f"out ({path})")


# ---- determinism, errors, custom-op machinery

def test_map_and_gradients_are_deterministic():
    q, k, v, w, _ = _inputs(1, 6, 200, 300, 64, 64, torch.bfloat16, seed=3)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, w)]
        o, amap = dk.sra_attention(*leaves, return_attn_map=True, backend="cuda")
        (o.float().square().sum() + amap.square().sum()).backward()
        runs.append([o, amap] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_float32_is_rejected_with_a_clear_error():
    q = torch.randn(1, 2, 8, 16, device="cuda")
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        dk.sra_attention(q, q, q, backend="cuda")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        torch.ops.dare_kernels.sra_attention_fwd(q, q, q, None, None, 1.0, 0.25, 0, 0)


def test_auto_never_picks_unvalidated_cuda():
    from dare_kernels.tuning import CUDA_SRA_VALIDATED_ON_GPU

    if not CUDA_SRA_VALIDATED_ON_GPU:
        assert "cuda" not in backends.auto_order("sra_attention", torch.device("cuda"))


def test_opcheck():
    q, k, v, w, kpm = _inputs(1, 2, 33, 20, 64, 64, torch.float16, mask=True, seed=5)
    torch.library.opcheck(torch.ops.dare_kernels.sra_attention_fwd.default,
                          (q, k, v, w.view(1, 1, 20).expand(1, 2, 20).contiguous(), kpm, 0.7, 0.125, 2, 15))


_MODEL = [TEST_CUT_SHAPES[n] for n in ("wan-1.3b", "ltx-video", "cogvideox-5b-joint")]


@pytest.mark.parametrize("shape", _MODEL, ids=[s.name for s in _MODEL])
def test_cuda_matches_triton(shape):
    why = backends.unsupported_reason("sra_attention", "triton", torch.device("cuda"), torch.bfloat16)
    if why is not None:
        pytest.skip(f"triton backend: {why}")
    B, H, N, M, D = shape.B, shape.H, shape.N, shape.M, shape.D
    q, k, v, w, _ = _inputs(B, H, N, M, D, D, torch.bfloat16, layout="bnhd")
    keys = shape.map_keys or (0, M)
    o_c, a_c = dk.sra_attention(q, k, v, w, return_attn_map=True, attn_map_keys=keys, backend="cuda")
    o_t, a_t = dk.sra_attention(q, k, v, w, return_attn_map=True, attn_map_keys=keys, backend="triton")
    _close(o_c, o_t.float(), torch.bfloat16, "out cuda vs triton")
    _close(a_c, a_t, torch.bfloat16, "map cuda vs triton", kind="map")


def test_no_keys_gives_zeros_minus_inf_lse_and_an_empty_map():
    """M == 0 at the op itself (below the wrapper): every row has no valid key, so o = 0 (never Q data, which
    a missing barrier in the forward epilogue once let through), lse = -inf, map [B, N, 0], dq = 0."""
    q = torch.randn(2, 3, 70, 64, device="cuda", dtype=torch.float16)
    k = torch.empty(2, 3, 0, 64, device="cuda", dtype=torch.float16)
    v = torch.empty(2, 3, 0, 48, device="cuda", dtype=torch.float16)
    out, lse, amap = torch.ops.dare_kernels.sra_attention_fwd(q, k, v, None, None, 1.0, 0.125, 0, 0)
    torch.cuda.synchronize()
    assert out.shape == (2, 3, 70, 48) and bool((out == 0).all()), "o must be zeros with no keys"
    assert lse.shape == (2, 3, 70) and bool(torch.isneginf(lse).all())
    assert amap.shape == (2, 70, 0)
    go = torch.randn_like(out)
    dq, dk, dv, dw = torch.ops.dare_kernels.sra_attention_bwd(go, None, None, q, k, v, None, None, out, lse, 1.0,
                                                             0.125, 0, 0)
    assert bool((dq == 0).all()) and dk.shape == k.shape and dv.shape == v.shape
