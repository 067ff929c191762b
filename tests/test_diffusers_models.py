"""The diffusers model table, the joint-attention renormalisation of the token weights (SPEC §1), both ways.

Joint attention (CogVideoX, HunyuanVideo): with uniform scores the renormalised weights keep the text keys'
stock share of attention exactly; with ``joint_renormalize=False`` the raw weights move mass to the video keys.
Cross-attention models are scale-invariant, so the option does not touch them.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from dare_kernels.integrations.diffusers import MODEL_TABLE, SUPPORTED_MODELS, apply_dare  # noqa: E402
from dare_kernels.integrations.diffusers.models import entry_for  # noqa: E402
from dare_kernels.integrations.diffusers.weights import renormalize_joint  # noqa: E402
from test_diffusers_patch import (  # noqa: E402
    _Oracle, _cog, _hunyuan, _ltx, _rel, _wan, _weights, joint_renormalized_ref,
)


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

def test_table_covers_every_supported_model():
    import diffusers

    assert [e.class_name for e in MODEL_TABLE] == list(SUPPORTED_MODELS)
    assert {e.class_name for e in MODEL_TABLE if e.joint} == {"CogVideoXTransformer3DModel",
                                                              "HunyuanVideoTransformer3DModel"}
    for e in MODEL_TABLE:
        assert e.model_class() is getattr(diffusers, e.class_name)
        assert len(e.stock_processors()) >= 1
    torch.manual_seed(0)
    for build, name, text_len in ((_wan, "WanTransformer3DModel", None), (_ltx, "LTXVideoTransformer3DModel", None),
                                  (_hunyuan, "HunyuanVideoTransformer3DModel", None)):
        model = build()["model"]
        assert entry_for(model).class_name == name
        with apply_dare(model) as h:
            assert h.text_len == text_len
    assert entry_for(torch.nn.Linear(2, 2)) is None


def test_cogvideox_text_length_is_fixed_only_with_learned_positions():
    from dare_kernels.integrations.diffusers import tiny

    with apply_dare(tiny.tiny_cogvideox(num_layers=1, rope=False, text_len=16)) as h:
        assert h.text_len == 16
        with pytest.raises(ValueError, match="15 entries per prompt.*attends 16 text tokens"):
            h.set_token_weights(torch.ones(15))
    with apply_dare(tiny.tiny_cogvideox(num_layers=1, rope=True, text_len=16)) as h:
        assert h.text_len is None
        h.set_token_weights(torch.ones(15))  # RoPE models take any prompt length: checked per forward
    with apply_dare(tiny.tiny_wan(num_layers=1), text_len=226) as h:  # a Wan run with max_sequence_length=226
        h.set_token_weights(torch.ones(226))
        with pytest.raises(ValueError, match="16 entries per prompt.*attends 226 text tokens.*max_sequence_length"):
            h.set_token_weights(torch.ones(16))


def test_wan_text_length_is_fixed_only_for_i2v():
    # T2V attends any text length (checked per forward); I2V splits its context as [image; 512 text] in
    # diffusers' own processor, so there 512 is the model's and is checked when the weights are set
    from dare_kernels.integrations.diffusers import tiny

    with apply_dare(tiny.tiny_wan(num_layers=1)) as h:
        assert h.text_len is None
        h.set_token_weights(torch.ones(16))
    with apply_dare(tiny.tiny_wan(num_layers=1, image=True)) as h:
        assert h.text_len == 512
        with pytest.raises(ValueError, match="16 entries per prompt.*attends 512 text tokens.*max_sequence_length"):
            h.set_token_weights(torch.ones(16))
    with pytest.raises(ValueError, match="text_len"):
        apply_dare(tiny.tiny_wan(num_layers=1), text_len=0)


# ---------------------------------------------------------------------------------------------
# renormalize_joint against the float64 formula
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.5, 1.0, 2.5])
def test_renormalize_joint_matches_formula(strength):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(4, 9, generator=g) * 3
    w[:, 2] = 0.0
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[1, 6:] = False
    valid[3, 1:] = False
    out = renormalize_joint(w, strength, valid)
    ref = joint_renormalized_ref(w, strength, valid)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    mean = (out.double().pow(strength) * valid).sum(-1) / valid.sum(-1)
    torch.testing.assert_close(mean, torch.ones(4, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(renormalize_joint(w, strength), joint_renormalized_ref(w, strength).float())


def test_renormalize_joint_edges():
    ones = torch.ones(2, 7)
    assert torch.equal(renormalize_joint(ones, 1.7), ones)  # exact: all-ones weights stay stock
    w = torch.rand(2, 7)
    assert renormalize_joint(w, 0.0) is w  # γ = 0: no bias at all
    dropped = torch.zeros(1, 7)
    assert torch.equal(renormalize_joint(dropped, 1.0), dropped)  # all text dropped: left as is
    big = torch.tensor([[1e6, 3e5, 2.0, 0.0]])  # w^γ overflows float32 without the peak scaling
    out = renormalize_joint(big, 8.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().pow(8.0).mean(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)
    # differentiable, finite gradients with dropped keys and γ < 1
    wg = torch.tensor([[0.0, 0.5, 2.0, 1.0]], requires_grad=True)
    (renormalize_joint(wg, 0.5) * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(wg.grad).all() and float(wg.grad.abs().max()) > 0


# ---------------------------------------------------------------------------------------------
# joint models: text share with uniform scores, both ways; off = the raw weights
# ---------------------------------------------------------------------------------------------

def _uniform_scores(model, h):
    """Zero the query projections of the patched layers: every score is 0 (norms and RoPE keep q = 0)."""
    layers = dict(model.named_modules())
    for name in h.layers:
        q = layers[name].to_q
        q.weight.data.zero_()
        if q.bias is not None:
            q.bias.data.zero_()


@torch.no_grad()
@pytest.mark.parametrize("build", [_cog, _hunyuan], ids=["cogvideox", "hunyuan_video"])
def test_text_share_with_uniform_scores(build):
    torch.manual_seed(0)
    case = build()
    B, M = case["B"], case["M"]
    valid = case["mask"] if case["mask"] is not None else torch.ones(B, M, dtype=torch.bool)
    w = _weights(B, M, case["mask"])  # includes a dropped key (w = 0) and zeros on the padding
    strength = 1.5
    shares = {}
    for renorm in (True, False):
        with apply_dare(case["model"], strength=strength, capture_maps=True, joint_renormalize=renorm) as h:
            _uniform_scores(case["model"], h)
            h.set_token_weights(w)
            case["call"]()
            shares[renorm] = {k: v.sum(-1) for k, v in h.maps.items()}  # [B, N]: text share of each video row
            n_video = next(iter(h.maps.values())).shape[1]
    t_valid = valid.sum(-1, keepdim=True).double()
    stock_share = t_valid / (t_valid + n_video)
    wg = (w.double().pow(strength) * valid).sum(-1, keepdim=True)
    raw_share = wg / (wg + n_video)
    assert float((raw_share - stock_share).abs().max()) > 1e-2, "raw weights must move the share: test could fail"
    for name in shares[True]:
        on, off = shares[True][name].double(), shares[False][name].double()
        torch.testing.assert_close(on, stock_share.expand_as(on), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(off, raw_share.expand_as(off), rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("build", [_cog, _hunyuan], ids=["cogvideox", "hunyuan_video"])
def test_joint_renormalize_off_uses_raw_weights(build, monkeypatch):
    torch.manual_seed(0)
    case = build()
    w = _weights(case["B"], case["M"], case["mask"]) * 0.3  # a common factor: only the renormalisation hides it
    strength = 0.7
    with apply_dare(case["model"], strength=strength, joint_renormalize=False) as h:
        h.set_token_weights(w)
        off = case["call"]()
        h.joint_renormalize = True
        on = case["call"]()
    assert _rel(on, off) > 1e-4
    oracle = _Oracle(case, w, strength, joint_renormalize=False)
    oracle.patch(monkeypatch)
    ref = case["call"]()
    torch.testing.assert_close(off, ref, atol=2e-5 * float(ref.abs().max()), rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("build", [_wan, _ltx], ids=["wan", "ltx"])
def test_cross_attention_is_scale_invariant_and_ignores_the_option(build):
    torch.manual_seed(0)
    case = build()
    w = _weights(case["B"], case["M"], case["mask"])
    outs = []
    for renorm, scale in ((True, 1.0), (False, 1.0), (True, 3.7)):
        with apply_dare(case["model"], strength=1.3, joint_renormalize=renorm) as h:
            h.set_token_weights(w * scale)
            outs.append(case["call"]())
    stock = case["call"]()
    assert _rel(outs[0], stock) > 1e-3
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5 * float(outs[0].abs().max()), rtol=1e-5)
