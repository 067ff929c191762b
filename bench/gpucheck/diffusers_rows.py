"""One real-size diffusers attention layer: Wan 2.1 T2V 1.3B text cross-attention ``blocks[0].attn2``.

Built from diffusers' own classes with random weights (nothing downloaded): a one-block
WanTransformer3DModel at the 1.3B dims (12 heads x 128 = 1536, FFN 8960, text 4096 -> 1536), bfloat16, and
its ``attn2`` called the way the block calls it: hidden_states [1, N, 1536] (N = 21x30x52 = 32760 latent
tokens of an 81-frame 480x832 video), encoder_hidden_states [1, 512, 1536] (the projected umT5 text).
Projections, QK norms and the output projection are included: what a user's forward pays per layer.

    stock         diffusers' WanAttnProcessor (SDPA, no weights, no maps)
    dare_<b>      the DARE processor (apply_dare(backend=<b>)), weights in [0.1, 2]; fwd+map also captures
                  the head-averaged map
    eager_maps    the same DARE processor with the attention core as explicit PyTorch (scores + γ·log w,
                  softmax, P·V, P.mean over heads): how one gets maps without dare_kernels
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .attention import Skip


def layer_available() -> str | None:
    if importlib.util.find_spec("diffusers") is None:
        return "diffusers is not installed here (install the wheels offline: see the README's GPU check)"
    return None


@functools.lru_cache(maxsize=2)
def build_layer(dims: tuple, device: str, dtype_name: str = "bfloat16"):
    """(model, hidden_states, encoder_hidden_states) for the layer dims (plan.LAYER_DIMS as sorted items)."""
    from diffusers import WanTransformer3DModel

    d = dict(dims)
    inner = d["heads"] * d["head_dim"]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=d["heads"], attention_head_dim=d["head_dim"], in_channels=16,
            out_channels=16, text_dim=d["text_dim"], freq_dim=256 if d["head_dim"] >= 64 else 32,
            ffn_dim=d["ffn"], num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        )
    model = model.to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    n = d["frames"] * d["height"] * d["width"]
    hs = torch.randn(1, n, inner, generator=g).to(device=device, dtype=dtype)
    enc = torch.randn(1, d["text"], inner, generator=g).to(device=device, dtype=dtype)
    return model, hs, enc


def _eager_attend(proc, query, key, value, *, text_slice=None, key_padding_mask=None, map_rows=None, frames=1,
                  stock=None):
    """Explicit-softmax attention with the handle's weights (materialises [B, H, N, M] scores in float32)."""
    handle = proc._handle
    B, H, N, D = query.shape
    M = key.shape[2]
    s = (query @ key.transpose(-1, -2)).float() * D ** -0.5
    w = handle.token_weights(proc.layer_name, B, M, frames=frames, device=query.device, dtype=query.dtype)
    if w is not None:
        s = s + handle.strength * torch.log(w).view(B, 1, 1, M)
    p = torch.softmax(s, dim=-1)
    out = p.to(query.dtype) @ value
    if handle.capture_maps:
        handle.record_map(proc.layer_name, p.mean(dim=1), frames=frames)
    return out


class LayerCall:
    """One forward of the layer for ``provider`` / ``mode``; ``close()`` restores the stock processor."""

    def __init__(self, provider: str, mode: str, dims: tuple, device: str):
        why = layer_available()
        if why:
            raise Skip(why)
        self.model, self.hs, self.enc = build_layer(dims, device)
        self.attn = self.model.blocks[0].attn2
        self.handle = None
        with_map = "map" in mode
        if provider == "stock":
            if with_map:
                raise Skip("diffusers' stock processor returns no attention map")
            return
        from dare_kernels.integrations.diffusers import apply_dare

        backend = provider.removeprefix("dare_") if provider.startswith("dare_") else "auto"
        if provider.startswith("dare_"):
            from dare_kernels import backends

            head_dim = dict(dims)["head_dim"]
            why = backends.unsupported_reason("sra_attention", backend, self.hs.device, self.hs.dtype,
                                              head_dim=head_dim, head_dim_v=head_dim)
            if why:
                raise Skip(why)
        elif provider != "eager_maps":
            raise ValueError(f"unknown provider {provider!r}")
        m = self.enc.shape[1]
        self.handle = apply_dare(self.model, capture_maps=with_map, backend=backend, text_len=m)
        g = torch.Generator().manual_seed(2)
        self.handle.set_token_weights(torch.rand(1, m, generator=g) * 1.9 + 0.1)
        if provider == "eager_maps":
            proc = self.attn.processor
            proc._attend = functools.partial(_eager_attend, proc)

    def __call__(self):
        with torch.no_grad():
            return self.attn(self.hs, encoder_hidden_states=self.enc)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def layer_work(dims: tuple) -> float:
    """Matmul FLOPs of one layer call: q and output projections over N, k / v over M, attention 4·N·M·inner."""
    d = dict(dims)
    inner = d["heads"] * d["head_dim"]
    n, m = d["frames"] * d["height"] * d["width"], d["text"]
    return 2.0 * inner * inner * (2 * n + 2 * m) + 4.0 * n * m * inner
