"""SRA attention rows of the device-check bench: inputs and one zero-argument call per (provider, mode).

Inputs (``attn_inputs``): q [B, H, N, D], k / v [B, H, M, D] as [B, N, H, D] memory viewed as [B, H, N, D]
(diffusers' layout), in the unit's dtype; weights w float32 [B, M] in [0.1, 2.0] (joint attention: 1 on the
video keys); the last 10 % of the keys padded (mask False, w 0); the peers' bias γ·log w float32 [B, M]
(-inf where a key is dropped). Backward modes differentiate q, k, v and, for every provider that takes it,
the bias (dare: w), with all-ones output gradients (and map gradients in map modes).
"""

from __future__ import annotations

import warnings

import torch

from dare_kernels.benchmarking.shapes import AttnShape

STRENGTH = 1.0
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TAKES_BIAS = ("sdpa_bias", "sdpa_bias_efficient", "sdpa_bias_cudnn", "flex_compiled", "eager_maps")


class Skip(Exception):
    """This row cannot run here; the message says why."""


def attn_inputs(shape: AttnShape, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, H, N, M, D = shape.B, shape.H, shape.N, shape.M, shape.D

    def rnd(rows):  # [B, rows, H, D] memory viewed as [B, H, rows, D]
        return torch.randn(B, rows, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)

    q, k, v = rnd(N), rnd(M), rnd(M)
    w = torch.rand(B, M, generator=g) * 1.9 + 0.1
    if shape.map_keys is not None:
        w[:, : shape.map_keys[0]] = 1.0  # joint attention: the video keys carry no weight
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[:, M - max(1, M // 10):] = False  # text padding
    w = torch.where(mask, w, torch.zeros_like(w))
    bias = torch.where(w > 0, STRENGTH * torch.log(torch.where(w > 0, w, torch.ones_like(w))), float("-inf"))
    return dict(q=q, k=k, v=v, w=w.to(device), mask=mask.to(device), bias=bias.to(device))


def _dare_unavailable(op: str, backend: str, x: torch.Tensor, head_dim: int | None = None) -> str | None:
    """Why dare's ``backend`` cannot run ``op`` on ``x`` here (None when it can), from the backend registry."""
    from dare_kernels import backends

    name = "sra_attention" if op == "sra" else "rectified_cfg"
    return backends.unsupported_reason(name, backend, x.device, x.dtype, head_dim=head_dim, head_dim_v=head_dim)


def _sdpa_pinned(backend_name: str, probe_args: tuple):
    """SDPA restricted to one backend; probed once, so "No available kernel" is a skip with torch's reason."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def call(q_, k_, v_, mask=None):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call(*probe_args)
        except RuntimeError as exc:
            why = "; ".join(str(c.message).split("\n")[0] for c in caught)[:240]
            raise Skip(f"SDPA {backend_name} cannot run these inputs: {str(exc)[:80]} {why}".strip()) from exc
    return call


def forward_fn(provider: str, shape: AttnShape, x: dict, device: str, with_map: bool):
    """fwd(q, k, v, bias_or_w) -> output(s) of one forward of ``provider``; raises Skip when it cannot run here.

    The fourth argument is the weights w [B, M] for dare, the bias [B, M] for the peers that take one
    (ignored by the others): the backward modes pass a leaf that requires grad.
    """
    q, k, v, mask = x["q"], x["k"], x["v"], x["mask"]
    B, H, N, M, D = shape.B, shape.H, shape.N, shape.M, shape.D
    if provider.startswith("dare_"):
        backend = provider.removeprefix("dare_")
        why = _dare_unavailable("sra", backend, q, D)
        if why:
            raise Skip(why)
        from dare_kernels import sra_attention

        def dare(q_, k_, v_, w_):
            return sra_attention(q_, k_, v_, w_, key_padding_mask=mask, strength=STRENGTH, return_attn_map=with_map,
                                 attn_map_keys=shape.map_keys if with_map else None, backend=backend)
        return dare
    if with_map and provider != "eager_maps":
        raise Skip(f"{provider} returns no attention map")

    def bias4(b):  # [B, M] -> the [B, 1, 1, M] additive mask in the inputs' dtype
        return b.to(q.dtype).view(B, 1, 1, M)

    if provider == "sdpa":
        import torch.nn.functional as F
        return lambda q_, k_, v_, _b: F.scaled_dot_product_attention(q_, k_, v_)
    if provider == "sdpa_bias":  # as users call it: the default backend choice
        import torch.nn.functional as F
        return lambda q_, k_, v_, b: F.scaled_dot_product_attention(q_, k_, v_, attn_mask=bias4(b))
    if provider == "sdpa_flash":
        call = _sdpa_pinned("FLASH_ATTENTION", (q, k, v))
        return lambda q_, k_, v_, _b: call(q_, k_, v_)
    if provider in ("sdpa_bias_efficient", "sdpa_bias_cudnn"):
        name = "EFFICIENT_ATTENTION" if provider.endswith("efficient") else "CUDNN_ATTENTION"
        call = _sdpa_pinned(name, (q, k, v, bias4(x["bias"])))
        return lambda q_, k_, v_, b: call(q_, k_, v_, bias4(b))
    if provider == "eager_maps":
        need = 3 * 4 * B * H * N * M
        free = torch.cuda.mem_get_info()[0] if device == "cuda" else 4 * 2**30
        if need > 0.5 * free:
            raise Skip(f"eager attention would materialise ~{need / 2**30:.1f} GiB of [B, H, N, M] scores")
        lo, hi = shape.map_keys or (0, M)

        def eager(q_, k_, v_, b):
            s = (q_ @ k_.transpose(-1, -2)).float() * D ** -0.5 + b.view(B, 1, 1, M)
            p = torch.softmax(s, -1)
            return p.to(q_.dtype) @ v_, p[..., lo:hi].mean(1)
        return eager
    if provider == "flex_compiled":
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as exc:
            raise Skip(f"torch {torch.__version__} has no FlexAttention ({exc})") from exc
        if device != "cuda":  # the rehearsal runs it eagerly: compiling on CPU takes longer than the rehearsal
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            flex = flex_attention
        else:
            flex = torch.compile(flex_attention, dynamic=False)

        mods: dict = {}  # one score_mod per bias tensor: a new function object each call would recompile

        def fx(q_, k_, v_, b):
            mod = mods.get(id(b))
            if mod is None:
                def mod(score, bi, h, q_idx, kv_idx):
                    return score + b[bi, kv_idx]
                mods[id(b)] = mod
            return flex(q_, k_, v_, score_mod=mod)
        return fx
    raise ValueError(f"unknown provider {provider!r}")


def allow_recompiles(limit: int = 64) -> None:
    """Let torch.compile specialise FlexAttention for every (shape, dtype, mode) of the table: past dynamo's
    default limit (8 per function) it would fall back to eager silently and time something else."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def attn_call(provider: str, mode: str, shape: AttnShape, x: dict, device: str):
    """A zero-argument callable running ``mode`` of ``provider`` once (forward, or forward and backward)."""
    fwd = forward_fn(provider, shape, x, device, with_map="map" in mode)
    extra = x["w"] if provider.startswith("dare_") else x["bias"]
    if "bwd" not in mode:
        q, k, v = x["q"], x["k"], x["v"]
        return lambda: fwd(q, k, v, extra)
    leaves = [x[n].detach().requires_grad_() for n in ("q", "k", "v")]
    if provider.startswith("dare_") or provider in TAKES_BIAS:
        leaves.append(extra.detach().clone().requires_grad_())  # dw / the bias gradient
        args = leaves
    else:
        args = leaves + [extra]

    def step():
        outs = fwd(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

    if provider == "flex_compiled":  # compile and probe here: a missing captured-buffer gradient is a skip
        try:
            step()
        except NotImplementedError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch's own words are the reason
            raise Skip(f"FlexAttention cannot differentiate the captured per-key bias here: "
                       f"{type(exc).__name__}: {str(exc)[:160]}") from exc
    return step


def attn_work(shape: AttnShape, mode: str, elem_bytes: int = 2) -> tuple[float, float]:
    """(matmul FLOPs, minimum bytes) of one call: 4·B·H·N·M·D forward, 3.5x that with the backward."""
    fl = 4.0 * shape.B * shape.H * shape.N * shape.M * shape.D
    by = float(elem_bytes) * (2 * shape.B * shape.H * shape.N * shape.D + 2 * shape.B * shape.H * shape.M * shape.D)
    if "map" in mode:
        lo, hi = shape.map_keys or (0, shape.M)
        by += 4.0 * shape.B * shape.N * (hi - lo)
    return (3.5 * fl, 3.0 * by) if "bwd" in mode else (fl, by)
