// Launch parameters of the CUDA SRA attention kernels (docs/SPEC.md §1). Plain C++: no torch, no CUDA headers,
// so the kernels (csrc/cuda/*.cu) compile with plain nvcc and the binding fills this struct from tensors.
//
// Every tensor is described by a pointer and int64 strides in elements (any strides, stride 0 allowed).
// Shapes: q [B,H,N,D], k [B,H,M,D], v [B,H,M,Dv], out [B,H,N,Dv], lse [B,H,N] (float32),
// attn_map [B,N,map_stop-map_start] (float32), token_weight [B,H,M] (q's dtype or float32),
// key_padding_mask [B,M] (bool as uint8). Backward adds grad_out [B,H,N,Dv], grad_lse [B,H,N] (float32),
// grad_map like attn_map (float32), dq/dk/dv like q/k/v, dw [B,H,M] float32 and a float32 scratch
// delta [B,H,N] (contiguous) that the dq kernel fills for the dk/dv kernel.
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace dare {
namespace cuda {

enum class SraDtype : int32_t { kFloat16 = 0, kBFloat16 = 1 };

// How the forward treats the keys (DARE_KERNELS_CUDA_SRA_PATH, csrc/include/switches.h, can force one; see
// sra_attention_fwd.cu).
enum class SraFwdPath : int32_t {
  kAuto = 0,    // exact when a map is asked for or M <= 512 and the keys fit in shared memory, else online
  kExact = 1,   // two passes over the keys: exact row max/sum, then P = exp(s - lse) with no rescaling
  kOnline = 2,  // one pass, online softmax (rescaled accumulator); not allowed with a map
};

struct SraParams {
  // ---- inputs (forward and backward)
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* token_weight = nullptr;        // nullptr = all ones
  const uint8_t* key_padding_mask = nullptr;  // nullptr = every key attends
  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t w_stride[3] = {0, 0, 0};
  int64_t mask_stride[2] = {0, 0};
  bool w_is_float32 = false;  // token_weight in float32 (else in q's dtype)

  // ---- forward outputs; backward reads out and lse
  void* out = nullptr;
  float* lse = nullptr;
  float* attn_map = nullptr;  // nullptr (or map_start == map_stop) = no map
  int64_t out_stride[4] = {0, 0, 0, 0};
  int64_t lse_stride[3] = {0, 0, 0};
  int64_t map_stride[3] = {0, 0, 0};

  // ---- backward only
  const void* grad_out = nullptr;
  const float* grad_lse = nullptr;  // nullptr = 0
  const float* grad_map = nullptr;  // nullptr = 0
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dw = nullptr;     // nullptr when there is no token_weight
  float* delta = nullptr;  // scratch [B,H,N] contiguous float32
  // dk/dv split over the query axis (long N, few keys): kv_splits CTAs per key tile each write float32
  // partials to kv_partial = [kv_splits][B][H][M][D + Dv + 1] (dk | dv | dw), summed in a fixed order by a
  // reduction kernel (deterministic). kv_splits = 1: no scratch, the dk/dv kernel writes the outputs.
  float* kv_partial = nullptr;
  int32_t kv_splits = 1;
  int64_t grad_out_stride[4] = {0, 0, 0, 0};
  int64_t grad_lse_stride[3] = {0, 0, 0};
  int64_t grad_map_stride[3] = {0, 0, 0};
  int64_t dq_stride[4] = {0, 0, 0, 0};
  int64_t dk_stride[4] = {0, 0, 0, 0};
  int64_t dv_stride[4] = {0, 0, 0, 0};
  int64_t dw_stride[3] = {0, 0, 0};

  // ---- sizes and scalars
  int32_t B = 0, H = 0, N = 0, M = 0, D = 0, Dv = 0;
  float strength = 1.f;  // γ
  float scale = 1.f;     // logit scale
  int32_t map_start = 0, map_stop = 0;
  SraDtype dtype = SraDtype::kFloat16;
  SraFwdPath fwd_path = SraFwdPath::kAuto;
};

// Largest head dim (D and Dv) the kernels take.
constexpr int kSraMaxHeadDim = 256;

// Launch on `stream`. Return 0 (cudaSuccess) or the cudaError_t code of the failing launch / attribute call.
// The caller guarantees the contract above (shapes, dtypes, D, Dv <= kSraMaxHeadDim, N, M >= 1).
int sra_attention_fwd_launch(const SraParams& params, CUstream_st* stream);
// How many query splits the dk/dv kernel uses for these sizes on the current device (the caller allocates
// kv_partial with kv_splits * B * H * M * (D + Dv + 1) floats when it is > 1).
int sra_attention_bwd_kv_splits(const SraParams& params);
int sra_attention_bwd_launch(const SraParams& params, CUstream_st* stream);

}  // namespace cuda
}  // namespace dare
