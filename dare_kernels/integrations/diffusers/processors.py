"""DARE attention processors for diffusers' text-conditioning attention layers.

Each processor reproduces the stock diffusers processor of its model step for step, except that the
text attention runs through :func:`dare_kernels.sra_attention` (SPEC §1): the per-token weights of
the owning :class:`~dare_kernels.integrations.diffusers.DAREHandle` become the bias γ·log w_j, and the
head-averaged map over the text keys is captured in the same pass when the handle asks for it.

Layout notes (what each processor sees):
- Wan ``blocks[i].attn2``: query [B, N, C] video, text [B, M, C] (M = the encoded prompt length, 512 after WanPipeline's padding);
  I2V / FLF2V models prepend the image tokens, which keep their own unweighted softmax exactly as
  diffusers computes it (``dispatch_attention_fn``), added to the text attention output.
- LTX-Video ``transformer_blocks[i].attn2``: text mask arrives as an additive bias [B, 1, M]
  (0 = attend, -10000 = padding); it becomes ``key_padding_mask``.
- Joint text+video attention (CogVideoX, HunyuanVideo): see ``joint.py``.
- AnimateDiff (UNetMotionModel) spatial ``attn2``: batch is B·F (frames folded into the batch).
"""

from __future__ import annotations

import torch

from ...sra import sra_attention
from .weights import renormalize_joint

__all__ = [
    "DAREWanAttnProcessor",
    "DARELTXAttnProcessor",
    "DAREAttnProcessor",
    "project_qkv",
    "project_out",
]


def _key_padding_from_bias(mask: torch.Tensor, batch: int, m: int, layer: str) -> torch.Tensor:
    """Bool key-padding mask [B, M] (True = attend) from a diffusers text mask (bool, or additive 0 / -10000)."""
    if mask.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 2 or tuple(mask.shape) != (batch, m):
        raise ValueError(
            f"DARE ({layer}): the text attention mask must be per key, [B, M] or [B, 1, M] = "
            f"[{batch}, (1,) {m}], got {list(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return mask
    if not torch.compiler.is_compiling():
        ok = (mask == 0) | (mask <= -1000.0)
        if not bool(ok.all()):
            raise ValueError(
                f"DARE ({layer}): only key-padding masks are supported (additive 0 for kept keys and a large "
                f"negative value such as -10000 for padding); this mask holds other values"
            )
    return mask == 0


def _prepared_mask(attn, attention_mask, sequence_length: int, batch_size: int):
    """The mask exactly as diffusers' AttnProcessor2_0 / CogVideoXAttnProcessor2_0 hand it to SDPA."""
    if attention_mask is None:
        return None
    mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    return mask.view(batch_size, attn.heads, -1, mask.shape[-1])


def project_qkv(attn, hidden_states, context, *, layout: str, projections=None):
    """The query from ``hidden_states``, key / value from ``context``, split into heads, QK-normed as diffusers does.

    ``layout``:
      - "norm_then_split": norms over all heads first, then [B, L, H, D] (Wan, LTX-Video);
      - "split_then_norm": [B, L, H, D], then per-head norms (HunyuanVideo);
      - "heads_first": [B, H, L, D] (view + transpose), then per-head norms (AttnProcessor2_0, CogVideoX).
    ``projections(attn, hidden_states, context)`` replaces the plain to_q / to_k / to_v (Wan's fused projections).
    Every step is the stock processor's own, in its order, so the fast path stays bitwise stock.
    """
    if projections is not None:
        query, key, value = projections(attn, hidden_states, context)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if layout == "norm_then_split":
        query, key = attn.norm_q(query), attn.norm_k(key)
    if layout == "heads_first":
        batch, head_dim = query.shape[0], key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    else:
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
    if layout != "norm_then_split":
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
    return query, key, value


def project_out(attn, hidden_states):
    """diffusers' output projection and dropout (``to_out[0]``, ``to_out[1]``)."""
    return attn.to_out[1](attn.to_out[0](hidden_states))


class _DAREProcessorBase:
    """Shared state (the owning handle, the layer's name, diffusers' backend / parallel attributes) and the
    attention call. The handle's processor interface: ``token_weights``, ``record_map``, ``frames_folded``,
    ``capture_maps``, ``strength``, ``backend``, ``fast_path``, ``joint_renormalize``."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, handle, layer_name: str, original):
        self._handle = handle
        self.layer_name = layer_name
        # keep what set_attention_backend / enable_parallelism recorded on the stock processor
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def _attend(self, query, key, value, *, text_slice=None, key_padding_mask=None, map_rows=None,
                frames=1, stock=None):
        """SRA attention on [B, H, N, D] tensors with this layer's weights; records the map when asked.

        ``text_slice`` = (start, stop) of the text keys inside ``key`` (joint attention), default all keys.
        ``key_padding_mask``: bool [B, M] or a callable returning it (evaluated only on the SRA path).
        ``map_rows`` = (start, stop) of the query rows kept in the map (default all).
        ``frames``: the attention batch is the model batch times ``frames`` (AnimateDiff).
        ``stock``: callable giving diffusers' own attention output [B, H, N, Dv]; used when this forward needs
        neither weights nor maps and ``handle.fast_path`` is on (then the output is bitwise stock).
        """
        handle = self._handle
        B, H, N, _ = query.shape
        M = key.shape[2]
        t0, t1 = (0, M) if text_slice is None else text_slice
        weight = handle.token_weights(self.layer_name, B, t1 - t0, frames=frames, device=query.device,
                                      dtype=query.dtype)
        want_map = handle.capture_maps
        if stock is not None and weight is None and not want_map and handle.fast_path:
            return stock()
        if callable(key_padding_mask):
            key_padding_mask = key_padding_mask()
        if weight is not None and (t0, t1) != (0, M):
            # joint attention: text keys beside unweighted video keys (SPEC §1, joint renormalisation)
            if handle.joint_renormalize:
                valid = None if key_padding_mask is None else key_padding_mask[:, t0:t1]
                weight = renormalize_joint(weight, handle.strength, valid)
            ones = torch.ones(B, M, device=weight.device, dtype=weight.dtype)
            weight = torch.cat([ones[:, :t0], weight, ones[:, t1:]], dim=1)
        res = sra_attention(
            query, key, value, weight,
            key_padding_mask=key_padding_mask,
            strength=handle.strength,
            return_attn_map=want_map,
            attn_map_keys=(t0, t1) if want_map else None,
            backend=handle.backend,
        )
        if want_map:
            out, amap = res
            if map_rows is not None:
                amap = amap[:, map_rows[0]:map_rows[1]]
            handle.record_map(self.layer_name, amap, frames=frames)
            return out
        return res


class DAREWanAttnProcessor(_DAREProcessorBase):
    """Replaces ``WanAttnProcessor`` on ``blocks[i].attn2`` (text cross-attention) of Wan 2.1 / 2.2."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import (
            _get_added_kv_projections,
            _get_qkv_projections,
        )

        if encoder_hidden_states is None:
            raise RuntimeError(f"DARE ({self.layer_name}): expected text cross-attention, got self-attention")
        if attention_mask is not None or rotary_emb is not None:
            raise NotImplementedError(
                f"DARE ({self.layer_name}): Wan text cross-attention is called without mask and RoPE by diffusers; "
                "got an attention_mask / rotary_emb"
            )
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            # 512 is the context length of the text encoder, hardcoded in diffusers too
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states, layout="norm_then_split",
                                        projections=_get_qkv_projections)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = dispatch_attention_fn(
                query, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=None,
            )
            hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)

        # [B, N, H, D] -> [B, H, N, D] views; each rank of a context-parallel run attends its query shard
        def stock():
            return dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         backend=self._attention_backend, parallel_config=None).transpose(1, 2)

        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), stock=stock)
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        return project_out(attn, hidden_states)


