// CUDA implementations of the SRA attention ops (schemas in python/sra_attention_ops.cpp): input checks,
// output allocation per the contract in dare_kernels/sra.py, the launch-parameter struct, and the launch
// on the current stream. The kernels themselves are torch-free (csrc/cuda/sra_attention_{fwd,bwd}.cu).
//
// dtypes: float16 and bfloat16 only (fp32 accumulation inside). float32 inputs raise a TypeError rather
// than being silently rounded to 16 bits: use backend="triton" (or cast) for float32.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "sra_attention_params.h"
#include "switches.h"

namespace dare {
namespace cuda_binding {
namespace {

using at::Tensor;
using dare::cuda::SraDtype;
using dare::cuda::SraFwdPath;
using dare::cuda::SraParams;

SraDtype kernel_dtype(const Tensor& q) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "sra_attention (backend='cuda'): query, key and value must be float16 or bfloat16, got ",
                   q.scalar_type(), ". The CUDA kernels do not take float32 (it would be rounded to 16 bits); "
                   "use backend='triton' for float32 or cast the inputs.");
  return q.scalar_type() == at::kBFloat16 ? SraDtype::kBFloat16 : SraDtype::kFloat16;
}

void check_on(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == q.device(), "sra_attention (backend='cuda'): ", name,
                    " must be a CUDA tensor on ", q.device(), ", got ", t.device());
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "sra_attention (backend='cuda'): ", name, " must have shape ",
                    expected, ", got ", t.sizes());
}

template <size_t K>
void strides(int64_t (&dst)[K], const Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == int64_t(K));
  for (size_t i = 0; i < K; ++i) dst[i] = t.stride(int64_t(i));
}

// Points a parameter at t's data and copies t's strides (in elements), as the kernels index with them.
template <typename T, size_t K>
void bind(T*& ptr, int64_t (&stride)[K], const Tensor& t) {
  using U = std::remove_const_t<T>;
  if constexpr (std::is_void_v<U>) {
    ptr = t.data_ptr();
  } else {
    ptr = t.data_ptr<U>();  // checks the dtype
  }
  strides(stride, t);
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, " (cuda): kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// Fills the input part of the parameters and checks the inputs shared by forward and backward.
// Returns the (possibly converted) token_weight so that it outlives the launch.
std::optional<Tensor> fill_inputs(SraParams& p, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const std::optional<Tensor>& token_weight,
                                  const std::optional<Tensor>& key_padding_mask, double strength, double scale,
                                  int64_t map_start, int64_t map_stop) {
  p.dtype = kernel_dtype(q);
  check_on(q, "query", q);
  check_on(k, "key", q);
  check_on(v, "value", q);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "sra_attention (backend='cuda'): query, key and value must share a dtype");
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "sra_attention (backend='cuda'): query, key, value must be 4-D [B, H, seq, head_dim]");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2), Dv = v.size(3);
  check_shape(k, "key", {B, H, M, D});
  check_shape(v, "value", {B, H, M, Dv});
  TORCH_CHECK_VALUE(D >= 1 && D <= dare::cuda::kSraMaxHeadDim && Dv >= 1 && Dv <= dare::cuda::kSraMaxHeadDim,
                    "sra_attention (backend='cuda'): head dims must be in [1, ", dare::cuda::kSraMaxHeadDim,
                    "], got D=", D, ", Dv=", Dv);
  TORCH_CHECK_VALUE(B <= 65535 && H <= 65535, "sra_attention (backend='cuda'): B and H must be <= 65535, got B=",
                    B, ", H=", H);
  TORCH_CHECK_VALUE(N < (int64_t(1) << 31) && M < (int64_t(1) << 31),
                    "sra_attention (backend='cuda'): sequence lengths must be < 2^31");
  TORCH_CHECK_VALUE(map_start == map_stop || (0 <= map_start && map_start < map_stop && map_stop <= M),
                    "sra_attention (backend='cuda'): map range must satisfy 0 <= map_start < map_stop <= M=", M,
                    ", got (", map_start, ", ", map_stop, ")");
  bind(p.q, p.q_stride, q);
  bind(p.k, p.k_stride, k);
  bind(p.v, p.v_stride, v);
  p.B = int32_t(B);
  p.H = int32_t(H);
  p.N = int32_t(N);
  p.M = int32_t(M);
  p.D = int32_t(D);
  p.Dv = int32_t(Dv);
  p.strength = float(strength);
  p.scale = float(scale);
  p.map_start = int32_t(map_start);
  p.map_stop = int32_t(map_stop);

  std::optional<Tensor> w;
  if (token_weight.has_value()) {
    w = *token_weight;
    check_on(*w, "token_weight", q);
    check_shape(*w, "token_weight", {B, H, M});
    TORCH_CHECK_TYPE(at::isFloatingType(w->scalar_type()),
                     "sra_attention (backend='cuda'): token_weight must be floating point, got ", w->scalar_type());
    if (w->scalar_type() != q.scalar_type() && w->scalar_type() != at::kFloat) w = w->to(at::kFloat);
    p.token_weight = w->data_ptr();
    p.w_is_float32 = w->scalar_type() == at::kFloat;
    strides(p.w_stride, *w);
  }
  if (key_padding_mask.has_value()) {
    const Tensor& m = *key_padding_mask;
    check_on(m, "key_padding_mask", q);
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "sra_attention (backend='cuda'): key_padding_mask must be bool, got ",
                     m.scalar_type());
    check_shape(m, "key_padding_mask", {B, M});
    p.key_padding_mask = reinterpret_cast<const uint8_t*>(m.data_ptr());
    strides(p.mask_stride, m);
  }
  return w;
}

