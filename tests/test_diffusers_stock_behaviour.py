"""What a diffusers model does keeps working on a patched model, as on the stock one, with the maps captured:
save_pretrained / from_pretrained, attn_processors / set_attn_processor, gradient checkpointing,
enable_forward_chunking (AnimateDiff's UNetMotionModel; the transformers have none), dtype casts, torch.compile."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from dare_kernels.integrations.diffusers import apply_dare  # noqa: E402
from dare_kernels.integrations.diffusers import tiny  # noqa: E402

from conftest import assert_close_to_scale  # noqa: E402

T_STEP = 500.0


def _inputs(name, dtype=torch.float32):
    """(model builder, positional inputs, text length M, batch B) of a tiny model."""
    g = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    if name == "wan":
        return tiny.tiny_wan, (rnd(2, 4, 2, 4, 6), torch.full((2,), T_STEP), rnd(2, 512, 32)), 512, 2
    if name == "ltx":
        return tiny.tiny_ltx, (rnd(2, 2 * 2 * 3, 8), rnd(2, 12, 32), torch.full((2,), T_STEP), torch.ones(2, 12)), 12, 2
    if name == "cogvideox":
        return (lambda **kw: tiny.tiny_cogvideox(rope=False, **kw)), \
            (rnd(2, 2, 4, 8, 8), rnd(2, 16, 32), torch.full((2,), T_STEP)), 16, 2
    if name == "animatediff":
        return tiny.tiny_animatediff, \
            (rnd(2, 4, 3, 8, 8), torch.full((2,), T_STEP), rnd(2, 10, 32).repeat_interleave(3, dim=0)), 10, 2
    raise KeyError(name)


_EXTRA = {"ltx": dict(num_frames=2, height=2, width=3)}


def _call(name, model, args):
    return model(*args, return_dict=False, **_EXTRA.get(name, {}))[0]


NAMES = ["wan", "ltx", "cogvideox", "animatediff"]


@torch.no_grad()
@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_round_trip(name, tmp_path):
    """A patched model saves the stock checkpoint (the processors hold no parameters); it loads as a stock model,
    which gives the stock output and can be patched again with the same result."""
    build, args, m, b = _inputs(name)
    model = build()
    stock = _call(name, model, args)
    w = torch.rand(b, m) + 0.1
    with apply_dare(model) as h:
        h.set_token_weights(w)
        weighted = _call(name, model, args)
        model.save_pretrained(tmp_path / "patched")
    model.save_pretrained(tmp_path / "stock")
    a, s = (type(model).from_pretrained(tmp_path / d).eval() for d in ("patched", "stock"))
    assert a.state_dict().keys() == s.state_dict().keys()
    for k, v in s.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k
    drop = lambda c: {k: v for k, v in dict(c).items() if k != "_name_or_path"}  # noqa: E731
    assert drop(a.config) == drop(s.config)
    assert torch.equal(_call(name, a, args), stock)
    with apply_dare(a) as h2:
        h2.set_token_weights(w)
        assert torch.equal(_call(name, a, args), weighted)


@torch.no_grad()
@pytest.mark.parametrize("name", ["wan", "animatediff"])
def test_attn_processors_round_trip(name):
    """``attn_processors`` lists the DARE processors at the patched layers; ``set_attn_processor`` with that dict
    keeps the patch working (same output, maps captured); remove() restores the stock processors."""
    build, args, m, b = _inputs(name)
    model = build()
    stock_procs = {k: type(v) for k, v in model.attn_processors.items()}
    with apply_dare(model, capture_maps=True) as h:
        h.set_token_weights(torch.rand(b, m) + 0.1)
        procs = model.attn_processors
        assert procs.keys() == stock_procs.keys()
        dare = {k for k, v in procs.items() if type(v) is not stock_procs[k]}
        assert dare == {f"{layer}.processor" for layer in h.layers}
        before = _call(name, model, args)
        model.set_attn_processor(procs)
        h.reset_maps()
        assert torch.equal(_call(name, model, args), before)
        assert set(h.maps) == set(h.layers)
    assert {k: type(v) for k, v in model.attn_processors.items()} == stock_procs


@pytest.mark.parametrize("name", ["wan", "cogvideox", "animatediff"])
def test_gradient_checkpointing(name):
    """enable_gradient_checkpointing on a patched model in training: same output, parameter and token-weight
    gradients as without it; maps captured."""
    build, args, m, b = _inputs(name)
    results = []
    for ckpt in (False, True):
        model = build().train()
        if ckpt:
            model.enable_gradient_checkpointing()
            assert model.is_gradient_checkpointing
        w = (torch.rand(b, m, generator=torch.Generator().manual_seed(1)) + 0.1).requires_grad_()
        with apply_dare(model, capture_maps=True) as h:
            h.set_token_weights(w)
            out = _call(name, model, args)
            loss = out.square().mean() + sum(v.square().mean() for v in h.maps.values())
            loss.backward()
            assert set(h.maps) == set(h.layers)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads, w.grad.clone()))
    (o0, g0, w0), (o1, g1, w1) = results
    assert_close_to_scale(o1, o0, 1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert_close_to_scale(g1[n], g0[n], 1e-5)
    assert_close_to_scale(w1, w0, 1e-5)
    assert float(w0.abs().max()) > 0


@torch.no_grad()
def test_forward_chunking_animatediff():
    """UNetMotionModel.enable_forward_chunking (feed-forward chunks) on a patched model: output and maps unchanged."""
    build, args, m, b = _inputs("animatediff")
    model = build()
    with apply_dare(model, capture_maps=True) as h:
        h.set_token_weights(torch.rand(b, m) + 0.1)
        plain = _call("animatediff", model, args)
        maps = {k: v.clone() for k, v in h.maps.items()}
        model.enable_forward_chunking(chunk_size=1, dim=1)
        chunked = _call("animatediff", model, args)
        assert_close_to_scale(chunked, plain, 1e-6)
        assert h.maps.keys() == maps.keys()
        for k in maps:
            assert_close_to_scale(h.maps[k], maps[k], 1e-6)
        model.disable_forward_chunking()


@torch.no_grad()
@pytest.mark.parametrize("name", ["wan", "cogvideox", "animatediff"])
def test_dtype_cast_after_patching(name):
    """``.to(torch.bfloat16)`` after apply_dare: weights 1 agree with the stock bf16 model, weighted outputs with the
    patched model in float64, to bf16 rounding; maps stay float32 [B, N, M]."""
    build, args64, m, b = _inputs(name, torch.float64)
    args = tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args64)
    stock = build().to(torch.bfloat16)
    stock_out = _call(name, stock, args)
    model = build()
    w = torch.rand(b, m) + 0.1
    with apply_dare(model, capture_maps=True) as h:
        model.to(torch.bfloat16)
        h.set_token_weights(torch.ones(b, m))
        assert_close_to_scale(_call(name, model, args), stock_out, 2e-2)
        h.set_token_weights(w)
        out = _call(name, model, args)
        assert out.dtype == torch.bfloat16
        for v in h.maps.values():
            assert v.dtype == torch.float32 and v.shape[-1] == m
        model.to(torch.float64)
        ref = _call(name, model, args64)
    assert_close_to_scale(out, ref, 5e-2)
    assert float((out.double() - stock_out.double()).abs().max()) > 1e-3  # the weights did something


@pytest.mark.parametrize("how", ["module_compile", "torch_compile_wrapper"])
@pytest.mark.parametrize("name", ["wan", "animatediff"])
def test_compiled_module(name, how):
    """``model.compile()`` / ``torch.compile(model)`` of a patched model (and apply_dare on the compiled wrapper):
    equal to eager, maps captured, new weights after compiling used. Backend "aot_eager" traces forward and
    backward like inductor without its C++ build time here (tests/test_diffusers_compile.py runs inductor)."""
    torch._dynamo.reset()
    build, args, m, b = _inputs(name)
    model = build()
    ws = [torch.rand(b, m) + 0.1, torch.rand(b, m) + 0.1]
    with apply_dare(model, capture_maps=True) as h:
        eager = []
        for w in ws:
            h.set_token_weights(w)
            with torch.no_grad():
                eager.append((_call(name, model, args), {k: v.clone() for k, v in h.maps.items()}))
    if how == "module_compile":
        model.compile(backend="aot_eager")
        compiled = model
    else:
        compiled = torch.compile(model, backend="aot_eager")
    with apply_dare(compiled, capture_maps=True) as h:  # a wrapper: the module under it is patched
        for w, (out_e, maps_e) in zip(ws, eager):
            h.set_token_weights(w)
            with torch.no_grad():
                out = _call(name, compiled, args)
            assert_close_to_scale(out, out_e, 1e-5)
            assert h.maps.keys() == maps_e.keys()
            for k in maps_e:
                assert_close_to_scale(h.maps[k], maps_e[k], 1e-5)
    torch._dynamo.reset()
