"""Public sra_attention API on CPU: bad input, return conventions, SDPA equivalence, invariances, custom ops.

Bad input must raise ValueError/TypeError naming the argument; strength=0 must equal
F.scaled_dot_product_attention; a common factor on the weights changes nothing; both custom ops pass
torch.library.opcheck; torch.compile(fullgraph=True) runs forward and backward without a graph break.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dare_kernels import _ext, sra_attention

from conftest import TOL

needs_cpu_kernels = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="CPU kernels not built")

B, H, N, M, D = 2, 3, 11, 7, 8


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k = torch.randn(B, H, M, D, generator=g).to(dtype)
    v = torch.randn(B, H, M, D, generator=g).to(dtype)
    w = (torch.rand(B, M, generator=g) + 0.1).to(dtype)
    return q, k, v, w


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def _bad_cases():
    q, k, v, w = inputs()
    meta = torch.device("meta")
    cases = [
        # (kwargs overriding the good call, error type, words the message must contain)
        ("q_rank", dict(query=q[0]), ValueError, "query"),
        ("k_rank", dict(key=k[..., 0]), ValueError, "key"),
        ("v_rank", dict(value=v.unsqueeze(0)), ValueError, "value"),
        ("q_not_tensor", dict(query=q.tolist()), TypeError, "query"),
        ("k_batch", dict(key=k[:1]), ValueError, "key"),
        ("k_heads", dict(key=k[:, :2]), ValueError, "key"),
        ("k_dim", dict(key=k[..., :5]), ValueError, "key"),
        ("v_keys", dict(value=v[:, :, :5]), ValueError, "value"),
        ("v_batch", dict(value=v[:1]), ValueError, "value"),
        ("int_query", dict(query=q.to(torch.int32)), TypeError, "query"),
        ("int_key", dict(key=k.to(torch.int64)), TypeError, "key"),
        ("mixed_dtype", dict(value=v.double()), TypeError, "dtype"),
        ("k_device", dict(key=k.to(meta)), ValueError, "device"),
        ("w_shape", dict(token_weight=torch.rand(M + 1)), ValueError, "token_weight"),
        ("w_shape_bh", dict(token_weight=torch.rand(B, H)), ValueError, "token_weight"),
        ("w_rank", dict(token_weight=torch.rand(1, B, H, M)), ValueError, "token_weight"),
        ("w_negative", dict(token_weight=w - 1.0), ValueError, "token_weight"),
        ("w_nan", dict(token_weight=torch.where(w > 0.5, w, float("nan"))), ValueError, "token_weight"),
        ("w_int", dict(token_weight=torch.ones(B, M, dtype=torch.int64)), TypeError, "token_weight"),
        ("w_not_tensor", dict(token_weight=[1.0] * M), TypeError, "token_weight"),
        ("w_device", dict(token_weight=w.to(meta)), ValueError, "token_weight"),
        ("mask_dtype", dict(key_padding_mask=torch.ones(B, M)), TypeError, "key_padding_mask"),
        ("mask_shape", dict(key_padding_mask=torch.ones(B, M + 1, dtype=torch.bool)), ValueError, "key_padding_mask"),
        ("mask_rank", dict(key_padding_mask=torch.ones(B, 1, M, dtype=torch.bool)), ValueError, "key_padding_mask"),
        ("mask_device", dict(key_padding_mask=torch.ones(B, M, dtype=torch.bool, device=meta)), ValueError, "key_padding_mask"),
        ("strength_negative", dict(strength=-1.0), ValueError, "strength"),
        ("strength_nan", dict(strength=float("nan")), ValueError, "strength"),
        ("strength_type", dict(strength="1"), TypeError, "strength"),
        ("scale_inf", dict(scale=float("inf")), ValueError, "scale"),
        ("scale_type", dict(scale="x"), TypeError, "scale"),
        ("map_keys_empty", dict(return_attn_map=True, attn_map_keys=(3, 3)), ValueError, "attn_map_keys"),
        ("map_keys_range", dict(return_attn_map=True, attn_map_keys=(0, M + 1)), ValueError, "attn_map_keys"),
        ("map_keys_negative", dict(return_attn_map=True, attn_map_keys=(-1, 2)), ValueError, "attn_map_keys"),
        ("map_keys_type", dict(return_attn_map=True, attn_map_keys=5), TypeError, "attn_map_keys"),
        ("map_keys_triple", dict(return_attn_map=True, attn_map_keys=(0, 1, 2)), TypeError, "attn_map_keys"),
        ("backend_unknown", dict(backend="tpu"), ValueError, "backend"),
        ("backend_cuda_on_cpu", dict(backend="cuda"), RuntimeError, "backend"),
    ]
    return [pytest.param(kw, err, words, id=name) for name, kw, err, words in cases]


@pytest.mark.parametrize("override,err,words", _bad_cases())
def test_bad_input_raises_naming_the_argument(override, err, words):
    q, k, v, w = inputs()
    args = dict(query=q, key=k, value=v, token_weight=w)
    args.update(override)
    with pytest.raises(err, match=words):
        sra_attention(**args)


def test_error_types_are_the_documented_ones():
    # RuntimeError is only for an explicitly requested backend that cannot run here
    q, k, v, w = inputs()
    with pytest.raises((ValueError, TypeError)):
        sra_attention(q, k[:1], v, w)


# ---------------------------------------------------------------------------------------------
# return conventions, backends agree
# ---------------------------------------------------------------------------------------------

@needs_cpu_kernels
def test_return_tuple_order_and_shapes():
    q, k, v, w = inputs()
    o = sra_attention(q, k, v, w)
    assert o.shape == (B, H, N, D) and o.dtype == q.dtype
    o2, amap = sra_attention(q, k, v, w, return_attn_map=True)
    o3, lse = sra_attention(q, k, v, w, return_lse=True)
    o4, amap4, lse4 = sra_attention(q, k, v, w, return_attn_map=True, return_lse=True, attn_map_keys=(2, 5))
    assert amap.shape == (B, N, M) and amap.dtype == torch.float32
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    assert amap4.shape == (B, N, 3)
    for x in (o2, o3, o4):
        assert torch.equal(x, o)
    torch.testing.assert_close(amap4, amap[..., 2:5])
    torch.testing.assert_close(lse4, lse)
    # the map is a head average of probabilities: rows sum to 1 over all keys
    torch.testing.assert_close(amap.sum(-1), torch.ones(B, N))


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_backend_agrees_with_reference_backend(dtype):
    q, k, v, w = inputs(dtype)
    mask = torch.rand(B, M, generator=torch.Generator().manual_seed(1)) > 0.3
    a = sra_attention(q, k, v, w, key_padding_mask=mask, return_attn_map=True, return_lse=True, backend="cpu")
    b = sra_attention(q, k, v, w, key_padding_mask=mask, return_attn_map=True, return_lse=True, backend="reference")
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x.float(), y.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


# ---------------------------------------------------------------------------------------------
# invariances: strength 0 is SDPA; a common factor on the weights changes nothing
# ---------------------------------------------------------------------------------------------

@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use_mask", [False, True])
def test_strength_zero_equals_sdpa(dtype, use_mask):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, H, 37, 40, generator=g).to(dtype)
    k = torch.randn(B, H, 77, 40, generator=g).to(dtype)
    v = torch.randn(B, H, 77, 40, generator=g).to(dtype)
    w = torch.rand(B, 77, generator=g) + 0.1  # positive: strength 0 ignores the values
    mask = (torch.rand(B, 77, generator=g) > 0.3) if use_mask else None
    o = sra_attention(q, k, v, w.to(dtype), key_padding_mask=mask, strength=0.0, backend="cpu")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                         attn_mask=None if mask is None else mask.view(B, 1, 1, 77))
    torch.testing.assert_close(o.float(), ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@needs_cpu_kernels
@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("M_", [77, 1100])
def test_weight_scale_invariance(strength, M_):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 19, 16, generator=g)
    k = torch.randn(1, 2, M_, 16, generator=g)
    v = torch.randn(1, 2, M_, 16, generator=g)
    w = torch.rand(1, M_, generator=g) + 0.05
    o1, a1 = sra_attention(q, k, v, w, strength=strength, return_attn_map=True, backend="cpu")
    o2, a2 = sra_attention(q, k, v, w * 7.3, strength=strength, return_attn_map=True, backend="cpu")
    torch.testing.assert_close(o1, o2, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])
    torch.testing.assert_close(a1, a2, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])


@needs_cpu_kernels
def test_strength_one_reweights_probabilities():
    # γ = 1: P ∝ w_j · exp(scale·q·k)
    q, k, v, w = inputs(torch.float64)
    _, amap = sra_attention(q, k, v, w, strength=1.0, return_attn_map=True, backend="cpu")
    p = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, -1) * w.view(B, 1, 1, M)
    p = p / p.sum(-1, keepdim=True)
    torch.testing.assert_close(amap, p.mean(1), atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# custom ops: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

@needs_cpu_kernels
def test_opcheck_forward_and_backward_ops():
    q, k, v, w = inputs()
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # BSHD memory
    wx = w.view(B, 1, M).expand(B, H, M)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0, 2] = False
    fwd = torch.ops.dare_kernels.sra_attention_fwd.default
    bwd = torch.ops.dare_kernels.sra_attention_bwd.default
    for args in [
        (q, k, v, wx, mask, 1.0, D**-0.5, 1, 6),
        (q, k, v, None, None, 0.5, 0.3, 0, 0),
    ]:
        torch.library.opcheck(fwd, args)
    qg, kg, vg, wg = (t.detach().requires_grad_() for t in (q, k, v, wx))
    torch.library.opcheck(fwd, (qg, kg, vg, wg, mask, 1.0, D**-0.5, 0, M))
    out, lse, _ = fwd(q, k, v, wx, mask, 1.0, D**-0.5, 1, 6)
    go, gm, gl = torch.randn_like(out), torch.randn(B, N, 5), torch.randn(B, H, N)
    torch.library.opcheck(bwd, (go, gm, gl, q, k, v, wx, mask, out, lse, 1.0, D**-0.5, 1, 6))
    torch.library.opcheck(bwd, (go, None, None, q, k, v, None, None, out, lse, 1.0, D**-0.5, 0, 0))


@needs_cpu_kernels
def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    q, k, v, w = inputs()
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1, 0] = False

    def f(q_, k_, v_, w_):
        o, amap = sra_attention(q_, k_, v_, w_, key_padding_mask=mask, return_attn_map=True, backend="cpu")
        return (o.square().sum() + amap.square().sum()) * 2

    leaves = [t.detach().requires_grad_() for t in (q, k, v, w)]
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    compiled(*leaves).backward()
    got = [t.grad.clone() for t in leaves]
    eager = [t.detach().requires_grad_() for t in (q, k, v, w)]
    f(*eager).backward()
    for a, b in zip(got, (t.grad for t in eager)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
