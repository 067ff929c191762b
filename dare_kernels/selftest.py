"""GPU self-check of SRA attention: correctness of the Triton (and CUDA) kernels, then a benchmark table.

    python -m dare_kernels.selftest --device cuda     # correctness at small and model shapes + benchmarks
    python -m dare_kernels.selftest --device cpu      # tiny version in Triton's interpreter (tests the script)
    dare-kernels selftest --device cuda --json out.json

Correctness compares against the float64 reference (``dare_kernels.reference``), computed in chunks of
query rows at model shapes so no [B, H, N, M] float64 tensor is ever whole: forward output, head-averaged
map, LSE and the gradients of q, k, v and the token weights (through the output and the map). Model shapes
(bfloat16): Wan-1.3B (N=32760, H=12, D=128, M=512), LTX-Video (N=6144, H=32, D=64, M=128) and CogVideoX
joint attention (N=M=17550+226, H=48, D=64, map over the 226 text keys).

The benchmark table compares, per model shape: SDPA without bias (FlashAttention backend), SDPA with the
bias as an additive mask, compiled FlexAttention with a per-key-bias score_mod, eager attention that also
returns maps, and dare_kernels' Triton (and CUDA) kernels; medians of CUDA-event timings. Built to finish
within one 10-minute GPU session: optional providers are skipped (with the reason) once ``--budget-s`` is
spent; compiling and autotuning dominate a cold start, so when a call runs short, split it
(``--no-bench``, then ``--no-small --no-models``: Triton's on-disk cache keeps the compiled kernels
between calls on the same machine). Exit status 1 when a correctness check fails, including a backend
that raises on a case the capability table (``dare_kernels.benchmarking.capabilities``) does not declare
unsupported. Shapes, peers and tolerances come from the catalog (``dare_kernels.benchmarking``: shapes,
peers, tolerances, capabilities).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from .benchmarking import peers
from .benchmarking.capabilities import unsupported_reason
from .benchmarking.shapes import ATTN_SHAPES, SELFTEST_SHAPES, TINY_SHAPES, AttnShape
from .benchmarking.tolerances import compare, family_scale

# device memory bandwidth (GB/s) for the bytes-over-bandwidth floor of memory-bound shapes
_BANDWIDTH = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


# ---------------------------------------------------------------------------------------------
# inputs and the chunked float64 reference
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case(AttnShape):
    """A model or small shape (name, B, H, N, M, D, map_keys) and how the check runs it."""

    Dv: int | None = None
    dtype: torch.dtype = torch.bfloat16
    w_shape: str | None = "bm"
    mask: bool = True
    want_map: bool = True
    layout: str = "bhnd"
    strength: float = 1.0
    grads: bool = True
    joint: bool = False
    extra: dict = field(default_factory=dict)


def make_inputs(case: Case, device: str, seed: int = 0):
    """Random q, k, v, token weight, key mask for ``case`` (video keys of joint attention keep weight 1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, H, N, M, D = case.B, case.H, case.N, case.M, case.D
    Dv = case.Dv or D

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=case.dtype)

    if case.layout == "bnhd":  # the layout diffusers' attention processors produce: transposed views
        q, k, v = rnd(B, N, H, D).transpose(1, 2), rnd(B, M, H, D).transpose(1, 2), rnd(B, M, H, Dv).transpose(1, 2)
    else:
        q, k, v = rnd(B, H, N, D), rnd(B, H, M, D), rnd(B, H, M, Dv)
    w = None
    if case.w_shape is not None:
        shape = {"m": (M,), "bm": (B, M), "bhm": (B, H, M)}[case.w_shape]
        w = torch.rand(*shape, generator=g) * 1.9 + 0.1
        if case.joint and case.map_keys is not None:
            w[..., : case.map_keys[0]] = 1.0  # video keys unweighted, text keys weighted
        if M > 2:
            w[..., -1] = 0.0  # a dropped key
        w = w.to(device)
    mask = None
    if case.mask:
        mask = torch.ones(B, M, dtype=torch.bool)
        pad = max(1, M // 10) if M > 4 else 0
        if pad:
            mask[:, M - pad:] = False  # trailing text padding
        mask[:, 0] = True
        if case.extra.get("empty_batch") and B > 1:
            mask[1] = False  # a sample with no key at all: o = 0, map = 0, lse = -inf
        mask = mask.to(device)
    return q, k, v, w, mask


def chunked_reference(q, k, v, w, mask, *, strength, map_keys, want_map, go=None, ga=None,
                      max_bytes=1 << 30):
    """Float64 reference in chunks of query rows: (o, map, lse) and, with ``go``, (dq, dk, dv, dw).

    Each chunk materialises [B, H, rows, M] float64 (≤ ``max_bytes``); k, v, w gradients accumulate over
    the chunks through autograd.
    """
    from .reference import sra_attention_ref

    B, H, N, _ = q.shape
    M = k.shape[2]
    rows = max(1, min(N, int(max_bytes // (8 * B * H * M))))
    grads = go is not None
    kd, vd = (t.detach().double().requires_grad_(grads) for t in (k, v))
    wd = None if w is None else w.detach().double().requires_grad_(grads)
    outs, maps, lses, dqs = [], [], [], []
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        qc = q[:, :, i0:i1].detach().double().requires_grad_(grads)
        with torch.set_grad_enabled(grads):
            res = sra_attention_ref(qc, kd, vd, wd, key_padding_mask=mask, strength=strength,
                                    return_attn_map=want_map, attn_map_keys=map_keys, return_lse=True)
            o, a, lse = res if want_map else (res[0], None, res[1])
            if grads:
                loss = (o * go[:, :, i0:i1].double()).sum()
                if want_map and ga is not None:
                    loss = loss + (a * ga[:, i0:i1].double()).sum()
                loss.backward()
                dqs.append(qc.grad)
        outs.append(o.detach())
        lses.append(lse.detach())
        if want_map:
            maps.append(a.detach())
    o = torch.cat(outs, 2)
    lse = torch.cat(lses, 2)
    amap = torch.cat(maps, 1) if want_map else None
    if not grads:
        return (o, amap, lse), None
    dw = None if wd is None else wd.grad
    return (o, amap, lse), (torch.cat(dqs, 2), kd.grad, vd.grad, dw)


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------

def run_backend(backend: str, case: Case, inputs, go, ga):
    """Outputs and gradients of ``sra_attention(backend=...)``: ((o, map, lse), (dq, dk, dv, dw))."""
    from . import sra_attention

    q, k, v, w, mask = inputs
    leaves = [t.detach().clone().requires_grad_(case.grads) for t in (q, k, v)]
    wl = None if w is None else w.detach().clone().requires_grad_(case.grads)
    res = sra_attention(*leaves, wl, key_padding_mask=mask, strength=case.strength,
                        return_attn_map=case.want_map,
                        attn_map_keys=case.map_keys if case.want_map else None, return_lse=True,
                        backend=backend)
    o, a, lse = res if case.want_map else (res[0], None, res[1])
    grads = None
    if case.grads:
        outs, gs = [o], [go.to(o.dtype)]
        if case.want_map:
            outs.append(a)
            gs.append(ga.float())
        torch.autograd.backward(outs, gs)
        grads = (leaves[0].grad, leaves[1].grad, leaves[2].grad, None if wl is None else wl.grad)
    return (o.detach(), None if a is None else a.detach(), lse.detach()), grads


def check_case(case: Case, device: str, backends: list[str], log) -> bool:
    inputs = make_inputs(case, device)
    q = inputs[0]
    B, H, N = q.shape[:3]
    n_map = (case.map_keys[1] - case.map_keys[0]) if case.map_keys else case.M
    g = torch.Generator(device="cpu").manual_seed(1)
    # gradients representable in the input dtype, so the reference sees exactly what the kernel sees
    go = (torch.randn(B, H, N, case.Dv or case.D, generator=g).to(case.dtype).float().to(device)
          if case.grads else None)
    ga = (torch.randn(B, N, n_map, generator=g) * N ** 0.5).to(device) if case.grads and case.want_map else None
    t0 = time.perf_counter()
    (ro, ra, rl), rgrads = chunked_reference(*inputs, strength=case.strength, map_keys=case.map_keys,
                                             want_map=case.want_map, go=go, ga=ga)
    t_ref = time.perf_counter() - t0
    ok_all = True
    results = {}
    shape_info = dict(B=B, H=H, N=N, M=case.M, D=case.D, Dv=case.Dv or case.D)
    for backend in backends:
        why = unsupported_reason("sra_attention", backend, device, case.dtype, **shape_info)
        if why is not None:  # declared in the capability table: a skip, with the reason
            log(f"  {case.name:<34} {backend:<7} unsupported (declared): {why}")
            continue
        t0 = time.perf_counter()
        try:
            (o, a, lse), grads = run_backend(backend, case, inputs, go, ga)
        except Exception as exc:  # a supported case that raises is a failure; go on so it hides no other
            log(f"  {case.name:<34} {backend:<7} FAIL raised {type(exc).__name__}: {str(exc)[:300]}")
            ok_all = False
            continue
        if device == "cuda":
            torch.cuda.synchronize()
        t_run = time.perf_counter() - t0
        checks = [("o", compare(o, ro, case.dtype, "out")), ("lse", compare(lse, rl, case.dtype, "lse"))]
        if case.want_map:
            checks.append(("map", compare(a, ra, case.dtype, "map")))
        if grads is not None:
            gscale = family_scale(*rgrads)  # one key: dq = dk = dw = 0 exactly; dv carries the scale
            for name, got, want in zip(("dq", "dk", "dv", "dw"), grads, rgrads):
                if want is not None:
                    checks.append((name, compare(got, want, case.dtype, "grad", scale=gscale)))
        ok = all(v.ok for _, v in checks)
        ok_all &= ok
        results[backend] = (o, a, lse)
        detail = "  ".join(f"{n}:{v.max_err:.1e}({v.ratio:.2f})" for n, v in checks)
        log(f"  {case.name:<34} {backend:<7} {'ok  ' if ok else 'FAIL'} {detail}   "
            f"[{t_run:.2f}s, ref {t_ref:.2f}s]")
    if "triton" in results and "cuda" in results:  # the two fast paths against each other
        (o1, a1, l1), (o2, a2, l2) = results["triton"], results["cuda"]
        e = [compare(o1, o2, case.dtype, "out", 2.0), compare(l1, l2, case.dtype, "lse", 2.0)]
        if case.want_map:
            e.append(compare(a1, a2, case.dtype, "map", 2.0))
        ok = all(v.ok for v in e)
        ok_all &= ok
        log(f"  {case.name:<34} cuda~triton {'ok  ' if ok else 'FAIL'} max diff "
            + " ".join(f"{v.max_err:.1e}" for v in e))
    return ok_all


def small_cases(device: str) -> list[Case]:
    if device == "cpu":
        return [
            Case("f32 M=20 map bhm", 1, 2, 20, 20, 16, dtype=torch.float32, w_shape="bhm"),
            Case("bf16 M=77 D=40 map(5,30)", 1, 2, 24, 77, 40, map_keys=(5, 30)),
            Case("bf16 empty rows", 2, 2, 20, 30, 16, extra={"empty_batch": True}),
        ]
    cases = []
    for dtype in (torch.float32, torch.float16):  # exact-float32 dots, and fp16 tensor cores
        tag = str(dtype).split(".")[-1]
        cases += [Case(f"{tag} M=77 D=64 map(25,77)", 2, 3, 300, 77, 64, dtype=dtype, map_keys=(25, 77)),
                  Case(f"{tag} M=1000 D=64 online", 2, 3, 300, 1000, 64, dtype=dtype, w_shape="bhm"),
                  Case(f"{tag} M=226 D=160", 1, 3, 300, 226, 160, dtype=dtype, layout="bnhd")]
    # bfloat16: every head dim, key lengths 1 / 77 / 226 / 512 / 1000 (one block and online softmax)
    for M, D, extra in ((1, 64, {}), (77, 40, {}), (77, 80, {"w_shape": "bhm"}), (226, 96, {"map_keys": (0, 77)}),
                        (226, 160, {}), (512, 128, {"layout": "bnhd"}), (512, 256, {}),
                        (1000, 64, {"map_keys": (900, 1000)})):
        cases.append(Case(f"bf16 M={M} D={D}", 2, 3, 300, M, D, **extra))
    cases.append(Case("bf16 Dv!=D M=226", 1, 4, 257, 226, 64, Dv=128))
    cases.append(Case("bf16 no weight no mask", 2, 2, 130, 77, 64, w_shape=None, mask=False))
    cases.append(Case("bf16 [M] weights, no map", 2, 2, 129, 77, 64, w_shape="m", want_map=False))
    cases.append(Case("bf16 γ=0.5 M=300 N=2000", 1, 8, 2000, 300, 64, strength=0.5))
    cases.append(Case("bf16 empty rows M=77", 2, 2, 200, 77, 64, extra={"empty_batch": True}))
    cases.append(Case("bf16 empty rows M=600", 2, 2, 200, 600, 64, map_keys=(500, 600),
                      extra={"empty_batch": True}))
    return cases


def model_cases(device: str) -> list[Case]:
    shapes = list(TINY_SHAPES.values()) if device == "cpu" else [ATTN_SHAPES[n] for n in SELFTEST_SHAPES]
    return [Case(s.name, s.B, s.H, s.N, s.M, s.D, map_keys=s.map_keys, joint=s.map_keys is not None,
                 layout="bnhd")
            for s in shapes]


def available_backends(device: str, log) -> list[str]:
    from . import _ext

    backends = []
    for b in ("triton", "cuda"):
        why = unsupported_reason("sra_attention", b, device, torch.bfloat16)
        if why is None:
            backends.append(b)
        else:
            log(f"  backend {b!r} skipped: {why}")
    if device == "cuda" and "cuda" not in backends and not _ext.has_cuda_kernels():
        log("  (the CUDA SRA kernels are compared once the extension is built with them)")
    return backends


# ---------------------------------------------------------------------------------------------
# benchmarks
# ---------------------------------------------------------------------------------------------

def _timer(device: str):
    if device == "cuda":
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return bench

    def bench_cpu(fn):  # interpreter smoke run: a couple of calls, median
        fn()
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[len(ts) // 2]
    return bench_cpu


def benchmark_shape(case: Case, device: str, backends: list[str], deadline: float, log) -> list[dict]:
    from . import sra_attention

    bench = _timer(device)
    q, k, v, w, mask = make_inputs(case, device, seed=3)
    B, H, N, D = q.shape
    M = k.shape[2]
    n_map = (case.map_keys[1] - case.map_keys[0]) if case.map_keys else M
    flops_fwd = 4.0 * B * H * N * M * D
    elt = q.element_size()
    bytes_fwd = elt * (q.numel() * 2 + k.numel() + v.numel())
    bias = peers.sra_bias(w, case.strength, q.dtype, key_padding_mask=mask)  # [B, 1|H, 1, M]
    go = torch.randn_like(q)
    rows = []

    def record(provider, mode, fn, flops, nbytes=None, note=""):
        if time.perf_counter() > deadline:
            rows.append(dict(shape=case.name, provider=provider, mode=mode, ms=None, note="skipped: time budget"))
            return
        try:
            ms = bench(fn)
        except Exception as exc:
            rows.append(dict(shape=case.name, provider=provider, mode=mode, ms=None,
                             note=f"error {type(exc).__name__}: {str(exc)[:120]}"))
            return
        rows.append(dict(shape=case.name, provider=provider, mode=mode, ms=ms,
                         tflops=flops / ms / 1e9 if flops else None,
                         gbps=nbytes / ms / 1e6 if nbytes else None, note=note))

    def skip(provider, mode, why):
        rows.append(dict(shape=case.name, provider=provider, mode=mode, ms=None, note=f"skipped: {why}"))

    def with_grad(*ts):
        return [t.detach().requires_grad_() for t in ts]

    def bwd_of(fwd_fn, leaves, grads):
        outs = fwd_fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return lambda: torch.autograd.grad(outs[: len(grads)], leaves, grads, retain_graph=True)

    # --- SDPA without bias (FlashAttention backend on GPU) and with the bias as an additive mask
    sdpa_flash = peers.sdpa_flash

    def sdpa_bias(q_, k_, v_):
        return peers.sdpa_with_bias(q_, k_, v_, bias)

    record("sdpa_flash (no bias)", "fwd", lambda: sdpa_flash(q, k, v), flops_fwd, bytes_fwd)
    record("sdpa_bias", "fwd", lambda: sdpa_bias(q, k, v), flops_fwd, bytes_fwd)
    for name, fn in (("sdpa_flash (no bias)", sdpa_flash), ("sdpa_bias", sdpa_bias)):
        try:
            record(name, "bwd", bwd_of(fn, with_grad(q, k, v), (go,)), 2.5 * flops_fwd)
        except Exception as exc:
            skip(name, "bwd", f"{type(exc).__name__}: {str(exc)[:100]}")

    # --- dare_kernels backends
    for backend in backends:
        def fwd(q_, k_, v_, w_, backend=backend, want_map=False):
            return sra_attention(q_, k_, v_, w_, key_padding_mask=mask, strength=case.strength,
                                 return_attn_map=want_map,
                                 attn_map_keys=case.map_keys if want_map else None, backend=backend)
        nb_map = bytes_fwd + 4 * B * N * n_map
        record(f"dare_{backend}", "fwd", lambda: fwd(q, k, v, w), flops_fwd, bytes_fwd)
        record(f"dare_{backend}", "fwd+map", lambda: fwd(q, k, v, w, want_map=True), flops_fwd, nb_map,
               note=_map_path_note(backend, M, D, v.shape[-1]) if device == "cuda" else "")
        if backend == "triton" and device == "cuda" and case.map_keys is None:
            # the map path the heuristic did not pick, for the record (it may not fit: then an error row)
            from .triton import sra_attention as tsra
            p2 = tsra._pow2
            fused = tsra._use_fused_map(p2(M), p2(D), p2(v.shape[-1]))
            tsra.FORCE_MAP_PATH = "two-kernel" if fused else "fused"
            try:
                record("dare_triton", "fwd+map (two-kernel)" if fused else "fwd+map (fused head loop)",
                       lambda: fwd(q, k, v, w, want_map=True), flops_fwd, nb_map)
            finally:
                tsra.FORCE_MAP_PATH = None
        leaves = with_grad(q, k, v, w)
        record(f"dare_{backend}", "bwd", bwd_of(lambda *a: fwd(*a), leaves, (go,)), 2.5 * flops_fwd)
        ga = torch.randn(B, N, n_map, device=q.device)
        record(f"dare_{backend}", "bwd (with map grad)",
               bwd_of(lambda *a: fwd(*a, want_map=True), leaves, (go, ga)), 2.5 * flops_fwd)

        def fwd_bwd():
            lv = with_grad(q, k, v, w)
            o = fwd(*lv)
            torch.autograd.grad(o, lv, go)
        record(f"dare_{backend}", "fwd+bwd", fwd_bwd, 3.5 * flops_fwd)

    # --- compiled FlexAttention with a per-key-bias score_mod
    if device != "cuda":
        skip("flex_compiled", "fwd", "CPU smoke run (FlexAttention is benchmarked on GPU)")
    elif time.perf_counter() > deadline:
        skip("flex_compiled", "fwd", "time budget")
    else:
        try:
            def flex(q_, k_, v_):
                return peers.flex_with_bias(q_, k_, v_, bias)

            record("flex_compiled", "fwd", lambda: flex(q, k, v), flops_fwd, bytes_fwd)
            record("flex_compiled", "bwd", bwd_of(flex, with_grad(q, k, v), (go,)), 2.5 * flops_fwd)
        except Exception as exc:
            skip("flex_compiled", "fwd", f"{type(exc).__name__}: {str(exc)[:100]}")

    # --- eager attention returning the head-averaged map
    need = B * H * N * M * 4 * 3
    if device == "cuda" and need > 0.6 * torch.cuda.mem_get_info()[0]:
        skip("eager_maps", "fwd+map", f"would materialise {need / 2**30:.0f} GiB of scores")
    else:
        record("eager_maps", "fwd+map", lambda: peers.eager_with_maps(q, k, v, bias, case.map_keys, upcast=True),
               flops_fwd)
    return rows


def log_autotuned_configs(log) -> dict:
    """The configuration the autotuner chose per kernel and key (to record with the benchmark)."""
    from .triton import sra_attention as tsra

    log("\n== autotuned configs (kernel: key -> config) ==")
    chosen = {}
    for name in ("sra_fwd_kernel", "sra_fwd_map_kernel", "sra_map_kernel", "sra_bwd_dkdv_kernel",
                 "sra_bwd_dq_kernel"):
        tuner = tsra._tuned_kernel(name)
        for key, cfg in getattr(tuner, "cache", {}).items():
            log(f"  {name}: {key} -> {cfg}")
            chosen[f"{name} {key}"] = str(cfg)
    return chosen


def _map_path_note(backend: str, M: int, D: int, Dv: int) -> str:
    if backend != "triton":
        return ""
    from .triton import sra_attention as tsra

    p2 = tsra._pow2
    return "fused head loop" if tsra._use_fused_map(p2(M), p2(D), p2(Dv)) else "two-kernel"


def print_table(rows: list[dict], log, device_name: str) -> None:
    bw = next((v for k, v in _BANDWIDTH.items() if k in device_name), None)
    log(f"{'shape':<16} {'provider':<22} {'mode':<26} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7} {'x sdpa':>7}  note")
    by_shape: dict[str, dict] = {}
    for r in rows:
        if r["provider"].startswith("sdpa_flash") and r["ms"]:
            by_shape.setdefault(r["shape"], {})[r["mode"].split()[0]] = r["ms"]
    for r in rows:
        ms = r.get("ms")
        base = by_shape.get(r["shape"], {}).get("bwd" if "bwd" in r["mode"] and "fwd" not in r["mode"] else "fwd")
        ratio = f"{base / ms:7.2f}" if ms and base else f"{'':>7}"
        tf = f"{r['tflops']:8.1f}" if ms and r.get("tflops") else f"{'':>8}"
        gb = f"{r['gbps']:7.0f}" if ms and r.get("gbps") else f"{'':>7}"
        note = r.get("note", "")
        if ms and r.get("gbps") and bw:
            note = (note + f" {100 * r['gbps'] / bw:.0f}% of {bw:.0f} GB/s").strip()
        log(f"{r['shape']:<16} {r['provider']:<22} {r['mode']:<26} "
            f"{(f'{ms:9.3f}' if ms else '        -')} {tf} {gb} {ratio}  {note}")


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------

def _print_flush(line: str) -> None:
    print(line, flush=True)


def run(device: str = "cuda", *, bench: bool = True, models: bool = True, small: bool = True,
        budget_s: float = 480.0, json_path: str | None = None, log=_print_flush) -> int:
    """Run the self-check on ``device`` ("cuda", or "cpu" in Triton's interpreter); returns an exit status."""
    t_start = time.perf_counter()
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if "dare_kernels.triton.sra_attention" in sys.modules and \
                not sys.modules["dare_kernels.triton.sra_attention"]._INTERPRET_AT_IMPORT:
            log("the Triton kernels were imported before TRITON_INTERPRET=1 was set; run in a fresh process")
            return 2
    elif not torch.cuda.is_available():
        log("selftest --device cuda: no CUDA device here (use --device cpu for the interpreter smoke run)")
        return 2
    import dare_kernels

    info = dare_kernels.info()
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    log(f"dare_kernels {info['version']} torch {info['torch']} on {dev_name}")
    try:
        import triton
        log(f"triton {triton.__version__}")
    except ImportError:
        pass
    backends = available_backends(device, log)
    if "triton" not in backends:
        log("the Triton backend is not usable here: nothing to check")
        return 2
    ok = True
    report: dict = {"device": dev_name, "torch": info["torch"], "checks": [], "bench": []}

    def logged_check(case):
        nonlocal ok
        lines = []

        def cap(line):
            lines.append(line)
            log(line)
        passed = check_case(case, device, backends, cap)
        ok &= passed
        report["checks"].append({"case": case.name, "passed": passed, "lines": lines})

    if small:
        log("\n== correctness, small shapes (float64 reference) ==")
        from .triton import sra_attention as tsra
        previous = tsra.set_autotune(False)  # one heuristic config: compile once per variant
        try:
            for case in small_cases(device):
                logged_check(case)
        finally:
            tsra.set_autotune(previous)
    if models:
        log("\n== correctness, model shapes (bf16 vs chunked float64 reference, autotuned kernels) ==")
        for case in model_cases(device):
            logged_check(case)
            if device == "cuda":
                torch.cuda.empty_cache()
    if bench:
        log("\n== benchmark (medians; ratios against SDPA without bias, FlashAttention backend) ==")
        deadline = t_start + budget_s
        for case in model_cases(device):
            report["bench"] += benchmark_shape(case, device, backends, deadline, log)
            if device == "cuda":
                torch.cuda.empty_cache()
        print_table(report["bench"], log, dev_name)
    if device == "cuda":
        report["autotuned"] = log_autotuned_configs(log)
    log(f"\nselftest {'PASSED' if ok else 'FAILED'} in {time.perf_counter() - t_start:.0f}s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if ok else 1


def add_parser(subparsers) -> None:
    """The ``selftest`` subcommand of the dare-kernels CLI."""
    p = subparsers.add_parser("selftest", help="correctness of the GPU kernels against the reference, "
                                               "then a benchmark table (one GPU session)")
    _add_arguments(p)
    p.set_defaults(func=_cmd)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: the real check; cpu: a tiny run in Triton's interpreter")
    p.add_argument("--no-bench", action="store_true", help="correctness only")
    p.add_argument("--no-small", action="store_true", help="skip the small-shape correctness sweep")
    p.add_argument("--no-models", action="store_true", help="skip correctness at model shapes")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="seconds after which optional benchmark rows are skipped (default 480)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _cmd(args: argparse.Namespace) -> int:
    return run(args.device, bench=not args.no_bench, models=not args.no_models, small=not args.no_small,
               budget_s=args.budget_s, json_path=args.json)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dare_kernels.selftest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return _cmd(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
