// SRA attention backward (docs/SPEC.md §1 gradients) with mma.sync tensor cores (sm_80+). No torch headers.
//
//   dP_ij = dO_i·v_j + dA_ij / H          (dA = grad of the head-averaged map, inside its key range)
//   Δ_i   = Σ_j P_ij dP_ij − grad_lse_i  = dO_i·O_i + (1/H) Σ_j P_ij dA_ij − grad_lse_i
//   dS_ij = P_ij (dP_ij − Δ_i)            dq = scale Σ_j dS k_j     dk = scale Σ_i dS q_i
//   dv_j  = Σ_i P_ij dO_i                 dw_j = γ / w_j Σ_i dS_ij  (0 for invalid keys)
//
// Two kernels, both deterministic (no atomics: every output element has exactly one owner CTA that
// sums in a fixed order):
//   1. dq kernel: a CTA owns 64 queries of one (b, h) (4 warps x 16 rows). Prologue: Δ for its rows —
//      dO·O row sums, minus grad_lse, plus the map term from a pass over the map's key range — stored
//      to the float32 scratch `delta` for kernel 2. Then it streams key tiles (64, or 16 at kD = 256):
//      S = Q K^T, P = exp2(s2 - lse2), dP = dO V^T (+ dA/H), dS, dq += dS K (dS re-packed in registers).
//   2. dk/dv kernel: a CTA owns 64 keys of one (b, h) (warp w%4 owns 16 keys) and streams query tiles of
//      32 (16 at kD = 256): S^T = K Q^T, P^T, dv += P^T dO, dP^T = V dO^T (+ dA^T/H), dS^T, dk += dS^T Q, dw row sums.
//      At kD = 256 the CTA has 8 warps in two groups, each owning half of the dk/dv columns (both
//      groups recompute S^T and dP^T) so that 16 x 256 float accumulators never spill.
//      Cross-attention has few keys and many queries (Wan: M = 512, N = 32760), so one CTA per key tile
//      leaves most SMs idle: the query axis is then split over kv_splits CTAs per key tile, each writing
//      float32 partials, and 3. a reduction kernel sums the partials in split order (deterministic) and
//      writes dk, dv (input dtype) and dw.
//
// Dynamic shared memory per CTA (bytes): dq kernel 37,376 / 70,144 / 84,800 and dk/dv kernel
// 27,904 / 52,480 / 84,608 for kD = 64 / 128 / 256 (all within the 99 KB opt-in of sm_86 / sm_89).
#include <cuda_runtime.h>

#include <cmath>

#include "sra_common.cuh"

