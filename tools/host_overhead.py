#!/usr/bin/env python3
"""Host overhead of one sra_attention / rectified_cfg call: what the Python wrapper, the backend choice, the
custom-op dispatch and the autograd wrapper cost per call, and (on a GPU) eager calls against CUDA-graph replay.

(a) layers: µs per call of each piece of the call path, on tiny inputs so the kernels cost next to nothing:
    a Python call with the same signature (the floor), the input checks, the backend choice, the op lookup,
    the weight expansion, the compiled op called directly (C++ dispatch + a tiny kernel), the same with inputs
    that require grad (the autograd wrapper), a Python custom op that only allocates the outputs (the
    torch.library dispatch of a Python op), the Triton op with its kernel launches stubbed out (its wrapper up
    to the launch), and the public calls. CPU tensors with --device cpu (Triton through its interpreter set-up,
    launches stubbed); CUDA tensors with --device cuda (the C++ ops launch their real tiny kernels; the loop
    does not synchronise, so the time per call is the host's).
(b) CUDA only: SRA forward at the LTX-Video shape (B1 H32 N6144 M128 D64, bf16) and rectified_cfg (CFG +
    rescale 0.7 on the Wan 81-frame latent [2, 16, 21, 60, 104], bf16), Triton and CUDA backends: host time to
    enqueue one eager call, eager calls back to back, and replays of the same call captured in a CUDA graph;
    eager - replay = what the host adds per call. A failed capture is recorded with the error, and the host
    synchronisations torch's sync debug mode finds in one eager call are listed by file:line.

Writes host_overhead.json and host_overhead.md into --out.

    python tools/host_overhead.py --out DIR --device cuda|cpu [--calls N --repeats R]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

LTX = dict(B=1, H=32, N=6144, M=128, D=64)
LATENT = (2, 16, 21, 60, 104)
TINY = dict(B=1, H=2, N=16, M=8, D=16)
TINY_LATENT = (2, 4, 2, 4, 4)


def per_call_us(fn, calls: int, repeats: int, sync=None) -> dict:
    """µs per call of ``fn``: the minimum (least disturbed) and median over ``repeats`` loops of ``calls`` calls."""
    for _ in range(max(3, calls // 20)):
        fn()
    if sync is not None:
        sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync is not None:
            sync()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    samples.sort()
    return {"min_us": samples[0], "median_us": samples[len(samples) // 2]}


def _recorder(rows: list, op: str, calls: int, repeats: int, sync):
    """``add(layer, what, fn, skip=None)``: times ``fn`` into a row of ``rows`` (or records why not: a skip
    reason, or the error it raised, so that one failing layer does not stop the others)."""
    def add(layer, what, fn, skip=None):
        row = dict(op=op, layer=layer, what=what)
        if skip:
            rows.append(dict(row, status="skipped", reason=skip))
            return
        try:
            rows.append(dict(row, status="ok", **per_call_us(fn, calls, repeats, sync)))
        except Exception as exc:  # noqa: BLE001 - recorded, the others go on
            rows.append(dict(row, status="error", reason=f"{type(exc).__name__}: {str(exc)[:200]}"))
    return add


class _StubLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` does nothing (the launch is not timed)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_triton_launches():
    """Replace the Triton kernels of both ops by no-op launches (yields the reason when Triton cannot load)."""
    try:
        from dare_kernels.triton import rectified_cfg as tcfg
        from dare_kernels.triton import sra_attention as tsra
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        yield f"Triton ops not importable: {type(exc).__name__}: {exc}"
        return
    stub = _StubLaunch()
    # every module-level kernel of the CFG op (their number depends on the kernel design: find them by name)
    saved = [(tsra, "_kernel", tsra._kernel)] + [(tcfg, n, getattr(tcfg, n)) for n in sorted(vars(tcfg))
                                                 if n.startswith("_") and n.endswith("_kernel")]
    tsra._kernel = lambda name: stub
    for mod, name, _ in saved[1:]:
        setattr(mod, name, stub)
    try:
        yield None
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _alloc_op():
    """A Python custom op with the SRA forward schema that only allocates its outputs (torch.library dispatch)."""
    name = "dare_host_overhead::alloc_like_sra_fwd"
    ns, op = name.split("::")
    if hasattr(getattr(torch.ops, ns), op):
        return getattr(getattr(torch.ops, ns), op).default

    @torch.library.custom_op(name, mutates_args=())
    def alloc_like(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, token_weight: Optional[torch.Tensor],
                   key_padding_mask: Optional[torch.Tensor], strength: float, scale: float, map_start: int,
                   map_stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _alloc3(query, value, map_stop - map_start)

    return getattr(getattr(torch.ops, ns), op).default


def _alloc3(query, value, n_map):
    B, H, N, _ = query.shape
    out = query.new_empty((B, N, H, value.shape[3])).transpose(1, 2)
    lse = torch.empty((B, H, N), device=query.device, dtype=torch.float32)
    amap = torch.empty((B, N, n_map), device=query.device, dtype=torch.float32)
    return out, lse, amap


def _below_autograd(fn):
    """``fn`` called with dispatch below the Autograd key: the op's kernel without its autograd wrapper."""
    def call():
        with torch._C._AutoDispatchBelowAutograd():
            return fn()
    return call


