"""Bad input is refused, never turned into NaN or silently ignored (docs/SPEC.md §1.1, §2.1).

- NaN / ±inf / negative token weights: ValueError naming ``token_weight`` on CPU (every backend, every
  weight shape and dtype); on a GPU only with DARE_KERNELS_CHECK_INPUTS=1, decided by
  ``value_checks.reads_values`` (tested here with a stand-in CUDA tensor, and on a real GPU when there is one).
- ``attn_map_keys`` without ``return_attn_map``; APG-only arguments with another mode: ValueError naming them.
- ``rectified_cfg`` on an empty batch: an empty result of the branch shape (0 is divisible by K).
"""

from __future__ import annotations

import types

import pytest
import torch

import dare_kernels as dk
from dare_kernels import _ext, switches, value_checks
from dare_kernels.reference import sra_attention_ref

B, H, N, M, D = 2, 3, 5, 7, 8
BAD = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan"), "negative": -0.5}
BACKENDS = ["auto", "reference"] + (["cpu"] if _ext.has_cpu_kernels() else [])


def _qkvw(w_shape=(B, M), w_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (N, M, M))
    w = (torch.rand(w_shape, generator=g) + 0.1).to(w_dtype)
    return q, k, v, w


@pytest.fixture
def check_inputs_env(monkeypatch):
    """Sets DARE_KERNELS_CHECK_INPUTS for one test and re-reads the switches before and after."""
    def set_to(value):
        if value is None:
            monkeypatch.delenv("DARE_KERNELS_CHECK_INPUTS", raising=False)
        else:
            monkeypatch.setenv("DARE_KERNELS_CHECK_INPUTS", value)
        switches.reload()
    yield set_to
    monkeypatch.delenv("DARE_KERNELS_CHECK_INPUTS", raising=False)
    switches.reload()


# ---------------------------------------------------------------------------------------------
# token weights on CPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("w_shape", [(M,), (B, M), (B, H, M)], ids=["m", "bm", "bhm"])
def test_bad_cpu_weight_is_refused_naming_the_argument(backend, kind, w_shape):
    q, k, v, w = _qkvw(w_shape)
    w.view(-1)[3] = BAD[kind]
    words = {"inf": "infinite", "-inf": "infinite", "nan": "NaN", "negative": "negative"}[kind]
    with pytest.raises(ValueError, match=rf"token_weight must be finite and >= 0.*{words}"):
        dk.sra_attention(q, k, v, w, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_bad_low_precision_weight_is_refused(dtype):
    q, k, v, w = _qkvw(w_dtype=dtype)
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match="token_weight"):
        dk.sra_attention(q, k, v, w, return_attn_map=True, return_lse=True)


def test_large_finite_and_zero_weights_still_run_and_match_the_oracle():
    # the check refuses what has no meaning only: the largest float32 and 0 (a dropped key) are fine
    q, k, v, w = _qkvw()
    w[0, 1] = torch.finfo(torch.float32).max
    w[1, 4] = 0.0
    o = dk.sra_attention(q, k, v, w)
    ref = sra_attention_ref(q.double(), k.double(), v.double(), w.double())
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), ref, atol=1e-4, rtol=1e-4)


def test_an_inf_weight_would_have_made_every_row_nan():
    # why the check exists: the reference, unchecked, turns one +inf weight into NaN rows
    q, k, v, w = _qkvw()
    w[0, 3] = float("inf")
    assert torch.isnan(sra_attention_ref(q.double(), k.double(), v.double(), w.double())[0]).all()


# ---------------------------------------------------------------------------------------------
# which devices are read: the decision and the switch
# ---------------------------------------------------------------------------------------------

def _stand_in(device: str):
    return types.SimpleNamespace(device=torch.device(device))


def test_cpu_is_always_read_gpu_only_with_the_switch(check_inputs_env):
    check_inputs_env(None)
    assert value_checks.reads_values(torch.ones(2))
    assert not value_checks.reads_values(_stand_in("cuda"))  # default on CUDA: no host sync
    assert not value_checks.reads_values(torch.ones(2, device="meta"))
    check_inputs_env("1")
    assert value_checks.reads_values(_stand_in("cuda"))
    assert not value_checks.reads_values(torch.ones(2, device="meta"))
    check_inputs_env("0")
    assert not value_checks.reads_values(_stand_in("cuda"))
    check_inputs_env("maybe")
    with pytest.raises(ValueError, match="DARE_KERNELS_CHECK_INPUTS"):
        value_checks.reads_values(_stand_in("cuda"))


def test_the_switch_is_documented_as_a_user_switch():
    s = switches.spec("DARE_KERNELS_CHECK_INPUTS")
    assert (s.default, s.scope, s.audience) == ("0", "python", "user")


def test_sra_attention_reads_weights_exactly_when_the_decision_says_so(monkeypatch):
    # the GPU default (not read) emulated on CPU tensors: the unchecked call gives the undefined result the
    # contract warns of; the checked one (the switch's path) raises
    q, k, v, w = _qkvw()
    w[0, 3] = float("inf")
    monkeypatch.setattr(value_checks, "reads_values", lambda t: False)
    out = dk.sra_attention(q, k, v, w, backend="reference")
    assert not torch.isfinite(out).all()
    monkeypatch.setattr(value_checks, "reads_values", lambda t: True)
    with pytest.raises(ValueError, match="token_weight"):
        dk.sra_attention(q, k, v, w, backend="reference")


