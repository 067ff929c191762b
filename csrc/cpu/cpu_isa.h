// The CPU kernels' view of the ISA switches (parsed once in csrc/switches.cpp; reload_switches() re-reads).
#pragma once

#include "switches.h"

namespace dare::cpu {

// True when ATEN_CPU_CAPABILITY keeps PyTorch itself below AVX-512 ("default" or "avx2"): our AVX-512
// paths stay off by default then too.
inline bool aten_capability_below_avx512() { return switches().aten_below_avx512; }

// True when DARE_KERNELS_CPU_ISA=avx2 asks for the build's at::vec paths.
inline bool dare_isa_is_avx2() { return switches().cpu_isa == Switches::CpuIsa::kAvx2; }

}  // namespace dare::cpu