def _triton_reason(device: str) -> str | None:
    from dare_kernels import backends

    return backends.unsupported_reason("sra_attention", "triton", torch.device(device), torch.float32)


def sra_layers(device: str, calls: int, repeats: int) -> list[dict]:
    """µs per call of each layer of one sra_attention call on tiny inputs (see the module docstring)."""
    from dare_kernels import backends, sra
    from dare_kernels.reference import expand_token_weight

    s = TINY
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s["B"], s["H"], s["N"], s["D"], generator=g).to(device, dtype)
    k = torch.randn(s["B"], s["H"], s["M"], s["D"], generator=g).to(device, dtype)
    v = torch.randn(s["B"], s["H"], s["M"], s["D"], generator=g).to(device, dtype)
    w = (torch.rand(s["B"], s["M"], generator=g) + 0.1).to(device)
    mask = torch.ones(s["B"], s["M"], dtype=torch.bool, device=device)
    w3 = expand_token_weight(w, s["B"], s["H"], s["M"])
    scale = s["D"] ** -0.5
    sync = torch.cuda.synchronize if device == "cuda" else None
    compiled = "cpu" if device == "cpu" else "cuda"
    rows = []
    add = _recorder(rows, "sra_attention", calls, repeats, sync)

    def noop(query, key, value, token_weight=None, *, key_padding_mask=None, strength=1.0, scale=None,
             return_attn_map=False, attn_map_keys=None, return_lse=False, backend="auto"):
        return query

    add("python_call", "a no-op Python function with sra_attention's signature", lambda: noop(q, k, v, w, key_padding_mask=mask))
    add("check_inputs", "sra._check_inputs",
        lambda: sra._check_inputs(q, k, v, w, mask, 1.0, None, return_attn_map=False, attn_map_keys=None))
    add("choose_auto", "backends.choose(backend='auto')",
        lambda: backends.choose("sra_attention", "auto", q.device, q.dtype, head_dim=s["D"], head_dim_v=s["D"]))
    add(f"choose_{compiled}", f"backends.choose(backend='{compiled}')",
        lambda: backends.choose("sra_attention", compiled, q.device, q.dtype, head_dim=s["D"], head_dim_v=s["D"]))
    why_triton = _triton_reason(device)
    add("choose_triton", "backends.choose(backend='triton')",
        lambda: backends.choose("sra_attention", "triton", q.device, q.dtype, head_dim=s["D"], head_dim_v=s["D"]),
        skip=why_triton)
    add("ops_for", "backends.ops_for (cached op lookup)", lambda: backends.ops_for("sra_attention", compiled))
    add("expand_weight", "expand_token_weight [B, M] -> [B, H, M] view", lambda: expand_token_weight(w, s["B"], s["H"], s["M"]))
    add("alloc_outputs", "the three output allocations (out, lse, map) in Python", lambda: _alloc3(q, v, 0))
    pyop = _alloc_op()
    add("python_custom_op", "a torch.library Python custom op that only allocates the outputs",
        lambda: pyop(q, k, v, w3, mask, 1.0, scale, 0, 0))
    why_compiled = backends.unsupported_reason("sra_attention", compiled, q.device, q.dtype)
    fwd = backends.ops_for("sra_attention", compiled)[0] if why_compiled is None else None
    add(f"op_{compiled}", f"the {compiled} forward op called directly (dispatch + tiny kernel)",
        lambda: fwd(q, k, v, w3, mask, 1.0, scale, 0, 0), skip=why_compiled)
    add(f"op_{compiled}_below_autograd", "the same below the Autograd key (without the op's Python autograd shim)",
        _below_autograd(lambda: fwd(q, k, v, w3, mask, 1.0, scale, 0, 0)), skip=why_compiled)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    add(f"op_{compiled}_autograd", "the same with inputs that require grad (autograd node, saved tensors)",
        lambda: fwd(qg, kg, vg, w3, mask, 1.0, scale, 0, 0), skip=why_compiled)
    add(f"sra_attention_{compiled}", f"sra_attention(backend='{compiled}'), no grad",
        lambda: sra.sra_attention(q, k, v, w, key_padding_mask=mask, backend=compiled), skip=why_compiled)
    add(f"sra_attention_{compiled}_grad", f"sra_attention(backend='{compiled}') with inputs that require grad",
        lambda: sra.sra_attention(qg, kg, vg, w, key_padding_mask=mask, backend=compiled), skip=why_compiled)
    with stubbed_triton_launches() as why_stub:
        why = why_triton or why_stub
        tfwd = backends.ops_for("sra_attention", "triton")[0] if why is None else None
        add("op_triton_stubbed", "the Triton forward op, kernel launch stubbed out (wrapper up to the launch)",
            lambda: tfwd(q, k, v, w3, mask, 1.0, scale, 0, 0), skip=why)
        add("op_triton_stubbed_map", "the same with a map (two-kernel or fused-map path), launch stubbed",
            lambda: tfwd(q, k, v, w3, mask, 1.0, scale, 0, s["M"]), skip=why)
        add("sra_attention_triton_stubbed", "sra_attention(backend='triton'), launch stubbed, no grad",
            lambda: sra.sra_attention(q, k, v, w, key_padding_mask=mask, backend="triton"), skip=why)
    return rows


