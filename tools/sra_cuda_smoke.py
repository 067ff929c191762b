#!/usr/bin/env python3
"""Small backend="cuda" SRA attention runs (forward + backward, every head-dim tier, odd sizes, masks, map
ranges, strided inputs) for compute-sanitizer (tools/sanitize_sra_cuda.sh). Prints one line per case and
the max error against the float64 reference; exits 1 on a NaN or a gross mismatch, 0 otherwise.

    python tools/sra_cuda_smoke.py                  the runs (needs a GPU and the CUDA build)
    python tools/sra_cuda_smoke.py --import-only    the imports only: prints where dare_kernels came from
"""

from __future__ import annotations

import sys

import torch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import dare_kernels as dk
    from dare_kernels import _ext
    from dare_kernels.reference import sra_attention_ref

    print(f"sra_cuda_smoke: imports ok: dare_kernels {dk.__version__} from {dk.__file__}, torch {torch.__version__}",
          flush=True)
    if "--import-only" in argv:
        return 0
    if not torch.cuda.is_available() or not _ext.has_cuda_kernels():
        print("sra_cuda_smoke: needs a CUDA device and the extension built with CUDA kernels", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    failed = 0
    # (B, H, N, M, D, Dv, dtype, map keys, transposed layout, mask: True / False / "empty" = sample 1 fully masked)
    cases = [
        (1, 2, 17, 5, 40, 40, torch.float16, (1, 4), False, True),
        (2, 3, 70, 77, 80, 80, torch.bfloat16, None, True, False),
        (1, 2, 65, 130, 160, 160, torch.float16, (64, 130), False, True),
        (1, 1, 33, 600, 256, 256, torch.bfloat16, None, True, False),  # M > 512: online forward without a map
        (1, 2, 40, 1, 64, 32, torch.float16, (0, 1), False, False),
        (2, 2, 1, 3, 64, 128, torch.bfloat16, (0, 3), False, "empty"),  # N = 1, M < a tile, Dv != D, no-key rows
        (2, 3, 130, 70, 256, 64, torch.float16, None, True, "empty"),    # kD = 256 tier with Dv < D
    ]
    for B, H, N, M, D, Dv, dtype, keys, bnhd, masked in cases:
        def make(n, d):
            t = torch.randn(B, n, H, d, device="cuda").transpose(1, 2) if bnhd else torch.randn(B, H, n, d, device="cuda")
            return t.to(dtype).requires_grad_(True)

        q, k, v = make(N, D), make(M, D), make(M, Dv)
        w = (torch.rand(B, M, device="cuda") + 0.1).requires_grad_(True)
        kpm = (torch.rand(B, M, device="cuda") > 0.3) if masked else None
        if kpm is not None:
            kpm[:, 0] = True
            if masked == "empty":
                kpm[1:] = False  # every row of sample 1 has no valid key: o = 0, lse = -inf
        with_map = keys is not None
        res = dk.sra_attention(q, k, v, w, key_padding_mask=kpm, return_attn_map=with_map, attn_map_keys=keys,
                               return_lse=True, backend="cuda")
        o, lse = res[0], res[-1]
        finite = torch.isfinite(lse)
        loss = o.float().square().sum() + lse[finite].sum() + (res[1].square().sum() if with_map else 0)
        loss.backward()
        torch.cuda.synchronize()
        ref = sra_attention_ref(q.detach().double(), k.detach().double(), v.detach().double(), w.detach().double(),
                                key_padding_mask=kpm, compute_dtype=torch.float64)
        err = float((o.detach().double() - ref).abs().max())
        bad = any(torch.isnan(t).any() for t in (o, q.grad, k.grad, v.grad, w.grad)) or err > 0.1
        if masked == "empty":
            bad = bad or not bool((o[1] == 0).all()) or not bool(torch.isneginf(lse[1]).all())
        failed += bad
        print(f"B={B} H={H} N={N} M={M} D={D} Dv={Dv} {dtype} map={keys} bnhd={bnhd} mask={masked}: "
              f"max|o - ref| = {err:.2e} {'FAIL' if bad else 'ok'}")
    # M == 0 at the op (the binding answers without a launch): zeros, lse -inf, map [B, N, 0]
    q = torch.randn(1, 2, 33, 64, device="cuda", dtype=torch.float16)
    k, v = q[:, :, :0], q[:, :, :0]
    o, lse, amap = torch.ops.dare_kernels.sra_attention_fwd(q, k, v, None, None, 1.0, 0.125, 0, 0)
    torch.cuda.synchronize()
    bad = not (bool((o == 0).all()) and bool(torch.isneginf(lse).all()) and amap.shape == (1, 33, 0))
    failed += bad
    print(f"M=0 at the op: o all zero, lse all -inf, map {tuple(amap.shape)}: {'FAIL' if bad else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
