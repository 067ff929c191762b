"""`apply_dare`: patch a diffusers video model's text attention with DARE (SRA) processors, reversibly.

    handle = apply_dare(pipe, strength=1.0, capture_maps=True)
    handle.set_token_weights(w)                 # [B, M] (or [M]); M = the text length the model sees
    video = pipe(prompt_embeds=..., ...).frames
    handle.maps["transformer.blocks.0.attn2"]   # [B_model, N_video, M] float32 head-averaged map
    handle.remove()                             # stock processors back, outputs bitwise as before

CFG branches. A forward's samples belong to branches: "uncond", "cond" and (DARE sampling) "degraded".
The handle learns the branch layout of each forward from, in order: ``with handle.branch(...)`` /
the DARE guiders (explicit), diffusers' ``model.cache_context(name)`` (stock Wan / HunyuanVideo run
"cond" and "uncond" as separate passes; stock LTX / CogVideoX run one "cond_uncond" pass with the
negative prompt first), the batched [uncond; cond] pass of a pipeline without cache_context
(AnimateDiff; apply_dare must be given the pipeline), else the whole batch is "cond" (a plain forward,
as in training). Weights are given per branch (``set_token_weights(w, only_cond=True)`` leaves the
unconditional pass stock).

The supported models are the entries of ``models.MODEL_TABLE``.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Iterator

import torch

from ...sra import BACKENDS
from .models import SUPPORTED_MODELS, ForwardInfo, ModelEntry, entry_for
from .weights import check_batch, check_length, check_weight, fit_weight

__all__ = ["apply_dare", "DAREHandle", "SUPPORTED_MODELS", "BRANCHES"]

BRANCHES = ("uncond", "cond", "degraded")

_CONTEXT_LAYOUTS = {
    "cond": ("cond",),
    "uncond": ("uncond",),
    "cond_uncond": ("uncond", "cond"),  # diffusers' batched CFG: torch.cat([negative, positive])
    "degraded": ("degraded",),
}


def _supported_list() -> str:
    return "; ".join(f"{k} ({v})" for k, v in SUPPORTED_MODELS.items())


# ---------------------------------------------------------------------------------------------
# model discovery: which attention layers to patch, with which processor (the table in models.py)
# ---------------------------------------------------------------------------------------------

def _find_layers(model, entry: ModelEntry, prefix: str) -> list[tuple[str, Any, type]]:
    """[(qualified layer name, attention module, DARE processor class)] for one model; refuses replaced processors."""
    allowed = entry.stock_processors()
    layers = []
    for rel_name, attn in entry.find_layers(model):
        name = prefix + rel_name
        proc = attn.processor
        if not isinstance(proc, allowed):
            expected = " or ".join(c.__name__ for c in allowed)
            raise TypeError(
                f"apply_dare: layer {name} uses processor {type(proc).__name__}, DARE replaces {expected} only"
                f"{entry.refuse_hint}. Restore the stock processor (e.g. model.set_default_attn_processor()) first."
            )
        layers.append((name, attn, entry.dare_processor))
    if not layers:
        raise ValueError(f"apply_dare: found no text-conditioning attention layer to patch in {type(model).__name__}")
    return layers


def uses_faster_cache(model: torch.nn.Module) -> bool:
    """Whether diffusers' FasterCache is enabled on ``model`` (it splits the batch into [uncond; cond] halves
    and on some steps runs the cond half alone). diffusers keeps the cache config in a private attribute."""
    return type(getattr(_uncompiled(model), "_cache_config", None)).__name__ == "FasterCacheConfig"


def _uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a ``torch.compile(model)`` wrapper (patched in place; the wrapper recompiles on its guards)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _supported(model: torch.nn.Module, where: str | None = None) -> tuple[torch.nn.Module, ModelEntry]:
    """(the model under any torch.compile wrapper, its table entry); a TypeError listing the supported models
    when it has none. ``where``: the pipeline attribute holding it ("WanPipeline.transformer"), for the message."""
    model = _uncompiled(model)
    entry = entry_for(model)
    if entry is not None:
        return model, entry
    name = type(model).__name__
    if where is None:
        raise TypeError(
            f"apply_dare: {name} is not supported. Supported models: {_supported_list()}; "
            "or a pipeline holding one of them (WanPipeline, LTXPipeline, CogVideoXPipeline, "
            "HunyuanVideoPipeline, AnimateDiffPipeline, ...)"
        )
    raise TypeError(f"apply_dare: {where} is a {name}, which is not supported. Supported models: {_supported_list()}")


def _models_of(obj) -> list[tuple[str, torch.nn.Module, ModelEntry]]:
    """[(prefix, model, entry)] for a supported model or a pipeline holding one (Wan 2.2 A14B: two experts)."""
    if isinstance(obj, torch.nn.Module):
        return [("", *_supported(obj))]
    found = []
    for attr in ("transformer", "transformer_2", "unet"):
        model = getattr(obj, attr, None)
        if isinstance(model, torch.nn.Module):
            found.append((f"{attr}.", *_supported(model, f"{type(obj).__name__}.{attr}")))
    if not found:
        raise TypeError(
            f"apply_dare: expected a diffusers model or pipeline, got {type(obj).__name__}. "
            f"Supported models: {_supported_list()}"
        )
    return found


# ---------------------------------------------------------------------------------------------
# the handle
# ---------------------------------------------------------------------------------------------

class DAREHandle:
    """What `apply_dare` returns: token weights in, captured maps out, `remove()` to undo.

    Attributes:
        strength: γ of SRA attention (bias γ·log w_j); may be changed between forwards.
        backend: sra_attention backend ("auto", "cpu", "triton", "cuda", "reference").
        capture_maps: record the head-averaged maps of every patched layer on each forward.
        joint_renormalize: in joint text+video attention (CogVideoX, HunyuanVideo) rescale each sample's text
            weights so that mean(w^γ) over its valid text keys is 1 (SPEC §1), so the weights redistribute
            attention among the text tokens; False = the raw weights. Cross-attention models ignore it (their
            softmax is over text keys only, where a common factor changes nothing). Default True.
        maps: {layer name: float32 [B_model, N_video, M_text]} of the latest forward (rows in the model's batch
            order; AnimateDiff rows are samples, frames unfolded into N). Keeps the autograd graph when grad is on.
        branch_maps: {"uncond" | "cond" | "degraded": {layer: map rows of that branch}} of the latest forward
            that ran each branch.
        map_grids: {layer: (frames, height, width)} of the latent token grid behind N (None when N is a
            context-parallel shard or the grid is unknown).
        layers: names of the patched layers.
        text_len: the text length the patched models fix (Wan I2V 512; CogVideoX with learned positions its
            ``max_text_seq_length``), checked when weights are set; None = any length (Wan T2V, LTX,
            HunyuanVideo, AnimateDiff): checked at each forward against the text the layer attends.
        fast_path: when a forward needs neither weights (none set, or all exactly 1) nor maps, run diffusers'
            own attention call instead of sra_attention (bitwise stock output, stock speed). Default True.

    Processor interface (what the DARE processors call; also for custom processors): ``token_weights``,
    ``record_map``, ``frames_folded``, ``current_layout`` and the attributes above.
    """

    def __init__(self, strength: float, capture_maps: bool, backend: str, joint_renormalize: bool = True,
                 text_len: int | None = None):
        self.strength = float(strength)
        self.capture_maps = bool(capture_maps)
        self.backend = backend
        self.joint_renormalize = bool(joint_renormalize)
        self.text_len = text_len
        self.maps: dict[str, torch.Tensor] = {}
        self.branch_maps: dict[str, dict[str, torch.Tensor]] = {}
        self.map_grids: dict[str, tuple[int, int, int] | None] = {}
        self.fast_path = True
        self._models: list[tuple[str, torch.nn.Module, ModelEntry]] = []
        self._layers: list[tuple[str, Any, Any]] = []  # (name, attn module, original processor)
        self._length_hint = ""  # appended to a wrong-length error (Wan's padding)
        self._hooks: list[Any] = []
        self._pipeline: weakref.ref | None = None  # the pipeline given to apply_dare (batched-CFG layout)
        self._spec: dict[str, torch.Tensor | None] | None = None  # per-branch weights, None = unweighted
        self._shapes: dict[str, tuple[int | None, int] | None] = {}  # per-branch (prompts, M), all-ones included
        self._forced_layout: tuple[str, ...] | None = None  # with handle.branch(...) / the DARE guiders
        self._context_name: str | None = None  # the model's cache_context name
        self._fwd: dict[str, Any] = {}  # per-forward state: batch, frames, latent grid, batched CFG
        self._wcache: dict[tuple, torch.Tensor | None] = {}
        self._active = False

    # -- public API -------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        return [name for name, _, _ in self._layers]

    @property
    def active(self) -> bool:
        return self._active

    def set_token_weights(self, weights=None, *, only_cond: bool = False, degraded=None) -> "DAREHandle":
        """Set the per-text-token weights w (w >= 0; 0 drops a token; None = stock attention).

        Args:
            weights: [B, M] or [M] tensor (M = the text length the patched layers attend: for Wan the encoded
                prompt including padding, 512 with WanPipeline's default max_sequence_length; CogVideoX 226,
                HunyuanVideo 256, LTX 128, AnimateDiff 77, ...); or a dict
                {"cond": w, "uncond": w, "degraded": w} with None for "unweighted". A batch of B prompts is tiled
                when a branch holds k·B samples.
            only_cond: apply ``weights`` to the conditional (and degraded) branch only; the unconditional
                pass stays stock.
            degraded: weights of the degraded branch (e.g. 0 on the high-density tokens, SPEC §3);
                default: the same as the conditional branch.
        Checked here, whatever the values (all ones too): type, rank, values (NaN, negative, infinite) and the
        length M against ``text_len`` where the model fixes it; the batch against each forward's branches.
        From a fitted ``TokenDensity``: ``set_token_weights(density.weights(token_ids))`` (it gives padding weight 0,
        i.e. drops Wan's padding keys, which stock Wan attends; pass ``pad_id=None`` to keep them at the floor).
        """
        if isinstance(weights, dict):
            unknown = set(weights) - set(BRANCHES)
            if unknown:
                raise ValueError(f"set_token_weights: unknown branch names {sorted(unknown)}; use {BRANCHES}")
            if only_cond or degraded is not None:
                raise ValueError("set_token_weights: give only_cond / degraded only with a single weights tensor")
            spec = {b: check_weight(weights.get(b), f"weights[{b!r}]") for b in BRANCHES}
        else:
            w = check_weight(weights, "weights")
            d = check_weight(degraded, "degraded") if degraded is not None else w
            spec = {"cond": w, "uncond": None if only_cond else w, "degraded": d}
        if self.text_len is not None and self._layers:
            for v in spec.values():
                if v is not None:
                    check_length(v.shape[-1], self.text_len, self._layers[0][0], self._length_hint)
        # the shapes are kept for the per-forward batch check, whatever the values
        self._shapes = {b: None if v is None else (v.shape[0] if v.dim() == 2 else None, v.shape[-1])
                        for b, v in spec.items()}
        # all-ones weights change nothing (SPEC §1): drop them so the fast path can run (one check, here)
        spec = {b: (None if v is not None and bool((v == 1).all()) else v) for b, v in spec.items()}
        self._spec = None if all(v is None for v in spec.values()) else spec
        self._wcache.clear()
        return self

    def clear_token_weights(self) -> "DAREHandle":
        """Back to unweighted attention (the patch stays on)."""
        return self.set_token_weights(None)

    @contextlib.contextmanager
    def branch(self, *layout: str) -> Iterator["DAREHandle"]:
        """Declare the CFG branches of the forwards inside: ``with handle.branch("uncond"): model(...)``,
        or ``handle.branch("uncond", "cond", "degraded")`` for a batch stacking those branches in that order."""
        if not layout or any(b not in BRANCHES for b in layout):
            raise ValueError(f"branch(): give one or more of {BRANCHES}, got {layout}")
        prev = self._forced_layout
        self._forced_layout = tuple(layout)
        self._wcache.clear()
        try:
            yield self
        finally:
            self._forced_layout = prev
            self._wcache.clear()

    def reset_maps(self) -> None:
        """Drop the captured maps."""
        self.maps = {}
        self.branch_maps = {}
        self.map_grids = {}

    def remove(self) -> None:
        """Restore the stock processors (and everything else apply_dare touched). Idempotent."""
        if not self._active:
            return
        for name, attn, original in self._layers:
            current = attn.processor
            # carry over what set_attention_backend / enable_parallelism recorded while patched
            for attr in ("_attention_backend", "_parallel_config"):
                if hasattr(original, attr) and hasattr(current, attr):
                    setattr(original, attr, getattr(current, attr))
            attn.processor = original
        for h in self._hooks:
            h.remove()
        for _, model, _ in self._models:
            if "cache_context" in model.__dict__:
                del model.__dict__["cache_context"]
            if model.__dict__.get("_dare_handle") is self:
                del model.__dict__["_dare_handle"]
        self._hooks = []
        self._active = False

    def __enter__(self) -> "DAREHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"DAREHandle({len(self._layers)} layers, strength={self.strength}, capture_maps={self.capture_maps}, "
                f"backend={self.backend!r}, active={self._active})")

    # -- processor interface ----------------------------------------------------------------

    def current_layout(self) -> tuple[str, ...]:
        """The CFG branches stacked along the batch of the running forward, in batch order.

        From, in order: ``with handle.branch(...)`` / the DARE guiders; the model's ``cache_context`` name; a
        batched [uncond; cond] forward of the pipeline given to apply_dare (AnimateDiff: the pipeline says
        ``do_classifier_free_guidance`` and the batch is two copies of one latent batch); else ("cond",).
        """
        if self._forced_layout is not None:
            return self._forced_layout
        if self._context_name in _CONTEXT_LAYOUTS:
            return _CONTEXT_LAYOUTS[self._context_name]
        if self._fwd.get("cfg_batched"):
            return ("uncond", "cond")
        return ("cond",)

    def _layout(self, model_batch: int | None = None) -> tuple[str, ...]:
        """Former private name of :meth:`current_layout` (tests/test_diffusers_guidance.py reads it)."""
        return self.current_layout()

    def frames_folded(self, attn_batch: int) -> int:
        """Frames folded into an AnimateDiff attention batch (attention batch = model batch × frames), else 1."""
        frames = self._fwd.get("frames", 1)
        model_batch = self._fwd.get("batch")
        if model_batch is not None and attn_batch == model_batch * frames:
            return frames
        return 1

    def token_weights(self, layer: str, attn_batch: int, m: int, *, frames: int = 1, device=None,
                      dtype=torch.float32) -> torch.Tensor | None:
        """[attn_batch, M] weights of this forward at ``layer`` (None = unweighted), cached per forward.

        Rows follow ``current_layout()``; a branch without weights gets ones; ``frames`` > 1 repeats each sample's
        row per frame (AnimateDiff). Float64 for float64 queries, else float32. Raises ValueError when the weights
        set do not fit this forward (length, prompts per branch), all-ones weights included.
        """
        if self._spec is None and not any(self._shapes.values()):
            return None
        key = (attn_batch, m, frames, device, dtype)
        if key in self._wcache:
            return self._wcache[key]
        if attn_batch % frames:
            raise ValueError(f"layer {layer}: attention batch {attn_batch} is not a multiple of {frames} frames")
        model_batch = attn_batch // frames
        layout = self.current_layout()
        if model_batch % len(layout):
            raise ValueError(
                f"layer {layer}: a batch of {model_batch} cannot hold the CFG branches {layout} in equal parts"
            )
        chunk = model_batch // len(layout)
        for br in layout:  # shape checks whatever the values (all-ones weights run the fast path)
            shape = self._shapes.get(br)
            if shape is not None:
                check_length(shape[1], m, layer, self._length_hint)
                check_batch(shape[0], br, chunk, layer)
        out = None
        if self._spec is not None and any(self._spec.get(br) is not None for br in layout):
            wdtype = torch.float64 if dtype == torch.float64 else torch.float32
            parts = []
            for br in layout:
                w = self._spec.get(br)
                if w is None:
                    parts.append(torch.ones(chunk, m, device=device, dtype=wdtype))
                else:
                    parts.append(fit_weight(w, br, chunk, m, layer).to(device=device, dtype=wdtype))
            out = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            if frames > 1:
                out = out.repeat_interleave(frames, dim=0)
        self._wcache[key] = out
        return out

    def record_map(self, layer: str, amap: torch.Tensor, *, frames: int = 1) -> None:
        """Store a layer's map [attn_batch, N, T] as [model_batch, frames·N, T]; also split it per CFG branch."""
        if frames > 1:
            ab, n, t = amap.shape
            amap = amap.reshape(ab // frames, frames * n, t)
        self.maps[layer] = amap
        self.map_grids[layer] = self._grid_for(amap.shape[1])
        layout = self.current_layout()
        if amap.shape[0] % len(layout) == 0:
            c = amap.shape[0] // len(layout)
            for k, br in enumerate(layout):
                self.branch_maps.setdefault(br, {})[layer] = amap[k * c:(k + 1) * c]

    # -- internals --------------------------------------------------------------------------

    def _grid_for(self, n: int):
        grid = self._fwd.get("grid")
        if grid is None:
            return None
        f, h, w = grid
        if f * h * w == n:
            return (f, h, w)
        # a lower-resolution UNet level: same aspect ratio, downsampled by 2^k
        for k in range(1, 8):
            s = 2 ** k
            hh, ww = math.ceil(h / s), math.ceil(w / s)
            if f * hh * ww == n:
                return (f, hh, ww)
        return None

    def _batched_cfg(self, info: ForwardInfo) -> bool:
        """Whether this forward is a pipeline's batched [uncond; cond] CFG pass that no cache_context names.

        AnimateDiff pipelines run torch.cat([negative, positive]) prompts on torch.cat([latents] * 2) in one UNet
        call. The pipeline's public ``do_classifier_free_guidance`` (set from guidance_scale at the start of each
        call) says CFG is on; the two equal halves of the latent batch confirm this call is its CFG pass (and not
        a later direct call to the model, when the pipeline's flag is stale).
        """
        if self._forced_layout is not None or self._context_name is not None or self._pipeline is None:
            return False
        pipe = self._pipeline()
        try:
            cfg = pipe is not None and bool(pipe.do_classifier_free_guidance)
        except Exception:  # before the pipeline's first call its guidance state is unset
            return False
        sample = info.sample
        if not cfg or sample is None or sample.shape[0] % 2:
            return False
        if torch.compiler.is_compiling():
            return True  # a data-dependent check would break the graph: trust the pipeline's state
        half = sample.shape[0] // 2
        return bool(torch.equal(sample[:half], sample[half:]))

    # forward pre-hook on each patched model: the batch, latent token grid and CFG layout of this forward
    def _pre_hook(self, entry: ModelEntry, model, args, kwargs) -> None:
        if self._spec is not None and self._spec["uncond"] is not self._spec["cond"] and uses_faster_cache(model):
            raise ValueError(
                f"{type(model).__name__}: FasterCache runs the conditional half of the batch alone on the steps where "
                "it reuses the unconditional prediction, so per-branch token weights (only_cond=True or a dict) "
                "cannot be applied right there; give every branch the same weights or use another cache")
        info = entry.forward_info(model, args, kwargs)
        self._fwd = {"batch": info.batch, "grid": info.grid, "frames": info.frames,
                     "cfg_batched": self._batched_cfg(info)}
        self._wcache.clear()
        if self.capture_maps:
            self.maps = {}
            self.map_grids = {}


def apply_dare(model_or_pipeline, *, strength: float = 1.0, capture_maps: bool = False,
               backend: str = "auto", joint_renormalize: bool = True, text_len: int | None = None) -> DAREHandle:
    """Patch the text-conditioning attention of a diffusers video model (or pipeline) with SRA attention.

    Args:
        model_or_pipeline: a model of ``SUPPORTED_MODELS`` (WanTransformer3DModel, LTXVideoTransformer3DModel,
            CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel, UNetMotionModel), or a pipeline holding
            them (``.transformer`` / ``.transformer_2`` / ``.unet``; one handle patches both Wan 2.2 experts).
            Give the pipeline for AnimateDiff: its batched [uncond; cond] CFG pass is recognised from it.
        strength: γ >= 0 of the bias γ·log w_j.
        capture_maps: record head-averaged text attention maps (float32 [B, N_video, M]) per layer each forward.
        backend: sra_attention backend.
        joint_renormalize: joint-attention models only (CogVideoX, HunyuanVideo): renormalise each sample's text
            weights so that mean(w^γ) over its valid text keys is 1 (default); False = the raw weights.
        text_len: the text length the weights must have, checked when they are set (default: the model's own
            where it fixes one, e.g. 512 for Wan I2V; otherwise None and each forward checks the weights against
            the text length its layers attend). Give it to catch a wrong length before the first forward.

    Returns:
        A :class:`DAREHandle`; ``handle.remove()`` (or leaving ``with apply_dare(...) as h:``) restores the
        stock processors exactly. Applying twice to one model raises RuntimeError.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ValueError(f"apply_dare: strength must be a finite number >= 0, got {strength!r}")
    if backend not in BACKENDS:
        raise ValueError(f"apply_dare: backend must be one of {BACKENDS}, got {backend!r}")
    if text_len is not None and (isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1):
        raise ValueError(f"apply_dare: text_len must be a positive int or None, got {text_len!r}")
    models = _models_of(model_or_pipeline)
    for prefix, model, _ in models:
        if model.__dict__.get("_dare_handle") is not None:
            raise RuntimeError(
                f"apply_dare: {type(model).__name__} is already patched by {model.__dict__['_dare_handle']!r}; "
                "call handle.remove() before applying DARE again"
            )
    # discover everything before touching anything, so an error leaves the model as it was
    plan = [(prefix, model, entry, _find_layers(model, entry, prefix)) for prefix, model, entry in models]
    if text_len is None:
        fixed = {entry.text_len(model) for _, model, entry in models}
        text_len = fixed.pop() if len(fixed) == 1 else None

    handle = DAREHandle(strength, capture_maps, backend, joint_renormalize, text_len)
    handle._length_hint = next((e.length_hint for _, _, e in models if e.length_hint), "")
    if not isinstance(model_or_pipeline, torch.nn.Module):
        handle._pipeline = weakref.ref(model_or_pipeline)
    for prefix, model, entry, layers in plan:
        handle._models.append((prefix, model, entry))
        for name, attn, proc_cls in layers:
            original = attn.processor
            attn.processor = proc_cls(handle, name, original)
            handle._layers.append((name, attn, original))
        handle._hooks.append(model.register_forward_pre_hook(
            lambda mod, args, kwargs, _entry=entry: handle._pre_hook(_entry, mod, args, kwargs), with_kwargs=True))
        if hasattr(model, "cache_context"):
            model.__dict__["cache_context"] = _context_tracker(handle, model.cache_context)
        model.__dict__["_dare_handle"] = handle
    handle._active = True
    return handle


def _context_tracker(handle: DAREHandle, original_cache_context):
    """Wrap ``model.cache_context`` so the handle knows which CFG branch a stock pipeline is running."""

    @contextlib.contextmanager
    def cache_context(name, *args, **kwargs):
        prev = handle._context_name
        handle._context_name = name
        handle._wcache.clear()
        try:
            with original_cache_context(name, *args, **kwargs):
                yield
        finally:
            handle._context_name = prev
            handle._wcache.clear()

    return cache_context
