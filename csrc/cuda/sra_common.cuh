// Device helpers shared by the SRA attention kernels: tensor-core fragments (mma.sync m16n8k16 with
// ldmatrix), strided global <-> shared tile copies, the key bias γ·log2(w). No torch headers.
//
// Fragment conventions (PTX ISA, mma.m16n8k16, per warp; g = lane / 4, t = lane % 4):
//   A (16x16, row major):  a0 = (g, 2t..2t+1)  a1 = (g+8, 2t..)  a2 = (g, 2t+8..)  a3 = (g+8, 2t+8..)
//   B (16x8, "col"):       b0 = (k 2t..2t+1, n g)  b1 = (k 2t+8.., n g)
//   C (16x8, float):       c0,c1 = (g, 2t..2t+1)   c2,c3 = (g+8, 2t..2t+1)
// Two neighbouring C tiles (n-tiles 2j, 2j+1) of a 16xN accumulator are exactly the A fragment of
// k-block j, which is how P (or dS) goes from the first matrix product into the second one
// without a round trip through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "sra_attention_params.h"

namespace dare {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// element types: raw 16-bit storage, conversions, the matching mma instruction
// ---------------------------------------------------------------------------------------------

// d += a * b: one m16n8k16 tensor-core step on 16-bit inputs of PTX type `ty` (f16 or bf16), fp32 accumulator
#define DARE_MMA_M16N8K16(ty, d, a, b0, b1)                                                          \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." #ty "." #ty ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
               "{%8,%9}, {%0,%1,%2,%3};\n"                                                          \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

// Two values rounded to the element type E and packed into one 32-bit register (lo in the low half).
template <typename E>
struct Packs16 {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    return uint32_t(E::from_float(lo)) | (uint32_t(E::from_float(hi)) << 16);
  }
};

struct F16 : Packs16<F16> {
  static __device__ __forceinline__ float to_float(uint16_t x) { return __half2float(__ushort_as_half(x)); }
  static __device__ __forceinline__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
  static __device__ __forceinline__ void mma(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    DARE_MMA_M16N8K16(f16, d, a, b0, b1);
  }
};

struct BF16 : Packs16<BF16> {
  static __device__ __forceinline__ float to_float(uint16_t x) { return __bfloat162float(__ushort_as_bfloat16(x)); }
  static __device__ __forceinline__ uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  static __device__ __forceinline__ void mma(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    DARE_MMA_M16N8K16(bf16, d, a, b0, b1);
  }
};

// ---------------------------------------------------------------------------------------------
// ldmatrix
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// A fragment of the 16x16 block at column k0 of a row-major [16][lda] tile (sA = the warp's first row).
__device__ __forceinline__ void load_a_frag(uint32_t a[4], const uint16_t* sA, int lda, int k0) {
  const int lane = threadIdx.x & 31, idx = lane >> 3, r = lane & 7;
  ldsm_x4(a, sA + (r + (idx & 1) * 8) * lda + k0 + (idx >> 1) * 8);
}

// B fragments of n-tiles n0..n0+15 (two n8 tiles), k-block k0, of B(k, n) = sB[n * ldb + k]
// (a row-major tile whose rows are the n index, e.g. K for S = Q K^T). b[0..1] = n-tile 0, b[2..3] = 1.
__device__ __forceinline__ void load_b_frag_nk(uint32_t b[4], const uint16_t* sB, int ldb, int n0, int k0) {
  const int lane = threadIdx.x & 31, idx = lane >> 3, r = lane & 7;
  ldsm_x4(b, sB + (n0 + r + (idx >> 1) * 8) * ldb + k0 + (idx & 1) * 8);
}

// Same for B(k, n) = sB[k * ldb + n] (rows are the k index, e.g. V for O = P V), via ldmatrix.trans.
__device__ __forceinline__ void load_b_frag_kn(uint32_t b[4], const uint16_t* sB, int ldb, int n0, int k0) {
  const int lane = threadIdx.x & 31, idx = lane >> 3, r = lane & 7;
  ldsm_x4_trans(b, sB + (k0 + r + (idx & 1) * 8) * ldb + n0 + (idx >> 1) * 8);
}