namespace dare {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// shared helpers
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float key_weight(const SraParams& p, int b, int h, int j) {
  const int64_t off = int64_t(b) * p.w_stride[0] + int64_t(h) * p.w_stride[1] + int64_t(j) * p.w_stride[2];
  if (p.w_is_float32) return static_cast<const float*>(p.token_weight)[off];
  const uint16_t x = static_cast<const uint16_t*>(p.token_weight)[off];
  return p.dtype == SraDtype::kBFloat16 ? BF16::to_float(x) : F16::to_float(x);
}

__device__ __forceinline__ float grad_map_at(const SraParams& p, int b, int row, int key) {
  return p.grad_map[int64_t(b) * p.grad_map_stride[0] + int64_t(row) * p.grad_map_stride[1] +
                    int64_t(key - p.map_start) * p.grad_map_stride[2]];
}

__device__ __forceinline__ float lse_log2_at(const SraParams& p, int b, int h, int row) {
  if (row >= p.N) return -INFINITY;
  return p.lse[int64_t(b) * p.lse_stride[0] + int64_t(h) * p.lse_stride[1] + int64_t(row) * p.lse_stride[2]] *
         kLog2e;
}

// ------------------------------------------------------------------------------------------------
// kernel 1: Δ and dq
// ------------------------------------------------------------------------------------------------

constexpr int kDqBM = 64;
constexpr int kDqThreads = 128;

template <int kD>
struct DqTile {
  // 16 keys a step at kD = 256 keeps shared memory under the 99 KB of sm_86/sm_89 (which run sm_80 code)
  static constexpr int kBN = kD <= 128 ? 64 : 16;
  static constexpr int kLd = kD + 8;
  static constexpr size_t kSmem =
      sizeof(uint16_t) * size_t(2 * kDqBM + 2 * kBN) * kLd + sizeof(float) * (kBN + kDqBM);
};

template <typename E, int kD>
__global__ void __launch_bounds__(kDqThreads) sra_bwd_dq_kernel(const SraParams p) {
  using Tile = DqTile<kD>;
  constexpr int kBN = Tile::kBN, kLd = Tile::kLd;
  constexpr int kNT = kBN / 8, kOT = kD / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sdO = sQ + kDqBM * kLd;
  uint16_t* sK = sdO + kDqBM * kLd;
  uint16_t* sV = sK + kBN * kLd;
  float* sBias = reinterpret_cast<float*>(sV + kBN * kLd);
  float* sDelta = sBias + kBN;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int q0 = blockIdx.x * kDqBM, h = blockIdx.y, b = blockIdx.z;
  const int n_valid = min(kDqBM, p.N - q0);
  const float sc2 = p.scale * kLog2e, inv_h = 1.f / float(p.H);
  const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  const bool with_map_grad = p.grad_map != nullptr && p.map_stop > p.map_start;

  const uint16_t* gK = bh_ptr(p.k, p.k_stride, b, h);
  const uint16_t* gV = bh_ptr(p.v, p.v_stride, b, h);
  load_tile<kD>(sQ, kLd, bh_ptr(p.q, p.q_stride, b, h) + int64_t(q0) * p.q_stride[2], p.q_stride[2],
                p.q_stride[3], kDqBM, n_valid, p.D, tid, kDqThreads);
  load_tile<kD>(sdO, kLd, bh_ptr(p.grad_out, p.grad_out_stride, b, h) + int64_t(q0) * p.grad_out_stride[2],
                p.grad_out_stride[2], p.grad_out_stride[3], kDqBM, n_valid, p.Dv, tid, kDqThreads);
  __syncthreads();

  // ---- Δ part 1: dO·O (O read from global, dO from shared memory), minus grad_lse; one warp per row
  {
    const uint16_t* gO = bh_ptr(p.out, p.out_stride, b, h);
    for (int r = warp; r < kDqBM; r += kDqThreads / 32) {
      const int row = q0 + r;
      float acc = 0.f;
      if (row < p.N)
        for (int d = lane; d < p.Dv; d += 32)
          acc += E::to_float(sdO[r * kLd + d]) *
                 E::to_float(gO[int64_t(row) * p.out_stride[2] + int64_t(d) * p.out_stride[3]]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0) {
        if (p.grad_lse != nullptr && row < p.N)
          acc -= p.grad_lse[int64_t(b) * p.grad_lse_stride[0] + int64_t(h) * p.grad_lse_stride[1] +
                            int64_t(row) * p.grad_lse_stride[2]];
        sDelta[r] = acc;
      }
    }
  }
  __syncthreads();
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse2[r] = lse_log2_at(p, b, h, rows[r]);
    delta[r] = sDelta[rows[r] - q0];
  }

