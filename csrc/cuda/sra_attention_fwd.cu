// SRA attention forward (docs/SPEC.md §1) with mma.sync tensor cores (sm_80+). No torch headers.
//
// Tiling. A CTA of 4 warps owns kBM = 64 queries of one (b, h) — or of one b and *all* heads when the
// head-averaged map is asked for: the CTA then loops h = 0..H-1 and adds P/H into its own map rows, so
// the average is summed in a fixed order with no atomics (deterministic). Warp w owns query rows
// 16w..16w+15. Q sits in shared memory (zero-padded to the head-dim tier kD = 64/128/256); keys come
// in tiles of kBN (64, or 32 for kD = 256 to keep the 16 x kD float accumulator in registers).
//   S = Q K^T : A = Q rows (ldmatrix), B = K rows (ldmatrix) -> 16 x kBN floats per warp
//   s2 = S * scale * log2(e) + γ log2(w_j)   (-inf for invalid keys; all math in the log2 domain)
//   O += P V  : P stays in registers (C fragments re-packed as A fragments), B = V via ldmatrix.trans
//
// Two key loops:
//   exact  (kExact): pass 1 finds each row's max and sum (only two scalars are rescaled), pass 2
//          computes P = exp2(s2 - lse2) exactly, writes the map, accumulates O — no rescaling of O.
//          Required for the map; the usual cross-attention case (M <= 512) keeps *all* key tiles
//          resident in shared memory between the passes when they fit (k_resident), so K is read once.
//   online (!kExact): one pass, FlashAttention-2 style running max with a rescaled accumulator.
//
// Dynamic shared memory per CTA (bytes; 2 B elements, row pitch kD + 8):
//   kD = 64:  27,904 streaming;  resident keys 27,904 + (M_pad - 64) * 144  (M = 512: 92,416)
//   kD = 128: 52,480 streaming;  resident 52,480 + (M_pad - 64) * 272      (M = 256: 104,704; 512 does not fit the budget)
//   kD = 256: 67,712 streaming;  resident 67,712 + (M_pad - 32) * 528      (M <= 96 only)
// The resident path is taken when it fits kResidentSmemBudget (two CTAs per H100 SM), else K streams
// through one tile in both passes (read twice, the second time mostly from L2).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "sra_common.cuh"

