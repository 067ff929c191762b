// Rectified CFG combine on CPU (docs/SPEC.md §2). One vectorised read of the inputs for the per-group
// statistics (fixed kChunk-element chunks: float accumulation inside a chunk, chunk partials added in
// float64 in chunk order, so results do not depend on the thread count), a per-group coefficient
// step in float64 (rectified_cfg_params.h), then one read + one write for the combine. bfloat16
// combines run the AVX-512 kernel (rectified_cfg_avx512.cpp) when the CPU has it: same bits. Entry points
// with the argument checks: python/cpu/rectified_cfg_cpu.cpp.
#include "cpu/rectified_cfg.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/rectified_cfg_avx512.h"
#include "rectified_cfg_params.h"

#ifndef DARE_KERNELS_CPU_VEC
#define DARE_KERNELS_CPU_VEC "default"
#endif

namespace dare::cpu {
namespace {

using at::vec::Vectorized;
namespace rc = dare::rcfg;

constexpr int64_t kChunk = 4096;                       // elements per reduction chunk (fixed)
constexpr int kBlock = 2 * Vectorized<float>::size();  // elements per vector step

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// A block of kBlock elements of T <-> kV vectors of the accumulation type.
template <typename T> struct IO;
template <> struct IO<float> {
  using V = Vectorized<float>;
  static constexpr int kV = kBlock / V::size();
  static void load(const float* p, V* v) { for (int i = 0; i < kV; ++i) v[i] = V::loadu(p + i * V::size()); }
  static void store(float* p, const V* v) { for (int i = 0; i < kV; ++i) v[i].store(p + i * V::size()); }
};
template <> struct IO<double> {
  using V = Vectorized<double>;
  static constexpr int kV = kBlock / V::size();
  static void load(const double* p, V* v) { for (int i = 0; i < kV; ++i) v[i] = V::loadu(p + i * V::size()); }
  static void store(double* p, const V* v) { for (int i = 0; i < kV; ++i) v[i].store(p + i * V::size()); }
};
template <typename R> struct IOReduced {
  using V = Vectorized<float>;
  static constexpr int kV = 2;
  static_assert(Vectorized<R>::size() == kBlock, "reduced-float vector must hold one block");
  static void load(const R* p, V* v) { at::vec::load_to_float<R>(p, v[0], v[1]); }
  static void store(R* p, const V* v) { at::vec::convert_from_float<R>(v[0], v[1]).store(p); }
};
template <> struct IO<c10::BFloat16> : IOReduced<c10::BFloat16> {};
template <> struct IO<c10::Half> : IOReduced<c10::Half> {};

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__)
// bf16 in even/odd lane order: bf16 -> fp32 is a 16-bit shift (even elements) or a mask (odd
// elements), with no cross-lane shuffles; the store rounds to nearest even (NaN -> 0x7FC0, as
// c10::BFloat16 does) and merges the halves back. Only for code that is elementwise in the lanes
// and whose other operands use the same order (see Split below).
struct IOBf16Split {
  using V = Vectorized<float>;
  static constexpr int kV = 2;
  static void load(const c10::BFloat16* p, V* v) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    v[1] = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static __m256i round(__m256 x) {  // fp32 -> bf16 bits in the upper half of each lane (RNE, quiet NaN)
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan);
  }
  static void store(c10::BFloat16* p, const V* v) {
    const __m256i even = _mm256_srli_epi32(round(v[0]), 16);
    const __m256i odd = _mm256_and_si256(round(v[1]), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_or_si256(even, odd));
  }
};
// The IO of T (and of the momentum buffer Bt) for one kernel: split bf16 when every bf16 operand
// can use it (the buffer is bf16 too or absent), else the natural order.
template <typename T, typename Bt, bool MOM>
constexpr bool kSplit = std::is_same_v<T, c10::BFloat16> && (!MOM || std::is_same_v<Bt, T>);
template <typename X, typename T, typename Bt, bool MOM>
using IOFor = std::conditional_t<kSplit<T, Bt, MOM> && std::is_same_v<X, c10::BFloat16>, IOBf16Split, IO<X>>;
#else
template <typename X, typename T, typename Bt, bool MOM>
using IOFor = IO<X>;
#endif

