// bf16 / fp16 block products of the CPU SRA kernels through PyTorch's at::native::cpublas::brgemm, the
// oneDNN batch-reduce GEMM micro-kernel that libtorch_cpu exports (on CPUs with AMX-BF16 / AMX-FP16 it runs
// on the tiles). The softmax, bias, map, LSE and dw epilogues around the products stay ours.
//
// The B operand of every product is stored as panels of kPanel = 64 columns: panel p of a [kdim x n]
// matrix holds columns [64p, 64p + 64) of all kdim rows, zero-padded to an even kdimp = kdim + kdim % 2
// rows and to 64 columns, kdimp·64 elements. Packed mode (Mode::kPacked, where cpublas::could_pack says
// the CPU packs for the dtype): each panel is passed through cpublas::pack (oneDNN's VNNI reorder; it takes
// only ld_in == N and ld_out in {16, 32, 48, 64}, hence the 64-column panels) and the products call brgemm
// with is_vnni = true. Plain mode (Mode::kPlain, DARE_KERNELS_CPU_GEMM=brgemm on a CPU that does not pack):
// the panels stay row-major [kdimp x 64] and brgemm runs with is_vnni = false, PyTorch's reference
// fallback (cpublas::gemm), so every step but the pack itself is exercised on any CPU.
//
// Products are exact in fp32 (bf16 x bf16 and fp16 x fp16 fit fp32), sums in fp32 in oneDNN's order.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace dare::cpu::brg16 {

constexpr int64_t kPanel = 64;

enum class Mode { kNone, kPacked, kPlain };

// cpublas::could_pack(t): the CPU (through oneDNN, with torch.backends.mkldnn enabled) packs B for brgemm
// on tiles: AMX-BF16 for bfloat16, AMX-FP16 for float16. False for other dtypes.
bool could_pack(c10::ScalarType t);

inline int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }
inline int64_t even(int64_t k) { return k + k % 2; }

// dst = the panels of X [kdim x n] (element (r, c) at x[r·sr + c·sc], 16-bit values of dtype t), packed
// when `packed`: panels(n) panels of even(kdim)·64 elements. tmp: even(kdim)·64 elements of scratch.
void pack_panels(const uint16_t* x, int64_t sr, int64_t sc, int64_t kdim, int64_t n, c10::ScalarType t, bool packed,
                 uint16_t* dst, uint16_t* tmp);

// c[m x 64·npanels] (row stride ldc >= 64·npanels) = (add ? c : 0) + A·B, A [m x kdimp] (row stride lda,
// kdimp even, the columns past the real kdim zero), B `npanels` consecutive panels of kdimp·64 elements.
void gemm(int64_t m, int64_t npanels, int64_t kdimp, const uint16_t* a, int64_t lda, const uint16_t* b, float* c,
          int64_t ldc, bool add, c10::ScalarType t, bool packed);

// Releases the calling thread's tile configuration (call once per worker after its last packed gemm).
void release(bool packed);

}  // namespace dare::cpu::brg16
