// The fused AVX-512 softmax rows of the CPU SRA forward built for AVX-512 F/BW/VL only: the fp32 rows of
// CPUs with AVX-512 but without AVX512-BF16 (e.g. Intel Xeon Skylake-SP to Ice Lake-SP). The same source as
// bf16dot::softmax_rows (sra_softmax_rows_avx512.inc), compiled without BF16, so the rows are bitwise the
// same as bf16dot's on any input; only the bf16 P output is left out.
#pragma once

#include <cstdint>

namespace dare::cpu::rows512 {

// True when the CPU and OS support AVX-512 F/BW/VL (and the compiler could build the rows).
bool supported();

// bf16dot::softmax_rows (sra_bf16_dot.h) with p16 == nullptr: p16 and ldp are ignored.
void softmax_rows(float* s, int64_t lds, int64_t rows, int64_t cols, const float* bias, uint16_t* p16, int64_t ldp,
                  float* map, int64_t ldmap, const float* map_in, int64_t ld_in, int64_t map_start,
                  int64_t map_stop, float map_scale, bool normalize, float* row_m, float* row_l, float* row_inv);

}  // namespace dare::cpu::rows512
