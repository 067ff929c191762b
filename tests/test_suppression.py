"""TokenSuppressor, prompt dropout and the degraded branch (SPEC §3): probabilities, statistics, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from dare_kernels import TokenDensity, TokenSuppressor, build_degraded_branch, prompt_dropout
from dare_kernels.suppression import apply_suppression_to_embeddings, step_generator

# vocabulary: 0 = pad, 1 = eos (special), 2.. regular tokens with decreasing counts -> increasing density
COUNTS = [0, 0, 4000, 1000, 300, 60, 10, 1, 0]


def make_density():
    ids = list(range(len(COUNTS)))
    return TokenDensity(len(COUNTS), ids, COUNTS, alpha=1.0, special_ids=[1], pad_id=0)


def test_probabilities_formula_and_warmup():
    d = make_density()
    s = TokenSuppressor(d, tau=0.6, p_max=0.8, beta=2.0, warmup_steps=100)
    ids = torch.arange(len(COUNTS)).view(1, -1)
    rho = d.density(ids).double()
    for step, ramp in ((0, 0.0), (25, 0.25), (100, 1.0), (1000, 1.0)):
        assert s.p_max_at(step) == pytest.approx(0.8 * ramp)
        p = s.probabilities(ids, step).double()
        exp = 0.8 * ramp * (1 - rho) ** 2
        exp[rho >= 0.6] = 0
        exp[0, :2] = 0            # pad and the special token are never suppressed
        torch.testing.assert_close(p, exp, atol=1e-6, rtol=0)
    assert (s.probabilities(ids, 100)[0, 2:] > 0).sum() >= 2 and (rho[0, 2:] >= 0.6).any()
    # specials become suppressible on request (eos has density 0 -> p = p_max)
    s2 = TokenSuppressor(d, tau=0.6, p_max=0.8, suppress_special_tokens=True)
    assert float(s2.probabilities(ids, 0)[0, 1]) == pytest.approx(0.8)
    assert float(s2.probabilities(ids, 0)[0, 0]) == 0.0


def test_suppression_frequencies_match_p():
    """Empirical suppression rates over 20000 draws (fixed seed) match p_j within 5 binomial sigmas."""
    d = make_density()
    s = TokenSuppressor(d, tau=0.7, p_max=0.6, beta=1.0, seed=7)
    M = len(COUNTS)
    ids = torch.arange(M).repeat(20000, 1)
    kpm = torch.ones_like(ids, dtype=torch.bool)
    kpm[:, -1] = False                       # a padded position (by mask) is never suppressed
    mask = s.sample_mask(ids, step=3, key_padding_mask=kpm)
    p = s.probabilities(ids[:1], 3, key_padding_mask=kpm[:1])[0].double()
    freq = mask.double().mean(0)
    sigma = torch.sqrt(p * (1 - p) / ids.shape[0])
    assert (p > 0.05).sum() >= 3
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
    assert not mask[:, p == 0].any()
    # draws of different tokens / rows are not the same stream: rows differ
    assert not torch.equal(mask[0], mask[1]) or not torch.equal(mask[1], mask[2])


def test_reproducible_and_step_dependent():
    d = make_density()
    ids = torch.randint(2, len(COUNTS), (8, 32), generator=torch.Generator().manual_seed(0))
    a = TokenSuppressor(d, tau=0.9, p_max=0.5, seed=3)
    b = TokenSuppressor(d, tau=0.9, p_max=0.5, seed=3)
    torch.manual_seed(1)
    m1 = a.sample_mask(ids, 10)
    torch.manual_seed(2)                                      # the global RNG plays no part
    assert torch.equal(m1, b.sample_mask(ids, 10))
    assert not torch.equal(m1, a.sample_mask(ids, 11))
    assert not torch.equal(m1, TokenSuppressor(d, tau=0.9, p_max=0.5, seed=4).sample_mask(ids, 10))
    # an explicit generator is used statefully and reproducibly
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x1, y1 = a.sample_mask(ids, 0, generator=g1), a.sample_mask(ids, 0, generator=g1)
    x2, y2 = a.sample_mask(ids, 0, generator=g2), a.sample_mask(ids, 0, generator=g2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, y1)


def test_sharded_draws_equal_global_draw():
    d = make_density()
    s = TokenSuppressor(d, tau=0.9, p_max=0.5, seed=11)
    ids = torch.randint(2, len(COUNTS), (6, 40), generator=torch.Generator().manual_seed(0))
    full = s.sample_mask(ids, 5)
    parts = [s.sample_mask(ids[r * 2:(r + 1) * 2], 5, global_batch_size=6, batch_offset=r * 2) for r in range(3)]
    assert torch.equal(full, torch.cat(parts))
    e_full, _, dr_full = prompt_dropout(torch.randn(6, 4, 3), 0.5, step=2, seed=1)
    drops = [prompt_dropout(torch.randn(3, 4, 3), 0.5, step=2, seed=1, global_batch_size=6, batch_offset=o)[2]
             for o in (0, 3)]
    assert torch.equal(dr_full, torch.cat(drops))


def test_apply_to_embeddings_and_weights():
    d = make_density()
    B, M, C = 3, len(COUNTS), 5
    ids = torch.arange(M).repeat(B, 1)
    emb = torch.randn(B, M, C)
    null = torch.randn(M, C)
    w = d.weights(ids, floor=0.2)
    s = TokenSuppressor(d, tau=1.0, p_max=1.0, beta=0.0)       # every regular token with rho < 1 is suppressed
    out = s(ids, step=0, embeds=emb, token_weight=w, null_embeds=null)
    m = out.mask
    rho = d.density(ids)
    assert torch.equal(m, (rho < 1) & (ids >= 2))
    torch.testing.assert_close(out.embeds[m], null.expand(B, M, C)[m], atol=0, rtol=0)
    torch.testing.assert_close(out.embeds[~m], emb[~m], atol=0, rtol=0)
    assert (out.token_weight[m] == 0).all() and torch.equal(out.token_weight[~m], w[~m])
    zero = TokenSuppressor(d, tau=1.0, p_max=1.0, beta=0.0, apply_to="embeds")(ids, 0, embeds=emb, token_weight=w)
    assert (zero.embeds[m] == 0).all() and torch.equal(zero.token_weight, w)
    only_w = TokenSuppressor(d, tau=1.0, p_max=1.0, beta=0.0, apply_to="weights")(ids, 0, embeds=emb, token_weight=w)
    assert torch.equal(only_w.embeds, emb) and (only_w.token_weight[m] == 0).all()
    # gradients flow to both the embeddings and the null embedding
    emb.requires_grad_(True)
    null.requires_grad_(True)
    apply_suppression_to_embeddings(emb, m, null).sum().backward()
    assert torch.equal(emb.grad[..., 0], (~m).float()) and torch.equal(null.grad[:, 0], m.float().sum(0))


def test_prompt_dropout_rate_and_composition():
    B, M, C = 4000, 6, 3
    emb = torch.randn(B, M, C)
    null = torch.randn(1, M, C)
    w = torch.rand(B, M) + 0.1
    out, w2, dropped = prompt_dropout(emb, 0.1, null_embeds=null, token_weight=w,
                                      null_token_weight=torch.ones(M), step=0, seed=0)
    rate = dropped.double().mean().item()
    assert abs(rate - 0.1) < 5 * math.sqrt(0.1 * 0.9 / B)
    assert torch.equal(out[dropped], null.expand(int(dropped.sum()), M, C))
    assert torch.equal(out[~dropped], emb[~dropped]) and (w2[dropped] == 1).all() and torch.equal(w2[~dropped], w[~dropped])
    assert not prompt_dropout(emb, 0.0)[2].any() and prompt_dropout(emb, 1.0)[2].all()


def test_degraded_branch_suppresses_high_density():
    d = make_density()
    ids = torch.tensor([[2, 3, 6, 7, 8, 1, 0, 0], [8, 7, 2, 2, 1, 0, 0, 0]])
    emb = torch.randn(2, 8, 4)
    null = torch.randn(8, 4)
    w = d.weights(ids, floor=0.1)
    rho = d.density(ids)
    br = build_degraded_branch(ids, emb, d, tau=0.5, null_embeds=null, token_weight=w)
    exp = (rho >= 0.5) & (ids >= 2)
    assert exp.any() and torch.equal(br.mask, exp)
    assert torch.equal(br.embeds[exp], null.expand(2, 8, 4)[exp]) and torch.equal(br.embeds[~exp], emb[~exp])
    assert (br.token_weight[exp] == 0).all() and torch.equal(br.token_weight[~exp], w[~exp])
    assert br.token_weight.dtype == torch.float32
    # default weights: 1 for real tokens, 0 for padding and suppressed tokens
    br2 = build_degraded_branch(ids, emb, d, tau=0.5)
    assert torch.equal(br2.token_weight, ((ids != 0) & ~exp).float()) and (br2.embeds[exp] == 0).all()


def test_step_generator_is_deterministic_and_distinct():
    a = torch.rand(4, generator=step_generator(1, 2, 0))
    assert torch.equal(a, torch.rand(4, generator=step_generator(1, 2, 0)))
    for other in (step_generator(1, 3, 0), step_generator(2, 2, 0), step_generator(1, 2, 1)):
        assert not torch.equal(a, torch.rand(4, generator=other))


def test_bad_input():
    d = make_density()
    ids = torch.tensor([[2, 3]])
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="p_max"):
            TokenSuppressor(d, p_max=p)
    with pytest.raises(ValueError, match="tau"):
        TokenSuppressor(d, tau=2.0)
    with pytest.raises(ValueError, match="beta"):
        TokenSuppressor(d, beta=-1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        TokenSuppressor(d, warmup_steps=-1)
    with pytest.raises(ValueError, match="apply_to"):
        TokenSuppressor(d, apply_to="all")
    with pytest.raises(TypeError, match="density"):
        TokenSuppressor({"a": 1})
    s = TokenSuppressor(d)
    with pytest.raises(ValueError, match="step"):
        s.sample_mask(ids, -1)
    with pytest.raises(ValueError, match="global_batch_size"):
        s.sample_mask(ids, 0, global_batch_size=2, batch_offset=1 + 1)
    with pytest.raises(ValueError, match="vocab_size"):
        s.sample_mask(torch.tensor([[2, 99]]), 0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        s.sample_mask(ids, 0, key_padding_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no density"):
        TokenSuppressor()(ids, 0)
    with pytest.raises(ValueError, match="rho"):
        TokenSuppressor().sample_mask(None, 0, rho=torch.tensor([[0.5, 1.5]]))
    with pytest.raises(ValueError, match="null_embeds"):
        s(ids, 0, embeds=torch.randn(1, 2, 4), null_embeds=torch.randn(3, 4))
    with pytest.raises(ValueError, match="mask"):
        apply_suppression_to_embeddings(torch.randn(1, 2, 4), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        apply_suppression_to_embeddings(torch.randn(1, 2, 4), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="p must"):
        prompt_dropout(torch.randn(2, 3, 4), 1.2)
    with pytest.raises(ValueError, match="embeds"):
        build_degraded_branch(ids, torch.randn(1, 3, 4), d)
    with pytest.raises(ValueError, match="tau"):
        build_degraded_branch(ids, torch.randn(1, 2, 4), d, tau=-0.5)
