// What the AVX-512 translation units of the CPU kernels (sra_bf16_dot.cpp, sra_rows_avx512.cpp,
// rectified_cfg_avx512.cpp) share: whether this compiler builds AVX-512 code from target attributes
// (DARE_CPU_HAVE_AVX512), the pragmas that open and close a target region, and lane_mask() of the masked
// fp32 loads / stores.
//
// The library is compiled for AVX2 (CMakeLists.txt); only the functions inside a target region get
// AVX-512 code, and callers reach them only after the file's supported() check, so the binary stays
// safe on an AVX2-only CPU. Include this header, like every other header, before the region opens: no
// inline function shared with other translation units may be compiled for AVX-512 (the linker could keep
// that copy and run it on a CPU without AVX-512). lane_mask() is integer code outside any region, private
// to each translation unit; it inlines into the AVX-512 callers.
#pragma once

#include <cstdint>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#define DARE_CPU_HAVE_AVX512 1
#include <immintrin.h>
#else
#define DARE_CPU_HAVE_AVX512 0
#endif

#if DARE_CPU_HAVE_AVX512

#define DARE_CPU_PRAGMA(x) _Pragma(#x)

// DARE_AVX512_REGION_BEGIN("avx512f,avx512bw,...") ... DARE_AVX512_REGION_END: every function defined in
// between is compiled for those features.
#if defined(__clang__)
#define DARE_AVX512_REGION_BEGIN(features) \
  DARE_CPU_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define DARE_AVX512_REGION_END DARE_CPU_PRAGMA(clang attribute pop)
#else
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() (a self-initialised variable), which
// -Wall reports as maybe-uninitialized in every caller.
#define DARE_AVX512_REGION_BEGIN(features)                                                             \
  DARE_CPU_PRAGMA(GCC push_options)                                                                   \
  DARE_CPU_PRAGMA(GCC target(features))                                                               \
  DARE_CPU_PRAGMA(GCC diagnostic push)                                                                \
  DARE_CPU_PRAGMA(GCC diagnostic ignored "-Wmaybe-uninitialized")                                     \
  DARE_CPU_PRAGMA(GCC diagnostic ignored "-Wuninitialized")
#define DARE_AVX512_REGION_END      \
  DARE_CPU_PRAGMA(GCC diagnostic pop) \
  DARE_CPU_PRAGMA(GCC pop_options)
#endif

namespace dare::cpu {
namespace {  // a private copy per translation unit, inlined into its AVX-512 callers

// the first n of 16 (fp32) lanes: 0 for n <= 0, all for n >= 16
inline __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

}  // namespace
}  // namespace dare::cpu

#endif  // DARE_CPU_HAVE_AVX512
