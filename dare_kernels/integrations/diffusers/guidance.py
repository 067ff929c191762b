"""DARE guidance for diffusers: the fused rectified-CFG combine (SPEC §2) with an optional degraded branch.

Two ways in:

* Modular pipelines: :class:`DAREGuidance`, a diffusers guider (``BaseGuidance`` subclass). Set it as the
  pipeline's ``guider``. Branches run in the order cond, uncond[, degraded]; when the denoiser is patched by
  :func:`apply_dare`, the guider tells the handle which branch each pass is, so per-branch token weights
  (``handle.set_token_weights(w, degraded=w_d)``) apply. The degraded branch reuses the conditional inputs
  unless ``degraded_inputs`` names other block-state fields (e.g. {"encoder_hidden_states": "degraded_prompt_embeds"}).

* Classic pipelines (WanPipeline, LTXPipeline, CogVideoXPipeline, AnimateDiffPipeline): :func:`dare_guidance`,
  a context manager that makes the denoiser (``transformer`` / ``transformer_2`` / ``unet``) run all branches in
  one batched forward and return the combined prediction::

      handle = apply_dare(pipe)                                   # optional: SRA token weights
      handle.set_token_weights(w, only_cond=True, degraded=w_d)
      with dare_guidance(pipe, negative_prompt_embeds=neg, guidance_scale=5.0, rectify_scale=1.5, mode="apg"):
          latents = pipe(prompt_embeds=pos, guidance_scale=1.0, output_type="latent").frames

  Call the pipeline with ``guidance_scale=1.0`` (so it runs one conditional pass); the guidance scale is
  given to ``dare_guidance``. Batch order of the forward: uncond, cond[, degraded].

  It installs a forward pre-hook (batch the branches) and a forward hook (combine) on each denoiser and
  removes them on exit; it never replaces ``forward`` on the instance. accelerate's offload hooks and
  diffusers' HookRegistry (group offload, caches, context parallelism) do replace it, and PyTorch module
  hooks run around whatever ``forward`` is installed, so they compose: the offload and cache hooks see the
  batched branches, as they see a stock pipeline's batched CFG.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from typing import Any

import torch

from ...reference import CFG_MODES
from .patch import uses_faster_cache

__all__ = ["DAREGuidance", "dare_guidance", "CFG_MODES", "combine"]


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
    for name, value, default in (("eta", eta, 1.0), ("norm_threshold", norm_threshold, 0.0)):
        if mode != "apg" and value != default:
            raise ValueError(f"{name} applies to mode='apg' only; mode={mode!r} would ignore {name}={value}")


def _diffusers_guider_api():
    """(BaseGuidance, GuiderOutput or None) of the installed diffusers; the one place that imports guider types.

    ``diffusers.guiders.BaseGuidance`` is public from diffusers 0.36 on; 0.35 has it in ``guider_utils`` only
    (guiders first appear in 0.35). ``GuiderOutput`` (diffusers >= 0.36) is not exported; without it a
    guider returns ``(pred, {})`` as 0.35's guiders do.
    """
    try:
        from diffusers.guiders import BaseGuidance
    except ImportError:
        try:
            from diffusers.guiders.guider_utils import BaseGuidance  # diffusers 0.35
        except ImportError as e:
            import diffusers

            raise ImportError(
                f"DAREGuidance needs diffusers' guiders (diffusers >= 0.35); installed: {diffusers.__version__}"
            ) from e
    try:
        from diffusers.guiders.guider_utils import GuiderOutput  # diffusers >= 0.36 (not exported)
    except ImportError:
        GuiderOutput = None
    return BaseGuidance, GuiderOutput


def _make_guider_class():
    from diffusers.configuration_utils import register_to_config
    from diffusers.modular_pipelines import BlockState

    BaseGuidance, GuiderOutput = _diffusers_guider_api()
    # BaseGuidance.__init__ is (start, stop) in diffusers 0.35 and (start, stop, enabled) later
    base_takes_enabled = "enabled" in inspect.signature(BaseGuidance.__init__).parameters

    class DAREGuidance(BaseGuidance):
        """Rectified CFG (SPEC §2) as a diffusers guider: modes "cfg", "cfg_zero_star", "apg", + degraded branch.

        g = combine(u, c[, d]) with the fused ``rectified_cfg`` kernel. ``rectify_scale`` != 0 adds a third pass
        (the degraded conditional branch d) and the term s_r·(c − d).

        Built on BaseGuidance's public interface only (set_state, prepare_inputs[_from_block_state],
        prepare_models / cleanup_models, forward, enable / disable); the batches it prepares are
        ``BlockState`` objects tagged ``__guidance_identifier__`` as diffusers' own guiders tag them.

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
        _identifier = "__guidance_identifier__"  # the tag diffusers' guiders put on each prepared batch

        @register_to_config
        def __init__(self, guidance_scale: float = 5.0, rectify_scale: float = 0.0, mode: str = "cfg",
                     guidance_rescale: float = 0.0, eta: float = 1.0, norm_threshold: float = 0.0,
                     momentum: float | None = None, degraded_inputs: dict | None = None,
                     start: float = 0.0, stop: float = 1.0, enabled: bool = True, backend: str = "auto"):
            if base_takes_enabled:
                super().__init__(start, stop, enabled)
            else:
                super().__init__(start, stop)
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
            # our own copies of the schedule state (BaseGuidance keeps its own in private fields)
            self._dare_range = (start, stop)
            self._dare_enabled = bool(enabled)
            self._dare_step = None
            self._dare_num_steps = None
            self._dare_prepared = 0
            self._dare_branch_ctx = None

        # -- state ---------------------------------------------------------------------------
        def set_state(self, step, num_inference_steps, timestep) -> None:
            super().set_state(step, num_inference_steps, timestep)
            self._dare_step, self._dare_num_steps, self._dare_prepared = step, num_inference_steps, 0
            if step == 0:
                self._momentum_buffer = None

        def enable(self):
            super().enable()
            self._dare_enabled = True

        def disable(self):
            super().disable()
            self._dare_enabled = False

        def _guidance_active(self) -> bool:
            if not self._dare_enabled:
                return False
            if self._dare_num_steps is not None and self._dare_step is not None:
                lo = int(self._dare_range[0] * self._dare_num_steps)
                hi = int(self._dare_range[1] * self._dare_num_steps)
                if not lo <= self._dare_step < hi:
                    return False
            return not (math.isclose(self.guidance_scale, 1.0) and self.rectify_scale == 0 and self.mode == "cfg")

        @property
        def num_conditions(self) -> int:
            if not self._guidance_active():
                return 1
            return 3 if self.rectify_scale != 0 else 2

        @property
        def is_conditional(self) -> bool:
            return self._dare_prepared in (1, 3)

        # -- inputs --------------------------------------------------------------------------
        def _batch(self, fields: dict, name: str):
            return BlockState(**fields, **{self._identifier: name})

        def prepare_inputs(self, data, input_fields=None):
            """diffusers >= 0.36: ``data`` = {input name: tensor or (cond, uncond[, degraded]) tuple}.
            diffusers 0.35: ``prepare_inputs(block_state, input_fields)`` (same as prepare_inputs_from_block_state)."""
            if input_fields is not None:
                return self.prepare_inputs_from_block_state(data, input_fields)
            batches = []
            for idx, name in enumerate(self._input_predictions[: self.num_conditions]):
                fields = {}
                for key, value in data.items():
                    if isinstance(value, tuple):
                        fields[key] = value[idx] if idx < len(value) else value[0]  # degraded: the cond input
                    else:
                        fields[key] = value
                batches.append(self._batch(fields, name))
            return batches

        def prepare_inputs_from_block_state(self, data, input_fields):
            """One BlockState per pass, cond, uncond[, degraded], from the block-state fields named in
            ``input_fields`` ({input name: field or (cond field, uncond field)}); fields missing on ``data`` are
            left out, as diffusers' guiders do."""
            batches = []
            for idx, name in enumerate(self._input_predictions[: self.num_conditions]):
                fields = {}
                for key, value in input_fields.items():
                    if isinstance(value, tuple):
                        value = value[idx] if idx < 2 else value[0]
                    if idx == 2 and key in self.degraded_inputs:
                        value = self.degraded_inputs[key]
                    if isinstance(value, str) and hasattr(data, value):
                        fields[key] = getattr(data, value)
                batches.append(self._batch(fields, name))
            return batches

        def __call__(self, data):
            if not all(hasattr(d, "noise_pred") for d in data):
                raise ValueError("DAREGuidance: every prepared batch needs its `noise_pred`")
            if len(data) != self.num_conditions:
                raise ValueError(f"DAREGuidance: expected {self.num_conditions} predictions, got {len(data)}")
            return self.forward(**{getattr(d, self._identifier): d.noise_pred for d in data})

        # -- models: tell a DARE handle which branch runs (through handle.branch) -------------
        def prepare_models(self, denoiser) -> None:
            super().prepare_models(denoiser)
            self._dare_prepared += 1
            self._exit_branch()
            handle = _handle_of(denoiser)
            if handle is not None:
                name = self._input_predictions[self._dare_prepared - 1]
                ctx = handle.branch(self._branch_of_prediction[name])
                ctx.__enter__()
                self._dare_branch_ctx = ctx

        def cleanup_models(self, denoiser) -> None:
            super().cleanup_models(denoiser)
            self._exit_branch()

        def _exit_branch(self) -> None:
            ctx, self._dare_branch_ctx = self._dare_branch_ctx, None
            if ctx is not None:
                ctx.__exit__(None, None, None)

        # -- combine -------------------------------------------------------------------------
        def _output(self, pred, pred_cond, pred_uncond):
            if GuiderOutput is None:
                return pred, {}  # diffusers 0.35: (prediction, scheduler step kwargs)
            return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

        def forward(self, pred_cond, pred_uncond=None, pred_degraded=None):
            if not self._guidance_active():
                return self._output(pred_cond, pred_cond, pred_uncond)
            preds = [pred_uncond, pred_cond] + ([pred_degraded] if pred_degraded is not None else [])
            if self.mode == "apg" and self.momentum is not None and self._momentum_buffer is None:
                acc = torch.float64 if pred_cond.dtype == torch.float64 else torch.float32
                self._momentum_buffer = torch.zeros_like(pred_cond, dtype=acc)
            pred = combine(preds, self.guidance_scale, mode=self.mode, rectify_scale=self.rectify_scale,
                           guidance_rescale=self.guidance_rescale, eta=self.eta, norm_threshold=self.norm_threshold,
                           momentum=self.momentum, momentum_buffer=self._momentum_buffer, backend=self.backend)
            return self._output(pred, pred_cond, pred_uncond)

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

