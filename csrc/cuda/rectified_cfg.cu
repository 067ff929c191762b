// Rectified CFG combine on CUDA (docs/SPEC.md §2). Free of torch headers: plain nvcc compile-checks it.
//
// Two-pass path (always available):
//   stats_kernel    grid (G, chunks): per-chunk partial statistics (14 floats, rectified_cfg_params.h)
//   finalize_kernel grid (G): partials -> float64 statistics -> coefficients γ (u, c, d, b_old)
//   combine_kernel  grid (G, chunks): out = Σ γ x (+ momentum buffer update)
// Single-pass path: a cooperative persistent kernel. Every block loads its tile of each input once
// into shared memory while accumulating the statistics, publishes its partials, waits at a grid-wide
// barrier (co-residency guaranteed by the cooperative launch), computes the coefficients of its
// sample and writes the combine from shared memory: each input is read from HBM once.
// Used only when the whole input fits in the blocks' shared memory and cooperative launch works;
// otherwise launch_fused() falls back to the two-pass path.
//
// Reductions use fixed chunking and fixed-order trees, so results do not depend on scheduling.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#define DARE_RCFG_CUDA_API 1
#include "../include/rectified_cfg_params.h"

namespace dare {
namespace rcfg {
namespace {

constexpr int kVec = 8;                 // elements per thread per step (16-byte loads of 16-bit types)
constexpr int kStatsThreads = 256;
constexpr int kCombineThreads = 256;
constexpr int kFinalizeThreads = 32 * kNumStats;  // one warp per statistic
constexpr int kPersistThreads = 512;
constexpr int kPartStride = 16;         // floats per partial record
constexpr int kMaxChunks = 1024;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// kVec elements starting at p[i] (i a multiple of kVec), up to `n` valid; vector loads when `aligned`.
template <typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, int64_t i, int64_t n, bool aligned, float* v) {
  if (aligned && i + kVec <= n) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = *reinterpret_cast<const float4*>(p + i);
      const float4 b = *reinterpret_cast<const float4*>(p + i + 4);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + i);
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = to_f(h[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = (i + k < n) ? to_f(p[i + k]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, int64_t i, int64_t n, bool aligned, const float* v) {
  if (aligned && i + kVec <= n) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint4 raw;
      T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) h[k] = from_f<T>(v[k]);
      *reinterpret_cast<uint4*>(p + i) = raw;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (i + k < n) p[i + k] = from_f<T>(v[k]);
  }
}

// kVec elements from element i (see load_vec) of each operand the variant reads (Operands, rectified_cfg_params.h).
template <typename T, typename Bt, bool K3, bool MOM>
__device__ __forceinline__ void load_operands(const Operands<T, Bt, K3, MOM>& x, int64_t i, int64_t end,
                                              bool aligned, float* vu, float* vc, float* vd, float* vb) {
  load_vec(x.u, i, end, aligned, vu);
  load_vec(x.c, i, end, aligned, vc);
  if (K3) load_vec(x.d, i, end, aligned, vd);
  if (MOM) load_vec(x.b, i, end, aligned, vb);
}

// Statistics accumulators of one thread; only the slots the variant uses are touched.
template <bool K3, bool MOM>
struct Acc {
  float s[kNumStats];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int k = 0; k < kNumStats; ++k) s[k] = 0.0f;
  }
  __device__ __forceinline__ void add(float u, float c, float d, float b, float beta) {
    float v1 = c - u;
    if (MOM) v1 = fmaf(beta, b, v1);
    const float e = K3 ? c - d : 0.0f;
    s[0] += u;
    s[1] += v1;
    s[pair_index(0, 0)] = fmaf(u, u, s[pair_index(0, 0)]);
    s[pair_index(0, 1)] = fmaf(u, v1, s[pair_index(0, 1)]);
    s[pair_index(1, 1)] = fmaf(v1, v1, s[pair_index(1, 1)]);
    if (K3) {
      s[2] += e;
      s[pair_index(0, 2)] = fmaf(u, e, s[pair_index(0, 2)]);
      s[pair_index(1, 2)] = fmaf(v1, e, s[pair_index(1, 2)]);
      s[pair_index(2, 2)] = fmaf(e, e, s[pair_index(2, 2)]);
    }
    if (MOM) {
      s[3] += c;
      s[pair_index(0, 3)] = fmaf(u, c, s[pair_index(0, 3)]);
      s[pair_index(1, 3)] = fmaf(v1, c, s[pair_index(1, 3)]);
      s[pair_index(3, 3)] = fmaf(c, c, s[pair_index(3, 3)]);
      if (K3) s[pair_index(2, 3)] = fmaf(e, c, s[pair_index(2, 3)]);
    }
  }
};

