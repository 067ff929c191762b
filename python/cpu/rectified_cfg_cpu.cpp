// CPU implementations of the rectified CFG ops (schemas in python/rectified_cfg_ops.cpp): argument checks,
// contiguous operands, output allocation, and the launch of the kernels (csrc/cpu/rectified_cfg.cpp).
// Mirrors python/cuda/rectified_cfg_cuda.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "cpu/rectified_cfg.h"
#include "rectified_cfg_params.h"

namespace dare::cpu_binding {
namespace {

namespace rc = dare::rcfg;
using dare::cpu::CfgInputs;

CfgInputs prepare(const at::Tensor& u, const at::Tensor& c, const std::optional<at::Tensor>& d,
                  const std::optional<at::Tensor>& buf, int64_t n_reduce) {
  TORCH_CHECK(u.device().is_cpu(), "rectified_cfg (cpu): inputs must be CPU tensors, got ", u.device());
  TORCH_CHECK(n_reduce >= 0 && n_reduce <= u.dim(), "rectified_cfg: n_reduce=", n_reduce, " out of range for ", u.dim(), "-D inputs");
  CfgInputs in;
  auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == u.sizes(), "rectified_cfg: ", name, " has shape ", t.sizes(), ", expected ", u.sizes());
    TORCH_CHECK(t.device() == u.device(), "rectified_cfg: ", name, " is on ", t.device(), ", expected ", u.device());
  };
  check(c, "cond");
  TORCH_CHECK(c.scalar_type() == u.scalar_type(), "rectified_cfg: branch dtypes differ");
  in.u = u.contiguous();
  in.c = c.contiguous();
  if (d.has_value()) {
    check(*d, "degraded");
    TORCH_CHECK(d->scalar_type() == u.scalar_type(), "rectified_cfg: branch dtypes differ");
    in.d = d->contiguous();
    in.k3 = true;
  }
  if (buf.has_value()) {
    check(*buf, "momentum_buffer");
    const auto bt = buf->scalar_type();
    TORCH_CHECK(bt == u.scalar_type() || (bt == at::kFloat && u.scalar_type() != at::kDouble),
                "rectified_cfg: momentum_buffer must be float32 or the predictions' dtype, got ", bt);
    in.b = buf->contiguous();
    in.mom = true;
    in.buf_f32 = bt == at::kFloat && u.scalar_type() != at::kFloat;
  }
  in.n = 1;
  for (int64_t i = u.dim() - n_reduce; i < u.dim(); ++i) in.n *= u.size(i);
  in.groups = in.n == 0 ? 0 : u.numel() / in.n;
  return in;
}

int mode_id(c10::string_view mode) {
  if (mode == "cfg") return rc::kModeCfg;
  if (mode == "cfg_zero_star") return rc::kModeZeroStar;
  if (mode == "apg") return rc::kModeApg;
  TORCH_CHECK(false, "rectified_cfg: unknown mode '", std::string(mode), "' (expected cfg, cfg_zero_star or apg)");
}

// out <- Σ γ_k x_k with γ from the statistics; the momentum buffer (APG) is updated in place.
void fused_cpu(const at::Tensor& u, const at::Tensor& c, const std::optional<at::Tensor>& d,
               const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& out, int64_t n_reduce,
               c10::string_view mode, double guidance_scale, double rectify_scale, double guidance_rescale,
               double eta, double norm_threshold, double momentum) {
  CfgInputs in = prepare(u, c, d, momentum_buffer, n_reduce);
  TORCH_CHECK(out.sizes() == u.sizes() && out.scalar_type() == u.scalar_type() && out.device() == u.device(),
              "rectified_cfg: out must match the branch shape ", u.sizes(), " and dtype ", u.scalar_type());
  rc::CoeffParams p{mode_id(mode), in.k3 ? 3 : 2, in.mom ? 1 : 0, guidance_scale, rectify_scale,
                    guidance_rescale, eta, norm_threshold, momentum};
  TORCH_CHECK(!in.mom || p.mode == rc::kModeApg, "rectified_cfg: a momentum buffer is only used by mode 'apg'");
  const bool avx512 = dare::cpu::rectified_cfg_use_avx512();
  const std::vector<double> gamma = dare::cpu::rectified_cfg_coeffs_cpu(in, p);
  at::Tensor o = out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
  at::Tensor bnew;
  if (in.mom) bnew = momentum_buffer->is_contiguous() ? *momentum_buffer : in.b;  // in.b is a private copy then
  dare::cpu::rectified_cfg_combine_cpu(in, gamma.data(), momentum, o, in.mom ? &bnew : nullptr, avx512);
  if (!o.is_same(out)) out.copy_(o);
  if (in.mom && !bnew.is_same(*momentum_buffer)) momentum_buffer->copy_(bnew);
}

// Per-group statistics [G, 14] (float64 for float64 inputs, else float32).
at::Tensor stats_cpu(const at::Tensor& u, const at::Tensor& c, const std::optional<at::Tensor>& d,
                     const std::optional<at::Tensor>& momentum_buffer, int64_t n_reduce, double momentum) {
  CfgInputs in = prepare(u, c, d, momentum_buffer, n_reduce);
  const std::vector<double> stats = dare::cpu::rectified_cfg_stats_cpu(in, momentum);
  at::Tensor res = at::empty({in.groups, rc::kNumStats}, u.options().dtype(at::kDouble));
  std::copy(stats.begin(), stats.end(), res.mutable_data_ptr<double>());
  return u.scalar_type() == at::kDouble ? res : res.to(at::kFloat);
}

// out = Σ γ_k x_k with γ = coeffs[G, 4] over (u, c, d, b_old); a new tensor in the inputs' dtype.
at::Tensor combine_cpu(const at::Tensor& u, const at::Tensor& c, const std::optional<at::Tensor>& d,
                       const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& coeffs, int64_t n_reduce) {
  CfgInputs in = prepare(u, c, d, momentum_buffer, n_reduce);
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == in.groups && coeffs.size(1) == rc::kNumCoeffs,
              "rectified_cfg: coeffs must be [G=", in.groups, ", 4], got ", coeffs.sizes());
  at::Tensor gamma = coeffs.to(at::kDouble).contiguous();
  at::Tensor out = at::empty(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  dare::cpu::rectified_cfg_combine_cpu(in, gamma.const_data_ptr<double>(), 0.0, out, nullptr,
                                       dare::cpu::rectified_cfg_use_avx512());
  return out;
}

}  // namespace
}  // namespace dare::cpu_binding

TORCH_LIBRARY_IMPL(dare_kernels, CPU, m) {
  m.impl("rectified_cfg_fused", &dare::cpu_binding::fused_cpu);
  m.impl("rectified_cfg_stats", &dare::cpu_binding::stats_cpu);
  m.impl("rectified_cfg_combine", &dare::cpu_binding::combine_cpu);
}
