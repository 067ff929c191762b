"""diffusers integration on CPU: tiny-but-not-trivial Wan / LTX-Video / CogVideoX transformers (random weights).

Per model (4 layers, 512 video tokens, real text lengths: Wan 512, LTX 128, CogVideoX 226), one forward of the
whole transformer, batch 2, float32:

- group "diffusers <model> fwd":  ``stock`` (diffusers' processors) vs ``dare_ones`` (patched, all weights 1:
  the handle's fast path hands the call to diffusers' own attention), ``dare_ones_kernel`` (the same through
  sra_attention, fast path off) and ``dare_weights`` (patched, weights != 1, no maps: the SRA kernel)
- group "diffusers <model> layer-maps": one text-attention layer (projections included) with maps,
  ``dare_maps`` vs ``eager_maps`` (and ``stock`` for scale): the attention core dominates here
- group "diffusers <model> maps": ``dare_maps`` (patched, weights, maps captured by the fused kernel) vs
  ``eager_maps`` (the same processors with the attention core written as explicit PyTorch:
  scores + γ·log w, softmax, P·V, P.mean(heads) — what one writes without dare_kernels)

``extra_info["peak_mem_bytes"]``: peak resident memory of one forward, measured in a fresh subprocess
(glibc told to mmap every block >= 64 KiB so freed memory leaves the RSS; VmHWM reset through
/proc/self/clear_refs before the forward). Linux only; left out elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("diffusers")

from harness import quick  # noqa: E402

MODELS = ("wan", "ltx", "cogvideox")
PROVIDERS = ("stock", "dare_ones", "dare_maps", "eager_maps")
BATCH = 2


def build(model_name: str):
    """(model, call, text_len, shape name) for a tiny-but-not-trivial config; 512 video tokens."""
    from dare_kernels.integrations.diffusers import tiny

    torch.manual_seed(0)
    B = BATCH
    if model_name == "wan":
        model = tiny.tiny_wan(num_layers=4, heads=12, head_dim=64, text_dim=256)
        M = 512
        x, e = torch.randn(B, 4, 2, 32, 32), torch.randn(B, M, 256)

        def call():
            return model(x, torch.full((B,), 500.0), e, return_dict=False)[0]
    elif model_name == "ltx":
        model = tiny.tiny_ltx(num_layers=4, heads=8, head_dim=64, caption_channels=256)
        M = 128
        x, e = torch.randn(B, 2 * 16 * 16, 8), torch.randn(B, M, 256)
        mask = torch.ones(B, M)
        mask[:, 100:] = 0

        def call():
            return model(x, e, torch.full((B,), 500.0), mask, num_frames=2, height=16, width=16, return_dict=False)[0]
    else:
        M = 226
        model = tiny.tiny_cogvideox(num_layers=4, heads=8, head_dim=64, text_dim=256, rope=False, text_len=M,
                                    frames=2, height=32, width=32)
        x, e = torch.randn(B, 2, 4, 32, 32), torch.randn(B, M, 256)

        def call():
            return model(x, e, torch.full((B,), 500.0), return_dict=False)[0]
    return model, call, M, f"{model_name}-4L-N512-M{M}"


def _eager_attend(self, query, key, value, *, text_slice=None, key_padding_mask=None, map_rows=None, frames=1,
                  stock=None):
    """Explicit-softmax DARE attention (the peer): materialises the [B, H, N, M] scores and probabilities."""
    handle = self._handle
    B, H, N, D = query.shape
    M = key.shape[2]
    t0, t1 = (0, M) if text_slice is None else text_slice
    s = torch.matmul(query, key.transpose(-1, -2)) * D ** -0.5
    w = handle.token_weights(self.layer_name, B, t1 - t0, frames=frames, device=query.device, dtype=query.dtype)
    if w is not None:
        bias = torch.zeros(B, M, dtype=s.dtype)
        bias[:, t0:t1] = handle.strength * torch.log(w)  # log 0 = -inf drops the key
        s = s + bias[:, None, None, :]
    if callable(key_padding_mask):
        key_padding_mask = key_padding_mask()
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, value)
    if handle.capture_maps:
        amap = p[..., t0:t1].mean(dim=1)
        if map_rows is not None:
            amap = amap[:, map_rows[0]:map_rows[1]]
        handle.record_map(self.layer_name, amap, frames=frames)
    return out


def _no_attend(self, query, key, value, **_):
    """No attention core at all (the ``no_attention`` provider): what is left of the layer's time."""
    return query


