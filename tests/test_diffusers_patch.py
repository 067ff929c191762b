"""apply_dare on tiny random Wan / LTX-Video / CogVideoX / HunyuanVideo / AnimateDiff models (nothing downloaded).

For each model: patched with all weights 1 equals stock; with weights equals the *stock diffusers code*
whose attention core is replaced by the float64 oracle ``reference.sra_attention_ref`` (so projections,
norms, RoPE, masks and output layers are diffusers' own, and only the attention math is the SPEC's);
captured maps equal the oracle's; remove() restores bitwise.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("diffusers")

from dare_kernels.integrations.diffusers import apply_dare  # noqa: E402
from dare_kernels.integrations.diffusers import tiny  # noqa: E402
from dare_kernels.reference import sra_attention_ref  # noqa: E402


T_STEP = 500.0


# ---------------------------------------------------------------------------------------------
# cases: model, inputs, text length M, model batch B, frames folded into attention batches
# ---------------------------------------------------------------------------------------------

def _wan(image=False, M=512):
    """M: the text length the call encodes (T2V attends any: WanPipeline's max_sequence_length; I2V fixes 512)."""
    model = tiny.tiny_wan(image=image)
    B = 2
    x = torch.randn(B, 4, 3, 8, 10)  # grid 3 x 4 x 5 = 60 video tokens
    e = torch.randn(B, M, 32)
    kw = {"encoder_hidden_states_image": torch.randn(B, 7, 24)} if image else {}

    def call():
        return model(x, torch.full((B,), T_STEP), e, return_dict=False, **kw)[0]

    return dict(model=model, call=call, B=B, M=M, grid=(3, 4, 5), frames=1, kind="wan", mask=None)


def _ltx():
    model = tiny.tiny_ltx()
    B, M = 2, 20
    x = torch.randn(B, 2 * 4 * 6, 8)
    e = torch.randn(B, M, 32)
    mask = torch.ones(B, M)
    mask[0, 13:] = 0
    mask[1, 7:] = 0

    def call():
        return model(x, e, torch.full((B,), T_STEP), mask, num_frames=2, height=4, width=6, return_dict=False)[0]

    return dict(model=model, call=call, B=B, M=M, grid=(2, 4, 6), frames=1, kind="ltx", mask=mask.bool())


def _cog(rope=True):
    model = tiny.tiny_cogvideox(rope=rope, text_len=16, frames=2, height=8, width=8)
    B, M = 2, 16
    x = torch.randn(B, 2, 4, 8, 8)
    e = torch.randn(B, M, 32)
    kw = {}
    if rope:
        # RoPE as the pipeline builds it (grid 2 x 4 x 4, head_dim 16)
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        cos, sin = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4),
                                           temporal_size=2, device="cpu")
        kw["image_rotary_emb"] = (cos, sin)

    def call():
        return model(x, e, torch.full((B,), T_STEP), return_dict=False, **kw)[0]

    return dict(model=model, call=call, B=B, M=M, grid=(2, 4, 4), frames=1, kind="cogvideox", mask=None)


def _hunyuan():
    model = tiny.tiny_hunyuan_video(num_layers=1, num_single_layers=1)
    B, M = 2, 12
    x = torch.randn(B, 4, 3, 8, 8)  # grid 3 x 4 x 4 = 48 video tokens
    e = torch.randn(B, M, 32)
    mask = torch.ones(B, M)
    mask[0, 9:] = 0
    mask[1, 5:] = 0
    pooled = torch.randn(B, 16)

    def call():
        return model(x, torch.full((B,), T_STEP), e, mask, pooled, guidance=torch.full((B,), 3000.0),
                     return_dict=False)[0]

    return dict(model=model, call=call, B=B, M=M, grid=(3, 4, 4), frames=1, kind="hunyuan", mask=mask.bool())