// Block-wide fixed-order reduction of the accumulators; thread 0 writes kPartStride floats to `dst`.
template <bool K3, bool MOM>
__device__ __forceinline__ void block_reduce_store(Acc<K3, MOM>& acc, float* smem /*[32][kNumStats]*/, float* dst) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int k = 0; k < kNumStats; ++k) {
    float x = acc.s[k];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    if (lane == 0) smem[warp * kNumStats + k] = x;
  }
  __syncthreads();
  if (threadIdx.x < kNumStats) {
    float t = 0.0f;
    for (int w = 0; w < nwarps; ++w) t += smem[w * kNumStats + threadIdx.x];
    dst[threadIdx.x] = t;
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// two-pass kernels
// ------------------------------------------------------------------------------------------------

template <typename T, typename Bt, bool K3, bool MOM>
__global__ void __launch_bounds__(kStatsThreads) stats_kernel(LaunchParams p, int64_t chunk, int64_t n_chunks,
                                                              bool aligned, float* __restrict__ partials) {
  __shared__ float red[32 * kNumStats];
  const int64_t g = blockIdx.x, ch = blockIdx.y, n = p.n;
  const int64_t row = g * n;
  const auto in = Operands<T, Bt, K3, MOM>(p.u, p.c, p.d, p.b_old).at(row);
  const float beta = static_cast<float>(p.coeff.beta);
  const int64_t end = min(n, (ch + 1) * chunk);
  Acc<K3, MOM> acc;
  acc.zero();
  for (int64_t i = ch * chunk + threadIdx.x * kVec; i < end; i += blockDim.x * kVec) {
    float vu[kVec], vc[kVec], vd[kVec], vb[kVec];
    load_operands(in, i, end, aligned, vu, vc, vd, vb);
#pragma unroll
    for (int k = 0; k < kVec; ++k) acc.add(vu[k], vc[k], K3 ? vd[k] : 0.0f, MOM ? vb[k] : 0.0f, beta);
  }
  block_reduce_store(acc, red, partials + (g * n_chunks + ch) * kPartStride);
}

// One warp per statistic sums the chunk partials (float64, fixed order); thread 0 computes γ.
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(LaunchParams p, int64_t n_chunks,
                                                                    const float* __restrict__ partials,
                                                                    double* __restrict__ stats,
                                                                    float* __restrict__ coeffs) {
  __shared__ double st[kNumStats];
  const int64_t g = blockIdx.x;
  const int lane = threadIdx.x & 31, s = threadIdx.x >> 5;
  double t = 0.0;
  if (needs_stats(p.coeff) || coeffs == nullptr)
    for (int64_t ch = lane; ch < n_chunks; ch += 32) t += static_cast<double>(partials[(g * n_chunks + ch) * kPartStride + s]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
  if (lane == 0) st[s] = t;
  __syncthreads();
  if (threadIdx.x < kNumStats && stats != nullptr) stats[g * kNumStats + threadIdx.x] = st[threadIdx.x];
  if (threadIdx.x == 0 && coeffs != nullptr) {
    double gam[kNumCoeffs];
    coefficients(st, static_cast<double>(p.n), p.coeff, gam);
#pragma unroll
    for (int k = 0; k < kNumCoeffs; ++k) coeffs[g * kNumCoeffs + k] = static_cast<float>(gam[k]);
  }
}

// r = gu*u + gc*c (+ gd*d with a third branch) (+ gb*b with momentum), per lane; with momentum, vb becomes
// the new buffer beta*b + (c - u).
template <bool K3, bool MOM>
__device__ __forceinline__ void combine_lanes(float gu, float gc, float gd, float gb, float beta, const float* vu,
                                              const float* vc, const float* vd, float* vb, float* r) {
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    float x = fmaf(gc, vc[k], gu * vu[k]);
    if (K3) x = fmaf(gd, vd[k], x);
    if (MOM) {
      x = fmaf(gb, vb[k], x);
      vb[k] = fmaf(beta, vb[k], vc[k] - vu[k]);
    }
    r[k] = x;
  }
}

template <typename T, typename Bt, bool K3, bool MOM>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(LaunchParams p, int64_t chunk, bool aligned,
                                                                  const float* __restrict__ coeffs) {
  const int64_t g = blockIdx.x, ch = blockIdx.y, n = p.n;
  const int64_t row = g * n;
  const auto in = Operands<T, Bt, K3, MOM>(p.u, p.c, p.d, p.b_old).at(row);
  Bt* bn = (MOM && p.b_new != nullptr) ? static_cast<Bt*>(p.b_new) + row : nullptr;
  T* out = static_cast<T*>(p.out) + row;
  const float gu = coeffs[g * kNumCoeffs + 0], gc = coeffs[g * kNumCoeffs + 1];
  const float gd = coeffs[g * kNumCoeffs + 2], gb = coeffs[g * kNumCoeffs + 3];
  const float beta = static_cast<float>(p.coeff.beta);
  const int64_t end = min(n, (ch + 1) * chunk);
  for (int64_t i = ch * chunk + threadIdx.x * kVec; i < end; i += blockDim.x * kVec) {
    float vu[kVec], vc[kVec], vd[kVec], vb[kVec], r[kVec];
    load_operands(in, i, end, aligned, vu, vc, vd, vb);
    combine_lanes<K3, MOM>(gu, gc, gd, gb, beta, vu, vc, vd, vb, r);
    store_vec(out, i, end, aligned, r);
    if (MOM && bn != nullptr) store_vec(bn, i, end, aligned, vb);
  }
}

// ------------------------------------------------------------------------------------------------
// single-pass cooperative kernel
// ------------------------------------------------------------------------------------------------

// Grid-wide barrier for a cooperative launch (all blocks co-resident). `counter` starts at 0.
__device__ __forceinline__ void grid_barrier(unsigned int* counter, unsigned int nblocks) {
  __threadfence();  // every thread's partial-statistics stores are visible device-wide
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(counter, 1u);
    while (*reinterpret_cast<volatile unsigned int*>(counter) < nblocks) {
#if __CUDA_ARCH__ >= 700
      __nanosleep(32);
#endif
    }
    __threadfence();
  }
  __syncthreads();
}

