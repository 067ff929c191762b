// Schemas of the rectified CFG ops (docs/SPEC.md §2). Per-device implementations: python/cpu/rectified_cfg_cpu.cpp,
// python/cuda/rectified_cfg_cuda.cpp; fake impls and autograd from Python (dare_kernels/cfg.py).
#include <torch/library.h>

#include "cpu/rectified_cfg.h"

TORCH_LIBRARY_FRAGMENT(dare_kernels, m) {
  m.def(
      "rectified_cfg_fused(Tensor u, Tensor c, Tensor? d, Tensor(a!)? momentum_buffer, Tensor(b!) out, "
      "int n_reduce, str guidance_mode, float guidance_scale, float rectify_scale, float guidance_rescale, "
      "float eta, float norm_threshold, float momentum) -> ()");
  m.def(
      "rectified_cfg_stats(Tensor u, Tensor c, Tensor? d, Tensor? momentum_buffer, int n_reduce, "
      "float momentum) -> Tensor");
  m.def(
      "rectified_cfg_combine(Tensor u, Tensor c, Tensor? d, Tensor? momentum_buffer, Tensor coeffs, "
      "int n_reduce) -> Tensor");
  // Which CPU vector path the ops above take now ("avx512", "avx2" or "default"); see csrc/cpu/rectified_cfg.h.
  m.def("rectified_cfg_cpu_isa() -> str", &dare::cpu::rectified_cfg_cpu_isa);
}