def _animatediff():
    model = tiny.tiny_animatediff()
    B, F, M = 2, 3, 10
    x = torch.randn(B, 4, F, 8, 8)
    e = torch.randn(B, M, 32).repeat_interleave(F, dim=0)  # as AnimateDiffPipeline feeds it

    def call():
        return model(x, torch.full((B,), T_STEP), e, return_dict=False)[0]

    return dict(model=model, call=call, B=B, M=M, grid=(F, 8, 8), frames=F, kind="animatediff", mask=None)


CASES = {
    "wan": _wan,
    "wan_text16": lambda: _wan(M=16),  # a short prompt encoding: weights of the length the layer attends
    "wan_i2v": lambda: _wan(image=True),
    "ltx": _ltx,
    "cogvideox": _cog,
    "cogvideox_no_rope": lambda: _cog(rope=False),
    "hunyuan_video": _hunyuan,
    "animatediff": _animatediff,
}


@pytest.fixture(params=list(CASES))
def case(request):
    torch.manual_seed(0)
    c = CASES[request.param]()
    c["name"] = request.param
    return c


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------
# the oracle path: stock diffusers code, attention core = sra_attention_ref in float64
# ---------------------------------------------------------------------------------------------

def joint_renormalized_ref(w, strength, valid=None):
    """float64 oracle of the joint renormalisation (SPEC §1): w / (mean over valid text keys of w^γ)^(1/γ)."""
    w = w.double()
    valid = torch.ones_like(w, dtype=torch.bool) if valid is None else valid
    mean = (w.pow(strength) * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)
    return w / mean.pow(1.0 / strength)


class _Oracle:
    """Replaces the attention call inside the stock processors; records the oracle's maps in call order.

    Joint-attention models (CogVideoX, HunyuanVideo) get the text weights renormalised by the float64 formula
    unless ``joint_renormalize=False``.
    """

    def __init__(self, case, weights, strength, joint_renormalize=True):
        self.case, self.w, self.strength = case, weights, strength
        self.joint_renormalize = joint_renormalize
        self.maps = []

    def _joint(self, w, valid=None):
        if w is None or not self.joint_renormalize:
            return w
        return joint_renormalized_ref(w, self.strength, valid)

    def _ref(self, q, k, v, w, kpm, map_keys, map_rows):
        o, amap = sra_attention_ref(q.double(), k.double(), v.double(), None if w is None else w.double(),
                                    key_padding_mask=kpm, strength=self.strength, return_attn_map=True,
                                    attn_map_keys=map_keys)
        self.maps.append(amap[:, map_rows[0]:map_rows[1]] if map_rows else amap)
        return o.to(q.dtype)

    def patch(self, monkeypatch):
        c = self.case
        M, kind = c["M"], c["kind"]
        if kind in ("wan", "ltx"):
            import diffusers.models.transformers.transformer_ltx as ltx_mod
            import diffusers.models.transformers.transformer_wan as wan_mod

            mod = wan_mod if kind == "wan" else ltx_mod
            stock = mod.dispatch_attention_fn

            def dispatch(query, key, value, attn_mask=None, **kw):  # [B, N, H, D]
                is_text = key.shape[1] == M and (kind == "ltx" or query.shape[1] != M)
                if not is_text or (kind == "ltx" and query.shape[1] == key.shape[1]):
                    return stock(query, key, value, attn_mask=attn_mask, **kw)
                kpm = None
                if attn_mask is not None:  # LTX: additive [B, H, 1, M] bias of 0 / -10000
                    kpm = attn_mask[:, 0, 0, :] == 0
                o = self._ref(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.w, kpm,
                              None, None)
                return o.transpose(1, 2)

            monkeypatch.setattr(mod, "dispatch_attention_fn", dispatch)
        elif kind == "hunyuan":
            import diffusers.models.transformers.transformer_hunyuan_video as hv_mod

            def dispatch(query, key, value, attn_mask=None, **kw):  # [B, N + M, H, D], text keys last
                total = key.shape[1]
                kpm = attn_mask[:, 0, 0, :]
                w = self._joint(self.w, kpm[:, total - M:])
                if w is not None:
                    w = torch.cat([torch.ones(c["B"], total - M, dtype=w.dtype), w], dim=1)
                o = self._ref(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), w, kpm,
                              (total - M, total), (0, total - M))
                return o.transpose(1, 2)

            monkeypatch.setattr(hv_mod, "dispatch_attention_fn", dispatch)
        else:
            import diffusers.models.attention_processor as ap

            real_sdpa = torch.nn.functional.scaled_dot_product_attention
            B, frames = c["B"], c["frames"]

            def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):  # [B, H, N, D]
                if kind == "cogvideox":
                    total = key.shape[2]
                    w = self._joint(self.w)
                    w = None if w is None else torch.cat([w, torch.ones(B, total - M, dtype=w.dtype)], dim=1)
                    return self._ref(query, key, value, w, None, (0, M), (M, total))
                if key.shape[2] != M or key.shape[0] != B * frames:
                    return real_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
                w = None if self.w is None else self.w.repeat_interleave(frames, dim=0)
                return self._ref(query, key, value, w, None, None, None)

            proxy = types.SimpleNamespace(**{n: getattr(torch.nn.functional, n) for n in dir(torch.nn.functional)
                                             if not n.startswith("__")})
            proxy.scaled_dot_product_attention = sdpa
            monkeypatch.setattr(ap, "F", proxy)


