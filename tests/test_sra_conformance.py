"""Every SRA backend against the float64 reference (docs/SPEC.md §1): one list of cases, run per backend.

Backends: ``reference`` (the float32 dispatch path), ``cpu`` (the C++ kernels), ``triton`` (CUDA tensors
with a GPU, else CPU tensors in Triton's interpreter: small cases only, it is slow) and ``cuda`` (skipped
with the reason without a CUDA device and a CUDA build). A case a backend does not take (dtype, device,
head dim, see ``dare_kernels.benchmarking.capabilities``) skips with the backend's reason.

Compared per case, with the catalog's per-dtype tolerances (``dare_kernels.benchmarking.tolerances``):
output, head-averaged map, LSE (-inf rows exact) and the gradients of q, k, v and the token weight
through all three. Families: exact and online softmax (key lengths 1 ... 1100), head dims 24 ... 256 and
Dv != D, token-weight shapes (incl. strided), layouts (diffusers' [B, N, H, D] views, strided, padded last
dim), masks, rows with no valid key (zeros, -inf, zero gradients), map key ranges, strength 0 / custom
scale / strength 2.5, no map / no LSE gradient, model shapes (query length cut), weight-scale invariance
and zero weights dropping keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from _triton_interp import load_sra_triton  # before dare_kernels: sets TRITON_INTERPRET without CUDA

from dare_kernels import sra_attention  # noqa: E402
from dare_kernels.benchmarking.capabilities import unsupported_reason  # noqa: E402
from dare_kernels.benchmarking.shapes import TEST_CUT_SHAPES, TINY_SHAPES, AttnShape  # noqa: E402
from dare_kernels.benchmarking.tolerances import assert_close  # noqa: E402
from dare_kernels.reference import sra_attention_ref  # noqa: E402

BACKENDS = ("reference", "cpu", "triton", "cuda")
HAS_CUDA = torch.cuda.is_available()
INTERPRETED = not HAS_CUDA  # Triton runs in its interpreter here
HALF = (torch.float32, torch.bfloat16, torch.float16)
ALL = HALF + (torch.float64,)


@dataclass(frozen=True)
class Case(AttnShape):
    """A shape (name, B, H, N, M, D, map_keys) and the options one comparison runs it with."""

    Dv: int | None = None
    weight: str | None = "bm"        # None, "m", "bm", "bhm", "bm_strided" (non-contiguous [B, M])
    mask: bool = False               # random key padding mask (key 0 always kept)
    layout: str = "contiguous"       # "contiguous", "bnhd" (diffusers' views), "strided", "padded"
    want_map: bool = True
    grad_lse: bool = True
    strength: float = 0.8
    scale: float | None = None
    empty: bool = False              # batch 1 fully masked, (b 0, h 1) all weights zero
    zero_w: bool = True              # key 1 gets weight 0
    w_in_dtype: bool = False         # the weight in the inputs' dtype (else float32)
    dtypes: tuple = HALF
    big: bool = False                # too slow for Triton's interpreter and for the reference backend
    gpu_only: bool = False           # GPU-sized (the CUDA suite's shapes): Triton / CUDA on a GPU only
    interp_half: bool = False        # Triton's interpreter runs this family in fp16 / bf16 too (else fp32 only)

    @property
    def id(self) -> str:
        return self.name


def _family(prefix, rows, **common):
    return [Case(f"{prefix}-{name}", **{**common, **kw}) for name, kw in rows]


CASES = (
    # exact (M in one key block) and online softmax (M > 1024 on CPU), odd N in diffusers' layout
    _family("grid", [
        ("M77-D40-bm", dict(B=2, H=3, N=37, M=77, D=40)),
        ("M226-D80-bhm-mask-keys", dict(B=1, H=2, N=25, M=226, D=80, weight="bhm", mask=True, map_keys=(10, 200))),
        ("M1-D160-m", dict(B=2, H=2, N=9, M=1, D=160, weight="m")),
        ("M512-D64-Dv48-wstrided", dict(B=1, H=2, N=33, M=512, D=64, Dv=48, weight="bm_strided", mask=True,
                                        big=True)),
        ("M1000-D40-noweight", dict(B=1, H=2, N=17, M=1000, D=40, weight=None, mask=True, map_keys=(0, 1000),
                                    big=True)),
        ("M1100-D32-Dv24-joint", dict(B=1, H=2, N=21, M=1100, D=32, Dv=24, mask=True, map_keys=(1000, 1100),
                                      big=True)),
    ], layout="bnhd", dtypes=ALL, w_in_dtype=True)
    # key lengths: one block, several blocks, online softmax
    + _family("keys", [(f"M{m}", dict(M=m, interp_half=m <= 77)) for m in (1, 13, 40, 77, 226)],
              B=2, H=2, N=19, D=32, weight="bhm", mask=True)
    + _family("keys", [(f"M{m}-N131", dict(M=m)) for m in (512, 1000)],
              B=1, H=2, N=131, D=64, weight="bhm", big=True, gpu_only=True)
    + _family("headdim", [(f"D{d}-Dv{dv}", dict(D=d, Dv=dv)) for d, dv in
                          ((40, 40), (80, 80), (160, 160), (24, 40), (256, 256), (48, 112))],
              B=1, H=2, N=17, M=37, mask=True)
    + _family("weight", [(str(w), dict(weight=w)) for w in ("m", "bm", "bhm", "bm_strided", None)],
              B=2, H=2, N=16, M=21, D=16, strength=1.0)
    + _family("layout", [(lay, dict(layout=lay)) for lay in ("bnhd", "strided", "padded")],
              B=2, H=2, N=18, M=45, D=16, mask=True, map_keys=(4, 40))
    + _family("mapkeys", [("M30-5:17", dict(M=30, map_keys=(5, 17))), ("M90-70:90", dict(M=90, map_keys=(70, 90))),
                          ("M90-0:1", dict(M=90, map_keys=(0, 1))),
                          ("M129-17:60", dict(N=70, M=129, D=64, map_keys=(17, 60), big=True)),
                          ("M129-64:129", dict(N=70, M=129, D=64, map_keys=(64, 129), big=True))],
              B=1, H=3, N=36, D=16)
    + _family("options", [
        ("nomap-nolsegrad", dict(B=1, H=2, N=33, M=50, D=16, mask=True, want_map=False, grad_lse=False)),
        ("nomap-M77-D128", dict(B=2, H=2, N=131, M=77, D=128, mask=True, want_map=False, big=True, gpu_only=True)),
        ("nomap-M512-D128", dict(B=2, H=2, N=131, M=512, D=128, mask=True, want_map=False, big=True, gpu_only=True)),
        ("nomap-M1000-D128", dict(B=2, H=2, N=131, M=1000, D=128, mask=True, want_map=False, big=True,
                                  gpu_only=True)),
        ("strength0-scale", dict(B=1, H=2, N=16, M=20, D=16, strength=0.0, scale=0.37, zero_w=False)),
        ("strength2.5", dict(B=1, H=2, N=40, M=50, D=64, strength=2.5)),
        ("noweight-Dv112", dict(B=1, H=2, N=50, M=33, D=48, Dv=112, weight=None, strength=1.0)),
    ])
    # rows with no valid key: a batch fully masked, a (batch, head) with every weight zero
    + _family("empty", [("M5", dict(N=11, M=5, interp_half=True)), ("M20", dict(N=37, M=20, interp_half=True)),
                        ("M70", dict(N=37, M=70)), ("M90-D64", dict(N=65, M=90, D=64, big=True)),
                        ("M1100", dict(N=11, M=1100, big=True))],
              B=2, H=2, D=16, weight="bhm", mask=True, empty=True)
    # model shapes: real key side and head dim, query length cut; tiny stand-ins for the interpreter
    + [Case(f"model-{s.name}", s.B, s.H, s.N, s.M, s.D, layout="bnhd", map_keys=s.map_keys,
            dtypes=(torch.bfloat16, torch.float16), big=True, gpu_only=True) for s in TEST_CUT_SHAPES.values()]
    + [Case(f"model-{s.name}", s.B, s.H, s.N, s.M, s.D, layout="bnhd", map_keys=s.map_keys, mask=True,
            interp_half=True) for s in TINY_SHAPES.values()]
)


def _device(backend: str) -> str:
    return "cuda" if backend in ("triton", "cuda") and HAS_CUDA else "cpu"


def _skip_reason(backend: str, case: Case, dtype: torch.dtype) -> str | None:
    if case.gpu_only and not (backend in ("triton", "cuda") and HAS_CUDA):
        return "GPU-sized case: runs for the Triton and CUDA backends on a GPU (the grid family covers CPU)"
    if backend == "reference" and case.big:
        return "the reference backend is the oracle's own code in float32: checked on the small cases"
    if backend == "triton" and INTERPRETED:
        if case.big:
            return "Triton's interpreter runs the small cases only (this one runs with a GPU)"
        if dtype != torch.float32 and not case.interp_half:
            return ("Triton's interpreter runs fp16 / bf16 on a few small key lengths, empty-row and model cases "
                    "only (every dtype runs with a GPU)")
    return unsupported_reason("sra_attention", backend, _device(backend), dtype, B=case.B, H=case.H, N=case.N,
                              M=case.M, D=case.D, Dv=case.Dv or case.D)


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    """q [B,H,N,D], k [B,H,M,D], v [B,H,M,Dv] in ``case.layout``, token weight, bool mask [B, M]."""
    B, H, N, M, D, Dv = case.B, case.H, case.N, case.M, case.D, case.Dv or case.D
    g = torch.Generator().manual_seed(seed + 1000 * N + 7 * M + D)

    def one(L, E):
        if case.layout == "bnhd":  # [B, L, H, E] memory seen as [B, H, L, E]
            t = torch.randn(B, L, H, E, generator=g, dtype=torch.float64).transpose(1, 2)
        elif case.layout == "strided":  # every stride but the last non-trivial: a slice of a larger tensor
            t = torch.randn(B, H + 1, 2 * L + 1, E + 3, generator=g, dtype=torch.float64)[:, 1:, 1::2, 2:E + 2]
        elif case.layout == "padded":  # last dim not contiguous
            t = torch.randn(B, H, L, E, 2, generator=g, dtype=torch.float64)[..., 0]
        else:
            t = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)
        return t.to(device=device, dtype=dtype)

    q, k, v = one(N, D), one(M, D), one(M, Dv)
    w = None
    if case.weight is not None:
        shape = {"m": (M,), "bm": (B, M), "bhm": (B, H, M), "bm_strided": (B, 2 * M)}[case.weight]
        w = torch.rand(*shape, generator=g, dtype=torch.float64) * 2 + 0.05
        if case.weight == "bm_strided":
            w = w[:, ::2]
        if case.zero_w and M > 2:
            w[..., 1] = 0.0  # a dropped key
        if case.empty:
            w[0, 1] = 0.0  # (b 0, h 1): no key with weight
        w = w.to(device=device, dtype=dtype if case.w_in_dtype or dtype == torch.float64 else torch.float32)
    mask = None
    if case.mask:
        mask = torch.rand(B, M, generator=g) > 0.25
        mask[:, 0] = True
        if case.empty:
            mask[1] = False  # batch 1: every key masked
        mask = mask.to(device)
    return q, k, v, w, mask


def run_and_compare(backend: str, case: Case, dtype: torch.dtype, seed: int = 0):
    """Run ``backend`` and the float64 reference on the same inputs; assert every output and gradient."""
    device = _device(backend)
    q, k, v, w, mask = make_inputs(case, dtype, device, seed)
    kw = dict(key_padding_mask=mask, strength=case.strength, scale=case.scale, return_attn_map=case.want_map,
              attn_map_keys=case.map_keys if case.want_map else None, return_lse=True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)] + \
             ([] if w is None else [w.detach().clone().requires_grad_()])
    res = sra_attention(*leaves[:3], leaves[3] if w is not None else None, backend=backend, **kw)
    o, a, lse = res if case.want_map else (res[0], None, res[1])
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref_mask = None if mask is None else mask.cpu()
    rres = sra_attention_ref(*ref_leaves[:3], ref_leaves[3] if w is not None else None,
                             **{**kw, "key_padding_mask": ref_mask})
    ro, ra, rl = rres if case.want_map else (rres[0], None, rres[1])

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    B, H, N, Dv = case.B, case.H, case.N, case.Dv or case.D
    assert o.dtype == dtype and o.shape == (B, H, N, Dv)
    assert lse.dtype == acc and lse.shape == (B, H, N)
    if backend != "reference":  # the ops' contract: out is [B, N, H, Dv] memory (as SDPA allocates it)
        assert o.stride(1) == Dv and o.stride(2) == H * Dv, f"out strides {o.stride()}"
    assert_close(o, ro, dtype, "out", "o")
    assert_close(lse, rl, dtype, "lse", "lse")
    if case.want_map:
        assert a.dtype == acc and a.shape == ra.shape
        assert_close(a, ra, dtype, "map", "attn_map")

    g = torch.Generator().manual_seed(7)
    go = torch.randn(ro.shape, generator=g, dtype=torch.float64)
    ga = torch.randn(ra.shape, generator=g, dtype=torch.float64) * 10 if case.want_map else None
    gl = torch.randn(rl.shape, generator=g, dtype=torch.float64) if case.grad_lse else None
    finite = torch.isfinite(rl)

    def loss(o_, a_, l_):
        total = (o_.double().cpu() * go).sum()
        if ga is not None:
            total = total + (a_.double().cpu() * ga).sum()
        if gl is not None:
            total = total + (torch.where(finite, l_.double().cpu(), 0.0) * gl).sum()
        return total

    loss(o, a, lse).backward()
    loss(ro, ra, rl).backward()
    for name, got, want in zip(("dq", "dk", "dv", "dw"), leaves, ref_leaves):
        assert got.grad is not None, f"no gradient for {name}"
        assert got.grad.dtype == got.dtype and got.grad.shape == got.shape, name
        assert_close(got.grad, want.grad, dtype, "grad", name)
    if case.empty:
        _check_empty_rows(o, a, lse, leaves, case)


def _check_empty_rows(o, a, lse, leaves, case):
    """Rows with no valid key: o = 0, map = 0, lse = -inf exactly, and no gradient flows through them."""
    assert (o[1] == 0).all() and (o[0, 1] == 0).all()
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, 1]).all() and torch.isfinite(lse[0, 0]).all()
    if a is not None:
        assert (a[1] == 0).all()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    dq, dk, dv = (t.grad for t in leaves[:3])
    assert (dq[1] == 0).all() and (dq[0, 1] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()
    if len(leaves) == 4:
        assert (leaves[3].grad[1] == 0).all() and (leaves[3].grad[0, 1] == 0).all()


def _params():
    for case in CASES:
        for dtype in case.dtypes:
            yield pytest.param(case, dtype, id=f"{case.id}-{str(dtype).replace('torch.', '')}")


_BACKEND_PARAMS = [pytest.param(b, marks=[pytest.mark.triton_interp] if b == "triton" and INTERPRETED else
                                 [pytest.mark.gpu] if b == "cuda" else []) for b in BACKENDS]


@pytest.fixture(params=_BACKEND_PARAMS)
def backend(request):
    name = request.param
    if name == "triton":
        triton_sra, why = load_sra_triton()
        if triton_sra is None:
            pytest.skip(why)
        previous = triton_sra.set_autotune(False)  # one heuristic config: autotuning each case takes minutes
        yield name
        triton_sra.set_autotune(previous)
        return
    yield name


@pytest.mark.parametrize("case,dtype", list(_params()))
def test_matches_reference(backend, case, dtype):
    why = _skip_reason(backend, case, dtype)
    if why is not None:
        pytest.skip(why)
    run_and_compare(backend, case, dtype)


# ---------------------------------------------------------------------------------------------
# properties every backend keeps
# ---------------------------------------------------------------------------------------------

def _skip_unless(backend, case, dtype=torch.float32):
    why = _skip_reason(backend, case, dtype)
    if why is not None:
        pytest.skip(why)


def test_weights_invariant_to_row_scaling(backend):
    # multiplying every weight by one constant changes nothing (γ = 1: it cancels in the softmax)
    case = Case("scale-invariance", 1, 2, 16, 24, 16, mask=False, zero_w=False)
    _skip_unless(backend, case)
    q, k, v, w, _ = make_inputs(case, torch.float32, _device(backend))
    o1 = sra_attention(q, k, v, w, backend=backend)
    o2 = sra_attention(q, k, v, w * 37.0, backend=backend)
    torch.testing.assert_close(o1, o2, atol=2e-6, rtol=2e-6)


def test_zero_weights_drop_keys_and_get_zero_grad(backend):
    case = Case("zero-weight", 1, 2, 13, 9, 8, zero_w=False)
    _skip_unless(backend, case)
    q, k, v, w, _ = make_inputs(case, torch.float32, _device(backend))
    w = w.detach().clone()
    w[0, 3] = 0.0
    w.requires_grad_()
    o, amap = sra_attention(q, k, v, w, return_attn_map=True, backend=backend)
    keep = [j for j in range(case.M) if j != 3]
    o2 = sra_attention(q, k[:, :, keep], v[:, :, keep], w.detach()[:, keep], backend=backend)
    torch.testing.assert_close(o, o2, atol=2e-5, rtol=2e-5)
    assert torch.all(amap[..., 3] == 0)
    (o.sum() + amap.sum()).backward()
    assert w.grad[0, 3] == 0 and torch.isfinite(w.grad).all()


def test_case_list_is_sound():
    # the families stay distinct and every case is small enough for the float64 reference
    names = [c.id for c in CASES]
    assert len(names) == len(set(names))
    for c in CASES:
        assert c.B * c.H * c.N * c.M <= 13_000_000, c.id
        assert not c.empty or (c.B >= 2 and c.H >= 2 and c.weight == "bhm" and c.mask), c.id
