// SRA attention on CPU (SPEC.md §1): forward and backward entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

namespace dare::cpu {

// Returns (out [B,H,N,Dv] in query dtype with [B,N,H,Dv] memory, lse float32 [B,H,N],
//          attn_map float32 [B,N,map_stop-map_start]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sra_attention_fwd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& token_weight,       // [B,H,M], any strides
    const std::optional<at::Tensor>& key_padding_mask,   // bool [B,M]
    double strength, double scale, int64_t map_start, int64_t map_stop);

// Returns (dq, dk, dv, dw float32 [B,H,M] or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sra_attention_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_map,
    const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& token_weight, const std::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& lse,
    double strength, double scale, int64_t map_start, int64_t map_stop);

}  // namespace dare::cpu
