"""The table of diffusers models `apply_dare` supports: one :class:`ModelEntry` per model class.

An entry says everything the patch needs to know about a model class:

* ``find_layers(model)``: the text-conditioning attention layers, as (name inside the model, module);
* ``stock_processors()``: the diffusers processor classes DARE replaces there (anything else is refused);
* ``dare_processor``: the DARE processor class installed instead (``processors.py`` / ``joint.py``);
* ``forward_info(model, args, kwargs)``: the model batch, the latent token grid (frames, height, width)
  behind the video tokens and the frames folded into attention batches, read from the forward's inputs;
* ``text_len(model)``: the text length the model itself fixes (weights of another length are refused when
  set), or None when any prompt length runs (then the length is checked at each forward against the text
  the layer attends); never a pipeline default the model does not enforce;
* ``length_hint`` / ``refuse_hint``: what the errors for wrong-length weights / a replaced processor add;
* ``joint``: text keys sit beside video keys in one softmax (joint attention), so the per-sample joint
  renormalisation of the weights applies (SPEC §1).

Adding a model = one entry here plus, when its stock processor differs from the existing ones, one
DARE processor (see ``_DAREProcessorBase``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch

from .joint import DARECogVideoXAttnProcessor, DAREHunyuanVideoAttnProcessor
from .processors import DAREAttnProcessor, DARELTXAttnProcessor, DAREWanAttnProcessor
from .weights import WAN_PADDING_HINT

__all__ = ["ModelEntry", "MODEL_TABLE", "ForwardInfo", "entry_for", "SUPPORTED_MODELS"]


@dataclasses.dataclass(frozen=True)
class ForwardInfo:
    """What a model's forward inputs say: batch (None = unknown), latent grid (F, H, W) or None, frames folded."""

    batch: int | None = None
    grid: tuple[int, int, int] | None = None
    frames: int = 1
    sample: torch.Tensor | None = None  # the latent input itself (for the batched-CFG check of the layout)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One supported diffusers model class (see the module docstring for the fields)."""

    class_name: str
    module: str  # where diffusers defines ``class_name`` (imported lazily)
    description: str
    find_layers: Callable[[Any], list[tuple[str, Any]]]
    stock_processors: Callable[[], tuple[type, ...]]
    dare_processor: type
    forward_info: Callable[[Any, tuple, dict], ForwardInfo]
    text_len: Callable[[Any], int | None]
    joint: bool = False
    refuse_hint: str = ""  # appended to the error for a replaced processor
    length_hint: str = ""  # appended to the error for weights of the wrong length

    def model_class(self) -> type | None:
        try:
            return getattr(importlib.import_module(self.module), self.class_name)
        except (ImportError, AttributeError):  # an older diffusers without this model
            return None


def _arg(args: tuple, kwargs: dict, name: str, idx: int):
    if name in kwargs:
        return kwargs[name]
    return args[idx] if len(args) > idx else None


def _sample_info(args, kwargs, name: str = "hidden_states") -> tuple[torch.Tensor | None, int | None]:
    hs = _arg(args, kwargs, name, 0)
    if not isinstance(hs, torch.Tensor):
        return None, None
    return hs, hs.shape[0]


# ---------------------------------------------------------------------------------------------
# layer finders
# ---------------------------------------------------------------------------------------------

def _blocks_attr(blocks_attr: str, attn_attr: str):
    def find(model):
        return [(f"{blocks_attr}.{i}.{attn_attr}", getattr(block, attn_attr))
                for i, block in enumerate(getattr(model, blocks_attr))]
    return find


def _hunyuan_layers(model):
    return (_blocks_attr("transformer_blocks", "attn")(model)
            + _blocks_attr("single_transformer_blocks", "attn")(model))


def _unet_cross_attention_layers(model):
    """Spatial text cross-attention ``attn2`` of a UNet (motion modules' temporal attention left alone)."""
    from diffusers.models.attention_processor import Attention

    layers = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, Attention) and parts[-1] == "attn2" and "motion_modules" not in parts \
                and module.is_cross_attention:
            layers.append((name, module))
    return layers


# ---------------------------------------------------------------------------------------------
# stock processors (imported only when a model of that kind is patched)
# ---------------------------------------------------------------------------------------------

def _stock(module: str, *names: str):
    def classes():
        mod = importlib.import_module(module)
        return tuple(getattr(mod, n) for n in names)
    return classes


# ---------------------------------------------------------------------------------------------
# forward info: batch, latent grid, frames
# ---------------------------------------------------------------------------------------------

