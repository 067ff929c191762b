"""DARE guidance for diffusers: the fused rectified-CFG combine (SPEC §2) with an optional degraded branch.

Two ways in:

* Modular pipelines: :class:`DAREGuidance`, a diffusers guider (``BaseGuidance`` subclass). Set it as the
  pipeline's ``guider``. Branches run in the order cond, uncond[, degraded]; when the denoiser is patched by
  :func:`apply_dare`, the guider tells the handle which branch each pass is, so per-branch token weights
  (``handle.set_token_weights(w, degraded=w_d)``) apply. The degraded branch reuses the conditional inputs
  unless ``degraded_inputs`` names other block-state fields (e.g. {"encoder_hidden_states": "degraded_prompt_embeds"}).

* Classic pipelines (WanPipeline, LTXPipeline, CogVideoXPipeline): :func:`dare_guidance`, a context manager
  that makes the transformer run all branches in one batched forward and return the combined prediction::

      handle = apply_dare(pipe)                                   # optional: SRA token weights
      handle.set_token_weights(w, only_cond=True, degraded=w_d)
      with dare_guidance(pipe, negative_prompt_embeds=neg, guidance_scale=5.0, rectify_scale=1.5, mode="apg"):
          latents = pipe(prompt_embeds=pos, guidance_scale=1.0, output_type="latent").frames

  Call the pipeline with ``guidance_scale=1.0`` (so it runs one conditional pass); the guidance scale is
  given to ``dare_guidance``. Batch order of the forward: uncond, cond[, degraded].
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch

__all__ = ["DAREGuidance", "dare_guidance", "CFG_MODES", "combine"]

CFG_MODES = ("cfg", "cfg_zero_star", "apg")


def combine(preds, guidance_scale, **kwargs):
    """The fused rectified-CFG combine, :func:`dare_kernels.rectified_cfg` (SPEC §2); same arguments."""
    from ...cfg import rectified_cfg

    return rectified_cfg(preds, guidance_scale, **kwargs)


def _check_mode_args(mode, guidance_scale, rectify_scale, guidance_rescale, eta, norm_threshold, momentum):
    if mode not in CFG_MODES:
        raise ValueError(f"mode must be one of {CFG_MODES}, got {mode!r}")
    for name, v in (("guidance_scale", guidance_scale), ("rectify_scale", rectify_scale),
                    ("guidance_rescale", guidance_rescale), ("eta", eta), ("norm_threshold", norm_threshold)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if momentum is not None and mode != "apg":
        raise ValueError("momentum applies to mode='apg' only")


def _make_guider_class():
    from diffusers.configuration_utils import register_to_config
    from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

    class DAREGuidance(BaseGuidance):
        """Rectified CFG (SPEC §2) as a diffusers guider: modes "cfg", "cfg_zero_star", "apg", + degraded branch.

        g = combine(u, c[, d]) with the fused ``rectified_cfg`` kernel. ``rectify_scale`` != 0 adds a third pass
        (the degraded conditional branch d) and the term s_r·(c − d).

        Args:
            guidance_scale: s. rectify_scale: s_r (0 = no degraded pass). mode: "cfg" | "cfg_zero_star" | "apg".
            guidance_rescale: φ of the std rescale. eta, norm_threshold, momentum: APG parameters (momentum
                state is kept here and reset at step 0).
            degraded_inputs: {model input name: block-state field} for the degraded pass (default: the
                conditional inputs, with the DARE handle's "degraded" token weights).
            start, stop, enabled: as every diffusers guider.
        """

        _input_predictions = ["pred_cond", "pred_uncond", "pred_degraded"]
        _branch_of_prediction = {"pred_cond": "cond", "pred_uncond": "uncond", "pred_degraded": "degraded"}

        @register_to_config
        def __init__(self, guidance_scale: float = 5.0, rectify_scale: float = 0.0, mode: str = "cfg",
                     guidance_rescale: float = 0.0, eta: float = 1.0, norm_threshold: float = 0.0,
                     momentum: float | None = None, degraded_inputs: dict | None = None,
                     start: float = 0.0, stop: float = 1.0, enabled: bool = True, backend: str = "auto"):
            super().__init__(start, stop, enabled)
            _check_mode_args(mode, guidance_scale, rectify_scale, guidance_rescale, eta, norm_threshold, momentum)
            self.guidance_scale = guidance_scale
            self.rectify_scale = rectify_scale
            self.mode = mode
            self.guidance_rescale = guidance_rescale
            self.eta = eta
            self.norm_threshold = norm_threshold
            self.momentum = momentum
            self.degraded_inputs = dict(degraded_inputs or {})
            self.backend = backend
            self._momentum_buffer = None
            self._dare_prev_layout = None

        # -- state ---------------------------------------------------------------------------
        def set_state(self, step, num_inference_steps, timestep) -> None:
            super().set_state(step, num_inference_steps, timestep)
            if step == 0:
                self._momentum_buffer = None

        def _is_cfg_enabled(self) -> bool:
            if not self._enabled:
                return False
            if self._num_inference_steps is not None:
                lo = int(self._start * self._num_inference_steps)
                hi = int(self._stop * self._num_inference_steps)
                if not lo <= self._step < hi:
                    return False
            return not (math.isclose(self.guidance_scale, 1.0) and self.rectify_scale == 0 and self.mode == "cfg")

        @property
        def num_conditions(self) -> int:
            if not self._is_cfg_enabled():
                return 1
            return 3 if self.rectify_scale != 0 else 2

        @property
        def is_conditional(self) -> bool:
            return self._count_prepared in (1, 3)

        # -- inputs --------------------------------------------------------------------------
        def prepare_inputs(self, data):
            batches = []
            for idx, name in enumerate(self._input_predictions[: self.num_conditions]):
                if idx < 2:
                    batches.append(self._prepare_batch(data, idx, name))
                else:
                    third = {k: (v[2] if len(v) > 2 else v[0]) if isinstance(v, tuple) else v for k, v in data.items()}
                    batches.append(self._prepare_batch(third, 0, name))
            return batches

        def prepare_inputs_from_block_state(self, data, input_fields):
            batches = []
            for idx, name in enumerate(self._input_predictions[: self.num_conditions]):
                if idx < 2:
                    batches.append(self._prepare_batch_from_block_state(input_fields, data, idx, name))
                else:
                    fields = {k: (v[0] if isinstance(v, tuple) else v) for k, v in input_fields.items()}
                    fields.update(self.degraded_inputs)
                    batches.append(self._prepare_batch_from_block_state(fields, data, 0, name))
            return batches

        # -- models: tell a DARE handle which branch runs ------------------------------------
        def prepare_models(self, denoiser) -> None:
            super().prepare_models(denoiser)
            handle = denoiser.__dict__.get("_dare_handle") if isinstance(denoiser, torch.nn.Module) else None
            if handle is not None:
                name = self._input_predictions[self._count_prepared - 1]
                self._dare_prev_layout = handle._forced_layout
                handle._forced_layout = (self._branch_of_prediction[name],)
                handle._wcache.clear()

        def cleanup_models(self, denoiser) -> None:
            handle = denoiser.__dict__.get("_dare_handle") if isinstance(denoiser, torch.nn.Module) else None
            if handle is not None:
                handle._forced_layout = self._dare_prev_layout
                handle._wcache.clear()

        # -- combine -------------------------------------------------------------------------
        def forward(self, pred_cond, pred_uncond=None, pred_degraded=None):
            if not self._is_cfg_enabled():
                return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
            preds = [pred_uncond, pred_cond] + ([pred_degraded] if pred_degraded is not None else [])
            if self.mode == "apg" and self.momentum is not None and self._momentum_buffer is None:
                acc = torch.float64 if pred_cond.dtype == torch.float64 else torch.float32
                self._momentum_buffer = torch.zeros_like(pred_cond, dtype=acc)
            pred = combine(preds, self.guidance_scale, mode=self.mode, rectify_scale=self.rectify_scale,
                           guidance_rescale=self.guidance_rescale, eta=self.eta, norm_threshold=self.norm_threshold,
                           momentum=self.momentum, momentum_buffer=self._momentum_buffer, backend=self.backend)
            return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    DAREGuidance.__qualname__ = "DAREGuidance"
    DAREGuidance.__module__ = __name__
    return DAREGuidance


_GUIDER_CLASS = None


def __getattr__(name):  # DAREGuidance is built on first use so importing this module does not import diffusers
    global _GUIDER_CLASS
    if name == "DAREGuidance":
        if _GUIDER_CLASS is None:
            _GUIDER_CLASS = _make_guider_class()
        return _GUIDER_CLASS
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------
# classic pipelines
# ---------------------------------------------------------------------------------------------

def _fit_batch(t: torch.Tensor, b: int, what: str) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if b % t.shape[0] == 0:
        return t.repeat_interleave(b // t.shape[0], dim=0)
    raise ValueError(f"dare_guidance: {what} has batch {t.shape[0]}, the pipeline's batch is {b}")


@contextlib.contextmanager
def dare_guidance(pipe, *, negative_prompt_embeds: torch.Tensor, guidance_scale: float = 5.0,
                  rectify_scale: float = 0.0, mode: str = "cfg", degraded_prompt_embeds: torch.Tensor | None = None,
                  negative_prompt_attention_mask: torch.Tensor | None = None,
                  degraded_prompt_attention_mask: torch.Tensor | None = None, guidance_rescale: float = 0.0,
                  eta: float = 1.0, norm_threshold: float = 0.0, momentum: float | None = None,
                  backend: str = "auto"):
    """Run WanPipeline / LTXPipeline / CogVideoXPipeline with DARE guidance (one batched forward per step).

    Inside the context, each transformer call of the pipeline (made with ``guidance_scale=1.0``) runs the
    branches uncond (``negative_prompt_embeds``), cond (the pipeline's ``prompt_embeds``) and, when
    ``rectify_scale`` != 0, degraded (``degraded_prompt_embeds``, default the prompt itself — give the handle
    "degraded" token weights then) stacked along the batch, and returns the ``rectified_cfg`` combine.
    LTX needs the text masks: ``negative_prompt_attention_mask`` (and ``degraded_prompt_attention_mask``).
    A patched transformer's DARE handle sees the layout ("uncond", "cond"[, "degraded"]).
    Momentum (APG) state resets when the timestep goes up (a new sampling run).
    """
    _check_mode_args(mode, guidance_scale, rectify_scale, guidance_rescale, eta, norm_threshold, momentum)
    models = [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None))
              if isinstance(m, torch.nn.Module)]
    if not models:
        raise TypeError(f"dare_guidance: expected a pipeline with a transformer, got {type(pipe).__name__}")
    if not isinstance(negative_prompt_embeds, torch.Tensor):
        raise TypeError("dare_guidance: negative_prompt_embeds must be a tensor [B, M, C]")
    k = 3 if rectify_scale != 0 else 2
    layout = ("uncond", "cond", "degraded")[:k]
    state = {"buf": None, "t": None}

    def wrap(model):
        original = model.forward  # bound method of the class (or an existing instance override)
        sig = inspect.signature(original)

        def guided_forward(*args, **kwargs):
            gs = getattr(pipe, "_guidance_scale", None)
            if gs is not None and gs > 1.0:
                raise RuntimeError(
                    "dare_guidance: call the pipeline with guidance_scale=1.0 inside this context "
                    f"(it got {gs}); the guidance scale goes to dare_guidance(...)"
                )
            bound = sig.bind(*args, **kwargs)
            a = dict(bound.arguments)
            for pname, p in sig.parameters.items():
                if p.kind is inspect.Parameter.VAR_KEYWORD and pname in a:
                    a.update(a.pop(pname))
            hs = a["hidden_states"]
            b = hs.shape[0]
            text = a["encoder_hidden_states"]
            neg = _fit_batch(negative_prompt_embeds.to(text), b, "negative_prompt_embeds")
            deg = text if degraded_prompt_embeds is None else _fit_batch(degraded_prompt_embeds.to(text), b,
                                                                          "degraded_prompt_embeds")
            if neg.shape[1:] != text.shape[1:] or deg.shape[1:] != text.shape[1:]:
                raise ValueError(f"dare_guidance: negative / degraded embeddings must match prompt_embeds "
                                 f"{list(text.shape[1:])} per sample, got {list(neg.shape[1:])}, {list(deg.shape[1:])}")
            new = {}
            for name, v in a.items():
                if name == "encoder_hidden_states":
                    new[name] = torch.cat([neg, text, deg][:k], dim=0)
                elif name == "encoder_attention_mask" and isinstance(v, torch.Tensor):
                    nm = negative_prompt_attention_mask
                    nm = torch.ones_like(v) if nm is None else _fit_batch(nm.to(v), b, "negative_prompt_attention_mask")
                    dm = v if degraded_prompt_attention_mask is None else _fit_batch(
                        degraded_prompt_attention_mask.to(v), b, "degraded_prompt_attention_mask")
                    new[name] = torch.cat([nm, v, dm][:k], dim=0)
                elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b:
                    new[name] = torch.cat([v] * k, dim=0)
                else:
                    new[name] = v
            t = a.get("timestep")
            if isinstance(t, torch.Tensor):
                tval = float(t.flatten()[0])
                if state["t"] is not None and tval > state["t"]:
                    state["buf"] = None
                state["t"] = tval
            handle = model.__dict__.get("_dare_handle")
            ctx = handle.branch(*layout) if handle is not None else contextlib.nullcontext()
            with ctx:
                out = original(**new)
            sample = out[0] if isinstance(out, tuple) else out.sample
            if mode == "apg" and momentum is not None and state["buf"] is None:
                acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
                state["buf"] = torch.zeros((b,) + tuple(sample.shape[1:]), dtype=acc, device=sample.device)
            g = combine(sample, guidance_scale, num_branches=k, mode=mode, rectify_scale=rectify_scale,
                        guidance_rescale=guidance_rescale, eta=eta, norm_threshold=norm_threshold,
                        momentum=momentum, momentum_buffer=state["buf"], backend=backend)
            if isinstance(out, tuple):
                return (g,) + tuple(out[1:])
            out.sample = g
            return out

        return guided_forward

    patched = []
    try:
        for m in models:
            if "forward" in m.__dict__:
                raise RuntimeError(f"dare_guidance: {type(m).__name__}.forward is already overridden on the instance "
                                   "(another dare_guidance context or a hook); nest-free use only")
            m.__dict__["forward"] = wrap(m)
            patched.append(m)
        yield pipe
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