// True when statistic s (a sum S_i or a Gram entry G_ij) involves only slots marked in `present`.
constexpr bool stat_used(int s, const bool* present) {
  if (s < rc::kNumSlots) return present[s];
  for (int i = 0; i < rc::kNumSlots; ++i)
    for (int j = i; j < rc::kNumSlots; ++j)
      if (rc::pair_index(i, j) == s) return present[i] && present[j];
  return false;
}

// Σ x[0..n) in float64 as a fixed pairwise tree: the same order every time, and dependency chains of
// log2(n) additions instead of n (the serial sum cost ~8% of the loop in a micro-benchmark).
template <typename A, int n>
inline double tree_sum(const A* x) {
  if constexpr (n == 1) {
    return static_cast<double>(x[0]);
  } else {
    return tree_sum<A, n / 2>(x) + tree_sum<A, n - n / 2>(x + n / 2);
  }
}

// Partial statistics of one chunk of one group (14 values, float64).
template <typename T, typename Bt, bool K3, bool MOM>
void stats_chunk(const T* u, const T* c, const T* d, const Bt* b, int64_t len, double beta, double* out) {
  using A = typename AccOf<T>::type;
  using IOT = IOFor<T, T, Bt, MOM>;
  using IOB = IOFor<Bt, T, Bt, MOM>;
  using V = typename IOT::V;
  constexpr int kV = IOT::kV;
  static_assert(std::is_same_v<V, typename IOB::V> && IOB::kV == kV, "buffer/input vector mismatch");
  constexpr bool P[rc::kNumSlots] = {true, true, K3, MOM};
  // Independent accumulator sets (one per vector of a block) break the add/FMA latency chain; only
  // when the used statistics fit the 16 AVX2 registers twice over (K = 2 without momentum: 5 stats).
  constexpr int kUsed = 2 + K3 + MOM;
  constexpr int kUsedStats = kUsed + kUsed * (kUsed + 1) / 2;
  constexpr int kSets = (kV >= 2 && 2 * kUsedStats + 6 <= 16) ? 2 : 1;
  V acc[kSets][rc::kNumStats];
  for (auto& as : acc)
    for (auto& a : as) a = V(A(0));
  const V vbeta(static_cast<A>(beta));
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    V xu[kV], xc[kV], xd[kV], xb[kV];
    IOT::load(u + i, xu);
    IOT::load(c + i, xc);
    if constexpr (K3) IOT::load(d + i, xd);
    if constexpr (MOM) IOB::load(b + i, xb);
    for (int k = 0; k < kV; ++k) {
      V* ac = acc[k % kSets];
      V v[rc::kNumSlots];
      v[0] = xu[k];
      v[1] = xc[k] - xu[k];
      if constexpr (MOM) v[1] = at::vec::fmadd(vbeta, xb[k], v[1]);
      if constexpr (K3) v[2] = xc[k] - xd[k];
      if constexpr (MOM) v[3] = xc[k];
      for (int s = 0; s < rc::kNumSlots; ++s)
        if (P[s]) ac[s] = ac[s] + v[s];
      for (int s = 0; s < rc::kNumSlots; ++s)
        for (int t = s; t < rc::kNumSlots; ++t)
          if (P[s] && P[t]) ac[rc::pair_index(s, t)] = at::vec::fmadd(v[s], v[t], ac[rc::pair_index(s, t)]);
    }
  }
  // every statistic, unrolled at compile time: unused ones (their accumulators hold zeros) are 0
  [&]<int... S>(std::integer_sequence<int, S...>) {
    ((out[S] = [&] {
       if constexpr (!stat_used(S, P)) {
         return 0.0;
       } else {
         A lanes[kSets * V::size()];
         for (int set = 0; set < kSets; ++set) acc[set][S].store(lanes + set * V::size());
         return tree_sum<A, kSets * V::size()>(lanes);
       }
     }()), ...);
  }(std::make_integer_sequence<int, rc::kNumStats>{});
  for (; i < len; ++i) {  // tail, in float64
    const double xu = static_cast<double>(static_cast<A>(u[i]));
    const double xc = static_cast<double>(static_cast<A>(c[i]));
    double v[rc::kNumSlots] = {xu, xc - xu, 0.0, 0.0};
    if constexpr (MOM) v[1] += beta * static_cast<double>(static_cast<A>(b[i]));
    if constexpr (K3) v[2] = xc - static_cast<double>(static_cast<A>(d[i]));
    if constexpr (MOM) v[3] = xc;
    for (int s = 0; s < rc::kNumSlots; ++s)
      if (P[s]) out[s] += v[s];
    for (int s = 0; s < rc::kNumSlots; ++s)
      for (int t = s; t < rc::kNumSlots; ++t)
        if (P[s] && P[t]) out[rc::pair_index(s, t)] += v[s] * v[t];
  }
}

