// Rectified CFG combine on CPU (SPEC.md §2): fused forward, and the statistics / combine halves used
// by the differentiable path. Every tensor argument u, c, d, buffer, out has one shape
// [*groups, *reduced]; the last `n_reduce` dims are reduced (N elements per group, G groups).
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>
#include <string>
#include <string_view>

namespace dare::cpu {

// out <- Σ γ_k x_k with γ from the statistics; the momentum buffer (APG) is updated in place.
void rectified_cfg_fused(const at::Tensor& u, const at::Tensor& c, const std::optional<at::Tensor>& d,
                         const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& out,
                         int64_t n_reduce, c10::string_view mode, double guidance_scale,
                         double rectify_scale, double guidance_rescale, double eta,
                         double norm_threshold, double momentum);

// Per-group statistics [G, 14] (float64 for float64 inputs, else float32); layout in rectified_cfg_params.h.
at::Tensor rectified_cfg_stats(const at::Tensor& u, const at::Tensor& c, const std::optional<at::Tensor>& d,
                               const std::optional<at::Tensor>& momentum_buffer, int64_t n_reduce,
                               double momentum);

// out = Σ γ_k x_k with γ = coeffs[G, 4] over (u, c, d, b_old); a new tensor in the inputs' dtype.
at::Tensor rectified_cfg_combine(const at::Tensor& u, const at::Tensor& c, const std::optional<at::Tensor>& d,
                                 const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& coeffs,
                                 int64_t n_reduce);

// The vector path the CPU kernels take now: "avx512" (when the CPU has AVX-512 F/BW/VL/DQ/BF16 and
// DARE_KERNELS_CPU_ISA is unset, "auto" or "avx512"), else the build's at::vec path ("avx2" or
// "default"; DARE_KERNELS_CPU_ISA=avx2 forces it).
std::string rectified_cfg_cpu_isa();

}  // namespace dare::cpu