  auto load_keys = [=](int kt, bool with_v) {
    const int j0 = kt * kBN, m_valid = min(kBN, p.M - j0);
    load_tile<kD>(sK, kLd, gK + int64_t(j0) * p.k_stride[2], p.k_stride[2], p.k_stride[3], kBN, m_valid, p.D,
                  tid, kDqThreads);
    if (with_v)
      load_tile<kD>(sV, kLd, gV + int64_t(j0) * p.v_stride[2], p.v_stride[2], p.v_stride[3], kBN, m_valid,
                    p.Dv, tid, kDqThreads);
    for (int j = tid; j < kBN; j += kDqThreads) sBias[j] = key_bias_log2(p, b, h, j0 + j);
  };
  // P of the warp's 16 rows for the current key tile (exact: lse is known)
  const float lse2_lo = lse2[0], lse2_hi = lse2[1];  // scalars: the lambda must not take an array's address
  auto probs = [=](float (&s)[kNT][4]) {
    zero_acc(s);
    warp_gemm_ss_nk<E, kNT, kD>(s, sQ + warp * 16 * kLd, kLd, sK, kLd);
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float l2 = (e >> 1) ? lse2_hi : lse2_lo;
        const float s2 = s[j][e] * sc2 + sBias[j * 8 + 2 * t + (e & 1)];
        s[j][e] = l2 == -INFINITY ? 0.f : exp2f(s2 - l2);
      }
  };

  // ---- Δ part 2: the map term (1/H) Σ_{j in map range} P_ij dA_ij
  if (with_map_grad) {
    float acc[2] = {0.f, 0.f};
    for (int kt = p.map_start / kBN; kt * kBN < p.map_stop; ++kt) {
      __syncthreads();
      load_keys(kt, false);
      __syncthreads();
      float s[kNT][4];
      probs(s);
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = kt * kBN + j * 8 + 2 * t + (e & 1), row = rows[e >> 1];
          if (key >= p.map_start && key < p.map_stop && row < p.N) acc[e >> 1] += s[j][e] * grad_map_at(p, b, row, key);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) delta[r] += quad_sum(acc[r]) * inv_h;
  }
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (rows[r] < p.N) p.delta[(int64_t(b) * p.H + h) * p.N + rows[r]] = delta[r];
  }

  // ---- main loop: dq
  float dq[kOT][4];
  zero_acc(dq);
  const int n_tiles = (p.M + kBN - 1) / kBN;
  for (int kt = 0; kt < n_tiles; ++kt) {
    __syncthreads();
    load_keys(kt, true);
    __syncthreads();
    float s[kNT][4], dp[kNT][4];
    probs(s);
    zero_acc(dp);
    warp_gemm_ss_nk<E, kNT, kD>(dp, sdO + warp * 16 * kLd, kLd, sV, kLd);
    const int j0 = kt * kBN;
    const bool map_tile = with_map_grad && j0 < p.map_stop && j0 + kBN > p.map_start;
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float dpv = dp[j][e];
        if (map_tile) {
          const int key = j0 + j * 8 + 2 * t + (e & 1), row = rows[e >> 1];
          if (key >= p.map_start && key < p.map_stop && row < p.N) dpv += grad_map_at(p, b, row, key) * inv_h;
        }
        s[j][e] = s[j][e] * (dpv - delta[e >> 1]);  // dS
      }
    uint32_t dsa[kNT / 2][4];
    c_to_a_frags<E, kNT>(dsa, s);
    warp_gemm_rs_kn<E, kOT, kNT / 2>(dq, dsa, sK, kLd);
  }

  // ---- epilogue: scale, through the warp's rows of sQ, coalesced store. A warp barrier is enough here
  // (unlike the forward): the __syncthreads after the Q / dO loads already ordered load_tile(sQ) for any M,
  // and inside the key loop each warp reads only its own 16 rows of sQ.
  __syncwarp();
  frags_to_smem<E, kOT>(sQ + warp * 16 * kLd, kLd, dq, p.scale);
  __syncthreads();
  store_tile<kD>(bh_ptr(p.dq, p.dq_stride, b, h) + int64_t(q0) * p.dq_stride[2], p.dq_stride[2], p.dq_stride[3],
                 sQ, kLd, kDqBM, n_valid, p.D, tid, kDqThreads);
}

// ------------------------------------------------------------------------------------------------
// kernel 2: dk, dv, dw
// ------------------------------------------------------------------------------------------------

constexpr int kKvBN = 64;  // keys per CTA

template <int kD>
struct KvTile {
  static constexpr int kSplit = kD == 256 ? 2 : 1;  // warp groups splitting the dk/dv columns
  static constexpr int kThreads = 128 * kSplit;
  static constexpr int kDsub = kD / kSplit;
  static constexpr int kLd = kD + 8;
  static constexpr int kBQ = kD == 256 ? 16 : 32;  // queries per step (16 at kD = 256: fits 99 KB)
  static constexpr size_t kSmem = sizeof(uint16_t) * size_t(2 * kKvBN + 2 * kBQ) * kLd + sizeof(float) * 2 * kBQ;
};

