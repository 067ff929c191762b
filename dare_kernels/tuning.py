"""Backend preferences filled from measurements (bench/results/). Edit only with numbers behind it.

dare_kernels/backends.py reads these: ``AUTO_ORDER`` is what ``backend="auto"`` tries, best first, per op
and device type; a backend whose ``*_VALIDATED_ON_GPU`` flag is False is never tried by ``auto`` on a GPU.
``AUTO_EVIDENCE`` says, per op and backend, which measurement put it where it is (or keeps it out), and
``dare-kernels info`` prints it.
"""

from __future__ import annotations

# The first GPU run: bench/results/gpu-h100-2026-12-06/ (NVIDIA H100 80GB HBM3, 2026-12-06, commit 2a89074,
# torch 2.11.0+cu130, triton 3.6.0). Its README.md states what every file holds.
FIRST_GPU_RUN = "bench/results/gpu-h100-2026-12-06"

# op -> device type -> backends "auto" tries, best first. A CUDA kernel joins a GPU list only once a GPU run
# has validated it against the reference and measured it faster than what it would displace.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    # CUDA SRA is not in the list: see CUDA_SRA_VALIDATED_ON_GPU and AUTO_EVIDENCE below
    "sra_attention": {"cuda": ("triton",), "cpu": ("cpu",)},
    # CUDA first: bench.csv row "rectified_cfg,wan-81f-480p,...,dare_cuda,cfg+rescale" 0.021 ms against
    # dare_triton 0.390 ms and torch_eager 0.198 ms (copy of the same bytes 0.013 ms), bf16, H100
    "rectified_cfg": {"cuda": ("cuda", "triton"), "cpu": ("cpu",)},
}

# Validation state of the CUDA SRA kernels (csrc/cuda/sra_attention_*.cu): the first GPU run's selftest agreed
# with the float64 reference for fp16 / bf16 before its time cap, but the four compute-sanitizer stages
# (tools/sanitize_sra_cuda.sh) failed to start (the package was not importable there) and no CUDA SRA bench row
# was reached. Flip only after tests/test_sra_cuda.py and the sanitizers pass on a GPU; "auto" then still needs
# a bench row ahead of Triton at the shape class before "cuda" enters AUTO_ORDER.
CUDA_SRA_VALIDATED_ON_GPU = False

# The CUDA rectified-CFG kernels (csrc/cuda/rectified_cfg*.cu): validated on the H100 of FIRST_GPU_RUN: an
# independent float64 check passed every mode (cfg, cfg_zero_star, apg; K = 2 / 3, rescale, momentum) on CUDA
# and on Triton (README.md there, "What was measured"), and bench.csv times them 19x faster than Triton.
CUDA_CFG_VALIDATED_ON_GPU = True

# op -> backend -> why "auto" on a GPU takes it where it does, or leaves it out (printed by `dare-kernels info`)
AUTO_EVIDENCE: dict[str, dict[str, str]] = {
    "rectified_cfg": {
        "cuda": (f"first on CUDA: {FIRST_GPU_RUN}/bench.csv, Wan 81-frame latent [2,16,21,60,104] bf16 cfg + "
                 "rescale 0.7: CUDA 0.021 ms, Triton 0.390 ms, eager PyTorch 0.198 ms (copy 0.013 ms); every "
                 f"mode matched the float64 reference on CUDA and Triton ({FIRST_GPU_RUN}/README.md)"),
        "triton": "second on CUDA: validated on the H100 in every mode; taken where the extension has no CUDA kernels",
    },
    "sra_attention": {
        "triton": (f"first on CUDA: validated against the float64 reference on the H100 ({FIRST_GPU_RUN}/"
                   "selftest.log); timed there at Wan-1.3B and LTX-Video (bench.csv)"),
        "cuda": ("not in auto: the compute-sanitizer checks (racecheck, memcheck, synccheck, initcheck) have not "
                 f"passed on a GPU yet ({FIRST_GPU_RUN}/stages.csv: they stopped at an import error before checking anything) and no bench row shows it "
                 "ahead of Triton at any shape class (none was reached); it joins once both hold on a GPU run "
                 "committed under bench/results/. backend='cuda' selects it explicitly"),
    },
}
