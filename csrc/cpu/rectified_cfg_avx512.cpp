// AVX-512 kernel of the rectified CFG combine on CPU (see rectified_cfg_avx512.h).
//
// Only raw intrinsics and our own code live under the AVX-512 target region: every header is included
// before it, so no inline function shared with other translation units is compiled for AVX-512 (the
// linker could otherwise keep that copy and run it on a CPU without AVX-512).
#include "cpu/rectified_cfg_avx512.h"

#include <cstdint>

#include "cpu/avx512_util.h"

#define DARE_RCFG_INSTANTIATE(K3, MOM)                                                                          \
  template void combine_bf16_chunk<K3, MOM>(const uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*, \
                                            uint16_t*, uint16_t*, int64_t, const double*, double);

namespace dare::cpu::avx512 {

#if DARE_CPU_HAVE_AVX512

bool supported() {
  // libgcc's / compiler-rt's CPU model also checks that the OS enables the AVX-512 register state (XCR0).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

DARE_AVX512_REGION_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace {

constexpr int kBlock = 32;  // elements per block: two vectors of 16 floats

// A block of 32 bfloat16 (as bits) <-> two __m512 of float in even/odd lane order: v[0] = elements
// 0, 2, ..., 30 and v[1] = 1, 3, ..., 31, so the widening is a shift (even) or a mask (odd) with no
// shuffle. `n` < 32 loads / stores the first n elements only (the other lanes load as zeros).
struct Bf16IO {
  static inline __mmask32 mask(int n) { return n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1u; }
  static inline void widen(__m512i raw, __m512* v) {
    v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    v[1] = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static inline void load(const uint16_t* p, __m512* v) { widen(_mm512_loadu_si512(p), v); }
  static inline void load(const uint16_t* p, int n, __m512* v) { widen(_mm512_maskz_loadu_epi16(mask(n), p), v); }

  // fp32 -> bf16 bits in the upper half of each lane: round to nearest even on the bits, NaN -> 0x7FC0
  // (c10::BFloat16's conversion, exact for subnormals too).
  static inline __m512i round_bits(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC00000));
  }
  static inline __m512i pack(const __m512* v) {
    // vcvtne2ps2bf16 rounds to nearest even like c10, but treats subnormal inputs as zero and keeps a
    // NaN's payload: blocks holding either (fpclass: QNaN 0x01, SNaN 0x80, subnormal 0x20) take the
    // integer rounding instead.
    const __mmask16 odd_cases = static_cast<__mmask16>(_mm512_fpclass_ps_mask(v[0], 0xA1) |
                                                       _mm512_fpclass_ps_mask(v[1], 0xA1));
    if (__builtin_expect(odd_cases == 0, 1)) {
      // lanes 0..15 <- even elements, 16..31 <- odd elements; then interleave back to memory order
      const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]);
      const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      return _mm512_permutexvar_epi16(idx, halves);
    }
    const __m512i even = _mm512_srli_epi32(round_bits(v[0]), 16);
    const __m512i odd = _mm512_and_si512(round_bits(v[1]), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
    return _mm512_or_si512(even, odd);
  }
  static inline void store(uint16_t* p, const __m512* v) { _mm512_storeu_si512(p, pack(v)); }
  static inline void store(uint16_t* p, int n, const __m512* v) { _mm512_mask_storeu_epi16(p, mask(n), pack(v)); }
};

// γ and β broadcast, and one block's arithmetic: the operations of the AVX2 / scalar path in the same
// order (r = u γu; r = fma(γc, c, r); r = fma(γd, d, r); r = fma(γb, b, r); b_new = fma(β, b, c - u)).
// A plain function, not a lambda: the target region must cover it with every compiler.
struct Coeffs {
  __m512 gu, gc, gd, gb, bt;
};

template <bool K3, bool MOM>
inline void combine_block(const Coeffs& g, const __m512* xu, const __m512* xc, const __m512* xd, const __m512* xb,
                          __m512* o, __m512* nb) {
  for (int k = 0; k < 2; ++k) {
    __m512 r = _mm512_mul_ps(xu[k], g.gu);
    r = _mm512_fmadd_ps(g.gc, xc[k], r);
    if constexpr (K3) r = _mm512_fmadd_ps(g.gd, xd[k], r);
    if constexpr (MOM) {
      r = _mm512_fmadd_ps(g.gb, xb[k], r);
      nb[k] = _mm512_fmadd_ps(g.bt, xb[k], _mm512_sub_ps(xc[k], xu[k]));
    }
    o[k] = r;
  }
}

template <bool K3, bool MOM>
void combine_impl(const uint16_t* u, const uint16_t* c, const uint16_t* d, const uint16_t* b_old, uint16_t* b_new,
                  uint16_t* out, int64_t len, const double* gamma, double beta) {
  const Coeffs g{_mm512_set1_ps(static_cast<float>(gamma[0])), _mm512_set1_ps(static_cast<float>(gamma[1])),
                 _mm512_set1_ps(static_cast<float>(gamma[2])), _mm512_set1_ps(static_cast<float>(gamma[3])),
                 _mm512_set1_ps(static_cast<float>(beta))};
  __m512 xu[2], xc[2], xd[2], xb[2], o[2], nb[2];
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) {
    Bf16IO::load(u + i, xu);
    Bf16IO::load(c + i, xc);
    if constexpr (K3) Bf16IO::load(d + i, xd);
    if constexpr (MOM) Bf16IO::load(b_old + i, xb);
    combine_block<K3, MOM>(g, xu, xc, xd, xb, o, nb);
    Bf16IO::store(out + i, o);
    if constexpr (MOM) {
      if (b_new != nullptr) Bf16IO::store(b_new + i, nb);
    }
  }
  if (i < len) {
    const int n = static_cast<int>(len - i);
    Bf16IO::load(u + i, n, xu);
    Bf16IO::load(c + i, n, xc);
    if constexpr (K3) Bf16IO::load(d + i, n, xd);
    if constexpr (MOM) Bf16IO::load(b_old + i, n, xb);
    combine_block<K3, MOM>(g, xu, xc, xd, xb, o, nb);
    Bf16IO::store(out + i, n, o);
    if constexpr (MOM) {
      if (b_new != nullptr) Bf16IO::store(b_new + i, n, nb);
    }
  }
}

}  // namespace

template <bool K3, bool MOM>
void combine_bf16_chunk(const uint16_t* u, const uint16_t* c, const uint16_t* d, const uint16_t* b_old,
                        uint16_t* b_new, uint16_t* out, int64_t len, const double* gamma, double beta) {
  combine_impl<K3, MOM>(u, c, d, b_old, b_new, out, len, gamma, beta);
}

DARE_RCFG_INSTANTIATE(false, false)
DARE_RCFG_INSTANTIATE(false, true)
DARE_RCFG_INSTANTIATE(true, false)
DARE_RCFG_INSTANTIATE(true, true)

DARE_AVX512_REGION_END

#else  // !DARE_CPU_HAVE_AVX512

bool supported() { return false; }

template <bool K3, bool MOM>
void combine_bf16_chunk(const uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, uint16_t*,
                        int64_t, const double*, double) {}

DARE_RCFG_INSTANTIATE(false, false)
DARE_RCFG_INSTANTIATE(false, true)
DARE_RCFG_INSTANTIATE(true, false)
DARE_RCFG_INSTANTIATE(true, true)

#endif  // DARE_CPU_HAVE_AVX512

}  // namespace dare::cpu::avx512
