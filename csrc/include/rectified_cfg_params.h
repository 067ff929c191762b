// Rectified CFG combine (docs/SPEC.md §2): the statistics layout, the per-sample coefficient step shared by
// the CPU and CUDA kernels, and the CUDA launch parameters. Free of torch headers (plain nvcc includes it).
//
// Every mode is g = Σ_k γ_k x_k over the inputs x = (u, c, d, b_old) with per-sample γ computed from
// statistics of a small basis of vectors formed elementwise from the inputs:
//   slot 0: u        slot 1: D = c - u (+ β·b_old with APG momentum)
//   slot 2: E = c - d (K = 3)                   slot 3: c (only with momentum; otherwise c = u + D)
// The basis keeps the quantities the modes need (‖c-u‖², <c-u, c>, σ(g)) free of cancellation.
// Stats per sample (kNumStats values): sums S_i of the 4 slots, then the Gram entries G_ij (i <= j) in
// the order 00 01 02 03 11 12 13 22 23 33. Slots that are absent hold 0.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define DARE_RCFG_HD __host__ __device__ __forceinline__
#else
#define DARE_RCFG_HD inline
#endif

namespace dare {
namespace rcfg {

enum Mode : int { kModeCfg = 0, kModeZeroStar = 1, kModeApg = 2 };

constexpr int kNumSlots = 4;
constexpr int kNumStats = 14;
constexpr int kNumCoeffs = 4;  // γ for (u, c, d, b_old)

DARE_RCFG_HD constexpr int pair_index(int i, int j) {  // i <= j
  return 4 + i * 4 - (i * (i - 1)) / 2 + (j - i);
}

// The operands u, c, d (third branch: K3) and b (momentum buffer: MOM) of a combine as typed pointers,
// absent ones null; at(off) is the same operands from element off on. The CPU and CUDA kernels both take them.
template <typename T, typename Bt, bool K3, bool MOM>
struct Operands {
  const T* u;
  const T* c;
  const T* d;
  const Bt* b;
  DARE_RCFG_HD Operands(const void* u_, const void* c_, const void* d_, const void* b_)
      : u(static_cast<const T*>(u_)),
        c(static_cast<const T*>(c_)),
        d(K3 ? static_cast<const T*>(d_) : nullptr),
        b(MOM ? static_cast<const Bt*>(b_) : nullptr) {}
  DARE_RCFG_HD Operands at(int64_t off) const {
    return {u + off, c + off, K3 ? d + off : nullptr, MOM ? b + off : nullptr};
  }
};

struct CoeffParams {
  int mode;      // Mode
  int K;         // 2 or 3 branches
  int momentum;  // 1 when APG momentum is active (slot 3 present, b_old read, b_new written)
  double scale;          // s
  double rectify_scale;  // s_r (K = 3)
  double rescale;        // φ in [0, 1]
  double eta;            // η (APG)
  double norm_threshold; // τ (APG)
  double beta;           // momentum β (APG)
};

// Statistics of slot pairs, with slot 3 (c) reconstructed as u + D when it was not accumulated.
struct StatView {
  const double* st;
  bool has_c;
  DARE_RCFG_HD double sum(int i) const {
    if (i == 3 && !has_c) return st[0] + st[1];
    return st[i];
  }
  DARE_RCFG_HD double gram(int i, int j) const {
    if (i > j) { int t = i; i = j; j = t; }
    if (j == 3 && !has_c) {  // <x_i, u + D> (no recursion: CUDA inlines it)
      if (i == 3) return st[pair_index(0, 0)] + 2.0 * st[pair_index(0, 1)] + st[pair_index(1, 1)];
      return st[pair_index(0, i)] + st[i <= 1 ? pair_index(i, 1) : pair_index(1, i)];
    }
    return st[pair_index(i, j)];
  }
};

// True when the mode needs the statistics pass at all (plain CFG without rescale does not).
DARE_RCFG_HD bool needs_stats(const CoeffParams& p) {
  return p.mode != kModeCfg || p.rescale > 0.0;
}

// γ (u, c, d, b_old) of one sample from its statistics `st` over n elements.
DARE_RCFG_HD void coefficients(const double* st, double n, const CoeffParams& p, double* gamma) {
  const StatView v{st, p.momentum != 0};
  const double s = p.scale;
  const double sr = p.K == 3 ? p.rectify_scale : 0.0;
  double gb[kNumSlots] = {1.0, s, sr, 0.0};  // coefficients on the basis (u, D, E, c)
  if (p.mode == kModeZeroStar) {
    const double uu = v.gram(0, 0), ud = v.gram(0, 1);
    const double alpha = (uu + ud) / (uu + 1e-8);       // <c,u> / (‖u‖² + 1e-8), c = u + D
    const double one_minus_alpha = (1e-8 - ud) / (uu + 1e-8);
    gb[0] = alpha + s * one_minus_alpha;                 // αu + s(c - αu) = (α + s(1-α))u + sD
  } else if (p.mode == kModeApg) {
    const double dd = v.gram(1, 1);
    double rho = 1.0;
    if (p.norm_threshold > 0.0 && dd > 0.0) rho = fmin(1.0, p.norm_threshold / sqrt(dd));
    const double cnorm = fmax(sqrt(v.gram(3, 3)), 1e-12);
    const double proj = v.gram(1, 3) / (cnorm * cnorm);   // <D, ĉ>/‖c‖ ... Δ∥ = proj·c
    const double b = s * rho * (p.eta - 1.0) * proj;      // g = u + sρD + sρ(η-1)·proj·c + s_r E
    gb[1] = s * rho;
    if (p.momentum) {
      gb[3] = b;
    } else {                                              // c = u + D
      gb[0] += b;
      gb[1] += b;
    }
  }
  double lam = 1.0;
  if (p.rescale > 0.0) {
    double sg = 0.0, sgg = 0.0;
    for (int i = 0; i < kNumSlots; ++i) {
      if (gb[i] == 0.0) continue;
      sg += gb[i] * v.sum(i);
      for (int j = 0; j < kNumSlots; ++j)
        if (gb[j] != 0.0) sgg += gb[i] * gb[j] * v.gram(i, j);
    }
    const double sc = v.sum(3);
    const double var_g = fmax(sgg - sg * sg / n, 0.0) / (n - 1.0);
    const double var_c = fmax(v.gram(3, 3) - sc * sc / n, 0.0) / (n - 1.0);
    lam = p.rescale * sqrt(var_c) / sqrt(var_g) + (1.0 - p.rescale);
  }
  gamma[0] = lam * (gb[0] - gb[1]);
  gamma[1] = lam * (gb[1] + gb[2] + gb[3]);
  gamma[2] = lam * (-gb[2]);
  gamma[3] = p.momentum ? lam * p.beta * gb[1] : 0.0;
}

// ------------------------------------------------------------------------------------------------
// CUDA launch parameters (csrc/cuda/rectified_cfg.cu)
// ------------------------------------------------------------------------------------------------

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct LaunchParams {
  const void* u;          // [G, N] contiguous rows, dtype `dtype`
  const void* c;
  const void* d;          // nullptr when K = 2
  const void* b_old;      // momentum buffer (read), nullptr without momentum
  void* b_new;            // momentum buffer (written, may equal b_old), nullptr without momentum
  void* out;              // [G, N], dtype `dtype`
  int dtype;              // DType of u, c, d, out
  int buf_dtype;          // DType of the momentum buffer (kF32 or `dtype`)
  int64_t groups;         // G samples
  int64_t n;              // N elements per sample
  CoeffParams coeff;
};

#if defined(DARE_RCFG_CUDA_API)
// Host entry points of csrc/cuda/rectified_cfg.cu (asynchronous on `stream`; no host synchronisation).
// `workspace` holds workspace_bytes(p) bytes of device memory.
size_t workspace_bytes(const LaunchParams& p);
// Statistics [G, 14] float64 into stats_out (nullable), and γ [G, 4] float32 into coeffs_out (nullable).
cudaError_t launch_stats(const LaunchParams& p, void* workspace, double* stats_out, float* coeffs_out,
                         cudaStream_t stream);
// out = Σ γ x with γ = coeffs [G, 4] float32 on the device; writes p.b_new when set.
cudaError_t launch_combine(const LaunchParams& p, const float* coeffs, cudaStream_t stream);
cudaError_t launch_two_pass(const LaunchParams& p, void* workspace, cudaStream_t stream);
// cudaErrorNotSupported (nothing launched) when the data does not fit on chip or cooperative launch is missing.
cudaError_t launch_single_pass(const LaunchParams& p, void* workspace, cudaStream_t stream);
// Single pass when possible and asked for, else two passes; *used_single_pass says which ran.
cudaError_t launch_fused(const LaunchParams& p, void* workspace, bool prefer_single_pass, cudaStream_t stream,
                         int* used_single_pass);
#endif

}  // namespace rcfg
}  // namespace dare
