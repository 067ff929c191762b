// AVX-512 kernel of the rectified CFG combine on CPU, picked at run time by rectified_cfg.cpp for
// bfloat16 (where the AVX2 path spends most of its time rounding fp32 to bf16 with integer ops).
// Compiled with function target attributes (no build flags), so the extension still loads and runs
// its AVX2 / generic paths on CPUs without AVX-512.
//
// combine_bf16_chunk: out = Σ γ x over one chunk of bf16 (passed as its bits), and with momentum
// b_new = (c - u) + β b_old (b_new may be null: then it is not written). The same float operations in
// the same order as the AVX2 / scalar path (r = u γu; r = fma(γc, c, r); ...) and the same rounding
// (to nearest even, NaN -> 0x7FC0, subnormals kept, as c10::BFloat16): bit-identical output for the
// same γ. The statistics pass has no AVX-512 path: on AMD Zen 4 (512-bit operations issued as two
// 256-bit halves) it measured no faster than AVX2, so results never depend on the instruction set.
#pragma once

#include <cstdint>

namespace dare::cpu::avx512 {

// True when the CPU and OS support the AVX-512 F/BW/VL/DQ/BF16 instructions the kernel uses (and the
// compiler could build it).
bool supported();

template <bool K3, bool MOM>
void combine_bf16_chunk(const uint16_t* u, const uint16_t* c, const uint16_t* d, const uint16_t* b_old,
                        uint16_t* b_new, uint16_t* out, int64_t len, const double* gamma, double beta);

}  // namespace dare::cpu::avx512