// out = γ_u u + γ_c c + γ_d d + γ_b b_old over one chunk; with momentum also b_new = c - u + β b_old.
template <typename T, typename Bt, bool K3, bool MOM>
void combine_chunk(const T* u, const T* c, const T* d, const Bt* b_old, Bt* b_new, T* out, int64_t len,
                   const double* gamma, double beta) {
  using A = typename AccOf<T>::type;
  using IOT = IOFor<T, T, Bt, MOM>;
  using IOB = IOFor<Bt, T, Bt, MOM>;
  using V = typename IOT::V;
  constexpr int kV = IOT::kV;
  const A gu = static_cast<A>(gamma[0]), gc = static_cast<A>(gamma[1]);
  const A gd = static_cast<A>(gamma[2]), gb = static_cast<A>(gamma[3]), bt = static_cast<A>(beta);
  const V vgu(gu), vgc(gc), vgd(gd), vgb(gb), vbt(bt);
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    V xu[kV], xc[kV], xd[kV], xb[kV], o[kV], nb[kV];
    IOT::load(u + i, xu);
    IOT::load(c + i, xc);
    if constexpr (K3) IOT::load(d + i, xd);
    if constexpr (MOM) IOB::load(b_old + i, xb);
    for (int k = 0; k < kV; ++k) {
      V r = xu[k] * vgu;
      r = at::vec::fmadd(vgc, xc[k], r);
      if constexpr (K3) r = at::vec::fmadd(vgd, xd[k], r);
      if constexpr (MOM) {
        r = at::vec::fmadd(vgb, xb[k], r);
        nb[k] = at::vec::fmadd(vbt, xb[k], xc[k] - xu[k]);
      }
      o[k] = r;
    }
    IOT::store(out + i, o);
    if constexpr (MOM) IOB::store(b_new + i, nb);
  }
  for (; i < len; ++i) {
    const A xu = static_cast<A>(u[i]), xc = static_cast<A>(c[i]);
    A r = xu * gu;
    r = std::fma(gc, xc, r);
    if constexpr (K3) r = std::fma(gd, static_cast<A>(d[i]), r);
    if constexpr (MOM) {
      const A xb = static_cast<A>(b_old[i]);
      r = std::fma(gb, xb, r);
      b_new[i] = static_cast<Bt>(std::fma(bt, xb, xc - xu));
    }
    out[i] = static_cast<T>(r);
  }
}

template <typename T> struct Tag { using type = T; };

// The AVX-512 combine takes bfloat16 (as its bits) with the momentum buffer absent or bf16 too
// (dispatch() passes Bt = T when there is no buffer); every other combination runs the at::vec path.
template <typename T, typename Bt>
constexpr bool kAvx512Ok = std::is_same_v<T, c10::BFloat16> && std::is_same_v<Bt, T>;
inline const uint16_t* bits(const c10::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }
inline uint16_t* bits(c10::BFloat16* p) { return reinterpret_cast<uint16_t*>(p); }