// ---------------------------------------------------------------------------------------------
// warp-level matrix products (one warp: a 16-row strip of C)
// ---------------------------------------------------------------------------------------------

// acc[16][8*NT] += A[16][K] * B[K][8*NT]; A row-major in shared memory, B(k, n) = sB[n*ldb + k].
template <typename E, int NT, int K>
__device__ __forceinline__ void warp_gemm_ss_nk(float (&acc)[NT][4], const uint16_t* sA, int lda,
                                                const uint16_t* sB, int ldb) {
  static_assert(NT % 2 == 0 && K % 16 == 0, "tile sizes");
#pragma unroll 2
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t a[4];
    load_a_frag(a, sA, lda, k0);
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      load_b_frag_nk(b, sB, ldb, j * 8, k0);
      E::mma(acc[j], a, b[0], b[1]);
      E::mma(acc[j + 1], a, b[2], b[3]);
    }
  }
}

// acc[16][8*NT] += A[16][16*KT] * B; A given as register fragments, B(k, n) = sB[k*ldb + n].
template <typename E, int NT, int KT>
__device__ __forceinline__ void warp_gemm_rs_kn(float (&acc)[NT][4], const uint32_t (&a)[KT][4],
                                                const uint16_t* sB, int ldb) {
  static_assert(NT % 2 == 0, "tile sizes");
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      load_b_frag_kn(b, sB, ldb, j * 8, kk * 16);
      E::mma(acc[j], a[kk], b[0], b[1]);
      E::mma(acc[j + 1], a[kk], b[2], b[3]);
    }
  }
}

