"""backend="cuda" SRA attention against the float64 reference (GPU only; skipped without a CUDA device
and a CUDA build of the extension). Forward out / lse / map and every gradient (q, k, v, token_weight,
through the map and the lse), on the model shapes (query length cut to keep the float64 reference small)
and small odd shapes: head dims 40/80/160/256, key lengths 1/77/226/512/1000, strided layouts, masks,
empty rows, map key ranges; determinism of the map and the gradients; float32 rejected clearly.
"""

from __future__ import annotations

import pytest
import torch

import dare_kernels as dk
from dare_kernels import _ext, backends
from dare_kernels.reference import sra_attention_ref

from conftest import TOL

_CUDA_OK = torch.cuda.is_available() and _ext.has_cuda_kernels()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _CUDA_OK, reason="needs a CUDA device and the extension built with CUDA kernels"),
]

DTYPES = (torch.float16, torch.bfloat16)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, mult: float = 1.0):
    """Per-dtype tolerance, relative to the reference's magnitude (gradients can be large)."""
    atol, rtol = TOL[dtype]
    actual, expected = actual.detach(), expected.detach()
    mag = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol * mag * mult,
                               rtol=rtol * mult, msg=lambda m: f"{what} ({dtype}): {m}")


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


def _ref(q, k, v, w, kpm, strength, keys, **kw):
    return sra_attention_ref(q.double(), k.double(), v.double(), None if w is None else w.double(),
                             key_padding_mask=kpm, strength=strength, return_attn_map=True, attn_map_keys=keys,
                             return_lse=True, compute_dtype=torch.float64)


def _check(B, H, N, M, D, Dv, dtype, *, layout="contiguous", weight="bm", mask=False, keys=None,
           strength=0.8, grads=True, seed=0, with_map=True):
    q, k, v, w, kpm = _inputs(B, H, N, M, D, Dv, dtype, layout, weight, mask, seed)
    keys = keys or (0, M)
    leaves = [q, k, v] + ([w] if w is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    if with_map:
        o, amap, lse = dk.sra_attention(q, k, v, w, key_padding_mask=kpm, strength=strength, return_attn_map=True,
                                        attn_map_keys=keys, return_lse=True, backend="cuda")
    else:  # no map: the forward may take the online-softmax path
        o, lse = dk.sra_attention(q, k, v, w, key_padding_mask=kpm, strength=strength, return_lse=True,
                                  backend="cuda")
        amap = torch.zeros(B, N, keys[1] - keys[0], device="cuda")
    assert o.dtype == dtype and amap.dtype == torch.float32 and lse.dtype == torch.float32
    assert o.shape == (B, H, N, Dv) and amap.shape == (B, N, keys[1] - keys[0]) and lse.shape == (B, H, N)

    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    q64, k64, v64 = leaves64[:3]
    w64 = leaves64[3] if w is not None else None
    o64, amap64, lse64 = sra_attention_ref(q64, k64, v64, w64, key_padding_mask=kpm, strength=strength,
                                           return_attn_map=True, attn_map_keys=keys, return_lse=True,
                                           compute_dtype=torch.float64)
    _close(o, o64, dtype, "out")
    if with_map:
        _close(amap, amap64, dtype, "attn_map")
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse).cpu(), finite.cpu()), "lse: -inf rows differ"
    _close(lse[finite], lse64[finite], dtype, "lse")
    assert not torch.isnan(o).any() and not torch.isnan(amap).any()
    if not grads:
        return
    go = torch.randn_like(o64)
    gmap = torch.randn_like(amap64)
    glse = torch.where(finite, torch.randn_like(lse64), torch.zeros_like(lse64))
    if with_map:
        ref_grads = torch.autograd.grad([o64, amap64, lse64], leaves64, [go, gmap, glse])
        got = torch.autograd.grad([o, amap, lse], leaves, [go.to(dtype), gmap.float(), glse.float()])
    else:
        ref_grads = torch.autograd.grad([o64, lse64], leaves64, [go, glse])
        got = torch.autograd.grad([o, lse], leaves, [go.to(dtype), glse.float()])
    for name, a, e in zip(("dq", "dk", "dv", "dw"), got, ref_grads):
        assert not torch.isnan(a).any(), name
        _close(a, e, dtype, name, mult=2.0)


