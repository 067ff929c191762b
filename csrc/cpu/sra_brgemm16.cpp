// bf16 / fp16 block products through cpublas::brgemm (see sra_brgemm16.h). No vector code of our own:
// the tile code is oneDNN's, generated at run time inside libtorch_cpu, so this file is safe in the AVX2
// build.
#include "cpu/sra_brgemm16.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

namespace dare::cpu::brg16 {

bool could_pack(c10::ScalarType t) {
  if (t != c10::kBFloat16 && t != c10::kHalf) return false;
  return at::native::cpublas::could_pack(t);
}

void pack_panels(const uint16_t* x, int64_t sr, int64_t sc, int64_t kdim, int64_t n, c10::ScalarType t, bool packed,
                 uint16_t* dst, uint16_t* tmp) {
  const int64_t kdimp = even(kdim), np = panels(n);
  for (int64_t p = 0; p < np; ++p) {
    const int64_t c0 = p * kPanel, w = std::min(kPanel, n - c0);
    uint16_t* out = dst + p * kdimp * kPanel;
    uint16_t* rows = packed ? tmp : out;
    for (int64_t r = 0; r < kdim; ++r) {
      uint16_t* d = rows + r * kPanel;
      const uint16_t* s = x + r * sr + c0 * sc;
      if (sc == 1) {
        std::memcpy(d, s, w * sizeof(uint16_t));
      } else {
        for (int64_t c = 0; c < w; ++c) d[c] = s[c * sc];
      }
      std::fill(d + w, d + kPanel, uint16_t(0));
    }
    if (kdimp > kdim) std::fill(rows + kdim * kPanel, rows + kdimp * kPanel, uint16_t(0));
    if (packed) at::native::cpublas::pack(kdimp, kPanel, kPanel, kPanel, t, t, rows, out);
  }
}

namespace {
template <typename T>
void gemm_t(int64_t m, int64_t npanels, int64_t kdimp, const uint16_t* a, int64_t lda, const uint16_t* b, float* c,
            int64_t ldc, bool add, bool packed) {
  const T* at_ = reinterpret_cast<const T*>(a);
  for (int64_t p = 0; p < npanels; ++p) {
    const T* bp = reinterpret_cast<const T*>(b + p * kdimp * kPanel);
    at::native::cpublas::brgemm(m, kPanel, kdimp, lda, kPanel, ldc, add, at_, bp, c + p * kPanel, packed);
  }
}
}  // namespace

void gemm(int64_t m, int64_t npanels, int64_t kdimp, const uint16_t* a, int64_t lda, const uint16_t* b, float* c,
          int64_t ldc, bool add, c10::ScalarType t, bool packed) {
  if (m <= 0 || npanels <= 0) return;
  if (t == c10::kBFloat16) {
    gemm_t<c10::BFloat16>(m, npanels, kdimp, a, lda, b, c, ldc, add, packed);
  } else {
    TORCH_CHECK(t == c10::kHalf, "brg16::gemm: bfloat16 or float16 expected");
    gemm_t<c10::Half>(m, npanels, kdimp, a, lda, b, c, ldc, add, packed);
  }
}

void release(bool packed) {
  if (packed) at::native::cpublas::brgemm_release(true);
}

}  // namespace dare::cpu::brg16