def setup_provider(model, provider: str, M: int):
    """Patch ``model`` for ``provider``; returns the handle (or None for stock)."""
    from dare_kernels.integrations.diffusers import apply_dare

    if provider == "stock":
        return None
    handle = apply_dare(model, capture_maps=provider in ("dare_maps", "eager_maps"))
    handle.fast_path = provider != "dare_ones_kernel"
    if provider in ("dare_ones", "dare_ones_kernel"):
        handle.set_token_weights(torch.ones(BATCH, M))
    else:
        g = torch.Generator().manual_seed(1)
        handle.set_token_weights(torch.rand(BATCH, M, generator=g) * 2 + 0.05)
    if provider in ("eager_maps", "no_attention"):
        attend = _eager_attend if provider == "eager_maps" else _no_attend
        for _, attn, _ in handle._layers:
            attn.processor._attend = types.MethodType(attend, attn.processor)
    return handle


def _peak_rss_subprocess(model_name: str, provider: str) -> int | None:
    if not sys.platform.startswith("linux"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(torch.get_num_threads()))
    res = subprocess.run([sys.executable, __file__, "--peak", model_name, provider], capture_output=True,
                         text=True, env=env, timeout=600)
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mem_bytes"]


def _measure_peak_here(model_name: str, provider: str) -> int:
    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    model, call, M, _ = build(model_name)
    setup_provider(model, provider, M)
    with torch.no_grad():
        call()  # warm-up
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = status("VmRSS:")
        out = call()
        peak = status("VmHWM:")
    del out
    return peak - before


@pytest.mark.parametrize("provider", ["stock", "dare_ones", "dare_ones_kernel", "dare_weights"])
@pytest.mark.parametrize("model_name", MODELS)
def test_bench_patched_vs_stock(benchmark, model_name, provider):
    _bench(benchmark, model_name, provider, "fwd")


@pytest.mark.parametrize("provider", ["dare_maps", "eager_maps"])
@pytest.mark.parametrize("model_name", MODELS)
def test_bench_maps_vs_eager(benchmark, model_name, provider):
    _bench(benchmark, model_name, provider, "maps")


LAYER_HEADS = {"wan": (12, 64), "ltx": (8, 64), "cogvideox": (8, 64)}  # (heads, head dim) of build()'s configs


