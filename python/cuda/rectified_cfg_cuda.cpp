// CUDA implementations of the rectified CFG ops (schemas in python/rectified_cfg_ops.cpp). Built only
// with a CUDA torch. Kernels live in csrc/cuda/rectified_cfg.cu (torch-free); this file turns tensors
// into LaunchParams, allocates the workspace from torch's caching allocator and launches on the
// current stream. DARE_KERNELS_CUDA_CFG_PATH = auto (single pass when it fits) | two_pass | single_pass.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>
#include <string>

#define DARE_RCFG_CUDA_API 1
#include "rectified_cfg_params.h"
#include "switches.h"

namespace {

namespace rc = dare::rcfg;

int dtype_id(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return rc::kF32;
    case at::kHalf: return rc::kF16;
    case at::kBFloat16: return rc::kBF16;
    default: TORCH_CHECK(false, "rectified_cfg (cuda): dtype must be float32, float16 or bfloat16, got ", t);
  }
}

int mode_id(c10::string_view mode) {
  if (mode == "cfg") return rc::kModeCfg;
  if (mode == "cfg_zero_star") return rc::kModeZeroStar;
  if (mode == "apg") return rc::kModeApg;
  TORCH_CHECK(false, "rectified_cfg: unknown mode '", std::string(mode), "'");
}

// Contiguous inputs kept alive for the launch, and the LaunchParams pointing at them.
struct Prepared {
  at::Tensor u, c, d, b;
  rc::LaunchParams p{};
};

Prepared prepare(const at::Tensor& u, const at::Tensor& c, const std::optional<at::Tensor>& d,
                 const std::optional<at::Tensor>& buf, int64_t n_reduce) {
  TORCH_CHECK(u.is_cuda(), "rectified_cfg (cuda): inputs must be CUDA tensors");
  TORCH_CHECK(n_reduce >= 0 && n_reduce <= u.dim(), "rectified_cfg: n_reduce out of range");
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == u.sizes() && t.device() == u.device(), "rectified_cfg: ", name,
                " must match uncond's shape and device");
  };
  Prepared r;
  same(c, "cond");
  TORCH_CHECK(c.scalar_type() == u.scalar_type(), "rectified_cfg: branch dtypes differ");
  r.u = u.contiguous();
  r.c = c.contiguous();
  r.p.u = r.u.const_data_ptr();
  r.p.c = r.c.const_data_ptr();
  if (d.has_value()) {
    same(*d, "degraded");
    TORCH_CHECK(d->scalar_type() == u.scalar_type(), "rectified_cfg: branch dtypes differ");
    r.d = d->contiguous();
    r.p.d = r.d.const_data_ptr();
  }
  r.p.dtype = dtype_id(u.scalar_type());
  r.p.buf_dtype = r.p.dtype;
  if (buf.has_value()) {
    same(*buf, "momentum_buffer");
    TORCH_CHECK(buf->scalar_type() == u.scalar_type() || buf->scalar_type() == at::kFloat,
                "rectified_cfg: momentum_buffer must be float32 or the predictions' dtype");
    r.b = buf->contiguous();
    r.p.b_old = r.b.const_data_ptr();
    r.p.buf_dtype = dtype_id(r.b.scalar_type());
  }
  int64_t n = 1;
  for (int64_t i = u.dim() - n_reduce; i < u.dim(); ++i) n *= u.size(i);
  r.p.n = n;
  r.p.groups = n == 0 ? 0 : u.numel() / n;
  r.p.coeff = rc::CoeffParams{rc::kModeCfg, d.has_value() ? 3 : 2, buf.has_value() ? 1 : 0, 0, 0, 0, 1, 0, 0};
  return r;
}

at::Tensor workspace(const rc::LaunchParams& p, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(rc::workspace_bytes(p))}, like.options().dtype(at::kByte));
}

void fused_cuda(const at::Tensor& u, const at::Tensor& c, const std::optional<at::Tensor>& d,
                const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& out, int64_t n_reduce,
                c10::string_view mode, double s, double sr, double phi, double eta, double tau, double beta) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared r = prepare(u, c, d, momentum_buffer, n_reduce);
  TORCH_CHECK(out.sizes() == u.sizes() && out.scalar_type() == u.scalar_type() && out.device() == u.device(),
              "rectified_cfg: out must match the branch shape and dtype");
  r.p.coeff.mode = mode_id(mode);
  r.p.coeff.scale = s;
  r.p.coeff.rectify_scale = sr;
  r.p.coeff.rescale = phi;
  r.p.coeff.eta = eta;
  r.p.coeff.norm_threshold = tau;
  r.p.coeff.beta = beta;
  at::Tensor o = out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
  r.p.out = o.data_ptr();
  if (r.b.defined()) r.p.b_new = r.b.data_ptr();  // r.b is the buffer itself, or a private contiguous copy
  if (r.p.groups == 0) return;
  const auto path = dare::switches().cuda_cfg_path;  // DARE_KERNELS_CUDA_CFG_PATH (switches.h)
  const at::Tensor ws = workspace(r.p, u);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (path == dare::Switches::CudaCfgPath::kSinglePass) {
    C10_CUDA_CHECK(rc::launch_single_pass(r.p, ws.data_ptr(), stream));
  } else {
    int used = 0;
    C10_CUDA_CHECK(rc::launch_fused(r.p, ws.data_ptr(), path != dare::Switches::CudaCfgPath::kTwoPass, stream, &used));
  }
  if (!o.is_same(out)) out.copy_(o);
  if (r.b.defined() && !r.b.is_same(*momentum_buffer)) momentum_buffer->copy_(r.b);
}

at::Tensor stats_cuda(const at::Tensor& u, const at::Tensor& c, const std::optional<at::Tensor>& d,
                      const std::optional<at::Tensor>& momentum_buffer, int64_t n_reduce, double beta) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared r = prepare(u, c, d, momentum_buffer, n_reduce);
  r.p.coeff.beta = beta;
  at::Tensor stats = at::zeros({r.p.groups, rc::kNumStats}, u.options().dtype(at::kDouble));
  if (r.p.groups > 0) {
    const at::Tensor ws = workspace(r.p, u);
    C10_CUDA_CHECK(rc::launch_stats(r.p, ws.data_ptr(), stats.data_ptr<double>(), nullptr,
                                    c10::cuda::getCurrentCUDAStream()));
  }
  return stats.to(at::kFloat);
}

at::Tensor combine_cuda(const at::Tensor& u, const at::Tensor& c, const std::optional<at::Tensor>& d,
                        const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& coeffs, int64_t n_reduce) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared r = prepare(u, c, d, momentum_buffer, n_reduce);
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == r.p.groups && coeffs.size(1) == rc::kNumCoeffs,
              "rectified_cfg: coeffs must be [G, 4]");
  const at::Tensor gam = coeffs.to(u.device(), at::kFloat).contiguous();
  at::Tensor out = at::empty(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  r.p.out = out.data_ptr();
  r.p.b_new = nullptr;
  if (r.p.groups > 0)
    C10_CUDA_CHECK(rc::launch_combine(r.p, gam.const_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dare_kernels, CUDA, m) {
  m.impl("rectified_cfg_fused", &fused_cuda);
  m.impl("rectified_cfg_stats", &stats_cuda);
  m.impl("rectified_cfg_combine", &combine_cuda);
}