namespace dare {
namespace cuda {
namespace {

constexpr int kFwdBM = 64;
constexpr int kFwdThreads = 128;

template <int kD>
struct FwdTile {
  static constexpr int kBN = kD <= 128 ? 64 : 32;  // key tile
  static constexpr int kLd = kD + 8;                // shared-memory row pitch (elements): conflict-free ldmatrix
  // bytes: Q tile, V tile, bias of a key tile, then the K buffer (one tile, or every tile when resident)
  static size_t smem_bytes(int k_rows) {
    return sizeof(uint16_t) * size_t(kFwdBM + kBN) * kLd + sizeof(float) * kBN +
           sizeof(uint16_t) * size_t(k_rows) * kLd;
  }
};

// Max over one key tile's scores s of fragment row r (log2 domain), across the four lanes of the row.
template <int kNT>
__device__ __forceinline__ float tile_row_max(const float (&s)[kNT][4], int r) {
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < kNT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
  return quad_max(mx);
}

template <typename E, int kD, bool kExact>
__global__ void __launch_bounds__(kFwdThreads)
    sra_fwd_kernel(const SraParams p, const int k_resident) {
  using Tile = FwdTile<kD>;
  constexpr int kBN = Tile::kBN, kLd = Tile::kLd;
  constexpr int kNT = kBN / 8;  // n-tiles of S
  constexpr int kOT = kD / 8;   // n-tiles of O

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sV = sQ + kFwdBM * kLd;
  float* sBias = reinterpret_cast<float*>(sV + kBN * kLd);
  uint16_t* sK = reinterpret_cast<uint16_t*>(sBias + kBN);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int q0 = blockIdx.x * kFwdBM;
  const int b = blockIdx.z;
  const bool with_map = p.attn_map != nullptr && p.map_stop > p.map_start;
  const int h_begin = with_map ? 0 : blockIdx.y, h_end = with_map ? p.H : blockIdx.y + 1;
  const int n_valid = min(kFwdBM, p.N - q0);
  const int n_tiles = (p.M + kBN - 1) / kBN;
  const float sc2 = p.scale * kLog2e;
  const float inv_h = 1.f / float(p.H);
  const int row_lo = q0 + warp * 16 + g, row_hi = row_lo + 8;  // this thread's two query rows

  for (int h = h_begin; h < h_end; ++h) {
    const uint16_t* gQ = bh_ptr(p.q, p.q_stride, b, h) + int64_t(q0) * p.q_stride[2];
    const uint16_t* gK = bh_ptr(p.k, p.k_stride, b, h);
    const uint16_t* gV = bh_ptr(p.v, p.v_stride, b, h);

    __syncthreads();  // previous head done with shared memory
    load_tile<kD>(sQ, kLd, gQ, p.q_stride[2], p.q_stride[3], kFwdBM, n_valid, p.D, tid, kFwdThreads);

    // Loads key tile `kt` (K into `dstK` unless null, V unless !with_v, and the bias).
    auto load_keys = [&](int kt, uint16_t* dstK, bool with_v) {
      const int j0 = kt * kBN, m_valid = min(kBN, p.M - j0);
      if (dstK != nullptr)
        load_tile<kD>(dstK, kLd, gK + int64_t(j0) * p.k_stride[2], p.k_stride[2], p.k_stride[3], kBN, m_valid,
                      p.D, tid, kFwdThreads);
      if (with_v)
        load_tile<kD>(sV, kLd, gV + int64_t(j0) * p.v_stride[2], p.v_stride[2], p.v_stride[3], kBN, m_valid,
                      p.Dv, tid, kFwdThreads);
      for (int j = tid; j < kBN; j += kFwdThreads) sBias[j] = key_bias_log2(p, b, h, j0 + j);
    };
    // S tile of the warp (scaled, biased, log2 domain).
    auto scores = [&](float (&s)[kNT][4], const uint16_t* tileK) {
      zero_acc(s);
      warp_gemm_ss_nk<E, kNT, kD>(s, sQ + warp * 16 * kLd, kLd, tileK, kLd);
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const float b0 = sBias[j * 8 + 2 * t], b1 = sBias[j * 8 + 2 * t + 1];
        s[j][0] = s[j][0] * sc2 + b0;
        s[j][1] = s[j][1] * sc2 + b1;
        s[j][2] = s[j][2] * sc2 + b0;
        s[j][3] = s[j][3] * sc2 + b1;
      }
    };

    float o[kOT][4];
    zero_acc(o);
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    float lse2[2];

    if constexpr (kExact) {
      // ---- pass 1: row max and row sum (log2 domain)
      for (int kt = 0; kt < n_tiles; ++kt) {
        uint16_t* tileK = k_resident ? sK + kt * kBN * kLd : sK;
        __syncthreads();
        load_keys(kt, tileK, false);
        __syncthreads();
        float s[kNT][4];
        scores(s, tileK);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float m_new = fmaxf(m_run[r], tile_row_max(s, r));
          const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no finite score yet: exp2(-inf) = 0, not NaN
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < kNT; ++j) sum += exp2f(s[j][2 * r] - m_use) + exp2f(s[j][2 * r + 1] - m_use);
          l_run[r] = l_run[r] * exp2f(m_run[r] - m_use) + quad_sum(sum);
          m_run[r] = m_new;
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) lse2[r] = l_run[r] > 0.f ? m_run[r] + log2f(l_run[r]) : -INFINITY;

      // ---- pass 2: exact probabilities, map, O
      for (int kt = 0; kt < n_tiles; ++kt) {
        uint16_t* tileK = k_resident ? sK + kt * kBN * kLd : sK;
        __syncthreads();
        load_keys(kt, k_resident ? nullptr : tileK, true);
        __syncthreads();
        float s[kNT][4];
        scores(s, tileK);
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float l2 = lse2[e >> 1];
            s[j][e] = l2 == -INFINITY ? 0.f : exp2f(s[j][e] - l2);
          }
        if (with_map) {
          const int j0 = kt * kBN;
          if (j0 < p.map_stop && j0 + kBN > p.map_start) {
#pragma unroll
            for (int j = 0; j < kNT; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int key = j0 + j * 8 + 2 * t + (e & 1);
                const int row = (e >> 1) ? row_hi : row_lo;
                if (key >= p.map_start && key < p.map_stop && row < p.N) {
                  float* dst = p.attn_map + int64_t(b) * p.map_stride[0] + int64_t(row) * p.map_stride[1] +
                               int64_t(key - p.map_start) * p.map_stride[2];
                  const float contrib = s[j][e] * inv_h;
                  *dst = (h == 0) ? contrib : *dst + contrib;  // same thread, heads in order: deterministic
                }
              }
          }
        }
        uint32_t pa[kNT / 2][4];
        c_to_a_frags<E, kNT>(pa, s);
        warp_gemm_rs_kn<E, kOT, kNT / 2>(o, pa, sV, kLd);
      }
    } else {
      // ---- one pass, online softmax
      for (int kt = 0; kt < n_tiles; ++kt) {
        __syncthreads();
        load_keys(kt, sK, true);
        __syncthreads();
        float s[kNT][4];
        scores(s, sK);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float m_new = fmaxf(m_run[r], tile_row_max(s, r));
          const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no finite score yet: exp2(-inf) = 0, not NaN
          const float alpha = exp2f(m_run[r] - m_use);
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
            s[j][2 * r] = exp2f(s[j][2 * r] - m_use);
            s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - m_use);
            sum += s[j][2 * r] + s[j][2 * r + 1];
          }
          l_run[r] = l_run[r] * alpha + quad_sum(sum);
          m_run[r] = m_new;
#pragma unroll
          for (int j = 0; j < kOT; ++j) {
            o[j][2 * r] *= alpha;
            o[j][2 * r + 1] *= alpha;
          }
        }
        uint32_t pa[kNT / 2][4];
        c_to_a_frags<E, kNT>(pa, s);
        warp_gemm_rs_kn<E, kOT, kNT / 2>(o, pa, sV, kLd);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float inv_l = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
#pragma unroll
        for (int j = 0; j < kOT; ++j) {
          o[j][2 * r] *= inv_l;
          o[j][2 * r + 1] *= inv_l;
        }
        lse2[r] = l_run[r] > 0.f ? m_run[r] + log2f(l_run[r]) : -INFINITY;
      }
    }

    // ---- epilogue: O through the warp's own rows of sQ (no longer read), then coalesced stores; LSE.
    // A CTA-wide barrier, not a warp one: load_tile above spreads the rows of sQ over all warps, and with
    // M == 0 no key loop (whose barriers would order it) runs, so another warp could still be writing Q
    // into these rows and O would come out as Q data. With keys it also covers the warp's own last reads.
    __syncthreads();
    frags_to_smem<E, kOT>(sQ + warp * 16 * kLd, kLd, o, 1.f);
    __syncthreads();
    store_tile<kD>(bh_ptr(p.out, p.out_stride, b, h) + int64_t(q0) * p.out_stride[2], p.out_stride[2],
                   p.out_stride[3], sQ, kLd, kFwdBM, n_valid, p.Dv, tid, kFwdThreads);
    if (t == 0) {
      float* gL = p.lse + int64_t(b) * p.lse_stride[0] + int64_t(h) * p.lse_stride[1];
      if (row_lo < p.N) gL[int64_t(row_lo) * p.lse_stride[2]] = lse2[0] * kLn2;
      if (row_hi < p.N) gL[int64_t(row_hi) * p.lse_stride[2]] = lse2[1] * kLn2;
    }
  }
}

