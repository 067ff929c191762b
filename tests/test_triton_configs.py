"""Every production launch config of the Triton SRA kernels, each forced once, vs the float64 reference; the
paths the shape rules never take at test shapes on a GPU (map from the final LSE, split dk/dv reduction),
forced; and tile offsets past 2^31 elements.

The configs are those ``aot_check --all`` proves (``aot_check.pickable``: what the autotuner keeps after
pruning and what the dispatcher launches with autotuning off, every head dim and dtype). Without a GPU the
kernels run in Triton's interpreter, where num_warps / num_stages mean nothing: configs are deduplicated by
block sizes, on sm_90 and sm_80 lists alike, and run in float32 at D=40 (padded to 64). With a GPU each
config of the current arch compiles and runs as launched, at its own head dim and dtype.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from _triton_interp import DEVICE, load_sra_triton  # before dare_kernels: sets TRITON_INTERPRET without CUDA

from dare_kernels import sra_attention  # noqa: E402
from dare_kernels.reference import sra_attention_ref  # noqa: E402

tsra, _SKIP = load_sra_triton()
aot_check = None
if tsra is not None:
    from dare_kernels.triton import aot_check

pytestmark = [pytest.mark.triton_interp, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

FWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _archs():
    if DEVICE == "cpu":
        return aot_check.ARCHS
    major, minor = torch.cuda.get_device_capability()
    return (10 * major + minor,)


def production_configs(kernel: str) -> list[dict]:
    """One entry per distinct launch of ``kernel``: {cfg (launch kwargs), D, dtype, BLOCK_M (fused map)}."""
    if tsra is None:
        return []
    seen, out = set(), []
    for arch in _archs():
        for D in aot_check.HEAD_DIMS:
            for dt in aot_check.DTYPES:
                for name, cx, w, s in aot_check.pickable(arch, D, dt):
                    if name != kernel:
                        continue
                    cfg = {"BLOCK_N": cx["BLOCK_N"]}
                    if name != "sra_fwd_map_kernel":
                        cfg["BLOCK_M"] = cx["BLOCK_M"]
                    if DEVICE == "cpu":  # the interpreter: key blocks of the fused kernel up to 128 suffice
                        bm = min(cx["BLOCK_M"], 128) if name == "sra_fwd_map_kernel" else None
                        key = (tuple(cfg.items()), bm)
                        entry = dict(cfg=cfg, D=40, dtype="fp32", BLOCK_M=bm)
                    else:
                        cfg.update(num_warps=w, num_stages=s)
                        key = (tuple(cfg.items()), D, dt, cx.get("BLOCK_M"), cx.get("HAS_GMAP"))
                        entry = dict(cfg=cfg, D=D, dtype=dt, BLOCK_M=cx.get("BLOCK_M"))
                    if key not in seen:
                        seen.add(key)
                        out.append(entry)
    return out


def _ids(entries):
    return ["-".join(f"{k}{v}" for k, v in e["cfg"].items()) + f"-D{e['D']}-{e['dtype']}"
            + (f"-M{e['BLOCK_M']}" if e["BLOCK_M"] else "") for e in entries]


@pytest.fixture(autouse=True)
def _clean_overrides():
    if tsra is None:
        yield
        return
    previous = tsra.set_autotune(False)
    yield
    tsra.set_autotune(previous)
    tsra.FORCE_CONFIG.clear()
    tsra.FORCE_MAP_PATH = None
    tsra.FORCE_DKDV_SPLIT = None


def _inputs(B, H, N, M, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 97 * N + M)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (N, M, M))
    w = torch.rand(B, M, generator=g, dtype=torch.float64) * 2 + 0.05
    w[:, 1] = 0.0  # a dropped key
    msk = torch.rand(B, M, generator=g) > 0.2
    msk[:, 0] = True
    to = lambda t, dt=dtype: t.to(device=DEVICE, dtype=dt)  # noqa: E731
    return to(q), to(k), to(v), to(w, torch.float32), msk.to(DEVICE)


def _check(q, k, v, w, msk, *, want_map, map_keys=None, grads=False, strength=0.8, clone=True):
    """Outputs (and gradients) vs float64; tolerances per dtype, relative to the reference's magnitude.
    ``clone=False`` hands the given views (strides) to the op."""
    dtype = q.dtype
    kw = dict(key_padding_mask=msk, strength=strength, return_attn_map=want_map,
              attn_map_keys=map_keys if want_map else None,
              return_lse=True)
    leaves = [(t.detach().clone() if clone else t.detach()).requires_grad_(grads) for t in (q, k, v, w)]
    ref_leaves = [t.detach().double().requires_grad_(grads) for t in (q, k, v, w)]
    flat_got = tuple(sra_attention(*leaves, backend="triton", **kw))  # (out, map, lse) or (out, lse)
    flat_ref = tuple(sra_attention_ref(*ref_leaves, **kw))
    names = ("out", "map", "lse") if want_map else ("out", "lse")
    assert len(flat_got) == len(names) == len(flat_ref)
    for name, a, b in zip(names, flat_got, flat_ref):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: -inf pattern differs"
        scale = max(1.0, b[finite].abs().max().item()) if finite.any() else 1.0
        torch.testing.assert_close(torch.where(finite, a.double(), 0), torch.where(finite, b, 0),
                                   atol=FWD_TOL[dtype] * scale, rtol=FWD_TOL[dtype], msg=lambda m: f"{name}: {m}")
    if not grads:
        return
    gen = torch.Generator().manual_seed(5)
    cot = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in flat_ref]

    def loss(outs):
        return sum((torch.where(torch.isfinite(o), o, 0).double() * c.to(o.device)).sum() for o, c in zip(outs, cot))

    loss(flat_got).backward()
    loss(flat_ref).backward()
    for name, a, b in zip("qkvw", leaves, ref_leaves):
        scale = max(1.0, b.grad.abs().max().item())
        torch.testing.assert_close(a.grad.double(), b.grad, atol=GRAD_TOL[dtype] * scale, rtol=GRAD_TOL[dtype],
                                   msg=lambda m: f"grad {name}: {m}")


def _shape(entry, n_blocks=2):
    """N and M spanning two blocks of the config (plus a ragged tail) so that every loop runs twice."""
    bn = entry["cfg"]["BLOCK_N"]
    bm = entry["cfg"].get("BLOCK_M", 16)
    return n_blocks * bn - 5 if bn > 16 else 2 * bn + 3, bm + 7


# ---------------------------------------------------------------------------------------------
# every production config, forced in turn
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", production_configs("sra_fwd_kernel"), ids=_ids(production_configs("sra_fwd_kernel")))
def test_fwd_kernel_config(entry):
    tsra.FORCE_CONFIG["sra_fwd_kernel"] = entry["cfg"]
    N, M = _shape(entry)
    _check(*_inputs(1, 2, N, M, entry["D"], DTYPES[entry["dtype"]]), want_map=False)


@pytest.mark.parametrize("entry", production_configs("sra_fwd_map_kernel"),
                         ids=_ids(production_configs("sra_fwd_map_kernel")))
def test_fused_map_kernel_config(entry):
    tsra.FORCE_MAP_PATH = "fused"
    tsra.FORCE_CONFIG["sra_fwd_map_kernel"] = entry["cfg"]
    N = 2 * entry["cfg"]["BLOCK_N"] - 3
    M = entry["BLOCK_M"] - 3 if entry["BLOCK_M"] > 16 else 13  # keeps next_pow2(M) = the config's BLOCK_M
    if DEVICE == "cpu":
        M = min(M, 77)  # the interpreter: BLOCK_M <= 128 is plenty to check the tile logic
    _check(*_inputs(1, 3, N, M, entry["D"], DTYPES[entry["dtype"]]), want_map=True)


@pytest.mark.parametrize("entry", production_configs("sra_map_kernel"), ids=_ids(production_configs("sra_map_kernel")))
def test_map_from_lse_kernel_config(entry):
    # the map-from-LSE path, forced (on GPUs the dispatcher sends keys up to 512 to the fused kernel)
    tsra.FORCE_MAP_PATH = "two-kernel"
    tsra.FORCE_CONFIG["sra_map_kernel"] = entry["cfg"]
    N, _ = _shape(entry)
    width = entry["cfg"]["BLOCK_M"] + 3  # the map spans two key blocks of the config
    _check(*_inputs(1, 2, N, width + 6, entry["D"], DTYPES[entry["dtype"]]), want_map=True,
           map_keys=(4, 4 + width))


@pytest.mark.parametrize("kernel", ["sra_bwd_dkdv_kernel", "sra_bwd_dq_kernel", "sra_bwd_delta_kernel"])
def test_backward_kernel_configs(kernel):
    # one test per kernel looping over its configs (each a forward + backward with the map gradient)
    entries = production_configs(kernel)
    assert entries, kernel
    for entry in entries:
        tsra.FORCE_CONFIG.clear()
        tsra.FORCE_CONFIG[kernel] = entry["cfg"]
        N, M = _shape(entry)
        _check(*_inputs(1, 2, N, M, entry["D"], DTYPES[entry["dtype"]]), want_map=True, grads=True)


# ---------------------------------------------------------------------------------------------
# paths the dispatcher does not take at test shapes on a GPU, forced
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_split,rows", [(3, 16), (2, 32)])
def test_split_dkdv_reduction(n_split, rows):
    # float32 partials per query split summed in a fixed order (the dispatcher splits only when there are
    # too few key blocks to fill a GPU, i.e. at large N)
    tsra.FORCE_DKDV_SPLIT = (n_split, rows)
    N = n_split * rows - 5
    _check(*_inputs(2, 2, N, 37, 24, torch.float32), want_map=True, map_keys=(2, 30), grads=True)


def test_map_from_lse_path_with_gradients():
    tsra.FORCE_MAP_PATH = "two-kernel"
    _check(*_inputs(1, 3, 41, 50, 32, torch.float32), want_map=True, grads=True)


def test_fused_map_estimate_counts_the_dtype():
    # fp32 AnimateDiff d160 (BLOCK_D = BLOCK_DV = 256, M = 77 -> BLOCK_M = 128): K+V are 256 KB in fp32
    # (the old estimate counted 2 bytes an element: 128 KB), over every GPU's shared memory
    from dare_kernels.triton import _sra_configs as C

    assert C.fused_map_kv_bytes(128, 256, 256, 4) == 256 * 1024 == 2 * C.fused_map_kv_bytes(128, 256, 256, 2)
    for arch in (80, 86, 90):
        assert not C.use_fused_map(128, 256, 256, 4, arch)
        for bn in (16, 32, 64):
            assert C.fused_map_smem(bn, 128, 256, 256, 4) > C.smem_limit(arch)
            assert C.fused_map_smem(bn, 128, 256, 256, 4) > C.fused_map_smem(bn, 128, 256, 256, 2)
    # every fused launch the dispatcher can make fits the arch by the formula (aot_check checks the
    # formula bounds the compiled size)
    for arch in (80, 90):
        for bm in (16, 32, 64, 128, 256, 512):
            for bd in (64, 128, 256):
                if C.use_fused_map(bm, bd, bd, 2, arch):
                    cfg = C.heuristic("sra_fwd_map_kernel", bm, bd, 2, arch)
                    assert C.fused_map_smem(cfg["BLOCK_N"], bm, bd, bd, 2) <= C.smem_limit(arch)
                    assert C.fused_map_regs(cfg["BLOCK_N"], bm, bd, bd, 2, cfg["num_warps"]) <= C.FUSED_MAP_REG_BUDGET
    assert C.use_fused_map(128, 64, 64, 2, 90)  # LTX-Video (M=128, D=64) keeps the fused kernel


# ---------------------------------------------------------------------------------------------
# tile offsets past 2^31 elements
# ---------------------------------------------------------------------------------------------

def test_row_offsets_past_int32():
    """Rows 2^27 elements apart: the second query / key block starts at element 16·2^27 = 2^31. With row
    offsets computed in int32 (``offs_n[:, None] * sqn``) that start wraps to -2^31 and the kernels read
    another part of the storage; with the int64 tile start they read the right rows.

    The views live in one lazily allocated storage of 2^32 fp16 elements (8 GiB of address space, a few
    pages touched) and start at element 2^31, so the wrapped int32 address stays inside the storage (it
    reads untouched zeros, a wrong result, not a crash). In-tile offsets (15·2^27 + 15) still fit int32,
    so the dispatcher passes the views to the kernels as they are.
    """
    rows = tsra._row_block()
    stride = (2**31 - 64) // (rows - 1)  # the largest row stride whose in-tile offsets fit int32
    n = rows + 1  # row `rows` starts past 2^31
    assert rows * stride >= 2**31 > (rows - 1) * stride + 63
    D, dtype = 16, torch.float16
    offset = 2**31
    try:
        storage = torch.empty(offset + n * stride + 3 * D, dtype=dtype, device=DEVICE)
    except (RuntimeError, MemoryError) as exc:
        pytest.skip(f"cannot reserve {offset + n * stride} fp16 elements of address space: {exc}")
    q, k, v = (storage.as_strided((1, 1, n, D), (0, 0, stride, 1), offset + i * D) for i in range(3))
    q0, k0, v0, w, msk = _inputs(1, 1, n, n, D, dtype)
    with torch.no_grad():
        q.copy_(q0)
        k.copy_(k0)
        v.copy_(v0)
    assert tsra._tile_safe(q, rows, D) is q  # the kernels see the huge strides
    _check(q, k, v, w, msk, want_map=False, grads=True, clone=False)


# ---------------------------------------------------------------------------------------------
# one binary per op variant: N, M and B do not change what the GPU launcher compiles
# ---------------------------------------------------------------------------------------------

class _Recorder:
    """Stands for a kernel in ``tsra._kernel``: records the Triton specialization of each launch (and
    the autotuning class key) instead of running it."""

    def __init__(self, log, name, raw=False):
        self.log, self.name, self.raw = log, name, raw

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            fn = getattr(tsra.K, self.name).fn
            spec = aot_check.launch_specialization(self.name, args, kwargs, kernel_fn=fn if self.raw else None)
            named = dict(zip(inspect.signature(fn).parameters, args))
            tune = tsra._C.tune_key(self.name, named, kwargs) if self.name in tsra._C.TUNED else None
            self.log.add((spec, tune))
        return launch


def _gpu_launch_keys(monkeypatch, B, N, M, D, layout, with_map, raw=False):
    """The (specialization, tune key) set of one forward + backward as the GPU path launches them."""
    log = set()
    monkeypatch.setattr(tsra, "_interpret", lambda: False)
    monkeypatch.setattr(tsra, "_arch", lambda: 90)
    monkeypatch.setattr(tsra, "_check_device", lambda q: None)
    monkeypatch.setattr(tsra, "_sm_count", lambda: 132)
    monkeypatch.setattr(tsra, "_kernel", lambda name: _Recorder(log, name, raw))
    H = 2
    g = torch.Generator().manual_seed(0)

    def make(rows, d):
        shape = (B, rows, H, d) if layout == "bnhd" else (B, H, rows, d)
        t = torch.randn(shape, generator=g).to(torch.bfloat16)
        return t.transpose(1, 2) if layout == "bnhd" else t

    q, k, v = make(N, D), make(M, D), make(M, D)
    w = torch.rand(B, H, M, generator=g) + 0.5
    mask = torch.ones(B, M, dtype=torch.bool)
    map_start, map_stop = (0, M) if with_map else (0, 0)
    out, lse, amap = tsra.sra_attention_fwd_triton(q, k, v, w, mask, 0.5, D ** -0.5, map_start, map_stop)
    gmap = torch.randn_like(amap) if with_map else None
    tsra.sra_attention_bwd_triton(torch.randn_like(out), gmap, None, q, k, v, w, mask, out, lse, 0.5, D ** -0.5,
                                  map_start, map_stop)
    return log


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("D", [64, 40])
@pytest.mark.parametrize("with_map", [False, True])
def test_no_new_binary_when_n_m_or_b_change(monkeypatch, layout, D, with_map):
    """Triton's own binder (aot_check.launch_specialization) gives every launch of a forward + backward the
    same specialization and autotuning key for N in {1000, 32760, 32769}, M in {77, 226, 512} (one class;
    the map through the map-from-LSE kernel, whose key block does not depend on M) and B in {1, 2}."""
    tsra.FORCE_MAP_PATH = "two-kernel" if with_map else None
    base = _gpu_launch_keys(monkeypatch, 1, 1000, 77, D, layout, with_map)
    assert len(base) == (5 if with_map else 4)
    for B, N, M in [(1, 32760, 77), (1, 32769, 77), (1, 1000, 226), (1, 1000, 512), (2, 32769, 512)]:
        assert _gpu_launch_keys(monkeypatch, B, N, M, D, layout, with_map) == base, (B, N, M)


def test_fused_map_binary_depends_on_the_key_class_only(monkeypatch):
    """The head-looped map kernel holds all keys in one block (BLOCK_M = next_pow2(M)): one binary per
    power of two of M, none per N or B."""
    base = _gpu_launch_keys(monkeypatch, 1, 1000, 77, 64, "bnhd", True)
    assert any("sra_fwd_map_kernel" == spec[0] for spec, _ in base)
    assert _gpu_launch_keys(monkeypatch, 2, 32769, 100, 64, "bnhd", True) == base
    assert _gpu_launch_keys(monkeypatch, 1, 1000, 200, 64, "bnhd", True) != base


def test_undeclared_kernels_would_specialise_on_n(monkeypatch):
    """The check above can fail: without ``do_not_specialize`` Triton's binder tells N = 32768 (divisible
    by 16) from N = 32769 and M = 512 from M = 77."""
    a = _gpu_launch_keys(monkeypatch, 1, 32768, 512, 64, "bnhd", False, raw=True)
    assert a != _gpu_launch_keys(monkeypatch, 1, 32769, 512, 64, "bnhd", False, raw=True)
    assert a != _gpu_launch_keys(monkeypatch, 1, 32768, 77, 64, "bnhd", False, raw=True)


# ---------------------------------------------------------------------------------------------
# the sweep: its CPU rehearsal runs the GPU code path; the dispatcher reads what it writes
# ---------------------------------------------------------------------------------------------

def test_sweep_rehearsal_writes_a_table_of_proven_tiles(tmp_path):
    import triton

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tool finds the tree itself
    r = subprocess.run([sys.executable, "tools/triton_sweep.py", "--rehearse", "--out", str(tmp_path),
                        "--budget-s", "400"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = json.loads((tmp_path / "triton_sweep-sm_90.json").read_text())
    assert table["rehearsal"] is True and table["complete"] is True
    assert table["triton"] == triton.__version__ and table["commit"] and table["device"] and table["date"]
    assert sorted(table["choices"]) == sorted(f"{k}/D64/half" for k in
                                              ("sra_fwd_kernel", "sra_map_kernel", "sra_bwd_dkdv_kernel",
                                               "sra_bwd_dq_kernel"))
    timed = {(t["kernel"], tuple(t["tile"])) for t in table["timings"] if t["ms"] is not None}
    for key, tile in table["choices"].items():
        kernel = key.split("/")[0]
        assert tuple(tile) in tsra._C.candidate_tiles(kernel, 64, 64, 2, 90), key
        assert (kernel, tuple(tile)) in timed
    # more than one candidate was timed somewhere: the choice was a choice
    assert len(timed) > len(table["choices"])


def test_dispatcher_uses_a_sweep_choice_only_while_it_is_a_candidate(tmp_path, monkeypatch):
    C = tsra._C
    first, second = C.candidate_tiles("sra_fwd_kernel", 512, 128, 2, 90)[:2]
    key = C.table_key("sra_fwd_kernel", 128, 2)

    def heuristic_with(choice):
        (tmp_path / "sm_90.json").write_text(json.dumps({"choices": {key: list(choice)}}))
        monkeypatch.setattr(C, "TABLE_DIR", str(tmp_path))
        C.sweep_table.cache_clear()
        try:
            cfg = C.heuristic("sra_fwd_kernel", 512, 128, 2, 90)
        finally:
            C.sweep_table.cache_clear()
        return (cfg["BLOCK_N"], cfg["BLOCK_M"], cfg["num_warps"], cfg["num_stages"])

    assert heuristic_with(second) == tuple(second)
    assert heuristic_with((256, 256, 8, 5)) == tuple(first)  # not proven spill-free: ignored


@pytest.mark.parametrize("version", ["3.6.0", "3.7.1", "3.8.0"])
def test_committed_resource_proof_covers_every_pickable_case(version):
    """Each Triton the pins allow has a committed aot_check seed that covers every case the current config
    lists can launch, none failing (a config added without a proof on every version fails here; CI
    recompiles a sample of each seed under its own version: tools/triton_compat.sh, make test)."""
    with open(aot_check.seed_path(version)) as f:
        seed = json.load(f)
    assert seed["triton"].split("+")[0] == version
    for case in aot_check.all_cases():
        info = seed["results"].get(aot_check._case_key(case))
        assert info is not None, f"triton {version}: no proof for {aot_check.case_label(case)} {case}"
        assert not aot_check.judge(case, info), (version, aot_check.case_label(case), info)


def test_class_keyed_autotuner_tunes_once_per_class_and_stays_exact(monkeypatch):
    """With autotuning on, the tuner benchmarks every candidate of a class once (here a stand-in timer that
    prefers the last candidate), launches the winner, and reuses it for another N and M of the class;
    outputs stay exact against float64."""
    import triton.testing

    tuner = tsra._ClassTuner(tsra.K.sra_fwd_kernel, "sra_fwd_kernel", 90)
    timed = []

    def fake_bench(fn, **kwargs):
        fn()
        timed.append(1)
        return 10.0 - len(timed)  # later candidates "faster"

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(tsra, "_kernel", lambda name: tuner if name == "sra_fwd_kernel" else getattr(tsra.K, name))
    launch_kwargs = tsra._launch_kwargs
    monkeypatch.setattr(tsra, "_launch_kwargs",
                        lambda name, *a: {} if name == "sra_fwd_kernel" else launch_kwargs(name, *a))
    # the interpreter takes no num_warps / num_stages: drop them at launch
    monkeypatch.setattr(tuner, "_launch", lambda grid, args, kw, cfg: tuner.fn[grid](*args, **kw, **cfg.kwargs))
    tsra.set_autotune(True)
    _check(*_inputs(1, 2, 40, 77, 40, torch.bfloat16), want_map=False)
    candidates = tsra._C.candidate_tiles("sra_fwd_kernel", 77, 64, 2, 90)
    assert len(candidates) >= 2 and len(tuner.cache) == 1 and len(timed) == len(candidates)
    (key, cfg), = tuner.cache.items()
    assert (cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_M"], cfg.num_warps, cfg.num_stages) == candidates[-1]
    _check(*_inputs(1, 2, 33, 100, 40, torch.bfloat16), want_map=False)
    assert list(tuner.cache) == [key] and len(timed) == len(candidates)  # same class: no new tuning
