// bf16 block products of the CPU SRA forward with AVX512-BF16 (vdpbf16ps), picked at run time by
// sra_cpu_fwd.cpp / sra_cpu_bwd.cpp for bfloat16 inputs. Compiled with function target attributes (no build flags), so
// the extension still loads and runs its fp32 path on CPUs without AVX512-BF16.
//
// Arithmetic of vdpbf16ps (Intel SDM, VDPBF16PS): per 32-bit lane, acc += a[2l+1]·b[2l+1], then
// acc += a[2l]·b[2l], in fp32, round to nearest even whatever MXCSR says, no exceptions, denormal inputs
// treated as zero and denormal results flushed to zero. A bf16×bf16 product has at most 16 significant
// bits, so each product is exact in fp32; only the sums round (like the fp32 path, in another order).
// Differences to the fp32 path: bf16 subnormal inputs (|x| < 2^-126) read as zero and fp32-subnormal
// partial sums flush to zero, both far below the bf16 tolerance of an attention output (scores of order
// 1). The order of the sums is fixed (no dependence on threads), so results are deterministic on a given
// CPU; the SDM's order is Intel's, other vendors' hardware may round the pair differently in the last bit.
// vcvtne2ps2bf16 (P -> bf16 for P·V) also rounds to nearest even and flushes fp32 subnormals to zero
// (probabilities below 2^-126 count as 0 in P·V; the map and the softmax sum use the fp32 P).
//
// Layouts. A: m rows of kp bf16 pairs (row r at a + r·lda, lda in bf16 elements; the pair p is
// a[2p], a[2p+1]). B ("VNNI"): [kp][ldb][2] bf16, pairs along the reduction dimension.
#pragma once

#include <cstdint>

namespace dare::cpu::bf16dot {

// True when the CPU and OS support AVX-512 F/BW/VL/BF16 (and the compiler could build the kernels).
bool supported();

// Round up to the column tile of gemm (32): B must be readable for ldb >= round_up(n, 32) columns.
constexpr int64_t kTileN = 32;
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// dst = VNNI pairs of X (rows x cols, element (r, c) at x[r·sr + c·sc], bf16 bits) along r:
// dst[((r / 2)·ldd + c)·2 + r % 2] = X(r, c); zeros for r >= rows (odd rows) and c in [cols, ldd).
// dst holds ceil(rows / 2)·ldd·2 elements.
void pack_pairs(const uint16_t* x, int64_t sr, int64_t sc, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd);

// c[m x n] (row stride ldc) = (add ? c : 0) + alpha · A·B, kp pairs of the reduction dimension.
void gemm(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
          float alpha, bool add, float* c, int64_t ldc);

// dst[r·ldd + c] = bf16(row_scale[r] · (A·B)[r][c]) for r < m, c < n, rounded as c10::BFloat16 does (to nearest
// even, subnormals kept, NaN -> 0x7FC0): the product's fp32 sums (over all kp pairs in registers) scaled and
// rounded without an fp32 C in memory.
void gemm_rows_bf16(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                    const float* row_scale, uint16_t* dst, int64_t ldd);

// dst[r·ldd + c] = bf16(src[r·lds + c]) (round to nearest even) for c < cols, and a zero at column cols
// when cols is odd (so the rows are whole pairs).
void to_bf16_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd);

// dst[r·sl + c] = bf16(src[r·ld_src + c] · row_scale[r]) for c < cols, rounded as c10::BFloat16 does (to
// nearest even, subnormals kept, NaN -> 0x7FC0): the scaling pass and the conversion of the fp32 path
// in one pass.
void store_rows_bf16(const float* src, int64_t ld_src, int64_t rows, int64_t cols, const float* row_scale,
                     uint16_t* dst, int64_t sl);

// Softmax rows of an exact score block (all keys in one block), fused in one pass per row (AVX-512, the
// scores of a row of up to 128 keys stay in registers). For each row r of s (rows x cols, row stride lds):
//   x = s[r] + bias (bias: cols values or nullptr), m = max(x);
//   m == -inf (no valid key): row_m[r] = -inf, row_l[r] = 1, row_inv[r] = 0, the P row (s[r], and p16[r]
//     when given) zero, the map row its input row (below) plus nothing;
//   else e = exp(x - m) (our own polynomial, within 1 ulp of exp on [-110, 0] (checked on every 16th float); results
//     below 2^-126 kept as subnormals, -inf gives 0), l = sum(e), P = e (or e / l when `normalize`):
//     row_m[r] = m, row_l[r] = l, row_inv[r] = 1 / l; s[r] = P (fp32; left as it is when p16 is given and the map, if any, covers
//     all cols); p16[r·ldp + j] = bf16(P_j) as vcvtne2ps2bf16 rounds (when p16 != nullptr; a zero at column
//     cols when cols is odd); map[r·ldmap + j - map_start] = in_j + e_j / l · map_scale for j in
//     [map_start, map_stop) (when map != nullptr), in_j = map_in[r·ld_in + j - map_start] (0 when map_in is
//     nullptr; map_in == map accumulates in place).
// NaN scores propagate to that row's P, sum and map.
void softmax_rows(float* s, int64_t lds, int64_t rows, int64_t cols, const float* bias, uint16_t* p16, int64_t ldp,
                  float* map, int64_t ldmap, const float* map_in, int64_t ld_in, int64_t map_start,
                  int64_t map_stop, float map_scale, bool normalize, float* row_m, float* row_l, float* row_inv);
// (row_m[r] + log(row_l[r]) is the row's LSE in both cases.)

}  // namespace dare::cpu::bf16dot
