"""Rectified CFG combine (docs/SPEC.md §2): the public function, its input checks and the coefficient math.

Every mode is g = Σ_k γ_k x_k over x = (u, c, d, b_old) with per-sample γ from statistics of the branches;
the custom ops' schema, fakes and autograd are in dare_kernels/ops/rectified_cfg.py, the backend choice in
dare_kernels/backends.py. Without gradients the fused op runs (no host sync); with them, stats ->
coefficients (PyTorch ops below, so autograd sees how γ depends on the statistics) -> combine.

Conventions where docs/SPEC.md and diffusers 0.42.1 differ or are silent (tests/test_cfg.py holds them):
- Branch order u, c[, d] along dim 0 (diffusers pipelines chunk uncond first; guiders take
  ``forward(pred_cond, pred_uncond)``). APG momentum: buf <- (c - u) + β buf, exactly diffusers'
  MomentumBuffer; a zero buffer on the first step reproduces its fresh buffer.
- Statistics stay in float32 for every input dtype. diffusers rounds CFG-Zero*'s α and the rescale
  standard deviations to the input dtype (bf16/fp16); we do not, so low-precision results match
  the guider run on the float64 upcast of the same inputs.
- APG normalises c like ``F.normalize`` (c / max(‖c‖, 1e-12)), so c = 0 gives Δ∥ = 0, not NaN.
- ``reduce_dims`` applies to every statistic, the rescale σ included (diffusers' APG ``norm_dim``
  leaves ``rescale_noise_cfg`` over all non-batch dims): per-frame guidance rescales per frame.
- ``rectify_scale`` != 0 with two branches is an error rather than a silently dropped term.
- diffusers' CFG-Zero* ``zero_init_steps`` (returning zeros on the first steps) is sampler policy and
  stays with the caller.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from . import backends
from .ops.rectified_cfg import NUM_STATS, coefficients_from_stats, groups, stats_dtype
from .reference import CFG_MODES, rectified_cfg_ref

__all__ = ["rectified_cfg", "CFG_MODES", "BACKENDS"]

BACKENDS = backends.CHOICES


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------

def _check_number(name, value, *, low=None, high=None, allow_none=False):
    if type(value) is float and low is None and -math.inf < value < math.inf:  # the common case, cheaply
        return value
    if value is None and allow_none:
        return None
    # exact float/int first: the numbers.Real ABC check costs microseconds per call (bool is rejected below)
    if type(value) not in (float, int) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number (float), got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low or high is not None and value > high:
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


def _split_branches(preds, num_branches) -> list[torch.Tensor]:
    if num_branches is not None:
        if isinstance(num_branches, bool) or not isinstance(num_branches, int):
            raise TypeError(f"num_branches must be an int (2 or 3) or None, got {type(num_branches).__name__}")
        if num_branches not in (2, 3):
            raise ValueError(f"num_branches must be 2 (uncond, cond) or 3 (uncond, cond, degraded), got {num_branches}")
    if isinstance(preds, torch.Tensor):
        k = 2 if num_branches is None else num_branches
        if preds.dim() < 2:
            raise ValueError(f"preds must be [K*B, ...] with at least one non-batch dim, got shape {tuple(preds.shape)}")
        kb = preds.shape[0]
        if kb % k != 0:
            raise ValueError(f"preds' batch {kb} is not divisible by num_branches={k} "
                             f"(branches are stacked along dim 0: uncond, cond[, degraded])")
        if preds.dtype not in backends.FLOAT_DTYPES:
            raise TypeError(f"preds must be float16, bfloat16, float32 or float64, got {preds.dtype}")
        # equal chunks of one tensor: the branches share dtype, device and shape (no per-branch checks)
        return list(preds.chunk(k, dim=0))
    elif isinstance(preds, (list, tuple)):
        branches = list(preds)
        if len(branches) not in (2, 3):
            raise ValueError(f"preds must hold 2 or 3 branch tensors (uncond, cond[, degraded]), got {len(branches)}")
        if num_branches is not None and num_branches != len(branches):
            raise ValueError(f"num_branches={num_branches} but preds holds {len(branches)} tensors")
        for i, t in enumerate(branches):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"preds[{i}] must be a torch.Tensor, got {type(t).__name__}")
    else:
        raise TypeError(f"preds must be a torch.Tensor [K*B, ...] or a sequence of K tensors, got {type(preds).__name__}")
    ref = branches[0]
    if ref.dtype not in backends.FLOAT_DTYPES:
        raise TypeError(f"preds must be float16, bfloat16, float32 or float64, got {ref.dtype}")
    if ref.dim() < 2:
        raise ValueError(f"each branch must be [B, ...] with at least one non-batch dim, got shape {tuple(ref.shape)}")
    names = ("uncond", "cond", "degraded")
    for i, t in enumerate(branches[1:], 1):
        if t.dtype != ref.dtype:
            raise TypeError(f"branch {names[i]} has dtype {t.dtype}, uncond has {ref.dtype}: branches must share a dtype")
        if t.device != ref.device:
            raise ValueError(f"branch {names[i]} is on {t.device}, uncond on {ref.device}: branches must share a device")
        if t.shape != ref.shape:
            raise ValueError(f"branch {names[i]} has shape {tuple(t.shape)}, uncond {tuple(ref.shape)}: shapes must match")
    return branches


def _normalize_reduce_dims(reduce_dims, ndim: int) -> list[int]:
    if reduce_dims is None:
        return list(range(1, ndim))
    if isinstance(reduce_dims, bool):
        raise TypeError("reduce_dims must be an int, a sequence of ints or None, got bool")
    if isinstance(reduce_dims, int):
        reduce_dims = (reduce_dims,)
    try:
        dims = [int(d) for d in reduce_dims if not isinstance(d, bool) and int(d) == d]
        if len(dims) != len(reduce_dims):
            raise TypeError
    except TypeError:
        raise TypeError(f"reduce_dims must be an int, a sequence of ints or None, got {reduce_dims!r}") from None
    if not dims:
        raise ValueError("reduce_dims must name at least one non-batch dim")
    out = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(f"reduce_dims entry {d} is out of range for {ndim}-D branch tensors [B, ...]")
        d %= ndim
        if d == 0:
            raise ValueError("reduce_dims must not include the batch dim 0: statistics are per sample")
        if d in out:
            raise ValueError(f"reduce_dims has dim {d} twice")
        out.append(d)
    return sorted(out)


class _Args:
    """Validated arguments of one call."""


def _check_inputs(preds, guidance_scale, num_branches, mode, rectify_scale, guidance_rescale, eta,
                  norm_threshold, momentum, momentum_buffer, reduce_dims, out, backend) -> _Args:
    a = _Args()
    a.branches = _split_branches(preds, num_branches)
    a.K = len(a.branches)
    ref = a.branches[0]
    if not isinstance(mode, str) or mode not in CFG_MODES:
        raise ValueError(f"mode must be one of {CFG_MODES}, got {mode!r}")
    a.mode = mode
    a.s = _check_number("guidance_scale", guidance_scale)
    a.sr = _check_number("rectify_scale", rectify_scale)
    if a.K == 2 and a.sr != 0.0:
        raise ValueError("rectify_scale weighs the degraded branch (c - d): pass 3 branches (uncond, cond, degraded) "
                         "or rectify_scale=0")
    a.phi = _check_number("guidance_rescale", guidance_rescale, low=0.0, high=1.0)
    a.eta = _check_number("eta", eta)
    a.tau = _check_number("norm_threshold", norm_threshold, low=0.0)
    a.beta = _check_number("momentum", momentum, allow_none=True)
    if mode != "apg":
        # APG-only parameters that another mode would silently ignore (momentum is checked below)
        for name, value, default in (("eta", a.eta, 1.0), ("norm_threshold", a.tau, 0.0)):
            if value != default:
                raise ValueError(f"{name} is an APG option (mode='apg'); mode={mode!r} would ignore "
                                 f"{name}={value} (leave it at its default {default})")
    if a.beta is not None:
        if mode != "apg":
            raise ValueError(f"momentum is an APG option (mode='apg'), got mode={mode!r}")
        if momentum_buffer is None:
            raise ValueError("momentum needs a momentum_buffer: a caller-owned tensor of the branch shape "
                             f"{tuple(ref.shape)} (zeros on the first step), updated in place")
    if momentum_buffer is not None:
        if a.beta is None:
            raise ValueError("momentum_buffer was given but momentum is None")
        if not isinstance(momentum_buffer, torch.Tensor):
            raise TypeError(f"momentum_buffer must be a torch.Tensor, got {type(momentum_buffer).__name__}")
        if momentum_buffer.shape != ref.shape:
            raise ValueError(f"momentum_buffer must have the branch shape {tuple(ref.shape)}, "
                             f"got {tuple(momentum_buffer.shape)}")
        if momentum_buffer.device != ref.device:
            raise ValueError(f"momentum_buffer is on {momentum_buffer.device}, preds on {ref.device}")
        ok = (momentum_buffer.dtype == ref.dtype
              or (momentum_buffer.dtype == torch.float32 and ref.dtype != torch.float64))
        if not ok:
            raise TypeError(f"momentum_buffer must be float32 or the predictions' dtype {ref.dtype}, "
                            f"got {momentum_buffer.dtype}")
        if momentum_buffer.requires_grad:
            raise ValueError("momentum_buffer is sampler state updated in place and must not require grad")
    a.buf = momentum_buffer
    a.dims = _normalize_reduce_dims(reduce_dims, ref.dim())
    a.n = math.prod([ref.shape[d] for d in a.dims])
    if a.phi > 0 and a.n < 2:
        raise ValueError(f"guidance_rescale > 0 needs at least 2 elements per sample to take a standard deviation, "
                         f"reduce_dims={a.dims} hold {a.n}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if out.shape != ref.shape or out.dtype != ref.dtype or out.device != ref.device:
            raise ValueError(f"out must be a {ref.dtype} tensor of shape {tuple(ref.shape)} on {ref.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        # a stacked preds tensor whose memory span misses out's cannot overlap it through any branch
        branches = a.branches if not isinstance(preds, torch.Tensor) or _overlaps(out, preds) else []
        for t in branches + ([momentum_buffer] if momentum_buffer is not None else []):
            if _overlaps(out, t):
                raise ValueError("out must not share memory with preds or momentum_buffer")
    a.out = out
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return a


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if torch.compiler.is_compiling():
        return False
    try:
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return False
    except Exception:  # noqa: BLE001 - tensors without storage (fake, functional) cannot overlap here
        return False
    def span(t):
        lo = t.data_ptr()
        hi = lo + (sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()
        return lo, hi
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def rectified_cfg(
    preds: torch.Tensor | Sequence[torch.Tensor],
    guidance_scale: float,
    *,
    num_branches: int | None = None,
    mode: str = "cfg",
    rectify_scale: float = 0.0,
    guidance_rescale: float = 0.0,
    eta: float = 1.0,
    norm_threshold: float = 0.0,
    momentum: float | None = None,
    momentum_buffer: torch.Tensor | None = None,
    reduce_dims: int | Sequence[int] | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused classifier-free guidance combine with DR-CFG rectification (docs/SPEC.md §2).

    Args:
        preds: [K*B, ...] branch predictions stacked along dim 0 as diffusers batches them, or a sequence
            of K tensors [B, ...]; order uncond, cond[, degraded]. float16, bfloat16, float32 (float64 on
            cpu/reference). Any strides.
        guidance_scale: s. num_branches: K (2 or 3) for a stacked tensor, default 2. An empty batch
            (K*B = 0) gives an empty result [0, ...].
        mode: "cfg" (u + s(c-u)), "cfg_zero_star" (CFG-Zero*: u scaled by <c,u>/‖u‖²) or "apg"
            (adaptive projected guidance; ``eta`` weighs the part of c-u parallel to c, ``norm_threshold``
            τ > 0 caps ‖c-u‖, ``momentum`` β with ``momentum_buffer`` keeps buf <- (c-u) + β buf). These
            four are APG-only: another mode raises ValueError when one is set away from its default.
        rectify_scale: s_r, weighs the DR-CFG term s_r (c - d) (K = 3 only).
        guidance_rescale: φ in [0, 1]; g <- φ g σ(c)/σ(g) + (1-φ) g with σ = torch.std (Bessel).
        momentum_buffer: caller-owned state of the branch shape [B, ...], float32 or the preds' dtype,
            updated in place (start with zeros: diffusers' behaviour).
        reduce_dims: non-batch dims (of a branch [B, ...]) the per-sample statistics run over; default all.
        out: optional [B, ...] tensor in the preds' dtype to write the result into.
        backend: "auto", "cpu", "triton", "cuda" or "reference".

    Returns:
        The guided prediction g [B, ...] in the preds' dtype (statistics in float32). Differentiable
        w.r.t. preds (not with ``out=``).
    """
    a = _check_inputs(preds, guidance_scale, num_branches, mode, rectify_scale, guidance_rescale, eta,
                      norm_threshold, momentum, momentum_buffer, reduce_dims, out, backend)
    ref = a.branches[0]
    if ref.numel() == 0:  # an empty batch (or empty samples): an empty result of the branch shape
        if a.out is not None:
            return a.out
        # 0 * every branch (no elements: free) keeps the empty result on the autograd graph of preds
        return sum(t * 0 for t in a.branches)
    needs_grad = torch.is_grad_enabled() and (preds.requires_grad if isinstance(preds, torch.Tensor)
                                              else any(t.requires_grad for t in a.branches))
    if needs_grad and a.out is not None:
        raise ValueError("out= does not support autograd: the predictions require grad")
    chosen = backends.choose("rectified_cfg", backend, ref.device, ref.dtype)
    if chosen == "reference":
        res = rectified_cfg_ref(a.branches, a.s, mode=a.mode, rectify_scale=a.sr, guidance_rescale=a.phi,
                                eta=a.eta, norm_threshold=a.tau, momentum=a.beta, momentum_buffer=a.buf,
                                reduce_dims=a.dims)
        if a.out is not None:
            a.out.copy_(res)
            return a.out
        return res

    fused, stats_op, combine_op = backends.ops_for("rectified_cfg", chosen)
    nd = ref.dim()
    n_reduce = len(a.dims)
    identity = a.dims == list(range(nd - n_reduce, nd))  # the reduced dims are already the last ones
    if identity:
        xs, buf = a.branches, a.buf
    else:  # move the reduced dims last (views; the kernels take any strides)
        perm = [i for i in range(nd) if i not in a.dims] + a.dims
        xs = [t.permute(perm) for t in a.branches]
        buf = None if a.buf is None else a.buf.permute(perm)
    u, c = xs[0], xs[1]
    d = xs[2] if a.K == 3 else None
    beta = 0.0 if a.beta is None else a.beta

    if not needs_grad:
        res = a.out if a.out is not None else torch.empty_like(ref, memory_format=torch.contiguous_format)
        fused(u, c, d, buf, res if identity else res.permute(perm), n_reduce, a.mode, a.s, a.sr, a.phi, a.eta, a.tau,
              beta)
        return res

    if buf is not None:  # the ops save b_old for backward; the in-place update below must not touch it
        buf = buf.detach().clone()
    params = dict(K=a.K, mode=a.mode, momentum=buf is not None, guidance_scale=a.s, rectify_scale=a.sr,
                  guidance_rescale=a.phi, eta=a.eta, norm_threshold=a.tau, beta=beta)
    if a.mode != "cfg" or a.phi > 0:
        stats = stats_op(u, c, d, buf, n_reduce, beta)
        gamma = coefficients_from_stats(stats, a.n, **params)
    else:
        G = groups(u.shape, n_reduce)
        st = torch.zeros((G, NUM_STATS), dtype=stats_dtype(ref.dtype), device=ref.device)
        gamma = coefficients_from_stats(st, a.n, **params)
    res = combine_op(u, c, d, buf, gamma, n_reduce)
    if buf is not None:
        with torch.no_grad():
            acc = stats_dtype(ref.dtype)
            a.buf.copy_(a.branches[1].to(acc) - a.branches[0].to(acc) + beta * a.buf.to(acc))
    if not identity:
        inv = [0] * nd
        for i, p in enumerate(perm):
            inv[p] = i
        res = res.permute(inv)
    return res
