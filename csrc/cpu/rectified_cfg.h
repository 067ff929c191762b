// Rectified CFG combine on CPU (docs/SPEC.md §2): the kernels behind the fused op and the statistics / combine
// halves of the differentiable path. The op entry points (argument checks, contiguous copies, output
// allocation) are in python/cpu/rectified_cfg_cpu.cpp. Every tensor u, c, d, buffer has one shape
// [*groups, *reduced]; the last dims are reduced (n elements per group, `groups` groups).
#pragma once

#include <ATen/core/Tensor.h>
#include <string>
#include <vector>

#include "rectified_cfg_params.h"

namespace dare::cpu {

// Checked, contiguous operands: d / b undefined when absent; b (the momentum buffer) float32 or u's dtype.
struct CfgInputs {
  at::Tensor u, c, d, b;
  int64_t groups = 0, n = 0;
  bool k3 = false, mom = false, buf_f32 = false;  // buf_f32: a float32 buffer with non-float32 predictions
};

// Per-group statistics, float64 [groups * 14] (layout in rectified_cfg_params.h); beta: momentum β.
std::vector<double> rectified_cfg_stats_cpu(const CfgInputs& in, double beta);

// Per-group coefficients γ, float64 [groups * 4], from the statistics when the mode needs them.
std::vector<double> rectified_cfg_coeffs_cpu(const CfgInputs& in, const rcfg::CoeffParams& p);

// out (contiguous, u's shape and dtype) = Σ γ x per group (gamma float64 [groups * 4] over u, c, d, b_old);
// with momentum also *b_new = c - u + β b_old (b_new may be null: not written). avx512: the AVX-512 bf16
// combine (rectified_cfg_use_avx512()), bitwise the same as the at::vec one.
void rectified_cfg_combine_cpu(const CfgInputs& in, const double* gamma, double beta, at::Tensor& out, at::Tensor* b_new,
                               bool avx512);

// True when the combine takes the AVX-512 kernel: the CPU has AVX-512 F/BW/VL/DQ/BF16 and
// DARE_KERNELS_CPU_ISA is unset, "auto" or "avx512" (an error without the hardware) and, for auto,
// ATEN_CPU_CAPABILITY does not keep PyTorch below AVX-512; DARE_KERNELS_CPU_ISA=avx2 turns it off.
bool rectified_cfg_use_avx512();

// The vector path the CPU kernels take now: "avx512", else the build's at::vec path ("avx2" or "default").
std::string rectified_cfg_cpu_isa();

}  // namespace dare::cpu
