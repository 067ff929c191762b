"""The memory-safe PyTorch fallback of SRA attention (auto's last resort), and M == 0 on every backend.

Correctness against the float64 reference (outputs, maps, LSE, gradients incl. the weights, rows with no
valid key); memory: a forced fallback at shapes where [B, H, N, M] float32 would take gigabytes keeps its
peak within about twice its outputs (measured in a subprocess through Linux's VmHWM, reset before the call).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dare_kernels as dk
from dare_kernels import backends, sra_fallback
from dare_kernels.reference import sra_attention_ref

from conftest import TOL


def _inputs(B, H, N, M, D, Dv, dtype, *, seed=0, empty_rows=True, w_shape="bm"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, M, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, M, Dv, generator=g, dtype=torch.float64)
    w = torch.rand(B, M, generator=g, dtype=torch.float64) + 0.05
    w[:, 1] = 0.0  # a dropped key
    mask = torch.rand(B, M, generator=g) > 0.3
    mask[:, 0] = True
    if empty_rows:  # sample 0: no valid key at all (O = 0, lse = -inf, gradients finite)
        mask[0] = False
    if w_shape == "bhm":
        w = w.unsqueeze(1).expand(B, H, M).contiguous() * (1 + torch.arange(H, dtype=torch.float64).view(1, H, 1))
    elif w_shape == "m":
        w = w[0]
    return [t.to(dtype) for t in (q, k, v, w)] + [mask]


def _close(a, b, dtype, what):
    atol, rtol = TOL[dtype]
    scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a.double(), b.double(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("outputs", ["o", "map_lse"])
@pytest.mark.parametrize("w_shape", ["bm", "bhm", "m"])
def test_fallback_matches_float64_reference_with_gradients(dtype, outputs, w_shape, monkeypatch):
    # small chunks: several row chunks per call, so the chunk bookkeeping is exercised
    monkeypatch.setattr(sra_fallback, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(sra_fallback, "SDPA_CHUNK_ELEMENTS", 96)
    B, H, N, M, D, Dv = 2, 3, 13, 7, 8, 6
    q, k, v, w, mask = _inputs(B, H, N, M, D, Dv, dtype, w_shape=w_shape)
    want_map = outputs == "map_lse"
    map_keys = (1, 6) if want_map else None
    strength, scale = 0.8, D ** -0.5

    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    out, amap, lse = sra_fallback.sra_attention_fallback(*leaves, mask, strength, scale, map_keys, want_map)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, w)]
    ref = sra_attention_ref(*ref_leaves, key_padding_mask=mask, strength=strength, scale=scale,
                            return_attn_map=want_map, attn_map_keys=map_keys, return_lse=want_map)
    ref = list(ref) if isinstance(ref, tuple) else [ref]

    assert out.dtype == dtype and out.shape == (B, H, N, Dv)
    _close(out, ref[0], dtype, "O")
    assert torch.all(out[0] == 0)  # sample 0 has no valid key
    g = torch.Generator().manual_seed(1)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * go).sum()
    ref_loss = (ref[0] * go).sum()
    if want_map:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert amap.dtype == acc and lse.dtype == acc and amap.shape == (B, N, 5) and lse.shape == (B, H, N)
        _close(amap, ref[1], dtype, "map")
        assert torch.all(torch.isneginf(lse[0])) and torch.all(torch.isfinite(lse[1]))
        _close(lse[1], ref[2][1], dtype, "lse")
        gm = torch.randn(amap.shape, generator=g, dtype=torch.float64)
        gl = torch.randn(B, H, N, generator=g, dtype=torch.float64)
        finite = torch.isfinite(lse)
        loss = loss + (amap.double() * gm).sum() + torch.where(finite, lse.double(), 0.0).mul(gl).sum()
        ref_loss = ref_loss + (ref[1] * gm).sum() + torch.where(finite, ref[2], 0.0).mul(gl).sum()
    loss.backward()
    ref_loss.backward()
    for name, a, b in zip("qkvw", leaves, ref_leaves):
        assert a.grad is not None and a.grad.dtype == a.dtype and torch.isfinite(a.grad).all(), name
        _close(a.grad, b.grad, dtype, f"d{name}")
    assert float(ref_leaves[3].grad.abs().max()) > 0  # the weights' gradient is not trivially zero


def test_auto_without_extension_takes_the_fallback_and_warns_once():
    # the same path as a missing extension, with every device the suite has: force it in the registry
    q, k, v, w, mask = _inputs(1, 2, 5, 4, 8, 8, torch.float32, empty_rows=False)
    code = textwrap.dedent("""
        import warnings, torch, dare_kernels as dk
        from dare_kernels import backends, sra_fallback
        assert dk._ext.EXT is None
        calls = []
        real = sra_fallback.sra_attention_fallback
        import dare_kernels.sra as sra
        sra.sra_attention_fallback = lambda *a: calls.append(1) or real(*a)
        q = torch.randn(1, 2, 5, 8); k = torch.randn(1, 2, 4, 8); w = torch.rand(4) + 0.1
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            o1 = dk.sra_attention(q, k, k, w)
            o2, a, l = dk.sra_attention(q, k, k, w, return_attn_map=True, return_lse=True)
        msgs = [str(x.message) for x in rec if "fallback" in str(x.message)]
        assert len(msgs) == 1 and "slow" in msgs[0], msgs
        assert len(calls) == 2, calls
        assert backends.choose("sra_attention", "auto", "cpu", torch.float32) == "fallback"
        r = dk.sra_attention(q, k, k, w, backend="reference")
        torch.testing.assert_close(o1, r, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(o2, r, atol=2e-5, rtol=2e-5)
        print("ok")
    """)
    env = dict(os.environ, DARE_KERNELS_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


_MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys, torch, dare_kernels as dk
    assert dk._ext.EXT is None
    B, H, N, M, D, want_map = json.loads(sys.argv[1])

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    # the address-space cap turns a regression (materialising [B, H, N, M]) into a MemoryError, not a swap storm
    cap = status("VmSize") + (3 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=g); k = torch.randn(B, H, M, D, generator=g)
    v = torch.randn(B, H, M, D, generator=g); w = torch.rand(B, M, generator=g) + 0.1
    kw = dict(return_attn_map=True, return_lse=True) if want_map else {}
    dk.sra_attention(q[:, :, :64], k, v, w, **kw)  # warm-up: kernels, thread pools, the one-time warning
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status("VmRSS")
    res = dk.sra_attention(q, k, v, w, **kw)
    peak = status("VmHWM") - before
    res = res if isinstance(res, tuple) else (res,)
    out_bytes = sum(t.numel() * t.element_size() for t in res)
    ok = all(bool(torch.isfinite(t).all()) for t in res)
    print(json.dumps({"peak": peak, "out": out_bytes, "probs": B * H * N * M * 4, "finite": ok}))
""")


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _can_reset_peak_rss(),
                    reason="peak RSS is measured through /proc/self/clear_refs and VmHWM (Linux)")
