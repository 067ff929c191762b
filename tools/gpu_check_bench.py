#!/usr/bin/env python3
"""The benchmark table of the device check (tools/gpu_check.sh): one row per (shape, provider, mode), on a budget.

SRA attention at the Wan-1.3B, LTX-Video and CogVideoX joint-attention shapes (bench/shapes.py), bfloat16,
[B, N, H, D] memory as diffusers hands it over, 10 % of the keys padded:

    dare_triton / dare_cuda   sra_attention(backend=...): fwd, fwd+map, fwd+bwd, fwd+map+bwd
    sdpa_flash                SDPA without the bias, FlashAttention backend (the ceiling without SRA)
    sdpa_bias_efficient       SDPA with γ·log w as an additive [B, 1, 1, M] mask, memory-efficient backend
    sdpa_bias_cudnn           the same on the cuDNN backend
    flex_compiled             torch.compile'd FlexAttention with a per-key-bias score_mod
    eager_maps                matmul-softmax-matmul that also returns the head-averaged map
and rectified_cfg (mode "cfg", rescale 0.7) on a Wan video latent: dare Triton / CUDA, the eager PyTorch
formula, diffusers' guider, and a copy of the same bytes (the bandwidth floor).

Every row is written to ``<out>/bench_rows.jsonl`` the moment it is done, so a run cut short keeps what it
measured; ``bench.json`` and ``bench.csv`` are written at the end. A row that would start after the budget
is recorded as skipped with that reason, as is every provider that cannot run here (and why). Timing: CUDA
events with the L2 flushed before each call (``dare_kernels.benchmarking.timing.cuda_time``); on CPU (the
rehearsal: tiny shapes, Triton in its interpreter, FlexAttention eager) wall-clock medians of a few calls.
Exit status 1 when a dare row fails with an error (a peer's error is only recorded), else 0.

    python tools/gpu_check_bench.py --out DIR [--device cuda|cpu] [--budget-s 120] [--tiny --rows-per-provider 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # the shape table and the diffusers guider set-up live there

import torch  # noqa: E402

from shapes import ATTN_SHAPES, LATENT_SHAPES, AttnShape  # noqa: E402

ATTN_SHAPE_NAMES = ("wan-1.3b", "ltx-video", "cogvideox-5b")
LATENT_NAME = "wan-81f-480p"
DTYPE = torch.bfloat16
STRENGTH = 1.0
# (provider, modes) in the order they run: the rows that matter most come first within a shape
ATTN_ROWS = (
    ("dare_triton", ("fwd", "fwd+map", "fwd+bwd", "fwd+map+bwd")),
    ("dare_cuda", ("fwd", "fwd+map", "fwd+bwd", "fwd+map+bwd")),
    ("sdpa_flash", ("fwd", "fwd+bwd")),
    ("sdpa_bias_efficient", ("fwd", "fwd+bwd")),
    ("sdpa_bias_cudnn", ("fwd", "fwd+bwd")),
    ("eager_maps", ("fwd+map", "fwd+map+bwd")),
    ("flex_compiled", ("fwd", "fwd+bwd")),
)
CFG_ROWS = ("dare_triton", "dare_cuda", "torch_eager", "diffusers_guider", "copy")
COMPILE_RESERVE_S = 45.0  # a compiled provider does not start with less budget left than this (GPU)
CSV_COLUMNS = ("kernel", "shape", "dims", "dtype", "provider", "mode", "status", "ms", "p20_ms", "p80_ms",
               "rounds", "tflops", "gbps", "wall_s", "reason", "device")


class Skip(Exception):
    """This row cannot run here; the message says why."""


def tiny_shape(s: AttnShape) -> AttnShape:
    """The rehearsal stand-in of a model shape: same structure (joint map range or not), interpreter-sized."""
    if s.map_keys is not None:
        video, text = 40, 8
        return AttnShape(f"{s.name}-tiny", 1, 2, video + text, video + text, 16, (video, video + text), "joint")
    return AttnShape(f"{s.name}-tiny", 1, 2, 32, min(s.M, 16), min(s.D, 16))


# ---------------------------------------------------------------------------------------------
# attention providers
# ---------------------------------------------------------------------------------------------

def attn_inputs(shape: AttnShape, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, H, N, M, D = shape.B, shape.H, shape.N, shape.M, shape.D

    def rnd(rows):  # [B, rows, H, D] memory viewed as [B, H, rows, D]
        return torch.randn(B, rows, H, D, generator=g).to(device=device, dtype=DTYPE).transpose(1, 2)

    q, k, v = rnd(N), rnd(M), rnd(M)
    w = torch.rand(B, M, generator=g) * 1.9 + 0.1
    if shape.map_keys is not None:
        w[:, : shape.map_keys[0]] = 1.0  # joint attention: the video keys carry no weight
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[:, M - max(1, M // 10):] = False  # text padding
    w = torch.where(mask, w, torch.zeros_like(w))
    bias = torch.where(w > 0, STRENGTH * torch.log(torch.where(w > 0, w, torch.ones_like(w))), float("-inf"))
    return q, k, v, w.to(device), mask.to(device), bias.to(device)


def _sdpa_backend_call(backend_name: str, q, k, v, bias4):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def call(q_, k_, v_):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=bias4)

    # probe once: "No available kernel" is a reason to skip, with torch's own explanation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call(q, k, v)
        except RuntimeError as exc:
            why = "; ".join(str(c.message).split("\n")[0] for c in caught)[:240]
            raise Skip(f"SDPA {backend_name} cannot run these inputs: {str(exc)[:80]} {why}".strip()) from exc
    return call


def attn_forward(provider: str, shape: AttnShape, inputs, device: str, with_map: bool):
    """(q, k, v) -> output(s) of one forward of ``provider``; raises Skip when it cannot run here."""
    q, k, v, w, mask, bias = inputs
    B, H, N, M, D = shape.B, shape.H, shape.N, shape.M, shape.D
    if provider.startswith("dare_"):
        backend = provider.removeprefix("dare_")
        why = _dare_unavailable("sra", backend, q)
        if why:
            raise Skip(why)
        from dare_kernels import sra_attention

        def fwd(q_, k_, v_):
            return sra_attention(q_, k_, v_, w, key_padding_mask=mask, strength=STRENGTH, return_attn_map=with_map,
                                 attn_map_keys=shape.map_keys if with_map else None, backend=backend)
        return fwd
    if with_map and provider != "eager_maps":
        raise Skip(f"{provider} returns no attention map")
    bias4 = bias.to(DTYPE).view(B, 1, 1, M)
    if provider == "sdpa_flash":
        return _sdpa_backend_call("FLASH_ATTENTION", q, k, v, None)
    if provider == "sdpa_bias_efficient":
        return _sdpa_backend_call("EFFICIENT_ATTENTION", q, k, v, bias4)
    if provider == "sdpa_bias_cudnn":
        return _sdpa_backend_call("CUDNN_ATTENTION", q, k, v, bias4)
    if provider == "eager_maps":
        need = 3 * 4 * B * H * N * M
        free = torch.cuda.mem_get_info()[0] if device == "cuda" else 4 * 2**30
        if need > 0.6 * free:
            raise Skip(f"eager attention would materialise ~{need / 2**30:.0f} GiB of [B, H, N, M] scores")
        lo, hi = shape.map_keys or (0, M)

        def eager(q_, k_, v_):
            s = (q_ @ k_.transpose(-1, -2)).float() * D ** -0.5 + bias.view(B, 1, 1, M)
            p = torch.softmax(s, -1)
            return p.to(q_.dtype) @ v_, p[..., lo:hi].mean(1)
        return eager
    if provider == "flex_compiled":
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as exc:
            raise Skip(f"torch {torch.__version__} has no FlexAttention ({exc})") from exc
        kb = bias.float()

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + kb[b, kv_idx]
        if device != "cuda":  # the rehearsal runs it eagerly: compiling on CPU takes longer than the rehearsal
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            flex = flex_attention
        else:
            flex = torch.compile(flex_attention, dynamic=False)

        def fx(q_, k_, v_):
            return flex(q_, k_, v_, score_mod=score_mod)
        return fx
    raise ValueError(f"unknown provider {provider!r}")


def attn_call(provider: str, mode: str, shape: AttnShape, inputs, device: str):
    """A zero-argument callable running ``mode`` of ``provider`` once (forward, or forward and backward)."""
    q, k, v = inputs[:3]
    fwd = attn_forward(provider, shape, inputs, device, with_map="map" in mode)
    if "bwd" not in mode:
        return lambda: fwd(q, k, v)

    def step():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        outs = fwd(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return step


def attn_work(shape: AttnShape, mode: str) -> tuple[float, float]:
    """(matmul FLOPs, minimum bytes) of one call: 4·B·H·N·M·D forward, 3.5x that with the backward."""
    fl = 4.0 * shape.B * shape.H * shape.N * shape.M * shape.D
    by = 2.0 * (2 * shape.B * shape.H * shape.N * shape.D + 2 * shape.B * shape.H * shape.M * shape.D)
    if "map" in mode:
        lo, hi = shape.map_keys or (0, shape.M)
        by += 4.0 * shape.B * shape.N * (hi - lo)
    return (3.5 * fl, 3.0 * by) if "bwd" in mode else (fl, by)


# ---------------------------------------------------------------------------------------------
# rectified_cfg providers
# ---------------------------------------------------------------------------------------------

def cfg_call(provider: str, preds: torch.Tensor):
    from _cfg_common import RESCALE, SCALE

    if provider.startswith("dare_"):
        backend = provider.removeprefix("dare_")
        why = _dare_unavailable("cfg", backend, preds)
        if why:
            raise Skip(why)
        import dare_kernels as dk
        return lambda: dk.rectified_cfg(preds, SCALE, mode="cfg", guidance_rescale=RESCALE, backend=backend)
    if provider == "torch_eager":
        from dare_kernels.reference import rectified_cfg_ref
        return lambda: rectified_cfg_ref(preds, SCALE, mode="cfg", guidance_rescale=RESCALE)
    if provider == "diffusers_guider":
        import importlib.util
        if importlib.util.find_spec("diffusers") is None:
            raise Skip("diffusers is not installed here (the GPU image has none and no network)")
        from _cfg_common import guider_fn
        run = guider_fn("cfg")
        return lambda: run(preds)
    if provider == "copy":
        dst = torch.empty_like(preds)
        return lambda: dst.copy_(preds)
    raise ValueError(f"unknown provider {provider!r}")


def _dare_unavailable(op: str, backend: str, x: torch.Tensor) -> str | None:
    """Why dare's ``backend`` cannot run ``op`` on ``x`` here (None when it can), from the backend registry."""
    from dare_kernels import backends

    name = "sra_attention" if op == "sra" else "rectified_cfg"
    return backends.unsupported_reason(name, backend, x.device, x.dtype)


