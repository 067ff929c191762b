// CPU implementations of the SRA attention ops (schemas in python/sra_attention_ops.cpp): input checks,
// output allocation per the contract in dare_kernels/sra.py, and the launch of the kernels
// (csrc/cpu/sra_cpu_{fwd,bwd}.cpp). Mirrors python/cuda/sra_attention_cuda.cpp.
//
// dtypes: float16, bfloat16, float32 and float64 (acc = float64 for float64, float32 otherwise).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "cpu/cpu_memory.h"
#include "cpu/sra_attention.h"

namespace dare::cpu_binding {
namespace {

using at::Tensor;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, int64_t map_start, int64_t map_stop) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "sra_attention (cpu): query, key, value must be 4-D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "sra_attention (cpu): tensors must be on the CPU");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "sra_attention (cpu): query, key and value must share a dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "sra_attention (cpu): key must be [B, H, M, D] matching query");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == k.size(2),
              "sra_attention (cpu): value must be [B, H, M, Dv] matching key");
  const int64_t M = k.size(2);
  TORCH_CHECK(0 <= map_start && map_start <= map_stop && map_stop <= M,
              "sra_attention (cpu): bad map key range [", map_start, ", ", map_stop, ") for M=", M);
}

bool empty_problem(const Tensor& q, const Tensor& k) {
  return q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0 || k.size(2) == 0;
}

std::tuple<Tensor, Tensor, Tensor> sra_attention_fwd_cpu(const Tensor& query, const Tensor& key, const Tensor& value,
                                                         const std::optional<Tensor>& token_weight,
                                                         const std::optional<Tensor>& key_padding_mask,
                                                         double strength, double scale, int64_t map_start,
                                                         int64_t map_stop) {
  check_inputs(query, key, value, map_start, map_stop);
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), Dv = value.size(3);
  const int64_t Mm = map_stop - map_start;
  const auto acc_opts = query.options().dtype(acc_type(query.scalar_type()));
  if (empty_problem(query, key)) {
    return {at::zeros({B, N, H, Dv}, query.options()).transpose(1, 2),
            at::full({B, H, N}, -std::numeric_limits<double>::infinity(), acc_opts), at::zeros({B, N, Mm}, acc_opts)};
  }
  Tensor out = at::empty({B, N, H, Dv}, query.options()).transpose(1, 2);  // [B,H,N,Dv] view, like SDPA
  Tensor lse = at::empty({B, H, N}, acc_opts);
  Tensor amap = at::empty({B, N, Mm}, acc_opts);
  dare::cpu::advise_huge_pages(out);
  dare::cpu::advise_huge_pages(amap);
  dare::cpu::sra_attention_fwd_launch(query, key, value, token_weight, key_padding_mask, strength, scale, map_start,
                                      map_stop, out, lse, amap);
  return {out, lse, amap};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sra_attention_bwd_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_map, const std::optional<Tensor>& grad_lse,
    const Tensor& query, const Tensor& key, const Tensor& value, const std::optional<Tensor>& token_weight,
    const std::optional<Tensor>& key_padding_mask, const Tensor& out, const Tensor& lse, double strength,
    double scale, int64_t map_start, int64_t map_stop) {
  check_inputs(query, key, value, map_start, map_stop);
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "sra_attention (cpu): grad_out must have the shape of out");
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), M = key.size(2);
  const int64_t Mm = map_stop - map_start;
  const auto acc = acc_type(query.scalar_type());
  const bool has_w = token_weight.has_value() && token_weight->defined();

  dare::cpu::SraBwdArgs a;
  a.dq = at::empty_like(query);
  a.dk = at::empty_like(key);
  a.dv = at::empty_like(value);
  a.dw = has_w ? at::zeros({B, H, M}, query.options().dtype(acc)) : at::empty({0}, query.options().dtype(acc));
  if (empty_problem(query, key)) {
    a.dq.zero_();
    a.dk.zero_();
    a.dv.zero_();
    return {a.dq, a.dk, a.dv, a.dw};
  }
  a.grad_out = grad_out.scalar_type() == query.scalar_type() ? grad_out : grad_out.to(query.scalar_type());
  a.out = out.scalar_type() == query.scalar_type() ? out : out.to(query.scalar_type());
  a.lse = lse.to(acc).contiguous();
  if (grad_map.has_value() && grad_map->defined() && grad_map->numel() > 0 && Mm > 0) {
    TORCH_CHECK(grad_map->dim() == 3 && grad_map->size(0) == B && grad_map->size(1) == N && grad_map->size(2) == Mm,
                "sra_attention (cpu): grad_map must be [B, N, map_stop - map_start]");
    a.grad_map = grad_map->to(acc).contiguous();
  }
  if (grad_lse.has_value() && grad_lse->defined() && grad_lse->numel() > 0) a.grad_lse = grad_lse->to(acc).contiguous();
  a.query = query;
  a.key = key;
  a.value = value;
  a.token_weight = token_weight;
  a.key_padding_mask = key_padding_mask;
  a.strength = strength;
  a.scale = scale;
  a.map_start = map_start;
  a.map_stop = map_stop;
  dare::cpu::sra_attention_bwd_launch(a);
  return {a.dq, a.dk, a.dv, a.dw};
}

}  // namespace
}  // namespace dare::cpu_binding

TORCH_LIBRARY_IMPL(dare_kernels, CPU, m) {
  m.impl("sra_attention_fwd", &dare::cpu_binding::sra_attention_fwd_cpu);
  m.impl("sra_attention_bwd", &dare::cpu_binding::sra_attention_bwd_cpu);
}