template <typename T, typename Bt, bool K3, bool MOM>
__global__ void __launch_bounds__(kPersistThreads) persistent_kernel(LaunchParams p, int64_t tile,
                                                                     int64_t tiles_per_group, bool aligned,
                                                                     float* __restrict__ partials,
                                                                     unsigned int* __restrict__ barrier) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float red[32 * kNumStats];
  __shared__ double st[kNumStats];
  __shared__ float gam_s[kNumCoeffs];
  const int64_t g = blockIdx.x / tiles_per_group, part = blockIdx.x % tiles_per_group, n = p.n;
  const int64_t row = g * n;
  const int64_t begin = part * tile, end = min(n, begin + tile);
  T* su = reinterpret_cast<T*>(smem_raw);
  T* sc = su + tile;
  T* sd = sc + tile;                                   // only with K3
  Bt* sb = reinterpret_cast<Bt*>(sc + (K3 ? 2 : 1) * tile);  // only with MOM
  const auto in = Operands<T, Bt, K3, MOM>(p.u, p.c, p.d, p.b_old).at(row);
  const float beta = static_cast<float>(p.coeff.beta);

  // phase 1: read the tile once, keep it in shared memory, accumulate the statistics
  Acc<K3, MOM> acc;
  acc.zero();
  for (int64_t i = begin + threadIdx.x * kVec; i < end; i += blockDim.x * kVec) {
    float vu[kVec], vc[kVec], vd[kVec], vb[kVec];
    const int64_t j = i - begin;
    load_vec(in.u, i, end, aligned, vu);
    load_vec(in.c, i, end, aligned, vc);
    store_vec(su, j, end - begin, true, vu);
    store_vec(sc, j, end - begin, true, vc);
    if (K3) {
      load_vec(in.d, i, end, aligned, vd);
      store_vec(sd, j, end - begin, true, vd);
    }
    if (MOM) {
      load_vec(in.b, i, end, aligned, vb);
      store_vec(sb, j, end - begin, true, vb);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) acc.add(vu[k], vc[k], K3 ? vd[k] : 0.0f, MOM ? vb[k] : 0.0f, beta);
  }
  block_reduce_store(acc, red, partials + static_cast<int64_t>(blockIdx.x) * kPartStride);

  grid_barrier(barrier, gridDim.x);

  // phase 2: this sample's statistics (fixed order over its tiles) -> γ
  if (threadIdx.x < kNumStats) {
    double t = 0.0;
    for (int64_t q = 0; q < tiles_per_group; ++q)
      t += static_cast<double>(__ldcg(partials + (g * tiles_per_group + q) * kPartStride + threadIdx.x));
    st[threadIdx.x] = t;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double gm[kNumCoeffs];
    coefficients(st, static_cast<double>(n), p.coeff, gm);
#pragma unroll
    for (int k = 0; k < kNumCoeffs; ++k) gam_s[k] = static_cast<float>(gm[k]);
  }
  __syncthreads();
  const float gu = gam_s[0], gc = gam_s[1], gd = gam_s[2], gb = gam_s[3];

  // phase 3: combine from shared memory (each thread reads back what it stored)
  T* out = static_cast<T*>(p.out) + row;
  Bt* bn = (MOM && p.b_new != nullptr) ? static_cast<Bt*>(p.b_new) + row : nullptr;
  for (int64_t i = begin + threadIdx.x * kVec; i < end; i += blockDim.x * kVec) {
    float vu[kVec], vc[kVec], vd[kVec], vb[kVec], r[kVec];
    const int64_t j = i - begin;
    load_vec(su, j, end - begin, true, vu);
    load_vec(sc, j, end - begin, true, vc);
    if (K3) load_vec(sd, j, end - begin, true, vd);
    if (MOM) load_vec(sb, j, end - begin, true, vb);
    combine_lanes<K3, MOM>(gu, gc, gd, gb, beta, vu, vc, vd, vb, r);
    store_vec(out, i, end, aligned, r);
    if (MOM && bn != nullptr) store_vec(bn, i, end, aligned, vb);
  }
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------

