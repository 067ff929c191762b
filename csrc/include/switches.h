// The run-time switches of the C++ kernels, all in one table: every environment variable the compiled code
// reads is parsed here, once, into `Switches` (csrc/switches.cpp), and cached. reload_switches() parses
// the environment again (Python: dare_kernels._C.reload_cpu_switches(); code that changes os.environ at run
// time calls it). Torch-free, so CPU kernels and CUDA bindings read the same table.
//
// A value the parser rejects does not fail the parse: its message is kept in the switch's `error` and
// raised (as RuntimeError) by the kernel that consults that switch, as when each kernel read its own
// variable; other kernels are not affected.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace dare {

struct Switches {
  // ATEN_CPU_CAPABILITY (PyTorch's own): "default" or "avx2" keep our AVX-512 paths off by default too.
  std::string aten_cpu_capability;  // as set ("" when unset)
  bool aten_below_avx512 = false;

  // DARE_KERNELS_CPU_ISA = auto | avx2 | avx512: the vector path of the CPU kernels (avx2: the build's
  // at::vec paths; avx512: the rectified-CFG AVX-512 combine, an error without the hardware).
  enum class CpuIsa { kAuto, kAvx2, kAvx512 };
  CpuIsa cpu_isa = CpuIsa::kAuto;
  std::string cpu_isa_error;  // raised by the rectified-CFG kernels (SRA only looks for "avx2")

  // DARE_KERNELS_CPU_BF16_DOT = auto | 1 | qk | 0: bf16 block products of the SRA forward/backward
  // (sra_bf16_dot.h). "1" fails on a CPU without AVX512-BF16; "qk": only S = Q·K^T in bf16; "0": fp32.
  enum class Bf16Dot { kAuto, kOn, kQk, kOff };
  Bf16Dot bf16_dot = Bf16Dot::kAuto;
  std::string bf16_dot_error;

  // DARE_KERNELS_CPU_GEMM = auto | native | brgemm: the block products of the bf16 / fp16 SRA kernels.
  // auto: PyTorch's cpublas::brgemm on packed blocks where cpublas::could_pack says the CPU has the tiles
  // for the dtype (AMX-BF16 / AMX-FP16 through oneDNN), else native; native: our own products
  // (AVX512-BF16 dot products or fp32 products, DARE_KERNELS_CPU_BF16_DOT); brgemm: cpublas::brgemm always
  // (packed where the CPU packs, else on plain row-major blocks: PyTorch's reference fallback, for tests).
  enum class CpuGemm { kAuto, kNative, kBrgemm };
  CpuGemm cpu_gemm = CpuGemm::kAuto;
  std::string cpu_gemm_error;

  // DARE_KERNELS_CPU_ROWS = auto | avx512f: avx512f takes the AVX-512 softmax rows built without BF16.
  bool rows_avx512f = false;
  std::string rows_error;

  // DARE_KERNELS_CPU_STREAM_OUT_BYTES: SRA outputs from this size are written non-temporally (default
  // 48 MiB; atoll semantics: a non-number reads as 0).
  static constexpr int64_t kDefaultStreamOutBytes = int64_t(48) << 20;
  int64_t stream_out_bytes = kDefaultStreamOutBytes;

  // DARE_KERNELS_CPU_SCORE_BLOCK: elements of a score block + map rows of an SRA task (values below 1024
  // mean the default, 262144 = 1 MiB fp32, sized for L2).
  static constexpr int64_t kDefaultScoreBudget = 262144;
  int64_t score_budget = kDefaultScoreBudget;

  // DARE_KERNELS_CPU_HUGE_PAGES=0 turns off the transparent-huge-page hint for large outputs.
  bool huge_pages = true;

  // DARE_KERNELS_CPU_BLAS=fallback: the portable at::vec GEMM instead of libtorch_cpu's sgemm_/dgemm_, and
  // no brgemm micro-kernel.
  bool blas_fallback = false;

  // DARE_KERNELS_CPU_BRGEMM=0: MKL's sgemm_ instead of oneDNN's brgemm micro-kernel for fp32 blocks.
  bool brgemm = true;

  // DARE_KERNELS_CUDA_SRA_PATH = auto | exact | online: the CUDA SRA forward's key loop (other values: auto).
  enum class CudaSraPath { kAuto, kExact, kOnline };
  CudaSraPath cuda_sra_path = CudaSraPath::kAuto;

  // DARE_KERNELS_CUDA_CFG_PATH = auto | two_pass | single_pass: the CUDA rectified-CFG fused launch
  // (other values: auto).
  enum class CudaCfgPath { kAuto, kTwoPass, kSinglePass };
  CudaCfgPath cuda_cfg_path = CudaCfgPath::kAuto;
};

// The cached table (parsed on first use). The reference stays valid for the life of the process.
const Switches& switches();

// Parses the environment again; later calls of switches() see the new values.
void reload_switches();

// Every switch by its environment name, as resolved now: the value in effect (defaults filled in), or
// "error: <message>" for a rejected value.
std::map<std::string, std::string> describe_switches();

}  // namespace dare