class DARELTXAttnProcessor(_DAREProcessorBase):
    """Replaces ``LTXVideoAttnProcessor`` on ``transformer_blocks[i].attn2`` of LTX-Video."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        if encoder_hidden_states is None:
            raise RuntimeError(f"DARE ({self.layer_name}): expected text cross-attention, got self-attention")
        batch_size, m, _ = encoder_hidden_states.shape
        key_padding_mask = None
        if attention_mask is not None:
            key_padding_mask = lambda: _key_padding_from_bias(attention_mask, batch_size, m, self.layer_name)  # noqa: E731

        if image_rotary_emb is None:
            query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states, layout="norm_then_split")
        else:  # RoPE sits between the norms and the head split
            query, key = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(encoder_hidden_states))
            value = attn.to_v(encoder_hidden_states)
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
            query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))

        def stock():
            mask = attention_mask
            if mask is not None:
                mask = attn.prepare_attention_mask(mask, m, batch_size)
                mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
            return dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                         backend=self._attention_backend,
                                         parallel_config=self._parallel_config).transpose(1, 2)

        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           key_padding_mask=key_padding_mask, stock=stock)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        return project_out(attn, hidden_states)


class DAREAttnProcessor(_DAREProcessorBase):
    """Replaces ``AttnProcessor2_0`` on a spatial text cross-attention ``attn2`` (AnimateDiff's UNetMotionModel).

    The UNet folds frames into the batch (attention batch = B·F, text repeated per frame); the handle
    expands the [B, M] weights per frame and stores maps as [B, F·h·w, M].
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None:
            raise RuntimeError(f"DARE ({self.layer_name}): expected text cross-attention, got self-attention")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        key_padding_mask = None
        if attention_mask is not None:
            key_padding_mask = lambda: _key_padding_from_bias(  # noqa: E731
                attention_mask, batch_size, sequence_length, self.layer_name)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states, layout="heads_first")

        frames = self._handle.frames_folded(batch_size)

        def stock():
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=_prepared_mask(attn, attention_mask, sequence_length, batch_size),
                dropout_p=0.0, is_causal=False)

        out = self._attend(query, key, value, key_padding_mask=key_padding_mask, frames=frames, stock=stock)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * query.shape[-1])
        hidden_states = project_out(attn, hidden_states.to(query.dtype))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states