// Calls f(Tag<T>, Tag<Bt>, bool_constant<K3>, bool_constant<MOM>) for the runtime combination.
template <typename F>
void dispatch(at::ScalarType st, bool buf_f32, bool k3, bool mom, F&& f) {
  auto flags = [&](auto t, auto b) {
    if (k3) {
      if (mom) f(t, b, std::true_type{}, std::true_type{});
      else f(t, b, std::true_type{}, std::false_type{});
    } else {
      if (mom) f(t, b, std::false_type{}, std::true_type{});
      else f(t, b, std::false_type{}, std::false_type{});
    }
  };
  switch (st) {
    case at::kFloat: flags(Tag<float>{}, Tag<float>{}); break;
    case at::kDouble: flags(Tag<double>{}, Tag<double>{}); break;
    case at::kBFloat16:
      if (buf_f32) flags(Tag<c10::BFloat16>{}, Tag<float>{});
      else flags(Tag<c10::BFloat16>{}, Tag<c10::BFloat16>{});
      break;
    case at::kHalf:
      if (buf_f32) flags(Tag<c10::Half>{}, Tag<float>{});
      else flags(Tag<c10::Half>{}, Tag<c10::Half>{});
      break;
    default: TORCH_CHECK(false, "rectified_cfg: unsupported dtype ", st);
  }
}

int64_t num_chunks(int64_t n) { return std::max<int64_t>(1, (n + kChunk - 1) / kChunk); }

// The tasks of the statistics and the combine: chunk ch of group g is task g * nch + ch; off is the
// chunk's first element in the [groups, n] operands.
struct Chunk {
  int64_t group, off, len;
};
inline Chunk chunk_of(int64_t task, int64_t n, int64_t nch) {
  const int64_t g = task / nch, ch = task % nch;
  return {g, g * n + ch * kChunk, std::min(kChunk, n - ch * kChunk)};
}

// The inputs as typed pointers (rc::Operands); const_data_ptr checks each dtype.
template <typename T, typename Bt, bool K3, bool MOM>
rc::Operands<T, Bt, K3, MOM> typed(const CfgInputs& in) {
  return {in.u.const_data_ptr<T>(), in.c.const_data_ptr<T>(), K3 ? in.d.const_data_ptr<T>() : nullptr,
          MOM ? in.b.const_data_ptr<Bt>() : nullptr};
}

}  // namespace

std::vector<double> rectified_cfg_stats_cpu(const CfgInputs& in, double beta) {
  const int64_t G = in.groups, N = in.n, nch = num_chunks(N);
  std::vector<double> partial(static_cast<size_t>(G * nch * rc::kNumStats), 0.0);
  std::vector<double> stats(static_cast<size_t>(G * rc::kNumStats), 0.0);
  if (G == 0) return stats;
  dispatch(in.u.scalar_type(), in.buf_f32, in.k3, in.mom, [&](auto t, auto b, auto k3, auto mom) {
    using T = typename decltype(t)::type;
    using Bt = typename decltype(b)::type;
    constexpr bool K3 = decltype(k3)::value, MOM = decltype(mom)::value;
    const auto x = typed<T, Bt, K3, MOM>(in);
    at::parallel_for(0, G * nch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const Chunk ck = chunk_of(task, N, nch);
        const auto xs = x.at(ck.off);
        stats_chunk<T, Bt, K3, MOM>(xs.u, xs.c, xs.d, xs.b, ck.len, beta, partial.data() + task * rc::kNumStats);
      }
    });
  });
  for (int64_t g = 0; g < G; ++g)
    for (int64_t ch = 0; ch < nch; ++ch)
      for (int s = 0; s < rc::kNumStats; ++s)
        stats[g * rc::kNumStats + s] += partial[(g * nch + ch) * rc::kNumStats + s];
  return stats;
}

