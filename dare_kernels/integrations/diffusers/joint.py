"""DARE processors for joint text+video attention (CogVideoX, HunyuanVideo).

In joint attention the text keys sit beside the video keys in one softmax. Only the text keys carry
token weights (the video keys keep weight 1) and the maps keep the video query rows and the text key
columns: [B, N_video, T]. By default the handle renormalises each sample's text weights so that the
mean of w^γ over its valid text keys is 1 (``renormalize_joint``, SPEC §1): SRA then redistributes
attention among the text tokens instead of moving it from text to video.

- CogVideoX ``transformer_blocks[i].attn1``: sequence [text; video]; RoPE on the video part.
- HunyuanVideo ``transformer_blocks[i].attn`` (dual stream: video through to_q/k/v, text through
  add_q/k/v_proj) and ``single_transformer_blocks[i].attn`` (one projection of [video; text]): sequence
  [video; text]; the model's text mask [B, 1, 1, N + T] (bool, True = attend) becomes the key-padding mask.
"""

from __future__ import annotations

import torch

from .processors import _DAREProcessorBase, _key_padding_from_bias, _prepared_mask, project_out, project_qkv

__all__ = ["DARECogVideoXAttnProcessor", "DAREHunyuanVideoAttnProcessor"]


class DARECogVideoXAttnProcessor(_DAREProcessorBase):
    """Replaces ``CogVideoXAttnProcessor2_0`` on the joint text+video ``attn1`` of CogVideoX blocks."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        key_padding_mask = None
        if attention_mask is not None:
            key_padding_mask = lambda: _key_padding_from_bias(  # noqa: E731
                attention_mask, batch_size, sequence_length, self.layer_name)

        query, key, value = project_qkv(attn, hidden_states, hidden_states, layout="heads_first")
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        def stock():
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=_prepared_mask(attn, attention_mask, sequence_length, batch_size),
                dropout_p=0.0, is_causal=False)

        out = self._attend(query, key, value, text_slice=(0, text_seq_length), key_padding_mask=key_padding_mask,
                           map_rows=(text_seq_length, sequence_length), stock=stock)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * query.shape[-1])
        hidden_states = project_out(attn, hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def _hunyuan_key_padding(mask: torch.Tensor, batch: int, total: int, layer: str) -> torch.Tensor:
    """bool [B, N + T] from HunyuanVideo's [B, 1, 1, N + T] bool mask (or any per-key form diffusers accepts)."""
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0]
    return _key_padding_from_bias(mask, batch, total, layer)


class DAREHunyuanVideoAttnProcessor(_DAREProcessorBase):
    """Replaces ``HunyuanVideoAttnProcessor2_0`` on HunyuanVideo's dual- and single-stream joint attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is None:
            raise RuntimeError(f"DARE ({self.layer_name}): expected joint text+video attention, got video only")
        single_stream = attn.add_q_proj is None
        text_len = encoder_hidden_states.shape[1]
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1-2. QKV projections and per-head QK norms of the video (dual) or the joint (single) stream
        query, key, value = project_qkv(attn, hidden_states, hidden_states, layout="split_then_norm")

        # 3. RoPE on the video tokens
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            if single_stream:
                query = torch.cat([apply_rotary_emb(query[:, :-text_len], image_rotary_emb, sequence_dim=1),
                                   query[:, -text_len:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-text_len], image_rotary_emb, sequence_dim=1),
                                 key[:, -text_len:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 4. the text stream's own projections (dual stream)
        if not single_stream:
            enc_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            enc_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                enc_q = attn.norm_added_q(enc_q)
            if attn.norm_added_k is not None:
                enc_k = attn.norm_added_k(enc_k)
            query = torch.cat([query, enc_q], dim=1)
            key = torch.cat([key, enc_k], dim=1)
            value = torch.cat([value, enc_v], dim=1)

        # 5. attention over [video; text]: text keys weighted, map = video rows x text columns
        batch_size, total = query.shape[0], query.shape[1]
        video_len = total - text_len
        key_padding_mask = None
        if attention_mask is not None:
            key_padding_mask = lambda: _hunyuan_key_padding(attention_mask, batch_size, total,  # noqa: E731
                                                            self.layer_name)

        def stock():
            return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                         is_causal=False, backend=self._attention_backend,
                                         parallel_config=self._parallel_config).transpose(1, 2)

        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                           text_slice=(video_len, total), key_padding_mask=key_padding_mask,
                           map_rows=(0, video_len), stock=stock)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        # 6. output projections
        hidden_states, encoder_hidden_states = hidden_states[:, :-text_len], hidden_states[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = project_out(attn, hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
