// The Python module dare_kernels._C: importing it registers the ops; build_info() says how it was built,
// cpu_switches() / reload_cpu_switches() read the run-time switch table (csrc/include/switches.h).
#include <torch/extension.h>

#include "cpu/cpu_blas.h"
#include "cpu/sra_attention.h"
#include "switches.h"

#ifndef DARE_KERNELS_CPU_VEC
#define DARE_KERNELS_CPU_VEC "default"
#endif
#ifndef DARE_KERNELS_TORCH_VERSION
#define DARE_KERNELS_TORCH_VERSION "unknown"
#endif
#ifndef DARE_KERNELS_CPU_ISA_REQUIRED
#define DARE_KERNELS_CPU_ISA_REQUIRED ""
#endif
#ifndef DARE_KERNELS_CUDA_ARCHS
#define DARE_KERNELS_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "dare_kernels compiled kernels (ops live under torch.ops.dare_kernels)";
  m.def("build_info", []() {
    pybind11::dict d;
#ifdef DARE_KERNELS_WITH_CUDA
    d["with_cuda"] = true;
#else
    d["with_cuda"] = false;
#endif
    d["cuda_archs"] = DARE_KERNELS_CUDA_ARCHS;
    d["cpu_vec"] = DARE_KERNELS_CPU_VEC;
    // x86 instruction-set extensions the whole binary is compiled for ("avx2+fma+f16c"; "" when it needs
    // none beyond the target's baseline, e.g. aarch64): a CPU without them must not load it (SIGILL)
    d["cpu_isa_required"] = DARE_KERNELS_CPU_ISA_REQUIRED;
    d["compiler"] = __VERSION__;
    d["torch_version"] = DARE_KERNELS_TORCH_VERSION;
    d["cpu_blas"] = dare::cpu::blas::backend_name();
    return d;
  });
  m.def(
      "cpu_switches",
      []() {
        pybind11::dict d;
        for (const auto& [name, value] : dare::describe_switches()) d[pybind11::str(name)] = value;
        return d;
      },
      "The C++ kernels' run-time switches {environment name: value in effect} (parsed once, cached).");
  m.def(
      "cpu_paths",
      []() {
        pybind11::dict d;
        for (const auto t : {at::kFloat, at::kBFloat16, at::kHalf}) d[c10::toString(t)] = dare::cpu::sra_cpu_path(t);
        return d;
      },
      "The CPU SRA forward's path per dtype {Float, BFloat16, Half: \"<rows ISA> / <product kernel>\"} now.");
  m.def("reload_cpu_switches", &dare::reload_switches,
        "Parses the switches' environment variables again (call after changing os.environ).");
}
