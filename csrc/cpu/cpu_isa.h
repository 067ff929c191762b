// Run-time switches of the CPU kernels' vector paths (read on every call, so a process can switch).
#pragma once

#include <cstdlib>
#include <cstring>

namespace dare::cpu {

// True when ATEN_CPU_CAPABILITY keeps PyTorch itself below AVX-512 ("default" or "avx2"): our AVX-512
// paths stay off by default then too.
inline bool aten_capability_below_avx512() {
  const char* aten = std::getenv("ATEN_CPU_CAPABILITY");
  return aten != nullptr && (std::strcmp(aten, "default") == 0 || std::strcmp(aten, "avx2") == 0);
}

// True when DARE_KERNELS_CPU_ISA=avx2 asks for the build's at::vec paths.
inline bool dare_isa_is_avx2() {
  const char* isa = std::getenv("DARE_KERNELS_CPU_ISA");
  return isa != nullptr && std::strcmp(isa, "avx2") == 0;
}

}  // namespace dare::cpu
