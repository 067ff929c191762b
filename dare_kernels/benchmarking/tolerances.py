"""Per-dtype tolerances of a backend against the float64 reference, and the one comparison that applies them.

What is compared decides how (``kind``):

- ``"out"`` (the attention output) and ``"grad"`` (dq, dk, dv, dw): elementwise
  ``|got - ref| <= atol * max(1, max|ref|) + rtol * |ref|`` (gradients sum over N or M terms and can be
  large), and the relative Frobenius error ``‖got - ref‖ / ‖ref‖ <= frob``: an output or gradient of the
  right order of magnitude but wrong content cannot pass on the elementwise floor alone.
- ``"map"`` (head-averaged probabilities, entries about 1/M: 2e-3 at Wan's M = 512, 5e-5 at CogVideoX's
  joint M = 17776): ``atol`` is scaled by the reference's largest entry, never by 1, and the relative
  Frobenius error is bounded. An absolute 2e-2 in bf16 let an all-zero map, or a map computed without the
  bias, pass at every model shape; ``tests/test_tolerances.py`` holds the guards that they now fail.
- ``"lse"``: log-space, so an absolute bound (``10 * atol``) plus ``rtol``; -inf rows must match exactly.

A reference can vanish where the math says so: with one key (M = 1) the softmax is 1 whatever the scores, so
the true dq, dk and dw are exactly 0 while a kernel returns rounding noise (about 1e-6 in bf16). A Frobenius
error relative to ‖ref‖ = 0 is infinite, so a correct kernel failed. ``scale`` gives the comparison the size of
what flows through the quantity: for gradients the largest reference entry over the family of one backward
(dq, dk, dv, dw: at M = 1, dv = Σ_i dO_i does not vanish; ``family_scale``). The Frobenius error is then
taken relative to max(‖ref‖, ZERO_REF_FLOOR · scale · √n), which is ‖ref‖ wherever the reference is of its
family's order, and stays finite where it vanishes: noise of 1e-6 passes, a planted gradient of the inputs'
size still fails (tests/test_tolerances.py).

The dtype is the inputs' dtype (a float32 map from bf16 inputs is judged at bf16's tolerance). The float64
reference gets the same (rounded) inputs, so only the kernel's own rounding is measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# (atol, rtol) of a forward output against the float64 reference, per input dtype
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (3e-3, 3e-3),
}
# (atol, rtol) of gradients: they sum over more terms
GRAD_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (6e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}
# bound on ‖got - ref‖_F / ‖ref‖_F, per kind and input dtype (bf16 rounds at 2^-9 relative, fp16 at 2^-12)
FROB_TOL: dict[str, dict[torch.dtype, float]] = {
    "out": {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3},
    "map": {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3},
    "grad": {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2},
}
KINDS = ("out", "map", "lse", "grad")
# a reference whose norm falls below this fraction of its family's scale (per entry) is judged against that
# scale: 1 % keeps the ordinary relative check wherever a gradient is within 100x of its family's largest entry
ZERO_REF_FLOOR = 1e-2


@dataclass(frozen=True)
class Tolerance:
    """Allowed error: ``|got - ref| <= atol * scale + rtol * |ref|`` and ``frob_rel <= frob`` (None: unchecked).

    ``scale`` is max(1, max|ref|) when ``floor_one`` is set, else max|ref| (maps).
    """

    atol: float
    rtol: float
    frob: float | None
    floor_one: bool


def tolerance(kind: str, dtype: torch.dtype, factor: float = 1.0) -> Tolerance:
    """The tolerance of ``kind`` ("out", "map", "lse", "grad") for inputs of ``dtype``, widened by ``factor``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if dtype not in TOL:
        raise ValueError(f"no tolerance for dtype {dtype}")
    atol, rtol = (GRAD_TOL if kind == "grad" else TOL)[dtype]
    if kind == "lse":
        return Tolerance(10 * atol * factor, rtol * factor, None, False)
    frob = FROB_TOL[kind][dtype] * factor
    return Tolerance(atol * factor, rtol * factor, frob, kind != "map")


@dataclass(frozen=True)
class Verdict:
    """Outcome of one comparison: ``ratio`` <= 1 passes (worst elementwise error over its allowance,
    or the Frobenius error over its bound, whichever is larger)."""

    max_err: float
    frob_rel: float
    ratio: float
    why: str = ""

    @property
    def ok(self) -> bool:
        return self.ratio <= 1.0

    def __str__(self) -> str:
        text = f"max|err| {self.max_err:.2e}, frob rel {self.frob_rel:.2e}, ratio {self.ratio:.2f}"
        return f"{text} ({self.why})" if self.why else text


def family_scale(*refs: torch.Tensor | None) -> float:
    """The largest finite entry (absolute) over the reference tensors of one family (e.g. dq, dk, dv, dw of one
    backward): the ``scale`` that keeps a vanishing member's comparison finite. None entries are skipped."""
    top = 0.0
    for r in refs:
        if r is None or r.numel() == 0:
            continue
        r = r.detach().double()
        finite = r[torch.isfinite(r)]
        if finite.numel():
            top = max(top, float(finite.abs().max()))
    return top


def compare(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, kind: str, factor: float = 1.0,
            scale: float | None = None) -> Verdict:
    """Judge ``got`` against the float64 ``ref`` for inputs of ``dtype`` (see the module docstring).

    ``scale``: the size of what flows through this quantity (``family_scale`` of its family), so that a
    reference that vanishes (one key: dq = dk = dw = 0) is judged against a scale that does not."""
    tol = tolerance(kind, dtype, factor)
    got = got.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if got.shape != ref.shape:
        return Verdict(math.inf, math.inf, math.inf, f"shape {tuple(got.shape)} != {tuple(ref.shape)}")
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(got)):
        return Verdict(math.inf, math.inf, math.inf, "non-finite entries differ")
    if not torch.equal(got[~finite], ref[~finite]):
        return Verdict(math.inf, math.inf, math.inf, "infinities of different sign")
    if not bool(finite.any()):
        return Verdict(0.0, 0.0, 0.0)
    g, r = got[finite], ref[finite]
    diff = (g - r).abs()
    top = float(r.abs().max())
    elem_scale = max(1.0, top) if tol.floor_one else top
    allowed = tol.atol * elem_scale + tol.rtol * r.abs()
    max_err = float(diff.max())
    if max_err == 0.0:
        return Verdict(0.0, 0.0, 0.0)
    elementwise = float((diff / allowed).max()) if bool((allowed > 0).all()) else math.inf
    norm = float(r.norm())
    if scale is not None and scale > 0:  # a vanishing reference is judged against its family's size
        norm = max(norm, ZERO_REF_FLOOR * scale * math.sqrt(r.numel()))
    frob_rel = float(diff.norm()) / norm if norm > 0 else math.inf
    ratio = elementwise
    why = "elementwise"
    if tol.frob is not None and frob_rel / tol.frob > ratio:
        ratio, why = frob_rel / tol.frob, "frobenius"
    return Verdict(max_err, frob_rel, ratio, why if ratio > 1.0 else "")


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, kind: str, what: str = "",
                 factor: float = 1.0, scale: float | None = None) -> Verdict:
    """``compare`` that raises AssertionError naming ``what`` when the check fails; returns the verdict."""
    verdict = compare(got, ref, dtype, kind, factor, scale)
    if not verdict.ok:
        raise AssertionError(f"{what or kind} ({str(dtype).replace('torch.', '')}, {kind}): {verdict}")
    return verdict