_DENOISER_ATTRS = ("transformer", "transformer_2", "unet")
_GUIDED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # denoisers inside a dare_guidance context


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a ``torch.compile(model)`` wrapper (OptimizedModule keeps it as ``_orig_mod``)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _handle_of(model):
    """The DARE handle patching ``model`` (or the module under its torch.compile wrapper), else None."""
    if not isinstance(model, torch.nn.Module):
        return None
    return _unwrapped(model).__dict__.get("_dare_handle")


def _fit_batch(t: torch.Tensor, b: int, what: str) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if b % t.shape[0] == 0:
        return t.repeat_interleave(b // t.shape[0], dim=0)
    raise ValueError(f"dare_guidance: {what} has batch {t.shape[0]}, the pipeline's batch is {b}")


class _BatchedBranches:
    """The forward pre-hook / forward hook pair of one dare_guidance context on one denoiser.

    PyTorch module hooks run in ``Module.__call__`` around whatever ``forward`` the instance has, so they
    compose with accelerate's offload hooks and diffusers' HookRegistry (group offload, caches, context
    parallelism), which all rewrite ``forward`` on the instance: their hooks see the batched branches.
    The pre-hook is prepended so it also runs before a DARE handle's own pre-hook (which reads the batch).
    """

    def __init__(self, pipe, model, *, negative, negative_mask, degraded, degraded_mask, k, combine_kwargs, state):
        base = _unwrapped(model)
        self.pipe = pipe
        self.model = model
        params = inspect.signature(type(base).forward).parameters
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.positional_names = [n for n, p in params.items() if p.kind in positional][1:]  # without self
        self.sample_name = "hidden_states" if "hidden_states" in params else "sample"
        if self.sample_name not in params or "encoder_hidden_states" not in params:
            raise TypeError(f"dare_guidance: {type(base).__name__}.forward takes no hidden_states / sample and "
                            "encoder_hidden_states; not a text-conditioned denoiser")
        self.negative, self.negative_mask = negative, negative_mask
        self.degraded, self.degraded_mask = degraded, degraded_mask
        self.k = k
        self.layout = ("uncond", "cond", "degraded")[:k]
        self.combine_kwargs = combine_kwargs
        self.state = state
        self.pending: list[tuple[int, Any]] = []  # per call in flight: (batch, entered handle.branch context)
        self.handles = [
            model.register_forward_pre_hook(self.pre, with_kwargs=True, prepend=True),
            model.register_forward_hook(self.post, with_kwargs=True, always_call=True),
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        while self.pending:
            _, ctx = self.pending.pop()
            if ctx is not None:
                ctx.__exit__(None, None, None)

    @torch.compiler.disable
    def pre(self, module, args, kwargs):
        gs = getattr(self.pipe, "guidance_scale", None)  # the pipelines' public property (None before a call)
        if isinstance(gs, (int, float)) and gs > 1.0:
            raise RuntimeError(
                "dare_guidance: call the pipeline with guidance_scale=1.0 inside this context "
                f"(it got {gs}); the guidance scale goes to dare_guidance(...)"
            )
        # name the arguments, but hand them on as the caller passed them (positional stays positional):
        # hooks inside (FasterCache) look for the CFG inputs among the keyword arguments
        names = self.positional_names[: len(args)]
        if len(args) > len(self.positional_names):
            raise TypeError(f"dare_guidance: {len(args)} positional arguments for {type(module).__name__}.forward")
        a = dict(zip(names, args), **kwargs)
        hs, text = a.get(self.sample_name), a.get("encoder_hidden_states")
        if not isinstance(hs, torch.Tensor) or not isinstance(text, torch.Tensor):
            raise TypeError(f"dare_guidance: expected tensors {self.sample_name} and encoder_hidden_states")
        b, tb, k = hs.shape[0], text.shape[0], self.k  # AnimateDiff repeats the text per frame: tb = b·F
        neg = _fit_batch(self.negative.to(text), tb, "negative_prompt_embeds")
        deg = text if self.degraded is None else _fit_batch(self.degraded.to(text), tb, "degraded_prompt_embeds")
        if neg.shape[1:] != text.shape[1:] or deg.shape[1:] != text.shape[1:]:
            raise ValueError(f"dare_guidance: negative / degraded embeddings must match prompt_embeds "
                             f"{list(text.shape[1:])} per sample, got {list(neg.shape[1:])}, {list(deg.shape[1:])}")
        for name, v in list(a.items()):
            if name == "encoder_hidden_states":
                a[name] = torch.cat([neg, text, deg][:k], dim=0)
            elif name == "encoder_attention_mask" and isinstance(v, torch.Tensor):
                nm = torch.ones_like(v) if self.negative_mask is None else _fit_batch(
                    self.negative_mask.to(v), v.shape[0], "negative_prompt_attention_mask")
                dm = v if self.degraded_mask is None else _fit_batch(
                    self.degraded_mask.to(v), v.shape[0], "degraded_prompt_attention_mask")
                a[name] = torch.cat([nm, v, dm][:k], dim=0)
            elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] in (b, tb):
                a[name] = torch.cat([v] * k, dim=0)  # per-sample inputs (latents, timesteps, image embeddings)
        t = a.get("timestep")
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            tval = float(t.flatten()[0])
            if self.state["t"] is not None and tval > self.state["t"]:
                self.state["buf"] = None  # a new sampling run: APG momentum starts again
            self.state["t"] = tval
        handle = _handle_of(module)
        ctx = None
        if handle is not None:
            ctx = handle.branch(*self.layout)
            ctx.__enter__()
        self.pending.append((b, ctx))
        return tuple(a[n] for n in names), {n: a[n] for n in kwargs}

    @torch.compiler.disable
    def post(self, module, args, kwargs, output):
        if not self.pending:
            return None  # the pre-hook itself raised: nothing to undo
        b, ctx = self.pending.pop()
        if ctx is not None:
            ctx.__exit__(None, None, None)
        if output is None:  # forward raised (always_call): the error propagates
            return None
        sample = output[0] if isinstance(output, tuple) else (output.sample if hasattr(output, "sample") else output[0])
        cw = self.combine_kwargs
        if cw["mode"] == "apg" and cw["momentum"] is not None and self.state["buf"] is None:
            acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
            self.state["buf"] = torch.zeros((b,) + tuple(sample.shape[1:]), dtype=acc, device=sample.device)
        g = combine(sample, num_branches=self.k, momentum_buffer=self.state["buf"], **cw)
        if isinstance(output, tuple):
            return (g,) + tuple(output[1:])
        if hasattr(output, "sample"):
            output.sample = g
            return output
        output[0] = g
        return output


@contextlib.contextmanager
def dare_guidance(pipe, *, negative_prompt_embeds: torch.Tensor, guidance_scale: float = 5.0,
                  rectify_scale: float = 0.0, mode: str = "cfg", degraded_prompt_embeds: torch.Tensor | None = None,
                  negative_prompt_attention_mask: torch.Tensor | None = None,
                  degraded_prompt_attention_mask: torch.Tensor | None = None, guidance_rescale: float = 0.0,
                  eta: float = 1.0, norm_threshold: float = 0.0, momentum: float | None = None,
                  backend: str = "auto"):
    """Run a classic pipeline (Wan, LTX, CogVideoX, AnimateDiff) with DARE guidance (one batched forward per step).

    Inside the context, each denoiser call of the pipeline (made with ``guidance_scale=1.0``) runs the
    branches uncond (``negative_prompt_embeds``), cond (the pipeline's ``prompt_embeds``) and, when
    ``rectify_scale`` != 0, degraded (``degraded_prompt_embeds``, default the prompt itself — give the handle
    "degraded" token weights then) stacked along the batch, and returns the ``rectified_cfg`` combine.
    The denoisers are the pipeline's ``transformer`` / ``transformer_2`` (Wan 2.2) / ``unet`` (AnimateDiff),
    plain, offloaded (accelerate, group offload), cached, or compiled (``torch.compile(model)``).
    LTX needs the text masks: ``negative_prompt_attention_mask`` (and ``degraded_prompt_attention_mask``).
    The degraded inputs are taken only with ``rectify_scale`` != 0 (ValueError otherwise: nothing would use them).
    A patched denoiser's DARE handle sees the layout ("uncond", "cond"[, "degraded"]).
    Momentum (APG) state resets when the timestep goes up (a new sampling run).
    """
    _check_mode_args(mode, guidance_scale, rectify_scale, guidance_rescale, eta, norm_threshold, momentum)
    if rectify_scale == 0:  # no degraded branch runs: its inputs would be ignored
        for name, value in (("degraded_prompt_embeds", degraded_prompt_embeds),
                            ("degraded_prompt_attention_mask", degraded_prompt_attention_mask)):
            if value is not None:
                raise ValueError(f"dare_guidance: {name} feeds the degraded branch, which runs only with "
                                 "rectify_scale != 0 (got rectify_scale=0)")
    models = [m for m in (getattr(pipe, a, None) for a in _DENOISER_ATTRS) if isinstance(m, torch.nn.Module)]
    if not models:
        raise TypeError(f"dare_guidance: expected a pipeline with a transformer or unet, got {type(pipe).__name__}")
    if not isinstance(negative_prompt_embeds, torch.Tensor):
        raise TypeError("dare_guidance: negative_prompt_embeds must be a tensor [B, M, C]")
    k = 3 if rectify_scale != 0 else 2
    for m in models:
        if _unwrapped(m) in _GUIDED:
            raise RuntimeError(f"dare_guidance: {type(_unwrapped(m)).__name__} is already inside a dare_guidance "
                               "context; contexts do not nest")
        if k == 3 and uses_faster_cache(m):
            raise ValueError("dare_guidance: FasterCache splits the batch into [uncond; cond] halves; it cannot run "
                             "the three-branch batch of rectify_scale != 0 (use rectify_scale=0 or another cache)")
    combine_kwargs = dict(guidance_scale=guidance_scale, mode=mode, rectify_scale=rectify_scale,
                          guidance_rescale=guidance_rescale, eta=eta, norm_threshold=norm_threshold,
                          momentum=momentum, backend=backend)
    state = {"buf": None, "t": None}
    hooked = []
    try:
        for m in models:
            hooked.append(_BatchedBranches(
                pipe, m, negative=negative_prompt_embeds, negative_mask=negative_prompt_attention_mask,
                degraded=degraded_prompt_embeds, degraded_mask=degraded_prompt_attention_mask, k=k,
                combine_kwargs=combine_kwargs, state=state))
            _GUIDED.add(_unwrapped(m))
        yield pipe
    finally:
        for hb in hooked:
            hb.remove()
            _GUIDED.discard(_unwrapped(hb.model))