def _wan_info(model, args, kwargs) -> ForwardInfo:
    hs, batch = _sample_info(args, kwargs)
    grid = None
    if hs is not None and hs.dim() == 5:
        pt, ph, pw = model.config.patch_size
        grid = (hs.shape[2] // pt, hs.shape[3] // ph, hs.shape[4] // pw)
    return ForwardInfo(batch, grid, 1, hs)


def _ltx_info(model, args, kwargs) -> ForwardInfo:
    hs, batch = _sample_info(args, kwargs)
    cfg = model.config
    nf, h, w = _arg(args, kwargs, "num_frames", 4), _arg(args, kwargs, "height", 5), _arg(args, kwargs, "width", 6)
    grid = None
    if all(isinstance(x, int) for x in (nf, h, w)):
        grid = (nf // cfg.patch_size_t, h // cfg.patch_size, w // cfg.patch_size)
    return ForwardInfo(batch, grid, 1, hs)


def _cogvideox_info(model, args, kwargs) -> ForwardInfo:
    hs, batch = _sample_info(args, kwargs)  # [B, F, C, H, W]
    grid = None
    if hs is not None and hs.dim() == 5:
        p, pt = model.config.patch_size, model.config.patch_size_t or 1
        grid = (hs.shape[1] // pt, hs.shape[3] // p, hs.shape[4] // p)
    return ForwardInfo(batch, grid, 1, hs)


def _hunyuan_info(model, args, kwargs) -> ForwardInfo:
    hs, batch = _sample_info(args, kwargs)  # [B, C, F, H, W]
    grid = None
    if hs is not None and hs.dim() == 5:
        p, pt = model.config.patch_size, model.config.patch_size_t
        grid = (hs.shape[2] // pt, hs.shape[3] // p, hs.shape[4] // p)
    return ForwardInfo(batch, grid, 1, hs)


def _unet_motion_info(model, args, kwargs) -> ForwardInfo:
    hs, batch = _sample_info(args, kwargs, "sample")  # [B, C, F, H, W]; attention batches are B·F
    if hs is None or hs.dim() != 5:
        return ForwardInfo(batch, None, 1, hs)
    frames = hs.shape[2]
    return ForwardInfo(batch, (frames, hs.shape[3], hs.shape[4]), frames, hs)


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

def _any_length(model):
    return None


def _wan_text_len(model):
    # T2V cross-attention attends whatever text length it is given (WanPipeline's max_sequence_length,
    # shorter encodings in training): checked per forward against what the layer sees. I2V (added K/V
    # projections) is different: diffusers' own processor splits the context as [image tokens; 512 text
    # tokens], so there the model fixes 512.
    return 512 if getattr(model.config, "added_kv_proj_dim", None) is not None else None


def _cogvideox_text_len(model):
    # learned / sincos positions cover exactly max_text_seq_length text tokens; with RoPE (5B, 1.5) any length runs
    return None if model.config.use_rotary_positional_embeddings else int(model.config.max_text_seq_length)


MODEL_TABLE: tuple[ModelEntry, ...] = (
    ModelEntry(
        class_name="WanTransformer3DModel", module="diffusers",
        description="Wan 2.1 / 2.2 (T2V, I2V, FLF2V, TI2V; A14B: transformer and transformer_2): "
                    "text cross-attention blocks[i].attn2",
        find_layers=_blocks_attr("blocks", "attn2"),
        stock_processors=_stock("diffusers.models.transformers.transformer_wan", "WanAttnProcessor"),
        dare_processor=DAREWanAttnProcessor, forward_info=_wan_info,
        text_len=_wan_text_len, length_hint=WAN_PADDING_HINT,
    ),
    ModelEntry(
        class_name="LTXVideoTransformer3DModel", module="diffusers",
        description="LTX-Video: text cross-attention transformer_blocks[i].attn2 (with its text mask)",
        find_layers=_blocks_attr("transformer_blocks", "attn2"),
        stock_processors=_stock("diffusers.models.transformers.transformer_ltx", "LTXVideoAttnProcessor"),
        dare_processor=DARELTXAttnProcessor, forward_info=_ltx_info, text_len=_any_length,
    ),
    ModelEntry(
        class_name="CogVideoXTransformer3DModel", module="diffusers",
        description="CogVideoX 1.0 / 1.5: joint text+video transformer_blocks[i].attn1 (text keys only)",
        find_layers=_blocks_attr("transformer_blocks", "attn1"),
        stock_processors=_stock("diffusers.models.attention_processor", "CogVideoXAttnProcessor2_0"),
        dare_processor=DARECogVideoXAttnProcessor, forward_info=_cogvideox_info, text_len=_cogvideox_text_len,
        joint=True, refuse_hint=" (fused QKV projections: call model.unfuse_qkv_projections() first)",
    ),
    ModelEntry(
        class_name="HunyuanVideoTransformer3DModel", module="diffusers",
        description="HunyuanVideo: joint text+video attention of the dual-stream transformer_blocks[i].attn and "
                    "single-stream single_transformer_blocks[i].attn (text keys only, with its text mask)",
        find_layers=_hunyuan_layers,
        stock_processors=_stock("diffusers.models.transformers.transformer_hunyuan_video",
                                "HunyuanVideoAttnProcessor2_0"),
        dare_processor=DAREHunyuanVideoAttnProcessor, forward_info=_hunyuan_info, text_len=_any_length,
        joint=True,
    ),
    ModelEntry(
        class_name="UNetMotionModel", module="diffusers",
        description="AnimateDiff: spatial text cross-attention attn2 (motion modules untouched)",
        find_layers=_unet_cross_attention_layers,
        stock_processors=_stock("diffusers.models.attention_processor", "AttnProcessor2_0", "AttnProcessor"),
        dare_processor=DAREAttnProcessor, forward_info=_unet_motion_info, text_len=_any_length,
    ),
)

# class name -> what gets patched (the error for an unsupported model lists these)
SUPPORTED_MODELS = {e.class_name: e.description for e in MODEL_TABLE}


def entry_for(model) -> ModelEntry | None:
    """The table entry of a model instance (subclasses included), or None."""
    for entry in MODEL_TABLE:
        cls = entry.model_class()
        if cls is not None and isinstance(model, cls):
            return entry
    return None