def _weights(B, M, mask=None):
    w = torch.rand(B, M, dtype=torch.float64) * 2 + 0.05
    w[:, 1] = 0.0  # a dropped key
    if mask is not None:
        w = torch.where(mask, w, torch.zeros_like(w))
    return w.float()


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("fast_path", [False, True])
def test_all_weights_one_equals_stock(case, fast_path):
    """fast_path=False: the SRA kernel with w = 1 against stock SDPA; True: diffusers' own call, bitwise."""
    stock = case["call"]()
    with apply_dare(case["model"]) as h:
        h.fast_path = fast_path
        h.set_token_weights(torch.ones(case["B"], case["M"]))
        out = case["call"]()
        if not fast_path:
            with pytest.MonkeyPatch.context() as mp:  # prove the kernel path ran
                import dare_kernels.integrations.diffusers.processors as procs

                calls = []
                real = procs.sra_attention
                mp.setattr(procs, "sra_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
                case["call"]()
                assert len(calls) == len(h.layers)
    if fast_path:
        assert torch.equal(out, stock)
    else:
        assert _rel(out, stock) <= 1e-5, _rel(out, stock)


@torch.no_grad()
def test_weighted_equals_reference_processor(case, monkeypatch):
    B, M = case["B"], case["M"]
    w = _weights(B, M, case["mask"])
    strength = 0.7
    h = apply_dare(case["model"], strength=strength, capture_maps=True)
    h.set_token_weights(w)
    out = case["call"]()
    maps = dict(h.maps)
    grids = dict(h.map_grids)
    h.remove()
    stock = case["call"]()
    assert _rel(out, stock) > 1e-3, "weights did not change the output: the test could not fail"

    oracle = _Oracle(case, w, strength)
    oracle.patch(monkeypatch)
    ref = case["call"]()
    torch.testing.assert_close(out, ref, atol=2e-5 * float(ref.abs().max()), rtol=1e-4)

    # maps: one per patched layer, in forward order, equal to the oracle's
    assert len(maps) == len(oracle.maps) == len(h.layers)
    for (name, amap), ref_map, in zip(maps.items(), oracle.maps):
        if case["frames"] > 1:
            ab, n, t = ref_map.shape
            ref_map = ref_map.reshape(ab // case["frames"], case["frames"] * n, t)
        assert amap.dtype == torch.float32
        assert amap.shape == ref_map.shape, name
        torch.testing.assert_close(amap.double(), ref_map, atol=2e-6, rtol=1e-4)
        f, hh, ww = grids[name]
        assert amap.shape == (B, f * hh * ww, M)
        assert f == case["grid"][0]


@torch.no_grad()
def test_maps_sum_to_one_over_keys(case):
    B, M = case["B"], case["M"]
    with apply_dare(case["model"], capture_maps=True) as h:
        h.set_token_weights(_weights(B, M, case["mask"]))
        case["call"]()
        assert len(h.maps) == len(h.layers) > 0
        for name, amap in h.maps.items():
            assert amap.shape[0] == B and amap.shape[2] == M
            assert bool((amap >= 0).all())
            assert bool((amap[:, :, 1] == 0).all()), "a zero-weight key must get no attention"
            if case["kind"] in ("cogvideox", "hunyuan"):
                # joint attention: only the text columns are mapped, the video keys hold the rest
                s = amap.sum(-1)
                assert bool((s < 1).all()) and bool((s > 0).all())
            else:
                torch.testing.assert_close(amap.sum(-1), torch.ones(amap.shape[:2]), atol=1e-5, rtol=0)
            if case["mask"] is not None:
                assert bool((amap.permute(0, 2, 1)[~case["mask"]] == 0).all()), "masked text keys got attention"


@torch.no_grad()
def test_remove_restores_bitwise(case):
    model = case["model"]
    stock = case["call"]()
    processors = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    h = apply_dare(model, strength=2.0, capture_maps=True)
    h.set_token_weights(_weights(case["B"], case["M"], case["mask"]))
    patched = case["call"]()
    assert not torch.equal(patched, stock)
    h.remove()
    h.remove()  # idempotent
    assert torch.equal(case["call"](), stock)
    assert {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")} == processors
    assert "_dare_handle" not in model.__dict__ and "cache_context" not in model.__dict__
    # and it can be applied again
    with apply_dare(model):
        pass


def test_only_text_attention_is_patched():
    from dare_kernels.integrations.diffusers.processors import _DAREProcessorBase

    torch.manual_seed(0)
    for c in (_wan(), _ltx(), _cog(), _hunyuan(), _animatediff()):
        model = c["model"]
        with apply_dare(model) as h:
            patched = [n for n, m in model.named_modules()
                       if isinstance(getattr(m, "processor", None), _DAREProcessorBase)]
            assert patched == [n for n in h.layers]
            if c["kind"] == "animatediff":
                assert all("motion_modules" not in n and n.endswith("attn2") for n in patched)
                assert any(n.startswith("up_blocks") for n in patched) and any("mid_block" in n for n in patched)
            elif c["kind"] == "cogvideox":
                assert all(n.endswith("attn1") for n in patched)
            elif c["kind"] == "hunyuan":
                assert patched == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
            else:
                assert all(n.endswith("attn2") for n in patched)
            assert len(patched) > 0


def test_training_gradients_match_reference(monkeypatch):
    """Gradients w.r.t. the token weights and the model flow through the patch and match the oracle."""
    torch.manual_seed(0)
    case = _wan()
    model = case["model"]
    w0 = _weights(case["B"], case["M"]).requires_grad_(False)

    def loss_and_grads(with_patch):
        w = w0.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        if with_patch:
            with apply_dare(model, capture_maps=True) as h:
                h.set_token_weights(w)
                out = case["call"]()
                map_term = sum(m.square().sum() for m in h.maps.values())
        else:
            out = case["call"]()
            map_term = sum(m.square().sum() for m in oracle.maps)
        loss = out.square().mean() + map_term
        loss.backward()
        return w.grad, model.blocks[0].attn2.to_q.weight.grad.clone()

    gw, gq = loss_and_grads(True)
    oracle = _Oracle(case, None, 1.0)
    w_ref = w0.clone().requires_grad_(True)
    oracle.w = w_ref
    oracle.patch(monkeypatch)
    model.zero_grad(set_to_none=True)
    out = case["call"]()
    loss = out.square().mean() + sum(m.square().sum() for m in oracle.maps)
    loss.backward()
    assert gw is not None and float(gw.abs().max()) > 0
    torch.testing.assert_close(gw, w_ref.grad, atol=1e-5 * float(w_ref.grad.abs().max()), rtol=1e-3)
    gq_ref = model.blocks[0].attn2.to_q.weight.grad
    torch.testing.assert_close(gq, gq_ref, atol=1e-5 * float(gq_ref.abs().max()), rtol=1e-3)
