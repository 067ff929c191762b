"""`apply_dare`: patch a diffusers video model's text attention with DARE (SRA) processors, reversibly.

    handle = apply_dare(pipe, strength=1.0, capture_maps=True)
    handle.set_token_weights(w)                 # [B, M] (or [M]); M = the text length the model sees
    video = pipe(prompt_embeds=..., ...).frames
    handle.maps["transformer.blocks.0.attn2"]   # [B_model, N_video, M] float32 head-averaged map
    handle.remove()                             # stock processors back, outputs bitwise as before

CFG branches. A forward's samples belong to branches: "uncond", "cond" and (DARE sampling) "degraded".
The handle learns the branch layout of each forward from, in order: ``with handle.branch(...)`` /
the DARE guiders (explicit), diffusers' ``model.cache_context(name)`` (stock Wan runs "cond" and
"uncond" as separate passes; stock LTX / CogVideoX run one "cond_uncond" pass with the negative
prompt first), else the whole batch is "cond" (a plain forward, as in training). Weights are given
per branch (``set_token_weights(w, only_cond=True)`` leaves the unconditional pass stock).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch

from ...sra import BACKENDS
from .processors import (
    DAREAttnProcessor,
    DARECogVideoXAttnProcessor,
    DARELTXAttnProcessor,
    DAREWanAttnProcessor,
)

__all__ = ["apply_dare", "DAREHandle", "SUPPORTED_MODELS", "BRANCHES"]

BRANCHES = ("uncond", "cond", "degraded")

# class name -> what gets patched (the error for an unsupported model lists these)
SUPPORTED_MODELS = {
    "WanTransformer3DModel": "Wan 2.1 / 2.2 (T2V, I2V, FLF2V): text cross-attention blocks[i].attn2",
    "LTXVideoTransformer3DModel": "LTX-Video: text cross-attention transformer_blocks[i].attn2 (with its text mask)",
    "CogVideoXTransformer3DModel": "CogVideoX 1.0 / 1.5: joint text+video transformer_blocks[i].attn1 (text keys only)",
    "UNetMotionModel": "AnimateDiff: spatial text cross-attention attn2 (motion modules untouched)",
}

_CONTEXT_LAYOUTS = {
    "cond": ("cond",),
    "uncond": ("uncond",),
    "cond_uncond": ("uncond", "cond"),  # diffusers' batched CFG: torch.cat([negative, positive])
    "degraded": ("degraded",),
}


def _supported_list() -> str:
    return "; ".join(f"{k} ({v})" for k, v in SUPPORTED_MODELS.items())


# ---------------------------------------------------------------------------------------------
# model discovery: which attention layers to patch, with which processor
# ---------------------------------------------------------------------------------------------

def _model_kind(model) -> str | None:
    from diffusers import (
        CogVideoXTransformer3DModel,
        LTXVideoTransformer3DModel,
        UNetMotionModel,
        WanTransformer3DModel,
    )

    for cls, kind in ((WanTransformer3DModel, "wan"), (LTXVideoTransformer3DModel, "ltx"),
                      (CogVideoXTransformer3DModel, "cogvideox"), (UNetMotionModel, "animatediff")):
        if isinstance(model, cls):
            return kind
    return None


def _check_processor(name: str, attn, allowed: tuple[type, ...], hint: str = "") -> None:
    proc = attn.processor
    if not isinstance(proc, allowed):
        expected = " or ".join(c.__name__ for c in allowed)
        raise TypeError(
            f"apply_dare: layer {name} uses processor {type(proc).__name__}, DARE replaces {expected} only"
            f"{hint}. Restore the stock processor (e.g. model.set_default_attn_processor()) first."
        )


def _find_layers(model, kind: str, prefix: str) -> list[tuple[str, Any, type]]:
    """[(qualified layer name, attention module, DARE processor class)] for one model."""
    layers = []
    if kind == "wan":
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        for i, block in enumerate(model.blocks):
            name = f"{prefix}blocks.{i}.attn2"
            _check_processor(name, block.attn2, (WanAttnProcessor,))
            layers.append((name, block.attn2, DAREWanAttnProcessor))
    elif kind == "ltx":
        from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

        for i, block in enumerate(model.transformer_blocks):
            name = f"{prefix}transformer_blocks.{i}.attn2"
            _check_processor(name, block.attn2, (LTXVideoAttnProcessor,))
            layers.append((name, block.attn2, DARELTXAttnProcessor))
    elif kind == "cogvideox":
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        for i, block in enumerate(model.transformer_blocks):
            name = f"{prefix}transformer_blocks.{i}.attn1"
            _check_processor(name, block.attn1, (CogVideoXAttnProcessor2_0,),
                             " (fused QKV projections: call model.unfuse_qkv_projections() first)")
            layers.append((name, block.attn1, DARECogVideoXAttnProcessor))
    elif kind == "animatediff":
        from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

        for mname, module in model.named_modules():
            parts = mname.split(".")
            if not isinstance(module, Attention) or parts[-1] != "attn2" or "motion_modules" in parts:
                continue
            if not module.is_cross_attention:
                continue
            name = prefix + mname
            _check_processor(name, module, (AttnProcessor2_0, AttnProcessor))
            layers.append((name, module, DAREAttnProcessor))
    if not layers:
        raise ValueError(f"apply_dare: found no text-conditioning attention layer to patch in {type(model).__name__}")
    return layers


def _models_of(obj) -> list[tuple[str, torch.nn.Module]]:
    """[(prefix, model)] for a supported model or a pipeline holding one (Wan 2.2: transformer and transformer_2)."""
    if isinstance(obj, torch.nn.Module):
        if _model_kind(obj) is None:
            raise TypeError(
                f"apply_dare: {type(obj).__name__} is not supported. Supported models: {_supported_list()}; "
                "or a pipeline holding one of them (WanPipeline, LTXPipeline, CogVideoXPipeline, AnimateDiffPipeline, ...)"
            )
        return [("", obj)]
    found = []
    for attr in ("transformer", "transformer_2", "unet"):
        model = getattr(obj, attr, None)
        if isinstance(model, torch.nn.Module):
            if _model_kind(model) is None:
                raise TypeError(
                    f"apply_dare: {type(obj).__name__}.{attr} is a {type(model).__name__}, which is not supported. "
                    f"Supported models: {_supported_list()}"
                )
            found.append((f"{attr}.", model))
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
        maps: {layer name: float32 [B_model, N_video, M_text]} of the latest forward (rows in the model's batch
            order; AnimateDiff rows are samples, frames unfolded into N). Keeps the autograd graph when grad is on.
        branch_maps: {"uncond" | "cond" | "degraded": {layer: map rows of that branch}} of the latest forward
            that ran each branch.
        map_grids: {layer: (frames, height, width)} of the latent token grid behind N (None when N is a
            context-parallel shard or the grid is unknown).
        layers: names of the patched layers.
        fast_path: when a forward needs neither weights (none set, or all exactly 1) nor maps, run diffusers'
            own attention call instead of sra_attention (bitwise stock output, stock speed). Default True.
    """

    def __init__(self, strength: float, capture_maps: bool, backend: str):
        self.strength = float(strength)
        self.capture_maps = bool(capture_maps)
        self.backend = backend
        self.maps: dict[str, torch.Tensor] = {}
        self.branch_maps: dict[str, dict[str, torch.Tensor]] = {}
        self.map_grids: dict[str, tuple[int, int, int] | None] = {}
        self._models: list[tuple[str, torch.nn.Module, str]] = []
        self._layers: list[tuple[str, Any, Any]] = []  # (name, attn module, original processor)
        self._hooks: list[Any] = []
        self._spec: dict[str, torch.Tensor | None] | None = None
        self._forced_layout: tuple[str, ...] | None = None
        self._context_name: str | None = None
        self._fwd: dict[str, Any] = {}  # per-forward state: batch, frames, latent grid, layout
        self._wcache: dict[tuple, torch.Tensor | None] = {}
        self._active = False
        self.fast_path = True

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
            weights: [B, M] or [M] tensor (M = the text length the patched layers attend: Wan 512 including
                padding, CogVideoX 226, LTX 128, ...); or a dict {"cond": w, "uncond": w, "degraded": w} with
                None for "unweighted". A batch of B prompts is tiled when a branch holds k·B samples.
            only_cond: apply ``weights`` to the conditional (and degraded) branch only; the unconditional
                pass stays stock.
            degraded: weights of the degraded branch (e.g. 0 on the high-density tokens, SPEC §3);
                default: the same as the conditional branch.
        From a fitted ``TokenDensity``: ``set_token_weights(density.weights(token_ids))`` (it gives padding weight 0,
        i.e. drops Wan's padding keys, which stock Wan attends; pass ``pad_id=None`` to keep them at the floor).
        """
        if isinstance(weights, dict):
            unknown = set(weights) - set(BRANCHES)
            if unknown:
                raise ValueError(f"set_token_weights: unknown branch names {sorted(unknown)}; use {BRANCHES}")
            if only_cond or degraded is not None:
                raise ValueError("set_token_weights: give only_cond / degraded only with a single weights tensor")
            spec = {b: self._check_weight(weights.get(b), f"weights[{b!r}]") for b in BRANCHES}
        else:
            w = self._check_weight(weights, "weights")
            d = self._check_weight(degraded, "degraded") if degraded is not None else w
            spec = {"cond": w, "uncond": None if only_cond else w, "degraded": d}
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

    # -- internals used by the processors ---------------------------------------------------

    @staticmethod
    def _check_weight(w, what: str):
        if w is None:
            return None
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"set_token_weights: {what} must be a torch.Tensor [B, M] or [M], got {type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"set_token_weights: {what} must be floating point, got {w.dtype}")
        if w.dim() not in (1, 2):
            raise ValueError(f"set_token_weights: {what} must be [B, M] or [M], got shape {list(w.shape)}")
        if w.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(torch.isnan(w).any()) or bool((w < 0).any()):
                raise ValueError(f"set_token_weights: {what} must be non-negative and not NaN")
        return w

    @property
    def _capturing(self) -> bool:
        return self.capture_maps

    def _layout(self, model_batch: int) -> tuple[str, ...]:
        if self._forced_layout is not None:
            return self._forced_layout
        if self._context_name in _CONTEXT_LAYOUTS:
            return _CONTEXT_LAYOUTS[self._context_name]
        return ("cond",)

    def _frames_folded(self, attn_batch: int) -> int:
        """Frames folded into an AnimateDiff attention batch (attention batch = model batch × frames)."""
        frames = self._fwd.get("frames", 1)
        model_batch = self._fwd.get("batch")
        if model_batch is not None and attn_batch == model_batch * frames:
            return frames
        return 1

    def _fit(self, w: torch.Tensor, branch: str, chunk: int, m: int, layer: str) -> torch.Tensor:
        if w.shape[-1] != m:
            hint = ""
            if ".attn2" in layer and "blocks" in layer and "transformer_blocks" not in layer:
                hint = (" (Wan pads every prompt to 512 tokens and attends the padding; give weights for all 512 "
                        "positions, e.g. 1 on the padding for stock behaviour or 0 to drop it)")
            raise ValueError(
                f"token weights have {w.shape[-1]} entries per prompt, but layer {layer} attends {m} text tokens{hint}"
            )
        if w.dim() == 1:
            return w.view(1, m).expand(chunk, m)
        b = w.shape[0]
        if b == chunk:
            return w
        if b >= 1 and chunk % b == 0:
            return w.repeat(chunk // b, 1)
        raise ValueError(
            f"token weights hold {b} prompts, but the {branch!r} branch of this forward at layer {layer} has "
            f"{chunk} samples (expected {chunk} or a divisor of it)"
        )

    def _weights_for(self, layer: str, attn_batch: int, m: int, frames: int, device, dtype):
        """[attn_batch, M] weights of this forward (None = unweighted), cached per forward."""
        if self._spec is None:
            return None
        key = (attn_batch, m, frames, device, dtype)
        if key in self._wcache:
            return self._wcache[key]
        if attn_batch % frames:
            raise ValueError(f"layer {layer}: attention batch {attn_batch} is not a multiple of {frames} frames")
        model_batch = attn_batch // frames
        layout = self._layout(model_batch)
        if model_batch % len(layout):
            raise ValueError(
                f"layer {layer}: a batch of {model_batch} cannot hold the CFG branches {layout} in equal parts"
            )
        chunk = model_batch // len(layout)
        wdtype = torch.float64 if dtype == torch.float64 else torch.float32
        parts, weighted = [], False
        for br in layout:
            w = self._spec.get(br)
            if w is None:
                parts.append(torch.ones(chunk, m, device=device, dtype=wdtype))
            else:
                weighted = True
                parts.append(self._fit(w, br, chunk, m, layer).to(device=device, dtype=wdtype))
        out = None
        if weighted:
            out = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            if frames > 1:
                out = out.repeat_interleave(frames, dim=0)
        self._wcache[key] = out
        return out

    def _record_map(self, layer: str, amap: torch.Tensor, frames: int) -> None:
        """Store [attn_batch, N, T] as [model_batch, frames·N, T]; also split it per CFG branch."""
        if frames > 1:
            ab, n, t = amap.shape
            amap = amap.reshape(ab // frames, frames * n, t)
        self.maps[layer] = amap
        self.map_grids[layer] = self._grid_for(amap.shape[1])
        layout = self._layout(amap.shape[0])
        if amap.shape[0] % len(layout) == 0:
            c = amap.shape[0] // len(layout)
            for k, br in enumerate(layout):
                self.branch_maps.setdefault(br, {})[layer] = amap[k * c:(k + 1) * c]

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

    # forward pre-hook on each patched model: the batch and the latent token grid of this forward
    def _pre_hook(self, kind: str, model, args, kwargs) -> None:
        def arg(name, idx):
            if name in kwargs:
                return kwargs[name]
            return args[idx] if len(args) > idx else None

        hs = arg("sample" if kind == "animatediff" else "hidden_states", 0)
        grid, batch, frames = None, None, 1
        if isinstance(hs, torch.Tensor):
            batch = hs.shape[0]
            cfg = model.config
            if kind == "wan" and hs.dim() == 5:
                pt, ph, pw = cfg.patch_size
                grid = (hs.shape[2] // pt, hs.shape[3] // ph, hs.shape[4] // pw)
            elif kind == "cogvideox" and hs.dim() == 5:
                p, pt = cfg.patch_size, cfg.patch_size_t or 1
                grid = (hs.shape[1] // pt, hs.shape[3] // p, hs.shape[4] // p)
            elif kind == "ltx":
                nf, h, w = arg("num_frames", 4), arg("height", 5), arg("width", 6)
                if all(isinstance(x, int) for x in (nf, h, w)):
                    grid = (nf // cfg.patch_size_t, h // cfg.patch_size, w // cfg.patch_size)
            elif kind == "animatediff" and hs.dim() == 5:
                frames = hs.shape[2]
                grid = (frames, hs.shape[3], hs.shape[4])
        self._fwd = {"batch": batch, "grid": grid, "frames": frames}
        self._wcache.clear()
        if self.capture_maps:
            self.maps = {}
            self.map_grids = {}


def apply_dare(model_or_pipeline, *, strength: float = 1.0, capture_maps: bool = False,
               backend: str = "auto") -> DAREHandle:
    """Patch the text-conditioning attention of a diffusers video model (or pipeline) with SRA attention.

    Args:
        model_or_pipeline: WanTransformer3DModel, LTXVideoTransformer3DModel, CogVideoXTransformer3DModel,
            UNetMotionModel, or a pipeline holding one (``.transformer`` / ``.transformer_2`` / ``.unet``).
        strength: γ >= 0 of the bias γ·log w_j.
        capture_maps: record head-averaged text attention maps (float32 [B, N_video, M]) per layer each forward.
        backend: sra_attention backend.

    Returns:
        A :class:`DAREHandle`; ``handle.remove()`` (or leaving ``with apply_dare(...) as h:``) restores the
        stock processors exactly. Applying twice to one model raises RuntimeError.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ValueError(f"apply_dare: strength must be a finite number >= 0, got {strength!r}")
    if backend not in BACKENDS:
        raise ValueError(f"apply_dare: backend must be one of {BACKENDS}, got {backend!r}")
    models = _models_of(model_or_pipeline)
    for prefix, model in models:
        if model.__dict__.get("_dare_handle") is not None:
            raise RuntimeError(
                f"apply_dare: {type(model).__name__} is already patched by {model.__dict__['_dare_handle']!r}; "
                "call handle.remove() before applying DARE again"
            )
    # discover everything before touching anything, so an error leaves the model as it was
    plan = [(prefix, model, _model_kind(model), _find_layers(model, _model_kind(model), prefix))
            for prefix, model in models]

    handle = DAREHandle(strength, capture_maps, backend)
    for prefix, model, kind, layers in plan:
        handle._models.append((prefix, model, kind))
        for name, attn, proc_cls in layers:
            original = attn.processor
            attn.processor = proc_cls(handle, name, original)
            handle._layers.append((name, attn, original))
        handle._hooks.append(model.register_forward_pre_hook(
            lambda mod, args, kwargs, _kind=kind: handle._pre_hook(_kind, mod, args, kwargs), with_kwargs=True))
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
