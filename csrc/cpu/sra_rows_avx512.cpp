// The fused AVX-512 softmax rows without BF16 (see sra_rows_avx512.h): sra_softmax_rows_avx512.inc under an
// AVX-512 F/BW/VL target region. Only raw intrinsics and our own code live in that region: every header is
// included before it, so no inline function shared with other translation units is compiled for AVX-512.
#include "cpu/sra_rows_avx512.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/avx512_util.h"

namespace dare::cpu::rows512 {

#if DARE_CPU_HAVE_AVX512

bool supported() {
  // libgcc's / compiler-rt's CPU model also checks that the OS enables the AVX-512 register state (XCR0).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

DARE_AVX512_REGION_BEGIN("avx512f,avx512bw,avx512vl")

#define DARE_ROWS_WITH_BF16 0
#include "cpu/sra_softmax_rows_avx512.inc"
#undef DARE_ROWS_WITH_BF16

DARE_AVX512_REGION_END

#else  // no AVX-512 build support

bool supported() { return false; }
void softmax_rows(float*, int64_t, int64_t, int64_t, const float*, uint16_t*, int64_t, float*, int64_t, const float*,
                  int64_t, int64_t, int64_t, float, bool, float*, float*, float*) {}

#endif

}  // namespace dare::cpu::rows512