template <typename E, int kD>
__global__ void __launch_bounds__(KvTile<kD>::kThreads) sra_bwd_dkdv_kernel(const SraParams p) {
  using Tile = KvTile<kD>;
  constexpr int kLd = Tile::kLd, kThreads = Tile::kThreads, kDsub = Tile::kDsub;
  constexpr int kKvBQ = Tile::kBQ;
  constexpr int kST = kKvBQ / 8;  // n-tiles of S^T (queries)
  constexpr int kOT = kDsub / 8;  // n-tiles of this group's dk / dv columns

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sV = sK + kKvBN * kLd;
  uint16_t* sQ = sV + kKvBN * kLd;
  uint16_t* sdO = sQ + kKvBQ * kLd;
  float* sLse2 = reinterpret_cast<float*>(sdO + kKvBQ * kLd);
  float* sDelta = sLse2 + kKvBQ;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int grp = warp / 4, wk = warp % 4;
  const int n_mtiles = (p.M + kKvBN - 1) / kKvBN;
  const int split = blockIdx.x / n_mtiles;
  const int j0 = (blockIdx.x % n_mtiles) * kKvBN, h = blockIdx.y, b = blockIdx.z;
  const int m_valid = min(kKvBN, p.M - j0);
  const float sc2 = p.scale * kLog2e, inv_h = 1.f / float(p.H);
  const int keys[2] = {j0 + wk * 16 + g, j0 + wk * 16 + g + 8};
  const float bias2[2] = {key_bias_log2(p, b, h, keys[0]), key_bias_log2(p, b, h, keys[1])};
  const bool with_map_grad = p.grad_map != nullptr && p.map_stop > p.map_start;
  const bool map_keys = with_map_grad && j0 < p.map_stop && j0 + kKvBN > p.map_start;

  load_tile<kD>(sK, kLd, bh_ptr(p.k, p.k_stride, b, h) + int64_t(j0) * p.k_stride[2], p.k_stride[2],
                p.k_stride[3], kKvBN, m_valid, p.D, tid, kThreads);
  load_tile<kD>(sV, kLd, bh_ptr(p.v, p.v_stride, b, h) + int64_t(j0) * p.v_stride[2], p.v_stride[2],
                p.v_stride[3], kKvBN, m_valid, p.Dv, tid, kThreads);
  const uint16_t* gQ = bh_ptr(p.q, p.q_stride, b, h);
  const uint16_t* gdO = bh_ptr(p.grad_out, p.grad_out_stride, b, h);
  const float* gDelta = p.delta + (int64_t(b) * p.H + h) * p.N;

  float dk[kOT][4], dv[kOT][4];
  zero_acc(dk);
  zero_acc(dv);
  float dw_acc[2] = {0.f, 0.f};

  const int n_qtiles = (p.N + kKvBQ - 1) / kKvBQ;
  const int qt_per_split = (n_qtiles + p.kv_splits - 1) / p.kv_splits;
  const int qt_end = min(n_qtiles, (split + 1) * qt_per_split);
  for (int qt = split * qt_per_split; qt < qt_end; ++qt) {
    const int i0 = qt * kKvBQ, n_valid = min(kKvBQ, p.N - i0);
    __syncthreads();
    load_tile<kD>(sQ, kLd, gQ + int64_t(i0) * p.q_stride[2], p.q_stride[2], p.q_stride[3], kKvBQ, n_valid, p.D,
                  tid, kThreads);
    load_tile<kD>(sdO, kLd, gdO + int64_t(i0) * p.grad_out_stride[2], p.grad_out_stride[2],
                  p.grad_out_stride[3], kKvBQ, n_valid, p.Dv, tid, kThreads);
    for (int i = tid; i < kKvBQ; i += kThreads) {
      sLse2[i] = lse_log2_at(p, b, h, i0 + i);
      sDelta[i] = i0 + i < p.N ? gDelta[i0 + i] : 0.f;
    }
    __syncthreads();

    // S^T (16 keys x 32 queries) -> P^T
    float s[kST][4];
    zero_acc(s);
    warp_gemm_ss_nk<E, kST, kD>(s, sK + wk * 16 * kLd, kLd, sQ, kLd);
#pragma unroll
    for (int j = 0; j < kST; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float l2 = sLse2[j * 8 + 2 * t + (e & 1)];
        const float s2 = s[j][e] * sc2 + bias2[e >> 1];
        s[j][e] = l2 == -INFINITY ? 0.f : exp2f(s2 - l2);
      }
    // dv += P^T dO (this group's columns)
    {
      uint32_t pa[kST / 2][4];
      c_to_a_frags<E, kST>(pa, s);
      warp_gemm_rs_kn<E, kOT, kST / 2>(dv, pa, sdO + grp * kDsub, kLd);
    }
    // dP^T = V dO^T (+ dA^T / H), dS^T = P^T (dP^T - Δ)
    float dp[kST][4];
    zero_acc(dp);
    warp_gemm_ss_nk<E, kST, kD>(dp, sV + wk * 16 * kLd, kLd, sdO, kLd);
#pragma unroll
    for (int j = 0; j < kST; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = j * 8 + 2 * t + (e & 1), key = keys[e >> 1];
        float dpv = dp[j][e];
        if (map_keys && key >= p.map_start && key < p.map_stop && i0 + qi < p.N)
          dpv += grad_map_at(p, b, i0 + qi, key) * inv_h;
        s[j][e] = s[j][e] * (dpv - sDelta[qi]);
        dw_acc[e >> 1] += s[j][e];
      }
    // dk += dS^T Q (this group's columns)
    {
      uint32_t dsa[kST / 2][4];
      c_to_a_frags<E, kST>(dsa, s);
      warp_gemm_rs_kn<E, kOT, kST / 2>(dk, dsa, sQ + grp * kDsub, kLd);
    }
  }

  if (p.kv_splits > 1) {
    // ---- split epilogue: float32 partials [split][b][h][key][dk | dv | dw]
    const int W = p.D + p.Dv + 1;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float dw_sum = quad_sum(dw_acc[r]);
      if (keys[r] >= p.M) continue;
      float* row = p.kv_partial + (((int64_t(split) * p.B + b) * p.H + h) * p.M + keys[r]) * W;
#pragma unroll
      for (int j = 0; j < kOT; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = grp * kDsub + j * 8 + 2 * t + c;
          if (col < p.D) row[col] = dk[j][2 * r + c] * p.scale;
          if (col < p.Dv) row[p.D + col] = dv[j][2 * r + c];
        }
      if (grp == 0 && t == 0)
        row[p.D + p.Dv] = (p.dw == nullptr || bias2[r] == -INFINITY)
                              ? 0.f
                              : p.strength / key_weight(p, b, h, keys[r]) * dw_sum;
    }
    return;
  }

  // ---- epilogue: dk (scaled) into sK, dv into sV, then coalesced stores; dw
  __syncthreads();
  frags_to_smem<E, kOT>(sK + wk * 16 * kLd + grp * kDsub, kLd, dk, p.scale);
  frags_to_smem<E, kOT>(sV + wk * 16 * kLd + grp * kDsub, kLd, dv, 1.f);
  __syncthreads();
  store_tile<kD>(bh_ptr(p.dk, p.dk_stride, b, h) + int64_t(j0) * p.dk_stride[2], p.dk_stride[2], p.dk_stride[3],
                 sK, kLd, kKvBN, m_valid, p.D, tid, kThreads);
  store_tile<kD>(bh_ptr(p.dv, p.dv_stride, b, h) + int64_t(j0) * p.dv_stride[2], p.dv_stride[2], p.dv_stride[3],
                 sV, kLd, kKvBN, m_valid, p.Dv, tid, kThreads);
  if (p.dw != nullptr) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(dw_acc[r]);
      if (grp == 0 && t == 0 && keys[r] < p.M) {
        const float w = key_weight(p, b, h, keys[r]);
        const float val = bias2[r] == -INFINITY ? 0.f : p.strength / w * sum;
        p.dw[int64_t(b) * p.dw_stride[0] + int64_t(h) * p.dw_stride[1] + int64_t(keys[r]) * p.dw_stride[2]] = val;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// kernel 3 (split dk/dv only): sum the partials in split order, convert, write dk, dv, dw
// ------------------------------------------------------------------------------------------------

template <typename E>
__global__ void __launch_bounds__(256) sra_bwd_kv_reduce_kernel(const SraParams p) {
  const int W = p.D + p.Dv + 1;
  const int64_t total = int64_t(p.B) * p.H * p.M * W;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int sp = 0; sp < p.kv_splits; ++sp) acc += p.kv_partial[sp * total + idx];
    const int c = int(idx % W);
    const int64_t bhm = idx / W;
    const int j = int(bhm % p.M), h = int((bhm / p.M) % p.H), b = int(bhm / (int64_t(p.M) * p.H));
    if (c < p.D) {
      bh_ptr(p.dk, p.dk_stride, b, h)[int64_t(j) * p.dk_stride[2] + int64_t(c) * p.dk_stride[3]] = E::from_float(acc);
    } else if (c < p.D + p.Dv) {
      bh_ptr(p.dv, p.dv_stride, b, h)[int64_t(j) * p.dv_stride[2] + int64_t(c - p.D) * p.dv_stride[3]] =
          E::from_float(acc);
    } else if (p.dw != nullptr) {
      p.dw[int64_t(b) * p.dw_stride[0] + int64_t(h) * p.dw_stride[1] + int64_t(j) * p.dw_stride[2]] = acc;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// launch
// ------------------------------------------------------------------------------------------------

template <typename E, int kD>
int launch_bwd_tier(const SraParams& p, cudaStream_t stream) {
  if (p.N > 0) {  // dq and delta (also the dk/dv kernel's input)
    auto kernel = sra_bwd_dq_kernel<E, kD>;
    const size_t smem = DqTile<kD>::kSmem;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return int(err);
    dim3 grid((p.N + kDqBM - 1) / kDqBM, p.H, p.B);
    kernel<<<grid, kDqThreads, smem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return int(err);
  }
  if (p.M > 0) {  // dk, dv, dw
    auto kernel = sra_bwd_dkdv_kernel<E, kD>;
    const size_t smem = KvTile<kD>::kSmem;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return int(err);
    const int splits = p.kv_splits > 1 && p.kv_partial != nullptr ? p.kv_splits : 1;
    SraParams q = p;
    q.kv_splits = splits;
    dim3 grid(((p.M + kKvBN - 1) / kKvBN) * splits, p.H, p.B);
    kernel<<<grid, KvTile<kD>::kThreads, smem, stream>>>(q);
    err = cudaGetLastError();
    if (err != cudaSuccess || splits == 1) return int(err);
    const int64_t total = int64_t(p.B) * p.H * p.M * (p.D + p.Dv + 1);
    const int blocks = int((total + 255) / 256 < 65536 ? (total + 255) / 256 : 65536);
    sra_bwd_kv_reduce_kernel<E><<<blocks, 256, 0, stream>>>(q);
    return int(cudaGetLastError());
  }
  return 0;
}

template <typename E>
int launch_bwd_dtype(const SraParams& p, cudaStream_t stream) {
  switch (sra_head_tier(p.D > p.Dv ? p.D : p.Dv)) {
    case 64: return launch_bwd_tier<E, 64>(p, stream);
    case 128: return launch_bwd_tier<E, 128>(p, stream);
    default: return launch_bwd_tier<E, 256>(p, stream);
  }
}

}  // namespace

int sra_attention_bwd_kv_splits(const SraParams& p) {
  if (p.M <= 0 || p.N <= 0 || p.B <= 0 || p.H <= 0) return 1;
  int device = 0, sms = 1;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t ctas = int64_t((p.M + kKvBN - 1) / kKvBN) * p.H * p.B;
  const int64_t target = 2 * int64_t(sms);  // ~2 resident CTAs per SM (register-bound at ~236 regs)
  if (ctas >= target) return 1;
  const int64_t max_splits = (p.N + 255) / 256;  // >= 256 queries per split
  int64_t splits = (target + ctas - 1) / ctas;
  splits = splits < max_splits ? splits : max_splits;
  splits = splits < 64 ? splits : 64;
  return splits > 1 ? int(splits) : 1;
}

int sra_attention_bwd_launch(const SraParams& params, CUstream_st* stream) {
  if (params.D > kSraMaxHeadDim || params.Dv > kSraMaxHeadDim) return int(cudaErrorInvalidValue);
  if (params.B == 0 || params.H == 0) return 0;
  return params.dtype == SraDtype::kBFloat16 ? launch_bwd_dtype<BF16>(params, stream)
                                             : launch_bwd_dtype<F16>(params, stream);
}

}  // namespace cuda
}  // namespace dare