def test_forced_check_names_the_argument_and_every_kind_found():
    w = torch.tensor([1.0, float("nan"), float("inf"), -1.0])
    with pytest.raises(ValueError, match="my_w must be finite and >= 0.*NaN and infinite and negative"):
        value_checks.check_weight_values(w, "my_w", force=True)
    value_checks.check_weight_values(torch.tensor([0.0, 3.0]), "my_w", force=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_weights_are_checked_with_the_switch(check_inputs_env):
    q, k, v, w = (t.cuda() for t in _qkvw())
    w[0, 3] = float("inf")
    check_inputs_env("1")
    with pytest.raises(ValueError, match="token_weight"):
        dk.sra_attention(q.half(), k.half(), v.half(), w)
    check_inputs_env(None)
    assert not value_checks.reads_values(w)


# ---------------------------------------------------------------------------------------------
# arguments that would be ignored
# ---------------------------------------------------------------------------------------------

def test_attn_map_keys_without_the_map_raises():
    q, k, v, w = _qkvw()
    with pytest.raises(ValueError, match=r"attn_map_keys=\(1, 4\).*return_attn_map=True"):
        dk.sra_attention(q, k, v, w, attn_map_keys=(1, 4))
    o, amap = dk.sra_attention(q, k, v, w, return_attn_map=True, attn_map_keys=(1, 4))
    assert amap.shape == (B, N, 3)


@pytest.mark.parametrize("mode", ["cfg", "cfg_zero_star"])
@pytest.mark.parametrize("kw,name", [(dict(eta=0.0), "eta"), (dict(norm_threshold=2.0), "norm_threshold"),
                                     (dict(momentum=0.5, momentum_buffer=torch.zeros(2, 3)), "momentum")])
def test_apg_only_arguments_with_another_mode_raise(mode, kw, name):
    preds = torch.randn(4, 3)
    with pytest.raises(ValueError, match=name):
        dk.rectified_cfg(preds, 5.0, mode=mode, **kw)
    # the defaults are not "set": the call with them runs
    dk.rectified_cfg(preds, 5.0, mode=mode, eta=1.0, norm_threshold=0.0)


def test_apg_only_arguments_with_another_mode_raise_in_the_guider():
    pytest.importorskip("diffusers")
    from dare_kernels.integrations.diffusers.guidance import _check_mode_args

    with pytest.raises(ValueError, match="eta"):
        _check_mode_args("cfg", 5.0, 0.0, 0.0, 0.0, 0.0, None)
    with pytest.raises(ValueError, match="norm_threshold"):
        _check_mode_args("cfg_zero_star", 5.0, 0.0, 0.0, 1.0, 3.0, None)
    _check_mode_args("apg", 5.0, 0.0, 0.0, 0.0, 3.0, None)


# ---------------------------------------------------------------------------------------------
# rectified_cfg on an empty batch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("K", [2, 3])
def test_empty_stacked_batch_gives_an_empty_result(K, backend):
    preds = torch.randn(0, 4, 2, 3, dtype=torch.bfloat16)
    g = dk.rectified_cfg(preds, 5.0, num_branches=K, rectify_scale=1.0 if K == 3 else 0.0,
                         guidance_rescale=0.5, backend=backend)
    assert g.shape == (0, 4, 2, 3) and g.dtype == torch.bfloat16


def test_empty_branches_with_momentum_out_and_grad():
    u, c = (torch.randn(0, 3, 4, requires_grad=True) for _ in range(2))
    buf = torch.zeros(0, 3, 4)
    g = dk.rectified_cfg([u, c], 4.0, mode="apg", momentum=0.5, momentum_buffer=buf)
    assert g.shape == (0, 3, 4)
    g.sum().backward()
    assert u.grad.shape == (0, 3, 4) and c.grad.shape == (0, 3, 4)
    out = torch.empty(0, 3, 4)
    assert dk.rectified_cfg(torch.randn(0, 3, 4), 4.0, out=out) is out


def test_a_batch_that_k_does_not_divide_still_names_it():
    with pytest.raises(ValueError, match="batch 5 is not divisible by num_branches=2"):
        dk.rectified_cfg(torch.randn(5, 3), 5.0)


# ---------------------------------------------------------------------------------------------
# the other public entries that take weights: suppression and prompt dropout
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(BAD))
def test_suppression_and_dropout_refuse_bad_cpu_weights(kind):
    from dare_kernels.suppression import apply_suppression_to_weights, prompt_dropout

    w = torch.rand(2, 6) + 0.1
    w[1, 2] = BAD[kind]
    mask = torch.zeros(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="token_weight must be finite and >= 0"):
        apply_suppression_to_weights(w, mask)
    emb = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="token_weight must be finite and >= 0"):
        prompt_dropout(emb, 0.5, token_weight=w, null_token_weight=torch.ones(6))
    with pytest.raises(ValueError, match="null_token_weight must be finite and >= 0"):
        prompt_dropout(emb, 0.5, token_weight=torch.ones(2, 6), null_token_weight=w[1])
    # good weights pass and are masked as before
    good = torch.rand(2, 6)
    mask[0, 1] = True
    out = apply_suppression_to_weights(good, mask)
    assert out[0, 1] == 0 and torch.equal(out[~mask], good[~mask])


@pytest.mark.parametrize("name", ["degraded_prompt_embeds", "degraded_prompt_attention_mask"])
def test_degraded_inputs_without_the_degraded_branch_raise(name):
    pytest.importorskip("diffusers")
    from dare_kernels.integrations.diffusers import dare_guidance

    with pytest.raises(ValueError, match=f"{name}.*rectify_scale != 0"):
        with dare_guidance(object(), negative_prompt_embeds=torch.zeros(1, 4, 8), rectify_scale=0.0,
                           **{name: torch.zeros(1, 4, 8)}):
            pass
