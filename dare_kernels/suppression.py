"""DR-CFG token suppression (docs/SPEC.md §3): training-time dynamic suppression, prompt dropout, the degraded branch.

Training: token j of a sample is suppressed with probability

    p_j = p_max(step) · (1 − ρ_j)^β   if ρ_j < τ, else 0,     p_max(step) = p_max · min(1, step / warmup_steps)

and a suppressed token's text embedding is replaced by the null-prompt embedding at that position
(or zero) and/or its SRA weight set to 0. Whole-prompt CFG dropout (:func:`prompt_dropout`) is a
separate step; apply it after suppression.

Randomness. Every draw is made on the CPU in float32 for the *global* batch ([global_batch_size, M])
from a generator, and the rows ``batch_offset : batch_offset + B`` are kept. Without an explicit
generator, the generator of a call is seeded from ``(seed, step, stream)`` alone, so the masks of a
step do not depend on the device, on what ran before (resuming from a checkpoint reproduces them),
or on how the global batch is sharded over data-parallel ranks: rank r of W with a local batch B
passes ``global_batch_size=W·B, batch_offset=r·B`` and gets exactly its rows of the single-process
masks.

Sampling: :func:`build_degraded_branch` suppresses the tokens with ρ ≥ τ (the informative ones) to
make DR-CFG's third branch d for ``rectified_cfg(..., num_branches=3, rectify_scale=...)``::

    d = build_degraded_branch(ids, cond_embeds, density, tau=0.5, null_embeds=uncond_embeds[0],
                              token_weight=cond_weights)
    enc = torch.cat([uncond_embeds, cond_embeds, d.embeds])        # branch order u, c, d
    w = torch.cat([uncond_weights, cond_weights, d.token_weight])  # SRA weights of the three branches
    pred = transformer(latents.repeat(3, 1, 1, 1, 1), t.repeat(3), encoder_hidden_states=enc, ...)
    guided = dare_kernels.rectified_cfg(pred, num_branches=3, guidance_scale=s, rectify_scale=s_r)

(see ``rectified_cfg``'s docstring for its exact keyword names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .density import TokenDensity
from .value_checks import check_weight_values

__all__ = ["TokenSuppressor", "Suppressed", "prompt_dropout", "build_degraded_branch", "DegradedPrompt",
           "apply_suppression_to_embeddings", "apply_suppression_to_weights", "step_generator"]

_MODES = ("both", "embeds", "weights")
_STREAM_SUPPRESS = 0
_STREAM_DROPOUT = 1


# ---------------------------------------------------------------------------------------------
# randomness
# ---------------------------------------------------------------------------------------------

def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU torch.Generator seeded from (seed, step, stream) alone (splitmix64-style mixing)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % (1 << 64)
    x ^= x >> 29
    return torch.Generator(device="cpu").manual_seed(x % (1 << 63))


def _check_int(name, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _draw_uniform(B: int, cols: int, generator: torch.Generator, global_batch_size: int | None,
                  batch_offset: int) -> torch.Tensor:
    """U(0, 1) float32 [B, cols] on CPU: rows batch_offset.. of a [global_batch_size, cols] draw."""
    gbs = B if global_batch_size is None else _check_int("global_batch_size", global_batch_size, 1)
    _check_int("batch_offset", batch_offset, 0)
    if batch_offset + B > gbs:
        raise ValueError(f"batch_offset + local batch ({batch_offset} + {B}) exceeds global_batch_size={gbs}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError("generator must be a CPU generator (draws are made on the CPU so every device agrees)")
    u = torch.rand(gbs, cols, generator=generator, dtype=torch.float32)
    return u[batch_offset: batch_offset + B]


# ---------------------------------------------------------------------------------------------
# applying masks
# ---------------------------------------------------------------------------------------------

def _check_mask(mask, B, M, name="mask"):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = suppressed), got "
                        f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}")
    if tuple(mask.shape) != (B, M):
        raise ValueError(f"{name} must be [B, M]={[B, M]}, got {list(mask.shape)}")


def apply_suppression_to_embeddings(embeds: torch.Tensor, mask: torch.Tensor,
                                    null_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Replace suppressed positions of ``embeds`` [B, M, C] by ``null_embeds`` ([M, C], [1, M, C] or [B, M, C]) or by 0.

    ``mask`` bool [B, M], True = suppressed. Differentiable in ``embeds`` and ``null_embeds``.
    """
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
        raise ValueError(f"embeds must be a [B, M, C] tensor, got "
                         f"{tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__}")
    B, M, C = embeds.shape
    _check_mask(mask, B, M)
    if null_embeds is None:
        null = torch.zeros((), dtype=embeds.dtype, device=embeds.device)
    else:
        if not isinstance(null_embeds, torch.Tensor):
            raise TypeError(f"null_embeds must be a tensor or None, got {type(null_embeds).__name__}")
        if tuple(null_embeds.shape) not in ((M, C), (1, M, C), (B, M, C)):
            raise ValueError(f"null_embeds must be [M, C], [1, M, C] or [B, M, C] with M={M}, C={C}, "
                             f"got {list(null_embeds.shape)}")
        null = null_embeds.to(device=embeds.device, dtype=embeds.dtype)
    return torch.where(mask.to(embeds.device).unsqueeze(-1), null, embeds)