# ---------------------------------------------------------------------------------------------
# timing, rows, budget
# ---------------------------------------------------------------------------------------------

def measure(fn, device: str) -> list[float]:
    """Seconds per call: CUDA events with an L2 flush on a GPU, wall clock (3 calls) on CPU."""
    from dare_kernels.benchmarking.timing import cpu_time, cuda_time

    if device == "cuda":
        return cuda_time(fn, warmup=2, rounds=20, max_time=1.0)
    return cpu_time(fn, warmup=1, rounds=2, max_time=2.0)


class Table:
    def __init__(self, out: Path, device: str, budget_s: float, rows_per_provider: int | None = None):
        self.out, self.device, self.rows = out, device, []
        self.rows_per_provider, self.measured = rows_per_provider, {}
        self.deadline = time.monotonic() + budget_s
        self.device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (rehearsal)"
        self.jsonl = out / "bench_rows.jsonl"
        self.dare_errors = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, row: dict) -> None:
        row = dict(row, device=self.device_name)
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        ms = f"{row['ms']:.3f} ms" if row.get("ms") is not None else row["status"]
        print(f"  {row['kernel']:<14} {row['shape']:<22} {row['provider']:<20} {row['mode']:<12} {ms}"
              + (f"  ({row['reason']})" if row.get("reason") else ""), flush=True)

    def run(self, base: dict, make, flops: float, nbytes: float, compiled: bool = False) -> None:
        if self.left() <= 0 or (compiled and self.device == "cuda" and self.left() < COMPILE_RESERVE_S):
            self.add(dict(base, status="skipped", reason=f"time budget: {max(0.0, self.left()):.0f} s left"))
            return
        key = (base["kernel"], base["provider"])
        if self.rows_per_provider is not None and self.measured.get(key, 0) >= self.rows_per_provider:
            self.add(dict(base, status="skipped", reason=f"at most {self.rows_per_provider} rows per provider here"))
            return
        self.measured[key] = self.measured.get(key, 0) + 1
        t0 = time.monotonic()
        try:
            fn = make()
            samples = sorted(measure(fn, self.device))
        except Skip as why:
            self.add(dict(base, status="skipped", reason=str(why)))
            return
        except NotImplementedError as exc:  # a peer's documented gap (e.g. FlexAttention's CPU backward)
            if base["provider"].startswith("dare_"):
                raise
            self.add(dict(base, status="skipped", reason=f"not supported here: {str(exc)[:160]}"))
            return
        except Exception as exc:  # noqa: BLE001 - a failing row is recorded and the table goes on
            if "is not available" in str(exc):  # the library's own "backend=... is not available: why"
                self.add(dict(base, status="skipped", reason=str(exc)[:240]))
                return
            self.dare_errors += base["provider"].startswith("dare_")
            self.add(dict(base, status="error", reason=f"{type(exc).__name__}: {str(exc)[:200]}",
                          wall_s=round(time.monotonic() - t0, 2)))
            if self.device == "cuda":
                torch.cuda.empty_cache()
            return
        med = samples[len(samples) // 2]
        self.add(dict(base, status="ok", ms=med * 1e3, p20_ms=samples[int(0.2 * (len(samples) - 1))] * 1e3,
                      p80_ms=samples[int(0.8 * (len(samples) - 1))] * 1e3, rounds=len(samples),
                      tflops=flops / med / 1e12 if flops else None, gbps=nbytes / med / 1e9 if nbytes else None,
                      wall_s=round(time.monotonic() - t0, 2)))

    def write(self) -> None:
        (self.out / "bench.json").write_text(json.dumps({"device": self.device_name, "rows": self.rows},
                                                        indent=1, default=str))
        with (self.out / "bench.csv").open("w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            wr.writeheader()
            wr.writerows(self.rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder of bench_rows.jsonl, bench.json, bench.csv")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=120.0, help="rows that would start later are skipped")
    ap.add_argument("--tiny", action="store_true", help="interpreter-sized stand-ins of the shapes (rehearsal)")
    ap.add_argument("--rows-per-provider", type=int, default=None,
                    help="measure at most this many rows per provider (the rehearsal: every provider runs)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before dare_kernels imports Triton
    args.out.mkdir(parents=True, exist_ok=True)
    table = Table(args.out, args.device, args.budget_s, args.rows_per_provider)
    print(f"gpu_check_bench: {table.device_name}, torch {torch.__version__}, budget {args.budget_s:.0f} s",
          flush=True)

    # rectified_cfg first: cheap on a GPU, so a tight budget never skips it
    c, f, h, w = LATENT_SHAPES[LATENT_NAME]
    lat = (c, 2, 8, 8) if args.tiny else (c, f, h, w)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, *lat, generator=g)
    preds = torch.cat([u, u + 0.3 * torch.randn(1, *lat, generator=g)]).to(device=args.device, dtype=DTYPE)
    in_bytes = preds.numel() * preds.element_size()
    for provider in CFG_ROWS:
        base = dict(kernel="rectified_cfg", shape=LATENT_NAME + ("-tiny" if args.tiny else ""),
                    dims="x".join(map(str, (2, *lat))), dtype="bfloat16", provider=provider, mode="cfg+rescale")
        # bytes: a copy reads and writes everything; the combine's floor reads both branches, writes one
        table.run(base, lambda p=provider: cfg_call(p, preds), 0.0, (2.0 if provider == "copy" else 1.5) * in_bytes)
    del preds

    # attention, provider by provider over the three shapes: a budget cut loses the last peers, not a shape
    shapes = [tiny_shape(ATTN_SHAPES[n]) if args.tiny else ATTN_SHAPES[n] for n in ATTN_SHAPE_NAMES]
    inputs = {s.name: attn_inputs(s, args.device) for s in shapes}
    for provider, modes in ATTN_ROWS:
        for shape in shapes:
            dims = f"B={shape.B} H={shape.H} N={shape.N} M={shape.M} D={shape.D}"
            for mode in modes:
                base = dict(kernel="sra_attention", shape=shape.name, dims=dims, dtype="bfloat16",
                            provider=provider, mode=mode)
                fl, by = attn_work(shape, mode)
                table.run(base, lambda p=provider, m=mode, s=shape: attn_call(p, m, s, inputs[s.name], args.device),
                          fl, by, compiled=provider == "flex_compiled")
            if args.device == "cuda":
                torch.cuda.empty_cache()

    table.write()
    ok = sum(r["status"] == "ok" for r in table.rows)
    print(f"gpu_check_bench: {ok}/{len(table.rows)} rows measured, {table.dare_errors} dare errors; "
          f"{args.out / 'bench.csv'}", flush=True)
    return 1 if table.dare_errors else 0


if __name__ == "__main__":
    sys.exit(main())
