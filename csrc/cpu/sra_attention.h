// SRA attention on CPU (docs/SPEC.md §1): the kernel launches (forward in sra_cpu_fwd.cpp, backward in
// sra_cpu_bwd.cpp). The op entry points with the argument checks and output allocation are in
// python/cpu/sra_attention_cpu.cpp; these take checked, non-empty inputs (B, H, N, M > 0).
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>
#include <string>

namespace dare::cpu {

// query [B,H,N,D], key [B,H,M,D], value [B,H,M,Dv] of one dtype, any strides; token_weight [B,H,M] (any
// strides, float), key_padding_mask bool [B,M]. Writes out (a [B,H,N,Dv] view of [B,N,H,Dv] memory, query
// dtype), lse [B,H,N] and amap [B,N,map_stop-map_start] (acc: float64 for float64 inputs, else float32).
void sra_attention_fwd_launch(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              const std::optional<at::Tensor>& token_weight,
                              const std::optional<at::Tensor>& key_padding_mask, double strength, double scale,
                              int64_t map_start, int64_t map_stop, at::Tensor& out, at::Tensor& lse,
                              at::Tensor& amap);

// The backward's operands: grad_out and out in query's dtype; lse [B,H,N], grad_lse [B,H,N] and grad_map
// [B,N,map_stop-map_start] acc and contiguous (the last two undefined when absent). dq, dk, dv are
// allocated like query, key, value; dw [B,H,M] acc when token_weight is given.
struct SraBwdArgs {
  at::Tensor grad_out, grad_map, grad_lse, query, key, value, out, lse;
  std::optional<at::Tensor> token_weight, key_padding_mask;
  double strength = 0, scale = 0;
  int64_t map_start = 0, map_stop = 0;
  at::Tensor dq, dk, dv, dw;
};
void sra_attention_bwd_launch(const SraBwdArgs& args);

// Which CPU path the SRA forward takes for inputs of dtype t as the switches stand now: "<ISA of the
// softmax rows> / <product kernel>", e.g. "avx2 / cpublas::brgemm (amx-bf16, packed)", or "error: ..."
// when a switch it reads holds a rejected value.
std::string sra_cpu_path(at::ScalarType t);

}  // namespace dare::cpu