struct Layout {
  int64_t chunk, n_chunks;
};

Layout two_pass_layout(int64_t n) {
  const int64_t step = static_cast<int64_t>(kStatsThreads) * kVec;  // 2048
  int64_t chunk = ((n + kMaxChunks - 1) / kMaxChunks + step - 1) / step * step;
  if (chunk < 4 * step) chunk = 4 * step;
  const int64_t n_chunks = n == 0 ? 1 : (n + chunk - 1) / chunk;
  return {chunk, n_chunks};
}

bool is_aligned(const LaunchParams& p) {
  auto ok = [](const void* q) { return q == nullptr || (reinterpret_cast<uintptr_t>(q) % 16) == 0; };
  return p.n % kVec == 0 && ok(p.u) && ok(p.c) && ok(p.d) && ok(p.b_old) && ok(p.b_new) && ok(p.out);
}

size_t elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

template <typename F>
cudaError_t dispatch(const LaunchParams& p, F&& f) {
  const bool k3 = p.d != nullptr, mom = p.b_old != nullptr;
  auto flags = [&](auto t, auto b) -> cudaError_t {
    if (k3) return mom ? f(t, b, std::true_type{}, std::true_type{}) : f(t, b, std::true_type{}, std::false_type{});
    return mom ? f(t, b, std::false_type{}, std::true_type{}) : f(t, b, std::false_type{}, std::false_type{});
  };
  const bool bf32 = p.buf_dtype == kF32;
  switch (p.dtype) {
    case kF32: return flags(float{}, float{});
    case kF16: return bf32 ? flags(__half{}, float{}) : flags(__half{}, __half{});
    case kBF16: return bf32 ? flags(__nv_bfloat16{}, float{}) : flags(__nv_bfloat16{}, __nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

size_t workspace_bytes(const LaunchParams& p) {
  const Layout l = two_pass_layout(p.n);
  // partials (two-pass chunks, or persistent tiles: at most one per block of a full device), coeffs,
  // float64 statistics, barrier counter; each region 256-byte aligned.
  const int64_t records = p.groups * l.n_chunks > 4096 ? p.groups * l.n_chunks : 4096;
  auto up = [](size_t x) { return (x + 255) / 256 * 256; };
  return up(records * kPartStride * sizeof(float)) + up(p.groups * kNumCoeffs * sizeof(float)) +
         up(p.groups * kNumStats * sizeof(double)) + 256;
}

namespace {
struct Workspace {
  float* partials;
  float* coeffs;
  double* stats;
  unsigned int* barrier;
};
Workspace carve(const LaunchParams& p, void* ws) {
  const Layout l = two_pass_layout(p.n);
  const int64_t records = p.groups * l.n_chunks > 4096 ? p.groups * l.n_chunks : 4096;
  auto up = [](size_t x) { return (x + 255) / 256 * 256; };
  char* base = static_cast<char*>(ws);
  Workspace w;
  w.partials = reinterpret_cast<float*>(base);
  base += up(records * kPartStride * sizeof(float));
  w.coeffs = reinterpret_cast<float*>(base);
  base += up(p.groups * kNumCoeffs * sizeof(float));
  w.stats = reinterpret_cast<double*>(base);
  base += up(p.groups * kNumStats * sizeof(double));
  w.barrier = reinterpret_cast<unsigned int*>(base);
  return w;
}
}  // namespace

// Statistics [G, 14] float64 into `stats_out` (and γ into the workspace when `with_coeffs`).
cudaError_t launch_stats(const LaunchParams& p, void* workspace, double* stats_out, float* coeffs_out,
                         cudaStream_t stream) {
  if (p.groups == 0 || p.n == 0) return cudaSuccess;
  const Layout l = two_pass_layout(p.n);
  const Workspace w = carve(p, workspace);
  const bool aligned = is_aligned(p);
  const bool need = needs_stats(p.coeff) || coeffs_out == nullptr;
  if (need) {
    cudaError_t err = dispatch(p, [&](auto t, auto b, auto k3, auto mom) {
      using T = decltype(t);
      using Bt = decltype(b);
      const dim3 grid(static_cast<unsigned>(p.groups), static_cast<unsigned>(l.n_chunks));  // G on x: up to 2^31 - 1
      stats_kernel<T, Bt, decltype(k3)::value, decltype(mom)::value>
          <<<grid, kStatsThreads, 0, stream>>>(p, l.chunk, l.n_chunks, aligned, w.partials);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  finalize_kernel<<<static_cast<unsigned>(p.groups), kFinalizeThreads, 0, stream>>>(p, l.n_chunks, w.partials,
                                                                                    stats_out, coeffs_out);
  return cudaGetLastError();
}

// out = Σ γ x with γ = coeffs [G, 4] (float32, device); writes b_new when set.
cudaError_t launch_combine(const LaunchParams& p, const float* coeffs, cudaStream_t stream) {
  if (p.groups == 0 || p.n == 0) return cudaSuccess;
  const Layout l = two_pass_layout(p.n);
  const bool aligned = is_aligned(p);
  return dispatch(p, [&](auto t, auto b, auto k3, auto mom) {
    using T = decltype(t);
    using Bt = decltype(b);
    const dim3 grid(static_cast<unsigned>(p.groups), static_cast<unsigned>(l.n_chunks));  // G on x: up to 2^31 - 1
    combine_kernel<T, Bt, decltype(k3)::value, decltype(mom)::value>
        <<<grid, kCombineThreads, 0, stream>>>(p, l.chunk, aligned, coeffs);
    return cudaGetLastError();
  });
}

cudaError_t launch_two_pass(const LaunchParams& p, void* workspace, cudaStream_t stream) {
  const Workspace w = carve(p, workspace);
  cudaError_t err = launch_stats(p, workspace, w.stats, w.coeffs, stream);
  if (err != cudaSuccess) return err;
  return launch_combine(p, w.coeffs, stream);
}

// Single pass when the data fits on chip; returns cudaErrorNotSupported (nothing launched) otherwise.
cudaError_t launch_single_pass(const LaunchParams& p, void* workspace, cudaStream_t stream) {
  if (p.groups == 0 || p.n == 0) return cudaSuccess;
  int dev = 0, coop = 0, sms = 0, smem_optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (!coop) return cudaErrorNotSupported;
  const bool k3 = p.d != nullptr, mom = p.b_old != nullptr;
  const size_t per_pos = (k3 ? 3 : 2) * elem_size(p.dtype) + (mom ? elem_size(p.buf_dtype) : 0);
  const size_t static_smem = 4096;  // the kernel's static shared memory (1920 B) plus alignment slack
  const int64_t cap_max = static_cast<int64_t>((smem_optin - static_smem) / per_pos) / kVec * kVec;
  if (cap_max < kVec * kPersistThreads) return cudaErrorNotSupported;
  const Workspace w = carve(p, workspace);
  const bool aligned = is_aligned(p);
  return dispatch(p, [&](auto t, auto b, auto k3c, auto momc) -> cudaError_t {
    using T = decltype(t);
    using Bt = decltype(b);
    auto kernel = persistent_kernel<T, Bt, decltype(k3c)::value, decltype(momc)::value>;
    // as many tiles per sample as the device holds blocks, but no tile larger than the shared memory
    int64_t tiles = (p.n + cap_max - 1) / cap_max;
    const int64_t spread = sms / (p.groups > 0 ? p.groups : 1);
    if (spread > tiles) tiles = spread;
    int64_t tile = ((p.n + tiles - 1) / tiles + kVec - 1) / kVec * kVec;
    tiles = (p.n + tile - 1) / tile;
    const size_t smem = static_cast<size_t>(tile) * per_pos + 64;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
    int per_sm = 0;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistThreads, smem);
    if (e != cudaSuccess) return e;
    const int64_t blocks = p.groups * tiles;
    if (blocks > static_cast<int64_t>(per_sm) * sms || blocks > 4096) return cudaErrorNotSupported;
    e = cudaMemsetAsync(w.barrier, 0, sizeof(unsigned int), stream);
    if (e != cudaSuccess) return e;
    LaunchParams pc = p;
    int64_t tile_a = tile, tpg = tiles;
    bool al = aligned;
    float* parts = w.partials;
    unsigned int* bar = w.barrier;
    void* args[] = {&pc, &tile_a, &tpg, &al, &parts, &bar};
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(blocks)),
                                       dim3(kPersistThreads), args, smem, stream);
  });
}

// The fused forward: single pass when possible (prefer_single_pass), else two passes.
cudaError_t launch_fused(const LaunchParams& p, void* workspace, bool prefer_single_pass, cudaStream_t stream,
                         int* used_single_pass) {
  if (used_single_pass) *used_single_pass = 0;
  if (prefer_single_pass && needs_stats(p.coeff)) {
    const cudaError_t e = launch_single_pass(p, workspace, stream);
    if (e == cudaSuccess) {
      if (used_single_pass) *used_single_pass = 1;
      return e;
    }
    if (e != cudaErrorNotSupported && e != cudaErrorCooperativeLaunchTooLarge) return e;
    (void)cudaGetLastError();  // clear a sticky-free launch error before falling back
  }
  return launch_two_pass(p, workspace, stream);
}

}  // namespace rcfg
}  // namespace dare