def _layer_attn_flops(model_name: str, video_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of the attention core of build_layer()'s layer (4·B·H·N·M·D; CogVideoX: joint, N+M each side)."""
    heads, dim = LAYER_HEADS[model_name]
    if model_name == "cogvideox":
        n = m = video_tokens + text_tokens
    else:
        n, m = video_tokens, text_tokens
    return 4.0 * BATCH * heads * n * m * dim


def build_layer(model_name: str, video_tokens: int = 512, dtype: torch.dtype = torch.float32):
    """(model, call of one patched text-attention layer with its projections, M, shape name): the attention
    layer alone, so the attention core is most of the time (model-level runs dilute it with FFN and attn1).
    The layer (only it) and its inputs are cast to ``dtype``."""
    model, _, M, shape = build(model_name)
    torch.manual_seed(2)
    B, N = BATCH, video_tokens
    if model_name == "wan":
        attn, hs, text = model.blocks[0].attn2, torch.randn(B, N, 768), torch.randn(B, M, 768)
        kwargs = {}
    elif model_name == "ltx":
        attn, hs, text = model.transformer_blocks[0].attn2, torch.randn(B, N, 512), torch.randn(B, M, 512)
        mask = torch.zeros(B, 1, M)
        mask[:, :, 100:] = -10000.0
        kwargs = {"attention_mask": mask.to(dtype)}
    else:
        attn, hs, text = model.transformer_blocks[0].attn1, torch.randn(B, N, 512), torch.randn(B, M, 512)
        kwargs = {}
    attn.to(dtype)
    hs, text = hs.to(dtype), text.to(dtype)

    def call():
        return attn(hs, text, **kwargs)

    return model, call, M, shape.replace("4L", "layer").replace("N512", f"N{N}")


@pytest.mark.parametrize("provider", ["dare_maps", "eager_maps", "stock", "no_attention"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("video_tokens", [512] if quick() else [512, 4096])
@pytest.mark.parametrize("model_name", MODELS)
def test_bench_layer_maps_vs_eager(benchmark, model_name, video_tokens, dtype, provider):
    """``no_attention``: the same layer with the attention core replaced by a no-op (projections, norms and
    output layer only): the part no attention kernel can speed up, which bounds the layer-level ratio."""
    model, call, M, shape = build_layer(model_name, video_tokens, getattr(torch, dtype))
    handle = setup_provider(model, provider, M)
    benchmark.group = f"diffusers {model_name} layer-maps {shape} {dtype}"
    mode = "fwd" if provider in ("stock", "no_attention") else "fwd+map"  # the report pairs rows on mode
    benchmark.extra_info.update({"kernel": "diffusers_attention_layer", "provider": provider, "mode": mode,
                                 "shape": shape, "dtype": dtype, "batch": BATCH, "video_tokens": video_tokens,
                                 "text_tokens": M, "flops": _layer_attn_flops(model_name, video_tokens, M)})
    with torch.no_grad():
        benchmark.pedantic(call, rounds=15, iterations=1, warmup_rounds=2)
    if handle is not None:
        handle.remove()


def _bench(benchmark, model_name, provider, pass_name):
    model, call, M, shape = build(model_name)
    handle = setup_provider(model, provider, M)
    benchmark.group = f"diffusers {model_name} {pass_name} {shape} float32"
    benchmark.extra_info.update({
        "kernel": "diffusers_transformer", "provider": provider, "mode": "fwd+map" if pass_name == "maps" else "fwd",
        "shape": shape, "dtype": "float32",
        "batch": BATCH, "layers": 4, "video_tokens": 512, "text_tokens": M,
    })
    peak = None if quick() else _peak_rss_subprocess(model_name, provider)
    if peak is not None:
        benchmark.extra_info["peak_mem_bytes"] = peak
        benchmark.extra_info["peak_mem_method"] = "rss_subprocess"
    with torch.no_grad():
        benchmark.pedantic(call, rounds=3 if quick() else 7, iterations=1, warmup_rounds=1)
    if handle is not None:
        if provider.endswith("maps"):
            assert len(handle.maps) == 4
        handle.remove()


def interleaved_ratios(pairs: int = 7) -> list[dict]:
    """Time provider pairs alternately (A, B, A, B, ...) on two copies of one model: robust to slow load drift.

    Returns one row per (level, model, peer pair) with min and median times and the ratio B / A of each.
    """
    rows = []
    for level, builder in (("layer", build_layer), ("model", build)):
        for model_name in MODELS:
            for a, b in (("stock", "dare_ones"), ("stock", "dare_weights"), ("dare_maps", "eager_maps")):
                rows.append(_interleave(builder, model_name, a, b, pairs))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _interleave(builder, model_name, a, b, pairs):
    """One row of interleaved_ratios: A and B on two copies of the model, called alternately."""
    import time

    ma, call_a, M, shape = builder(model_name)
    mb, call_b, _, _ = builder(model_name)
    ha, hb = setup_provider(ma, a, M), setup_provider(mb, b, M)
    ta, tb = [], []
    with torch.no_grad():
        call_a(), call_b()
        for _ in range(pairs):
            for call, acc in ((call_a, ta), (call_b, tb)):
                t0 = time.perf_counter()
                call()
                acc.append(time.perf_counter() - t0)
    for h in (ha, hb):
        if h is not None:
            h.remove()
    ta.sort()
    tb.sort()
    med = lambda xs: xs[len(xs) // 2]  # noqa: E731
    return {"shape": shape, "a": a, "b": b, "a_min": ta[0], "b_min": tb[0], "a_median": med(ta),
            "b_median": med(tb), "ratio_min": tb[0] / ta[0], "ratio_median": med(tb) / med(ta)}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--peak":
        print(json.dumps({"peak_mem_bytes": _measure_peak_here(sys.argv[2], sys.argv[3])}))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--ratios":
        interleaved_ratios(int(sys.argv[2]) if len(sys.argv) > 2 else 7)
    else:
        print(__doc__)
        sys.exit(2 if len(sys.argv) > 1 else 0)