template <typename E, int kD, bool kExact>
int launch_fwd_variant(const SraParams& p, cudaStream_t stream, bool k_resident) {
  using Tile = FwdTile<kD>;
  const int n_tiles = (p.M + Tile::kBN - 1) / Tile::kBN;
  const size_t smem = Tile::smem_bytes(k_resident ? n_tiles * Tile::kBN : Tile::kBN);
  auto kernel = sra_fwd_kernel<E, kD, kExact>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return int(err);
  const bool with_map = p.attn_map != nullptr && p.map_stop > p.map_start;
  dim3 grid((p.N + kFwdBM - 1) / kFwdBM, with_map ? 1 : p.H, p.B);
  kernel<<<grid, kFwdThreads, smem, stream>>>(p, k_resident ? 1 : 0);
  return int(cudaGetLastError());
}

// Shared-memory budget for the resident-keys path: at most this much per CTA so that two CTAs still
// share an H100 SM (228 KB). A first guess, to be tuned once the kernels run on a GPU.
constexpr size_t kResidentSmemBudget = 112 * 1024;

template <typename E, int kD>
int launch_fwd_tier(const SraParams& p, cudaStream_t stream) {
  using Tile = FwdTile<kD>;
  const bool with_map = p.attn_map != nullptr && p.map_stop > p.map_start;
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int n_tiles = (p.M + Tile::kBN - 1) / Tile::kBN;
  const size_t resident_bytes = Tile::smem_bytes(n_tiles * Tile::kBN);
  const bool fits = p.M <= 512 && resident_bytes <= kResidentSmemBudget && resident_bytes <= size_t(optin);

  SraFwdPath path = p.fwd_path;
  if (path == SraFwdPath::kAuto) path = (with_map || fits) ? SraFwdPath::kExact : SraFwdPath::kOnline;
  if (with_map) path = SraFwdPath::kExact;  // the map needs the exact probabilities
  if (path == SraFwdPath::kExact) return launch_fwd_variant<E, kD, true>(p, stream, fits);
  return launch_fwd_variant<E, kD, false>(p, stream, false);
}

template <typename E>
int launch_fwd_dtype(const SraParams& p, cudaStream_t stream) {
  switch (sra_head_tier(p.D > p.Dv ? p.D : p.Dv)) {
    case 64: return launch_fwd_tier<E, 64>(p, stream);
    case 128: return launch_fwd_tier<E, 128>(p, stream);
    default: return launch_fwd_tier<E, 256>(p, stream);
  }
}

}  // namespace

int sra_attention_fwd_launch(const SraParams& params, CUstream_st* stream) {
  if (params.D > kSraMaxHeadDim || params.Dv > kSraMaxHeadDim) return int(cudaErrorInvalidValue);
  if (params.N == 0 || params.B == 0 || params.H == 0) return 0;
  return params.dtype == SraDtype::kBFloat16 ? launch_fwd_dtype<BF16>(params, stream)
                                             : launch_fwd_dtype<F16>(params, stream);
}

}  // namespace cuda
}  // namespace dare
