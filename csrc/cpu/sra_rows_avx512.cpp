// The fused AVX-512 softmax rows without BF16 (see sra_rows_avx512.h): sra_softmax_rows_avx512.inc under an
// AVX-512 F/BW/VL target region. Only raw intrinsics and our own code live in that region: every header is
// included before it, so no inline function shared with other translation units is compiled for AVX-512.
#include "cpu/sra_rows_avx512.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#define DARE_ROWS512_HAVE_AVX512 1
#include <immintrin.h>
#else
#define DARE_ROWS512_HAVE_AVX512 0
#endif

namespace dare::cpu::rows512 {

#if DARE_ROWS512_HAVE_AVX512

bool supported() {
  // libgcc's / compiler-rt's CPU model also checks that the OS enables the AVX-512 register state (XCR0).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace {
inline __mmask16 lane_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u); }
}  // namespace

#define DARE_ROWS_WITH_BF16 0
#include "cpu/sra_softmax_rows_avx512.inc"
#undef DARE_ROWS_WITH_BF16

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#else  // no AVX-512 build support

bool supported() { return false; }
void softmax_rows(float*, int64_t, int64_t, int64_t, const float*, uint16_t*, int64_t, float*, int64_t, const float*,
                  int64_t, int64_t, int64_t, float, bool, float*, float*, float*) {}

#endif

}  // namespace dare::cpu::rows512