def cfg_layers(device: str, calls: int, repeats: int) -> list[dict]:
    """µs per call of each layer of one rectified_cfg call (CFG + rescale) on a tiny latent."""
    from dare_kernels import backends, cfg

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    preds = torch.randn(*TINY_LATENT, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    out = torch.empty_like(preds[:1])
    u, c = preds.chunk(2)
    sync = torch.cuda.synchronize if device == "cuda" else None
    compiled = "cpu" if device == "cpu" else "cuda"
    rows = []
    add = _recorder(rows, "rectified_cfg", calls, repeats, sync)

    add("check_inputs", "cfg._check_inputs", lambda: cfg._check_inputs(preds, 5.0, None, "cfg", 0.0, 0.7, 1.0, 0.0,
                                                                     None, None, None, out, compiled))
    add(f"choose_{compiled}", f"backends.choose(backend='{compiled}')",
        lambda: backends.choose("rectified_cfg", compiled, preds.device, preds.dtype))
    why_compiled = backends.unsupported_reason("rectified_cfg", compiled, preds.device, preds.dtype)
    fused = backends.ops_for("rectified_cfg", compiled)[0] if why_compiled is None else None
    add(f"op_{compiled}", f"the {compiled} fused op called directly (dispatch + tiny kernel)",
        lambda: fused(u, c, None, None, out, 4, "cfg", 5.0, 0.0, 0.7, 1.0, 0.0, 0.0), skip=why_compiled)
    add(f"op_{compiled}_below_autograd", "the same below the Autograd key",
        _below_autograd(lambda: fused(u, c, None, None, out, 4, "cfg", 5.0, 0.0, 0.7, 1.0, 0.0, 0.0)),
        skip=why_compiled)
    add(f"rectified_cfg_{compiled}", f"rectified_cfg(backend='{compiled}', out=...)",
        lambda: cfg.rectified_cfg(preds, 5.0, guidance_rescale=0.7, out=out, backend=compiled), skip=why_compiled)
    why_triton = backends.unsupported_reason("rectified_cfg", "triton", preds.device, preds.dtype)
    with stubbed_triton_launches() as why_stub:
        why = why_triton or why_stub
        tfused = backends.ops_for("rectified_cfg", "triton")[0] if why is None else None
        add("op_triton_stubbed", "the Triton fused op, its launches stubbed out",
            lambda: tfused(u, c, None, None, out, 4, "cfg", 5.0, 0.0, 0.7, 1.0, 0.0, 0.0), skip=why)
        add("rectified_cfg_triton_stubbed", "rectified_cfg(backend='triton', out=...), launches stubbed",
            lambda: cfg.rectified_cfg(preds, 5.0, guidance_rescale=0.7, out=out, backend="triton"), skip=why)
    return rows


def derived(rows: list[dict]) -> list[dict]:
    """What each layer adds, as differences of the measured minima (µs per call)."""
    m = {(r["op"], r["layer"]): r["min_us"] for r in rows if r.get("status") == "ok"}
    out = []

    def diff(op, name, a, b=None, note=""):
        if (op, a) in m and (b is None or (op, b) in m):
            out.append(dict(op=op, cost=name, us=m[(op, a)] - (m[(op, b)] if b else 0.0),
                            from_=f"{a}" + (f" - {b}" if b else ""), note=note))

    for dev in ("cpu", "cuda"):
        diff("sra_attention", "public wrapper (checks, choice, expansion, packing)", f"sra_attention_{dev}", f"op_{dev}")
        diff("sra_attention", "autograd wrapper of the op, inputs that require grad", f"op_{dev}_autograd",
             f"op_{dev}")
        diff("sra_attention", "the op's Python autograd shim, no grad needed", f"op_{dev}", f"op_{dev}_below_autograd",
             note="torch.library.register_autograd runs Python on every call")
        diff("sra_attention", "kernel + C++ dispatch (tiny inputs)", f"op_{dev}_below_autograd")
        diff("rectified_cfg", "the op's autograd shim, no grad needed", f"op_{dev}", f"op_{dev}_below_autograd")
        diff("sra_attention", "whole call, grad inputs", f"sra_attention_{dev}_grad")
        diff("sra_attention", "whole call, no grad", f"sra_attention_{dev}")
        diff("rectified_cfg", "public wrapper (checks, choice, views)", f"rectified_cfg_{dev}", f"op_{dev}")
        diff("rectified_cfg", "whole call", f"rectified_cfg_{dev}")
    diff("sra_attention", "input checks", "check_inputs", "python_call")
    diff("sra_attention", "torch.library dispatch of a Python custom op", "python_custom_op", "alloc_outputs")
    diff("sra_attention", "Triton op wrapper up to the launch, beyond the custom-op dispatch", "op_triton_stubbed",
         "python_custom_op")
    diff("sra_attention", "Triton public call up to the launch", "sra_attention_triton_stubbed",
         note="the launches themselves (Triton's argument binding and the driver call) are not in it")
    diff("rectified_cfg", "Triton public call up to the launches", "rectified_cfg_triton_stubbed")
    return out


# ---------------------------------------------------------------------------------------------
# (b) CUDA: eager vs CUDA-graph replay
# ---------------------------------------------------------------------------------------------

def sync_sites(fn) -> list[str]:
    """file:line of the dare_kernels frames where one call of ``fn`` synchronises with the GPU (sync debug mode)."""
    sites = []
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "dare_kernels" in f.filename]
        where = [f"{Path(f.filename).relative_to(ROOT) if str(f.filename).startswith(str(ROOT)) else f.filename}:"
                 f"{f.lineno}" for f in frames]
        sites.append(f"{'; '.join(where) or 'outside dare_kernels'}: {str(exc).splitlines()[0][:160]}")
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    return sites