def apply_suppression_to_weights(token_weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SRA weights [B, M] with the suppressed positions (``mask`` True) set to 0."""
    if not isinstance(token_weight, torch.Tensor) or token_weight.dim() != 2:
        raise ValueError("token_weight must be a [B, M] tensor")
    _check_mask(mask, *token_weight.shape)
    check_weight_values(token_weight, "token_weight")  # CPU tensors (SPEC §1.1): no NaN / inf / negative
    return token_weight.masked_fill(mask.to(token_weight.device), 0.0)


@dataclass
class Suppressed:
    """Result of a suppression step: ``mask`` bool [B, M] (True = suppressed), the new ``embeds`` and ``token_weight`` (None when not given)."""
    mask: torch.Tensor
    embeds: torch.Tensor | None
    token_weight: torch.Tensor | None


def _apply(mask, embeds, token_weight, null_embeds, apply_to):
    if apply_to not in _MODES:
        raise ValueError(f"apply_to must be one of {_MODES}, got {apply_to!r}")
    if embeds is not None and apply_to in ("both", "embeds"):
        embeds = apply_suppression_to_embeddings(embeds, mask, null_embeds)
    if token_weight is not None and apply_to in ("both", "weights"):
        token_weight = apply_suppression_to_weights(token_weight, mask)
    return embeds, token_weight


# ---------------------------------------------------------------------------------------------
# training-time suppression
# ---------------------------------------------------------------------------------------------

class TokenSuppressor:
    """Seeded, step-aware dynamic suppression of low-density prompt tokens (docs/SPEC.md §3).

    Args:
        density: the :class:`TokenDensity` giving ρ of each token id (or None: pass ρ directly).
        tau: τ ∈ [0, 1]; only tokens with ρ < τ can be suppressed.
        p_max: the largest suppression probability, in [0, 1] (reached after warm-up).
        beta: β ≥ 0, how fast p_j falls with density.
        warmup_steps: p_max ramps linearly from 0 at step 0 to p_max at step ``warmup_steps`` (0 = no ramp).
        seed: seed of the per-step generators (see the module docstring).
        suppress_special_tokens: if False (default), special tokens of ``density`` (BOS, EOS, ...)
            are never suppressed. Padding (pad id, or ``key_padding_mask`` False) never is.
        apply_to: "both" (default), "embeds" or "weights": what a suppressed token loses.
    """

    def __init__(self, density: TokenDensity | None = None, *, tau: float = 0.5, p_max: float = 0.3,
                 beta: float = 1.0, warmup_steps: int = 0, seed: int = 0,
                 suppress_special_tokens: bool = False, apply_to: str = "both"):
        if density is not None and not isinstance(density, TokenDensity):
            raise TypeError(f"density must be a TokenDensity or None, got {type(density).__name__}")
        for name, v in (("tau", tau), ("p_max", p_max)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a float in [0, 1], got {type(v).__name__}")
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite float >= 0, got {beta!r}")
        if apply_to not in _MODES:
            raise ValueError(f"apply_to must be one of {_MODES}, got {apply_to!r}")
        self.density = density
        self.tau, self.p_max, self.beta = float(tau), float(p_max), float(beta)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.seed = int(seed)
        self.suppress_special_tokens = bool(suppress_special_tokens)
        self.apply_to = apply_to

    def p_max_at(self, step: int) -> float:
        """p_max(step) = p_max · min(1, step / warmup_steps) (p_max when warmup_steps = 0)."""
        _check_int("step", step, 0)
        if self.warmup_steps == 0:
            return self.p_max
        return self.p_max * min(1.0, step / self.warmup_steps)

    def _rho_and_exempt(self, token_ids, rho, key_padding_mask):
        if rho is None:
            if self.density is None:
                raise ValueError("this TokenSuppressor has no density: pass rho= (float [B, M]) explicitly")
            rho = self.density.density(token_ids)
        else:
            if not isinstance(rho, torch.Tensor) or not rho.dtype.is_floating_point:
                raise TypeError("rho must be a floating-point tensor [B, M]")
            if not torch.compiler.is_compiling() and rho.numel() and \
                    (bool(torch.isnan(rho).any()) or float(rho.min()) < 0 or float(rho.max()) > 1):
                raise ValueError("rho must lie in [0, 1]")
        if rho.dim() != 2:
            raise ValueError(f"token ids / rho must be [B, M], got shape {tuple(rho.shape)}")
        exempt = torch.zeros(rho.shape, dtype=torch.bool, device=rho.device)
        if token_ids is not None:
            if tuple(token_ids.shape) != tuple(rho.shape):
                raise ValueError(f"token_ids {tuple(token_ids.shape)} and rho {tuple(rho.shape)} must have one shape")
            d = self.density
            if d is not None:
                ids = token_ids.to(rho.device).long()
                if d.pad_id is not None:
                    exempt |= ids == d.pad_id
                if not self.suppress_special_tokens and d.special_ids:
                    exempt |= torch.isin(ids, torch.tensor(d.special_ids, device=rho.device))
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (True = real token)")
            if tuple(key_padding_mask.shape) != tuple(rho.shape):
                raise ValueError(f"key_padding_mask must be [B, M]={list(rho.shape)}, got {list(key_padding_mask.shape)}")
            exempt |= ~key_padding_mask.to(rho.device)
        return rho.float(), exempt

    def probabilities(self, token_ids: torch.Tensor | None, step: int, *, rho: torch.Tensor | None = None,
                      key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """p_j = p_max(step) · (1 − ρ_j)^β where ρ_j < τ, else 0 (and 0 at padding / exempt specials): float32 [B, M]."""
        pm = self.p_max_at(step)
        rho, exempt = self._rho_and_exempt(token_ids, rho, key_padding_mask)
        p = pm * (1.0 - rho).pow(self.beta)
        return torch.where((rho < self.tau) & ~exempt, p, torch.zeros_like(p))

    def sample_mask(self, token_ids: torch.Tensor | None, step: int, *, rho: torch.Tensor | None = None,
                    key_padding_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    global_batch_size: int | None = None, batch_offset: int = 0) -> torch.Tensor:
        """Draw the suppression mask, bool [B, M] (True = suppressed), on the device of the ids / rho.

        token_ids: integer [B, M] (density lookup) or None with ``rho`` float [B, M] given.
        generator: a CPU torch.Generator to draw from (stateful); default: ``step_generator(seed, step)``.
        global_batch_size / batch_offset: data-parallel sharding (module docstring).
        """
        if token_ids is not None and not isinstance(token_ids, torch.Tensor):
            raise TypeError(f"token_ids must be an integer tensor [B, M], got {type(token_ids).__name__}")
        p = self.probabilities(token_ids, step, rho=rho, key_padding_mask=key_padding_mask)
        B, M = p.shape
        g = step_generator(self.seed, step, _STREAM_SUPPRESS) if generator is None else generator
        u = _draw_uniform(B, M, g, global_batch_size, batch_offset).to(p.device)
        return u < p

    def __call__(self, token_ids: torch.Tensor | None, step: int, *, embeds: torch.Tensor | None = None,
                 token_weight: torch.Tensor | None = None, null_embeds: torch.Tensor | None = None,
                 rho: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, global_batch_size: int | None = None,
                 batch_offset: int = 0) -> Suppressed:
        """Draw a mask and apply it: embeds [B, M, C] → null embedding (or 0) at suppressed positions,
        token_weight [B, M] → 0 there (per ``apply_to``). Returns :class:`Suppressed`."""
        mask = self.sample_mask(token_ids, step, rho=rho, key_padding_mask=key_padding_mask, generator=generator,
                                global_batch_size=global_batch_size, batch_offset=batch_offset)
        embeds, token_weight = _apply(mask, embeds, token_weight, null_embeds, self.apply_to)
        return Suppressed(mask, embeds, token_weight)


# ---------------------------------------------------------------------------------------------
# whole-prompt CFG dropout (separate, composable)
# ---------------------------------------------------------------------------------------------

def prompt_dropout(embeds: torch.Tensor, p: float, *, null_embeds: torch.Tensor | None = None,
                   token_weight: torch.Tensor | None = None, null_token_weight: torch.Tensor | None = None,
                   step: int = 0, seed: int = 0, generator: torch.Generator | None = None,
                   global_batch_size: int | None = None, batch_offset: int = 0):
    """Standard CFG prompt dropout: each sample's whole prompt becomes the null prompt with probability p.

    embeds [B, M, C]; null_embeds [M, C] / [1, M, C] / [B, M, C] or None (zeros). token_weight [B, M]
    (optional) is replaced by ``null_token_weight`` ([M] or [B, M]; default: unchanged) for dropped samples.
    Randomness as in :class:`TokenSuppressor` (its own stream of ``step_generator(seed, step)``).
    Returns ``(embeds, token_weight, dropped)`` with dropped bool [B].
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be a float in [0, 1], got {p!r}")
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
        raise ValueError("embeds must be a [B, M, C] tensor")
    B, M, _ = embeds.shape
    g = step_generator(seed, step, _STREAM_DROPOUT) if generator is None else generator
    dropped = (_draw_uniform(B, 1, g, global_batch_size, batch_offset)[:, 0] < float(p)).to(embeds.device)
    mask = dropped.view(B, 1).expand(B, M)
    embeds = apply_suppression_to_embeddings(embeds, mask, null_embeds)
    if token_weight is not None and null_token_weight is not None:
        if not isinstance(token_weight, torch.Tensor) or token_weight.shape != (B, M):
            raise ValueError(f"token_weight must be [B, M]={[B, M]}")
        if not isinstance(null_token_weight, torch.Tensor):
            raise TypeError(f"null_token_weight must be a tensor [M] or [B, M], got {type(null_token_weight).__name__}")
        ntw = null_token_weight.to(token_weight)
        if tuple(ntw.shape) not in ((M,), (B, M)):
            raise ValueError(f"null_token_weight must be [M] or [B, M] with M={M}, got {list(ntw.shape)}")
        check_weight_values(token_weight, "token_weight")
        check_weight_values(ntw, "null_token_weight")
        token_weight = torch.where(mask, ntw.expand(B, M), token_weight)
    return embeds, token_weight, dropped


# ---------------------------------------------------------------------------------------------
# sampling: DR-CFG's degraded branch
# ---------------------------------------------------------------------------------------------

@dataclass
class DegradedPrompt:
    """DR-CFG's third branch: ``embeds`` [B, M, C], ``token_weight`` float32 [B, M], ``mask`` bool [B, M] (True = suppressed)."""
    embeds: torch.Tensor
    token_weight: torch.Tensor
    mask: torch.Tensor


def build_degraded_branch(token_ids: torch.Tensor, embeds: torch.Tensor, density: TokenDensity, *,
                          tau: float = 0.5, null_embeds: torch.Tensor | None = None,
                          token_weight: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                          apply_to: str = "both", suppress_special_tokens: bool = False) -> DegradedPrompt:
    """The prompt with its high-density tokens (ρ ≥ τ) suppressed (docs/SPEC.md §3), for the degraded branch d.

    token_ids integer [B, M]; embeds [B, M, C] (the conditional prompt's text-encoder output);
    null_embeds: the null prompt's embeddings ([M, C], [1, M, C] or [B, M, C]) or None (zeros);
    token_weight: the conditional branch's SRA weights [B, M] (default: 1 for real tokens, 0 for
    padding). Suppressed tokens get the null embedding and/or SRA weight 0 (``apply_to``); padding
    and (unless ``suppress_special_tokens``) special tokens are never suppressed.
    See the module docstring for the ``rectified_cfg(..., num_branches=3)`` call.
    """
    if not isinstance(density, TokenDensity):
        raise TypeError(f"density must be a TokenDensity, got {type(density).__name__}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau must be a float in [0, 1], got {tau!r}")
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2:
        raise ValueError("token_ids must be an integer [B, M] tensor")
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or tuple(embeds.shape[:2]) != tuple(token_ids.shape):
        raise ValueError(f"embeds must be [B, M, C] with [B, M]={list(token_ids.shape)}, got "
                         f"{list(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__}")
    helper = TokenSuppressor(density, tau=1.0, p_max=0.0, suppress_special_tokens=suppress_special_tokens)
    rho, exempt = helper._rho_and_exempt(token_ids, None, key_padding_mask)
    mask = (rho >= float(tau)) & ~exempt
    if token_weight is None:
        valid = torch.ones_like(mask)
        if density.pad_id is not None:
            valid &= token_ids.to(mask.device) != density.pad_id
        if key_padding_mask is not None:
            valid &= key_padding_mask.to(mask.device)
        token_weight = valid.float()
    elif not isinstance(token_weight, torch.Tensor) or tuple(token_weight.shape) != tuple(token_ids.shape):
        raise ValueError(f"token_weight must be [B, M]={list(token_ids.shape)}")
    new_embeds, new_w = _apply(mask.to(embeds.device), embeds, token_weight, null_embeds, apply_to)
    return DegradedPrompt(new_embeds, new_w.float(), mask)
