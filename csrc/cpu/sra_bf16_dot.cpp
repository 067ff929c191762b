// bf16 block products of the CPU SRA forward with AVX512-BF16 (see sra_bf16_dot.h).
//
// Only raw intrinsics and our own code live under the AVX-512 target region: every header is included
// before it, so no inline function shared with other translation units is compiled for AVX-512.
#include "cpu/sra_bf16_dot.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/avx512_util.h"

namespace dare::cpu::bf16dot {

void pack_pairs(const uint16_t* x, int64_t sr, int64_t sc, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd) {
  const int64_t np = (rows + 1) / 2;
  for (int64_t p = 0; p < np; ++p) {
    uint16_t* d = dst + p * ldd * 2;
    const uint16_t* x0 = x + (2 * p) * sr;
    if (2 * p + 1 < rows) {
      const uint16_t* x1 = x0 + sr;
      for (int64_t c = 0; c < cols; ++c) {
        d[2 * c] = x0[c * sc];
        d[2 * c + 1] = x1[c * sc];
      }
    } else {
      for (int64_t c = 0; c < cols; ++c) {
        d[2 * c] = x0[c * sc];
        d[2 * c + 1] = 0;
      }
    }
    std::fill(d + 2 * cols, d + 2 * ldd, uint16_t(0));
  }
}

#if DARE_CPU_HAVE_AVX512

bool supported() {
  // libgcc's / compiler-rt's CPU model also checks that the OS enables the AVX-512 register state (XCR0).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

DARE_AVX512_REGION_BEGIN("avx512f,avx512bw,avx512vl,avx512bf16")

namespace {

#ifndef DARE_BF16DOT_ROWS
#define DARE_BF16DOT_ROWS 8
#endif
constexpr int kR = DARE_BF16DOT_ROWS;  // rows of a register tile (kR x 32 fp32 accumulators)
constexpr int64_t kKc = 64;  // pairs of the reduction dimension per pass (A panel and B tile stay in L1)

// same-size vector casts reinterpret the bits (GCC and clang)
inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }
inline __m512i as_si(__m512bh x) { return (__m512i)x; }

inline __m512i bcast_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// c10::BFloat16's rounding of 16 floats: to nearest even, subnormals kept, NaN -> 0x7FC0
inline __m256i round_bf16_c10(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// Where a tile's sums go: fp32 c = (add ? c : 0) + alpha·sum, or (d16 != nullptr) bf16 rows
// d16[r·ldd + col] = bf16(sum · row_scale[r]) rounded as c10::BFloat16. Pointers at the tile's first row/column.
struct Out {
  float alpha;
  bool add;
  float* c;
  int64_t ldc;
  const float* row_scale;
  uint16_t* d16;
  int64_t ldd;
};

inline void put(const Out& o, int r, int64_t col, __mmask16 mk, __m512 sum) {
  if (o.d16 != nullptr) {
    _mm256_mask_storeu_epi16(o.d16 + r * o.ldd + col, mk, round_bf16_c10(_mm512_mul_ps(sum, _mm512_set1_ps(o.row_scale[r]))));
    return;
  }
  float* cr = o.c + r * o.ldc + col;
  __m512 x = _mm512_mul_ps(sum, _mm512_set1_ps(o.alpha));
  if (o.add) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mk, cr));
  _mm512_mask_storeu_ps(cr, mk, x);
}

// R x (16·NC) sums A[R x kp]·B[kp x 16·NC] (masks m0, m1 on the two halves; NC = 1: one half) into `o`.
// NC = 0: a tile of at most 8 columns in 256-bit registers (mask m0 on 8 lanes), so the last 8 columns of
// e.g. a 40-wide P·V do not cost a 512-bit product each.
template <int R, int NC>
inline void tile(int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, const Out& o,
                 __mmask16 m0, __mmask16 m1) {
  if constexpr (NC == 0) {
    __m256 acc[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t p = 0; p < kp; ++p) {
      const __m256bh bv = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p * ldb * 2));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        int32_t v;
        std::memcpy(&v, a + r * lda + 2 * p, sizeof(v));
        acc[r] = _mm256_dpbf16_ps(acc[r], (__m256bh)_mm256_set1_epi32(v), bv);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) put(o, r, 0, m0 & 0xFF, _mm512_zextps256_ps512(acc[r]));
  } else {
    __m512 acc[R][NC];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int k = 0; k < NC; ++k) acc[r][k] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kp; ++p) {
      __m512bh bv[NC];
#pragma GCC unroll 2
      for (int k = 0; k < NC; ++k) bv[k] = as_bh(_mm512_loadu_si512(b + p * ldb * 2 + 32 * k));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512bh av = as_bh(bcast_pair(a + r * lda + 2 * p));
#pragma GCC unroll 2
        for (int k = 0; k < NC; ++k) acc[r][k] = _mm512_dpbf16_ps(acc[r][k], av, bv[k]);
      }
    }
    const __mmask16 mk[2] = {m0, m1};
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int k = 0; k < NC; ++k) put(o, r, 16 * k, mk[k], acc[r][k]);
  }
}

template <int NC>
void tile_rows(int rows, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, const Out& o,
               __mmask16 m0, __mmask16 m1) {
  switch (rows) {
#define DARE_BF16DOT_CASE(R) \
  case R: tile<R, NC>(kp, a, lda, b, ldb, o, m0, m1); break;
    DARE_BF16DOT_CASE(12) DARE_BF16DOT_CASE(11) DARE_BF16DOT_CASE(10) DARE_BF16DOT_CASE(9)
    DARE_BF16DOT_CASE(8) DARE_BF16DOT_CASE(7) DARE_BF16DOT_CASE(6) DARE_BF16DOT_CASE(5)
    DARE_BF16DOT_CASE(4) DARE_BF16DOT_CASE(3) DARE_BF16DOT_CASE(2)
#undef DARE_BF16DOT_CASE
    default: tile<1, NC>(kp, a, lda, b, ldb, o, m0, m1); break;
  }
}