# ---- small odd shapes

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 80, 160, 256])
def test_head_dims(dtype, D):
    _check(2, 3, 77, 77, D, D, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 77, 226, 512, 1000])
def test_key_lengths(dtype, M):
    _check(1, 2, 131, M, 64, 64, dtype, weight="bhm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [77, 512, 1000])
def test_without_map(dtype, M):
    _check(2, 2, 131, M, 128, 128, dtype, with_map=False, mask=True)


@pytest.mark.parametrize("layout", ["bnhd", "padded"])
def test_strided_layouts(layout):
    _check(2, 4, 100, 70, 80, 80, torch.float16, layout=layout)


def test_mask_and_empty_rows():
    _check(2, 2, 65, 90, 64, 64, torch.bfloat16, mask=True)


@pytest.mark.parametrize("keys", [(0, 1), (17, 60), (64, 129)])
def test_map_key_ranges(keys):
    _check(1, 3, 70, 129, 64, 64, torch.float16, keys=keys)


def test_dv_differs_from_d_and_no_weight():
    _check(1, 2, 50, 33, 48, 112, torch.float16, weight=None, strength=1.0)


@pytest.mark.parametrize("strength", [0.0, 2.5])
def test_strength(strength):
    _check(1, 2, 40, 50, 64, 64, torch.bfloat16, strength=strength)


@pytest.mark.parametrize("path", ["exact", "online"])
def test_forward_paths_agree(monkeypatch, path):
    # DARE_KERNELS_CUDA_SRA_PATH forces the forward's key loop (the map always takes the exact one)
    monkeypatch.setenv("DARE_KERNELS_CUDA_SRA_PATH", path)  # reloaded by conftest.monkeypatch
    q, k, v, w, _ = _inputs(1, 2, 130, 300, 128, 128, torch.float16)
    o = dk.sra_attention(q, k, v, w, backend="cuda")
    o64 = sra_attention_ref(q.double(), k.double(), v.double(), w.double(), compute_dtype=torch.float64)
    _close(o, o64, torch.float16, f"out ({path})")


# ---- model shapes (query length cut so that the float64 reference fits)

_MODEL = [
    ("wan-1.3b", 1, 12, 1024, 512, 128, None),
    ("ltx-video", 1, 32, 1024, 128, 64, None),
    ("cogvideox-5b-joint", 1, 4, 600, 826, 64, (600, 826)),
    ("animatediff-d40", 2, 8, 512, 77, 40, None),
    ("animatediff-d160", 2, 8, 256, 77, 160, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", _MODEL, ids=[s[0] for s in _MODEL])
def test_model_shapes(shape, dtype):
    _, B, H, N, M, D, keys = shape
    _check(B, H, N, M, D, D, dtype, layout="bnhd", keys=keys)


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


@pytest.mark.parametrize("shape", _MODEL[:3], ids=[s[0] for s in _MODEL[:3]])
def test_cuda_matches_triton(shape):
    why = backends.unsupported_reason("sra_attention", "triton", torch.device("cuda"), torch.bfloat16)
    if why is not None:
        pytest.skip(f"triton backend: {why}")
    _, B, H, N, M, D, keys = shape
    q, k, v, w, _ = _inputs(B, H, N, M, D, D, torch.bfloat16, layout="bnhd")
    keys = keys or (0, M)
    o_c, a_c = dk.sra_attention(q, k, v, w, return_attn_map=True, attn_map_keys=keys, backend="cuda")
    o_t, a_t = dk.sra_attention(q, k, v, w, return_attn_map=True, attn_map_keys=keys, backend="triton")
    _close(o_c, o_t.float(), torch.bfloat16, "out cuda vs triton")
    _close(a_c, a_t, torch.bfloat16, "map cuda vs triton")