// C fragments (16 x 8*NT floats) -> A fragments (16 x 16*(NT/2)) in the element type.
template <typename E, int NT>
__device__ __forceinline__ void c_to_a_frags(uint32_t (&a)[NT / 2][4], const float (&c)[NT][4]) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    a[kk][0] = E::pack(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = E::pack(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = E::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = E::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

template <int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// ---------------------------------------------------------------------------------------------
// global <-> shared tile copies (16-bit elements, any strides)
// ---------------------------------------------------------------------------------------------

// Copy rows [0, rows) x cols [0, kCols) of a strided global matrix into shared memory (row pitch lds),
// zero-filling rows >= valid_rows and columns >= valid_cols. 16-byte vector loads where the rows are
// contiguous and aligned, element loads otherwise.
template <int kCols>
__device__ __forceinline__ void load_tile(uint16_t* s, int lds, const uint16_t* g, int64_t rs, int64_t cs,
                                          int rows, int valid_rows, int valid_cols, int tid, int nthreads) {
  constexpr int kChunks = kCols / 8;
  const bool vec = cs == 1 && (rs % 8) == 0 && (reinterpret_cast<uintptr_t>(g) % 16) == 0;
  for (int idx = tid; idx < rows * kChunks; idx += nthreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    uint4 chunk = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid_rows) {
      const uint16_t* src = g + int64_t(r) * rs;
      if (vec && c + 8 <= valid_cols) {
        chunk = __ldg(reinterpret_cast<const uint4*>(src + c));
      } else {
        uint16_t e[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = (c + i < valid_cols) ? src[int64_t(c + i) * cs] : uint16_t(0);
        chunk.x = e[0] | (uint32_t(e[1]) << 16);
        chunk.y = e[2] | (uint32_t(e[3]) << 16);
        chunk.z = e[4] | (uint32_t(e[5]) << 16);
        chunk.w = e[6] | (uint32_t(e[7]) << 16);
      }
    }
    *reinterpret_cast<uint4*>(s + r * lds + c) = chunk;
  }
}

// Copy rows [0, valid_rows) x cols [0, valid_cols) of a shared tile to a strided global matrix.
template <int kCols>
__device__ __forceinline__ void store_tile(uint16_t* g, int64_t rs, int64_t cs, const uint16_t* s, int lds,
                                           int rows, int valid_rows, int valid_cols, int tid, int nthreads) {
  constexpr int kChunks = kCols / 8;
  const bool vec = cs == 1 && (rs % 8) == 0 && (reinterpret_cast<uintptr_t>(g) % 16) == 0;
  for (int idx = tid; idx < rows * kChunks; idx += nthreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    if (r >= valid_rows || c >= valid_cols) continue;
    uint16_t* dst = g + int64_t(r) * rs;
    const uint4 chunk = *reinterpret_cast<const uint4*>(s + r * lds + c);
    if (vec && c + 8 <= valid_cols) {
      *reinterpret_cast<uint4*>(dst + c) = chunk;
    } else {
      const uint32_t w[4] = {chunk.x, chunk.y, chunk.z, chunk.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (c + i < valid_cols) dst[int64_t(c + i) * cs] = uint16_t(w[i / 2] >> (16 * (i % 2)));
    }
  }
}

// Write a warp's C fragments (16 x 8*NT, times `mul`) into its 16-row strip of a shared tile.
template <typename E, int NT>
__device__ __forceinline__ void frags_to_smem(uint16_t* s, int lds, const float (&acc)[NT][4], float mul) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int c = j * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(s + g * lds + c) = E::pack(acc[j][0] * mul, acc[j][1] * mul);
    *reinterpret_cast<uint32_t*>(s + (g + 8) * lds + c) = E::pack(acc[j][2] * mul, acc[j][3] * mul);
  }
}

// ---------------------------------------------------------------------------------------------
// the SRA key bias in the log2 domain
// ---------------------------------------------------------------------------------------------

// γ·log2(w_bhj) for a valid key, -inf for an invalid one (masked, w <= 0 or NaN, or j >= M).
__device__ __forceinline__ float key_bias_log2(const SraParams& p, int b, int h, int j) {
  if (j >= p.M) return -INFINITY;
  if (p.key_padding_mask != nullptr &&
      p.key_padding_mask[int64_t(b) * p.mask_stride[0] + int64_t(j) * p.mask_stride[1]] == 0)
    return -INFINITY;
  if (p.token_weight == nullptr) return 0.f;
  const int64_t off = int64_t(b) * p.w_stride[0] + int64_t(h) * p.w_stride[1] + int64_t(j) * p.w_stride[2];
  float w;
  if (p.w_is_float32) {
    w = static_cast<const float*>(p.token_weight)[off];
  } else if (p.dtype == SraDtype::kBFloat16) {
    w = BF16::to_float(static_cast<const uint16_t*>(p.token_weight)[off]);
  } else {
    w = F16::to_float(static_cast<const uint16_t*>(p.token_weight)[off]);
  }
  if (!(w > 0.f)) return -INFINITY;
  return p.strength == 0.f ? 0.f : p.strength * log2f(w);
}

// Row reductions over the four lanes (t = 0..3) that share a fragment row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Pointer to element (b, h) of a [B, H, ...] tensor given its strides.
__device__ __forceinline__ const uint16_t* bh_ptr(const void* base, const int64_t* st, int b, int h) {
  return static_cast<const uint16_t*>(base) + int64_t(b) * st[0] + int64_t(h) * st[1];
}
__device__ __forceinline__ uint16_t* bh_ptr(void* base, const int64_t* st, int b, int h) {
  return static_cast<uint16_t*>(base) + int64_t(b) * st[0] + int64_t(h) * st[1];
}

// Pad a head dim to the kernel tier: 64, 128 or 256.
inline int sra_head_tier(int d) { return d <= 64 ? 64 : (d <= 128 ? 128 : 256); }

}  // namespace cuda
}  // namespace dare