// the blocked product behind gemm and gemm_rows_bf16; kc: pairs per pass (the fp32 C accumulates between
// passes; the bf16 output needs one pass)
void gemm_blocked(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                  int64_t kc, const Out& out) {
  // rows per panel: the A panel (rows x kc pairs) ~16 KiB of L1 next to the 8 KiB B tile
  const int64_t panel = std::clamp<int64_t>((16384 / (4 * std::max<int64_t>(kc, 1))) / kR * kR, kR, 64 / kR * kR);
  for (int64_t p0 = 0; p0 < std::max<int64_t>(kp, 1); p0 += kc) {
    const int64_t pn = std::min(kc, kp - p0);
    for (int64_t i0 = 0; i0 < m; i0 += panel) {
      const int64_t ie = std::min(m, i0 + panel);
      for (int64_t j0 = 0; j0 < n; j0 += kTileN) {
        const __mmask16 m0 = lane_mask(n - j0), m1 = lane_mask(n - j0 - 16);
        const uint16_t* bt = b + (p0 * ldb + j0) * 2;
        for (int64_t i = i0; i < ie; i += kR) {
          const int rows = static_cast<int>(std::min<int64_t>(kR, ie - i));
          Out o = out;
          o.add = out.add || p0 > 0;
          if (o.d16 != nullptr) {
            o.d16 += i * o.ldd + j0;
            o.row_scale += i;
          } else {
            o.c += i * o.ldc + j0;
          }
          const uint16_t* ai = a + i * lda + 2 * p0;
          if (n - j0 > 16) {
            tile_rows<2>(rows, pn, ai, lda, bt, ldb, o, m0, m1);
          } else if (n - j0 > 8) {  // a last tile of at most 16 columns
            tile_rows<1>(rows, pn, ai, lda, bt, ldb, o, m0, m1);
          } else {  // at most 8
            tile_rows<0>(rows, pn, ai, lda, bt, ldb, o, m0, m1);
          }
        }
      }
    }
    if (kp <= 0) break;
  }
}

}  // namespace

void gemm(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
          float alpha, bool add, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  // the reduction is split into passes of kKc pairs (C accumulates in memory between them) only when
  // that does not change the rounding of alpha (alpha == 1)
  const int64_t kc = alpha == 1.0f ? kKc : std::max<int64_t>(kp, 1);
  gemm_blocked(m, n, kp, a, lda, b, ldb, kc, Out{alpha, add, c, ldc, nullptr, nullptr, 0});
}

void gemm_rows_bf16(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                    const float* row_scale, uint16_t* dst, int64_t ldd) {
  if (m <= 0 || n <= 0) return;
  gemm_blocked(m, n, kp, a, lda, b, ldb, std::max<int64_t>(kp, 1),
               Out{1.0f, false, nullptr, 0, row_scale, dst, ldd});
}

void to_bf16_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    uint16_t* d = dst + r * ldd;
    int64_t j = 0;
    for (; j + 32 <= cols; j += 32) {
      const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + j + 16), _mm512_loadu_ps(s + j));
      _mm512_storeu_si512(d + j, as_si(x));
    }
    if (j < cols) {
      const int64_t rem = cols - j;
      const __m512 lo = _mm512_maskz_loadu_ps(lane_mask(rem), s + j);
      const __m512 hi = _mm512_maskz_loadu_ps(lane_mask(rem - 16), s + j + 16);
      const __m512bh x = _mm512_cvtne2ps_pbh(hi, lo);
      const __mmask32 mk = rem >= 32 ? ~__mmask32(0) : (__mmask32(1) << rem) - 1u;
      _mm512_mask_storeu_epi16(d + j, mk, as_si(x));
    }
    if (cols % 2 != 0) d[cols] = 0;
  }
}

void store_rows_bf16(const float* src, int64_t ld_src, int64_t rows, int64_t cols, const float* row_scale,
                     uint16_t* dst, int64_t sl) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld_src;
    uint16_t* d = dst + r * sl;
    const __m512 va = _mm512_set1_ps(row_scale[r]);
    int64_t j = 0;
    for (; j + 16 <= cols; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + j), round_bf16_c10(_mm512_mul_ps(_mm512_loadu_ps(s + j), va)));
    if (j < cols) {
      const __mmask16 m = lane_mask(cols - j);
      _mm256_mask_storeu_epi16(d + j, m, round_bf16_c10(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), va)));
    }
  }
}

#define DARE_ROWS_WITH_BF16 1
#include "cpu/sra_softmax_rows_avx512.inc"
#undef DARE_ROWS_WITH_BF16

DARE_AVX512_REGION_END

#else  // no AVX-512 build support

bool supported() { return false; }
void gemm(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float, bool, float*, int64_t) {}
void gemm_rows_bf16(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, const float*, uint16_t*,
                    int64_t) {}
void to_bf16_rows(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t) {}
void store_rows_bf16(const float*, int64_t, int64_t, int64_t, const float*, uint16_t*, int64_t) {}
void softmax_rows(float*, int64_t, int64_t, int64_t, const float*, uint16_t*, int64_t, float*, int64_t, const float*,
                  int64_t, int64_t, int64_t, float, bool, float*, float*, float*) {}

#endif

}  // namespace dare::cpu::bf16dot