def graph_case(name: str, fn, calls: int) -> dict:
    """Host enqueue time, eager back-to-back time and CUDA-graph replay time of ``fn`` (µs per call)."""
    row: dict = {"case": name}
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    row["enqueue_us"] = (t1 - t0) / calls * 1e6
    row["eager_us"] = (t2 - t0) / calls * 1e6
    row["sync_sites"] = sync_sites(fn)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            graph.replay()
        torch.cuda.synchronize()
        row["replay_us"] = (time.perf_counter() - t0) / calls * 1e6
        row["host_overhead_us"] = row["eager_us"] - row["replay_us"]
        row["capture"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failed capture is a finding
        row["capture"] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:240]}"
        try:
            torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 - a capture error can surface again here; it is the same finding
            row["capture"] += f" (then at synchronize: {type(err).__name__})"
    return row


def cuda_graph_cases(calls: int) -> list[dict]:
    import dare_kernels as dk
    from dare_kernels import backends

    s = LTX
    g = torch.Generator().manual_seed(0)

    def rnd(rows):
        return torch.randn(s["B"], rows, s["H"], s["D"], generator=g).to("cuda", torch.bfloat16).transpose(1, 2)

    q, k, v = rnd(s["N"]), rnd(s["M"]), rnd(s["M"])
    w = (torch.rand(s["B"], s["M"], generator=g) * 1.9 + 0.1).cuda()
    mask = torch.ones(s["B"], s["M"], dtype=torch.bool, device="cuda")
    preds = torch.randn(*LATENT, generator=g).to("cuda", torch.bfloat16)
    out = torch.empty_like(preds[:1])
    rows = []
    for backend in ("triton", "cuda"):
        why = backends.unsupported_reason("sra_attention", backend, q.device, q.dtype, head_dim=s["D"])
        name = f"sra_attention fwd LTX {backend}"
        if why:
            rows.append({"case": name, "capture": f"skipped: {why}"})
        else:
            rows.append(graph_case(name, lambda b=backend: dk.sra_attention(q, k, v, w, key_padding_mask=mask,
                                                                             backend=b), calls))
        why = backends.unsupported_reason("rectified_cfg", backend, preds.device, preds.dtype)
        name = f"rectified_cfg cfg+rescale Wan latent {backend}"
        if why:
            rows.append({"case": name, "capture": f"skipped: {why}"})
        else:
            rows.append(graph_case(name, lambda b=backend: dk.rectified_cfg(preds, 5.0, guidance_rescale=0.7, out=out,
                                                                             backend=b), calls))
    return rows


