// The one parser of the C++ kernels' environment switches (see csrc/include/switches.h).
#include "switches.h"

#include <atomic>
#include <cstdlib>
#include <string>

namespace dare {
namespace {

// nullptr when unset
const char* env(const char* name) { return std::getenv(name); }

std::string env_or(const char* name, const char* fallback) {
  const char* v = env(name);
  return v != nullptr ? v : fallback;
}

Switches parse() {
  Switches s;
  s.aten_cpu_capability = env_or("ATEN_CPU_CAPABILITY", "");
  s.aten_below_avx512 = s.aten_cpu_capability == "default" || s.aten_cpu_capability == "avx2";

  const std::string isa = env_or("DARE_KERNELS_CPU_ISA", "");
  if (isa == "avx2") {
    s.cpu_isa = Switches::CpuIsa::kAvx2;
  } else if (isa == "avx512") {
    s.cpu_isa = Switches::CpuIsa::kAvx512;
  } else if (!isa.empty() && isa != "auto") {
    s.cpu_isa_error = "DARE_KERNELS_CPU_ISA must be auto, avx2 or avx512, got '" + isa + "'";
  }

  const std::string dot = env_or("DARE_KERNELS_CPU_BF16_DOT", "auto");
  if (dot == "1") {
    s.bf16_dot = Switches::Bf16Dot::kOn;
  } else if (dot == "qk") {
    s.bf16_dot = Switches::Bf16Dot::kQk;
  } else if (dot == "0") {
    s.bf16_dot = Switches::Bf16Dot::kOff;
  } else if (dot != "auto" && !dot.empty()) {
    s.bf16_dot_error = "DARE_KERNELS_CPU_BF16_DOT must be auto, 0, 1 or qk, got '" + dot + "'";
  }

  const std::string gemm = env_or("DARE_KERNELS_CPU_GEMM", "auto");
  if (gemm == "native") {
    s.cpu_gemm = Switches::CpuGemm::kNative;
  } else if (gemm == "brgemm") {
    s.cpu_gemm = Switches::CpuGemm::kBrgemm;
  } else if (gemm != "auto" && !gemm.empty()) {
    s.cpu_gemm_error = "DARE_KERNELS_CPU_GEMM must be auto, native or brgemm, got '" + gemm + "'";
  }

  const std::string rows = env_or("DARE_KERNELS_CPU_ROWS", "auto");
  s.rows_avx512f = rows == "avx512f";
  if (rows != "auto" && rows != "avx512f" && !rows.empty())
    s.rows_error = "DARE_KERNELS_CPU_ROWS must be auto or avx512f, got '" + rows + "'";

  if (const char* v = env("DARE_KERNELS_CPU_STREAM_OUT_BYTES")) s.stream_out_bytes = std::atoll(v);
  if (const char* v = env("DARE_KERNELS_CPU_SCORE_BLOCK")) {
    const int64_t x = std::atoll(v);
    if (x >= 1024) s.score_budget = x;
  }
  s.huge_pages = env_or("DARE_KERNELS_CPU_HUGE_PAGES", "") != "0";
  s.blas_fallback = env_or("DARE_KERNELS_CPU_BLAS", "") == "fallback";
  s.brgemm = env_or("DARE_KERNELS_CPU_BRGEMM", "") != "0";

  const std::string sra_path = env_or("DARE_KERNELS_CUDA_SRA_PATH", "auto");
  if (sra_path == "exact") s.cuda_sra_path = Switches::CudaSraPath::kExact;
  if (sra_path == "online") s.cuda_sra_path = Switches::CudaSraPath::kOnline;
  const std::string cfg_path = env_or("DARE_KERNELS_CUDA_CFG_PATH", "auto");
  if (cfg_path == "two_pass") s.cuda_cfg_path = Switches::CudaCfgPath::kTwoPass;
  if (cfg_path == "single_pass") s.cuda_cfg_path = Switches::CudaCfgPath::kSinglePass;
  return s;
}

// The current table. A reload publishes a new one and keeps the old one alive (a few hundred bytes each):
// a kernel on another thread may still be reading it.
std::atomic<const Switches*>& current() {
  static std::atomic<const Switches*> table{new Switches(parse())};
  return table;
}

std::string or_error(const std::string& error, const std::string& value) {
  return error.empty() ? value : "error: " + error;
}

}  // namespace

const Switches& switches() { return *current().load(std::memory_order_acquire); }

void reload_switches() { current().store(new Switches(parse()), std::memory_order_release); }

std::map<std::string, std::string> describe_switches() {
  const Switches& s = switches();
  static const char* const kIsa[] = {"auto", "avx2", "avx512"};
  static const char* const kDot[] = {"auto", "1", "qk", "0"};
  static const char* const kGemm[] = {"auto", "native", "brgemm"};
  static const char* const kSraPath[] = {"auto", "exact", "online"};
  static const char* const kCfgPath[] = {"auto", "two_pass", "single_pass"};
  return {
      {"ATEN_CPU_CAPABILITY", s.aten_cpu_capability.empty() ? "auto" : s.aten_cpu_capability},
      {"DARE_KERNELS_CPU_ISA", or_error(s.cpu_isa_error, kIsa[static_cast<int>(s.cpu_isa)])},
      {"DARE_KERNELS_CPU_BF16_DOT", or_error(s.bf16_dot_error, kDot[static_cast<int>(s.bf16_dot)])},
      {"DARE_KERNELS_CPU_GEMM", or_error(s.cpu_gemm_error, kGemm[static_cast<int>(s.cpu_gemm)])},
      {"DARE_KERNELS_CPU_ROWS", or_error(s.rows_error, s.rows_avx512f ? "avx512f" : "auto")},
      {"DARE_KERNELS_CPU_STREAM_OUT_BYTES", std::to_string(s.stream_out_bytes)},
      {"DARE_KERNELS_CPU_SCORE_BLOCK", std::to_string(s.score_budget)},
      {"DARE_KERNELS_CPU_HUGE_PAGES", s.huge_pages ? "1" : "0"},
      {"DARE_KERNELS_CPU_BLAS", s.blas_fallback ? "fallback" : "auto"},
      {"DARE_KERNELS_CPU_BRGEMM", s.brgemm ? "1" : "0"},
      {"DARE_KERNELS_CUDA_SRA_PATH", kSraPath[static_cast<int>(s.cuda_sra_path)]},
      {"DARE_KERNELS_CUDA_CFG_PATH", kCfgPath[static_cast<int>(s.cuda_cfg_path)]},
  };
}

}  // namespace dare