// DARE_KERNELS_CUDA_SRA_PATH = exact | online | auto (switches.h)
SraFwdPath fwd_path_switch() {
  switch (dare::switches().cuda_sra_path) {
    case dare::Switches::CudaSraPath::kExact: return SraFwdPath::kExact;
    case dare::Switches::CudaSraPath::kOnline: return SraFwdPath::kOnline;
    default: return SraFwdPath::kAuto;
  }
}

std::tuple<Tensor, Tensor, Tensor> sra_attention_fwd_cuda(const Tensor& query, const Tensor& key,
                                                          const Tensor& value,
                                                          const std::optional<Tensor>& token_weight,
                                                          const std::optional<Tensor>& key_padding_mask,
                                                          double strength, double scale, int64_t map_start,
                                                          int64_t map_stop) {
  SraParams p;
  const auto w = fill_inputs(p, query, key, value, token_weight, key_padding_mask, strength, scale, map_start,
                             map_stop);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t B = p.B, H = p.H, N = p.N, Dv = p.Dv;
  const auto f32 = query.options().dtype(at::kFloat);
  Tensor out = at::empty({B, N, H, Dv}, query.options()).transpose(1, 2);  // [B,H,N,Dv] view, like SDPA
  Tensor lse = at::empty({B, H, N}, f32);
  Tensor amap = at::empty({B, N, map_stop - map_start}, f32);
  bind(p.out, p.out_stride, out);
  bind(p.lse, p.lse_stride, lse);
  if (map_stop > map_start) {
    bind(p.attn_map, p.map_stride, amap);
  }
  if (p.M == 0) {  // no key at all: every row has no valid key (zeros, lse -inf, map [B, N, 0]); no launch
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse, amap};
  }
  p.fwd_path = fwd_path_switch();
  check_launch(dare::cuda::sra_attention_fwd_launch(p, c10::cuda::getCurrentCUDAStream().stream()),
               "sra_attention_fwd");
  return {out, lse, amap};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sra_attention_bwd_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& grad_map, const std::optional<Tensor>& grad_lse,
    const Tensor& query, const Tensor& key, const Tensor& value, const std::optional<Tensor>& token_weight,
    const std::optional<Tensor>& key_padding_mask, const Tensor& out, const Tensor& lse, double strength,
    double scale, int64_t map_start, int64_t map_stop) {
  SraParams p;
  const auto w = fill_inputs(p, query, key, value, token_weight, key_padding_mask, strength, scale, map_start,
                             map_stop);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t B = p.B, H = p.H, N = p.N, M = p.M, Dv = p.Dv;
  const auto f32 = query.options().dtype(at::kFloat);

  check_on(grad_out, "grad_out", query);
  check_on(out, "out", query);
  check_on(lse, "lse", query);
  check_shape(grad_out, "grad_out", {B, H, N, Dv});
  check_shape(out, "out", {B, H, N, Dv});
  check_shape(lse, "lse", {B, H, N});
  const Tensor dO = grad_out.scalar_type() == query.scalar_type() ? grad_out : grad_out.to(query.scalar_type());
  const Tensor o = out.scalar_type() == query.scalar_type() ? out : out.to(query.scalar_type());
  const Tensor l = lse.scalar_type() == at::kFloat ? lse : lse.to(at::kFloat);
  bind(p.grad_out, p.grad_out_stride, dO);
  bind(p.out, p.out_stride, o);
  bind(p.lse, p.lse_stride, l);

  Tensor glse, gmap;
  if (grad_lse.has_value()) {
    check_on(*grad_lse, "grad_lse", query);
    check_shape(*grad_lse, "grad_lse", {B, H, N});
    glse = grad_lse->to(at::kFloat);
    bind(p.grad_lse, p.grad_lse_stride, glse);
  }
  if (grad_map.has_value() && map_stop > map_start) {
    check_on(*grad_map, "grad_map", query);
    check_shape(*grad_map, "grad_map", {B, N, map_stop - map_start});
    gmap = grad_map->to(at::kFloat);
    bind(p.grad_map, p.grad_map_stride, gmap);
  }

  Tensor dq = at::empty_like(query), dk = at::empty_like(key), dv = at::empty_like(value);
  Tensor dw = w.has_value() ? at::empty({B, H, M}, f32) : at::empty({0}, f32);
  Tensor delta = at::empty({B, H, N}, f32);
  bind(p.dq, p.dq_stride, dq);
  bind(p.dk, p.dk_stride, dk);
  bind(p.dv, p.dv_stride, dv);
  if (w.has_value()) {
    bind(p.dw, p.dw_stride, dw);
  }
  if (M == 0) {  // the forward was all zeros: dq = 0, and dk, dv, dw have no elements
    dq.zero_();
    return {dq, dk, dv, dw};
  }
  p.delta = delta.data_ptr<float>();
  Tensor kv_partial;
  p.kv_splits = dare::cuda::sra_attention_bwd_kv_splits(p);
  if (p.kv_splits > 1) {
    kv_partial = at::empty({int64_t(p.kv_splits) * B * H * M * (p.D + Dv + 1)}, f32);
    p.kv_partial = kv_partial.data_ptr<float>();
  }
  check_launch(dare::cuda::sra_attention_bwd_launch(p, c10::cuda::getCurrentCUDAStream().stream()),
               "sra_attention_bwd");
  return {dq, dk, dv, dw};
}

}  // namespace
}  // namespace cuda_binding
}  // namespace dare

TORCH_LIBRARY_IMPL(dare_kernels, CUDA, m) {
  m.impl("sra_attention_fwd", &dare::cuda_binding::sra_attention_fwd_cuda);
  m.impl("sra_attention_bwd", &dare::cuda_binding::sra_attention_bwd_cuda);
}