@pytest.mark.parametrize("case", [
    # out only (SDPA): [B, H, N, M] float32 would be 2 GiB; outputs 16 MiB
    dict(B=1, H=8, N=16384, M=4096, D=32, want_map=False),
    # map + LSE (reference in row chunks): probabilities 2 GiB; outputs (O, map, lse) 132 MiB
    dict(B=1, H=16, N=4096, M=8192, D=16, want_map=True),
], ids=["sdpa_out", "chunked_map_lse"])
def test_forced_fallback_peak_memory_stays_near_the_outputs(case):
    import json

    env = dict(os.environ, DARE_KERNELS_DISABLE_EXT="1", OMP_NUM_THREADS="2")
    args = json.dumps([case["B"], case["H"], case["N"], case["M"], case["D"], case["want_map"]])
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, args], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["finite"]
    assert r["probs"] >= 2 << 30  # the shape is one where materialising the probabilities costs gigabytes
    assert r["peak"] <= 2 * r["out"] + (16 << 20), r  # ~2x the outputs (+16 MiB of allocator slack)


# ---------------------------------------------------------------------------------------------
# M == 0: no keys at all
# ---------------------------------------------------------------------------------------------

def _no_key_backends():
    names = ["reference", "auto"]
    if backends.unsupported_reason("sra_attention", "cpu", "cpu", torch.float32) is None:
        names.append("cpu")
    if backends.unsupported_reason("sra_attention", "triton", "cpu", torch.float32) is None:
        names.append("triton")  # under TRITON_INTERPRET=1
    return names


@pytest.mark.parametrize("backend", _no_key_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_keys_gives_zero_output_neginf_lse_and_an_empty_map(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16, bfloat16 and float32")
    B, H, N, D, Dv = 2, 3, 5, 8, 6
    q = torch.randn(B, H, N, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, 0, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, 0, Dv, dtype=dtype, requires_grad=True)
    w = torch.rand(B, 0, dtype=dtype, requires_grad=True)
    mask = torch.ones(B, 0, dtype=torch.bool)
    o, amap, lse = dk.sra_attention(q, k, v, w, key_padding_mask=mask, return_attn_map=True, return_lse=True,
                                    backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert o.shape == (B, H, N, Dv) and o.dtype == dtype and torch.all(o == 0)
    assert lse.shape == (B, H, N) and lse.dtype == acc and torch.all(torch.isneginf(lse))
    assert amap.shape == (B, N, 0) and amap.dtype == acc
    o.sum().backward()
    assert q.grad is not None and torch.all(q.grad == 0)
    assert dk.sra_attention(q, k, v, backend=backend).shape == (B, H, N, Dv)


def test_no_keys_triton_under_the_interpreter():
    code = textwrap.dedent("""
        import torch, dare_kernels as dk
        from dare_kernels import backends
        why = backends.unsupported_reason("sra_attention", "triton", "cpu", torch.float32)
        if why is not None:
            print("skip", why); raise SystemExit(0)
        q = torch.randn(1, 2, 5, 8, requires_grad=True)
        k = torch.randn(1, 2, 0, 8)
        o, a, l = dk.sra_attention(q, k, k, return_attn_map=True, return_lse=True, backend="triton")
        assert torch.all(o == 0) and a.shape == (1, 5, 0) and torch.all(torch.isneginf(l))
        o.sum().backward()
        assert torch.all(q.grad == 0)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("skip"):
        pytest.skip(out.stdout.strip())
    assert "ok" in out.stdout


@pytest.mark.parametrize("D,Dv", [(4, 8), (8, 4)])
def test_fallback_sdpa_path_with_unequal_head_dims(D, Dv):
    # SDPA's fused CPU kernel needs D == Dv: the fallback pads with zero columns, which change nothing
    q, k, v, w, mask = _inputs(2, 2, 9, 5, D, Dv, torch.float32, empty_rows=False)
    out, _, _ = sra_fallback.sra_attention_fallback(q, k, v, w, mask, 1.3, 0.7, None, False)
    ref = sra_attention_ref(q.double(), k.double(), v.double(), w.double(), key_padding_mask=mask, strength=1.3,
                            scale=0.7)
    assert out.shape == (2, 2, 9, Dv)
    _close(out, ref, torch.float32, "O")