void rectified_cfg_combine_cpu(const CfgInputs& in, const double* gamma, double beta, at::Tensor& out, at::Tensor* b_new,
                               bool avx512) {
  const int64_t G = in.groups, N = in.n, nch = num_chunks(N);
  if (G == 0) return;
  dispatch(in.u.scalar_type(), in.buf_f32, in.k3, in.mom, [&](auto t, auto b, auto k3, auto mom) {
    using T = typename decltype(t)::type;
    using Bt = typename decltype(b)::type;
    constexpr bool K3 = decltype(k3)::value, MOM = decltype(mom)::value;
    const auto x = typed<T, Bt, K3, MOM>(in);
    Bt* pbn = (MOM && b_new != nullptr) ? b_new->mutable_data_ptr<Bt>() : nullptr;
    T* po = out.mutable_data_ptr<T>();
    if constexpr (kAvx512Ok<T, Bt>) {
      if (avx512) {
        at::parallel_for(0, G * nch, 1, [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) {
            const Chunk ck = chunk_of(task, N, nch);
            const auto xs = x.at(ck.off);
            avx512::combine_bf16_chunk<K3, MOM>(bits(xs.u), bits(xs.c), bits(xs.d), bits(xs.b),
                                                pbn != nullptr ? bits(pbn + ck.off) : nullptr, bits(po + ck.off), ck.len,
                                                gamma + ck.group * rc::kNumCoeffs, beta);
          }
        });
        return;
      }
    }
    at::parallel_for(0, G * nch, 1, [&](int64_t begin, int64_t end) {
      std::vector<Bt> scratch;  // b_new target when the caller does not want the buffer written
      for (int64_t task = begin; task < end; ++task) {
        const Chunk ck = chunk_of(task, N, nch);
        const auto xs = x.at(ck.off);
        Bt* dst = nullptr;
        if constexpr (MOM) {
          if (pbn != nullptr) {
            dst = pbn + ck.off;
          } else {
            scratch.resize(static_cast<size_t>(ck.len));
            dst = scratch.data();
          }
        }
        combine_chunk<T, Bt, K3, MOM>(xs.u, xs.c, xs.d, xs.b, dst, po + ck.off, ck.len, gamma + ck.group * rc::kNumCoeffs,
                                      beta);
      }
    });
  });
}

std::vector<double> rectified_cfg_coeffs_cpu(const CfgInputs& in, const rcfg::CoeffParams& p) {
  const int64_t G = in.groups;
  std::vector<double> gamma(static_cast<size_t>(G * rc::kNumCoeffs));
  if (rc::needs_stats(p)) {
    const std::vector<double> stats = rectified_cfg_stats_cpu(in, p.beta);
    for (int64_t g = 0; g < G; ++g)
      rc::coefficients(stats.data() + g * rc::kNumStats, static_cast<double>(in.n), p, gamma.data() + g * rc::kNumCoeffs);
  } else {
    double st[rc::kNumStats] = {};
    double g0[rc::kNumCoeffs];
    rc::coefficients(st, static_cast<double>(in.n), p, g0);
    for (int64_t g = 0; g < G; ++g) std::copy(g0, g0 + rc::kNumCoeffs, gamma.begin() + g * rc::kNumCoeffs);
  }
  return gamma;
}

bool rectified_cfg_use_avx512() {
  static const bool hw = avx512::supported();
  const Switches& sw = switches();
  TORCH_CHECK(sw.cpu_isa_error.empty(), sw.cpu_isa_error);
  if (sw.cpu_isa == Switches::CpuIsa::kAvx2) return false;
  if (sw.cpu_isa == Switches::CpuIsa::kAvx512) {
    TORCH_CHECK(hw, "DARE_KERNELS_CPU_ISA=avx512 but this CPU (or OS) lacks AVX-512 F/BW/VL/DQ/BF16");
    return true;
  }
  return hw && !aten_capability_below_avx512();
}

std::string rectified_cfg_cpu_isa() { return rectified_cfg_use_avx512() ? "avx512" : DARE_KERNELS_CPU_VEC; }

}  // namespace dare::cpu