def markdown(report: dict) -> str:
    lines = [f"## Host overhead ({report['device']}, torch {report['torch']}, {report['machine']})", "",
             "| op | layer | what | µs/call (min) | median | status |", "|---|---|---|---:|---:|---|"]
    for r in report["layers"]:
        st = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')[:90]}"
        mn = f"{r['min_us']:.2f}" if "min_us" in r else ""
        md = f"{r['median_us']:.2f}" if "median_us" in r else ""
        lines.append(f"| {r['op']} | {r['layer']} | {r['what']} | {mn} | {md} | {st.replace('|', '/')} |")
    lines += ["", "| op | cost | µs/call | from | note |", "|---|---|---:|---|---|"]
    for d in report["derived"]:
        lines.append(f"| {d['op']} | {d['cost']} | {d['us']:.2f} | {d['from_']} | {d['note']} |")
    lines += ["", "| case | enqueue µs | eager µs | replay µs | eager - replay µs | capture | host syncs |",
              "|---|---:|---:|---:|---:|---|---|"]
    for c in report["graphs"]:
        f = {k: (f"{c[k]:.1f}" if isinstance(c.get(k), float) else "") for k in
             ("enqueue_us", "eager_us", "replay_us", "host_overhead_us")}
        syncs = "; ".join(c.get("sync_sites", [])) or ("none" if "sync_sites" in c else "")
        lines.append(f"| {c['case']} | {f['enqueue_us']} | {f['eager_us']} | {f['replay_us']} | "
                     f"{f['host_overhead_us']} | {c.get('capture', '')} | {syncs.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder of host_overhead.json and host_overhead.md")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed loop of a layer")
    ap.add_argument("--repeats", type=int, default=7, help="timed loops per layer (the minimum is reported)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton ops accept CPU tensors (launches are stubbed)
    args.out.mkdir(parents=True, exist_ok=True)
    import dare_kernels  # noqa: F401  (after TRITON_INTERPRET)

    # one intra-op thread: a tiny CPU kernel must not pay a thread-pool wake-up per call (that would be timed as
    # overhead, and it swings with the machine's other load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    layers = sra_layers(args.device, args.calls, args.repeats) + cfg_layers(args.device, args.calls, args.repeats)
    if args.device == "cuda":
        graphs = cuda_graph_cases(max(20, args.calls // 20))
    else:
        graphs = [{"case": "eager vs CUDA-graph replay", "capture": "skipped: needs a CUDA device"}]
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
              "torch": torch.__version__, "machine": f"{os.cpu_count()} cores, python {platform.python_version()}",
              "calls": args.calls, "repeats": args.repeats, "intra_op_threads": 1, "threads_before": threads, "layers": layers, "derived": derived(layers),
              "graphs": graphs}
    (args.out / "host_overhead.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "host_overhead.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    errors = [r for r in layers if r["status"] == "error"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
