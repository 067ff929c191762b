// The Python module dare_kernels._C: importing it registers the ops; build_info() says how it was built.
#include <torch/extension.h>

#include "cpu/cpu_blas.h"

#ifndef DARE_KERNELS_CPU_VEC
#define DARE_KERNELS_CPU_VEC "default"
#endif
#ifndef DARE_KERNELS_TORCH_VERSION
#define DARE_KERNELS_TORCH_VERSION "unknown"
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
    d["compiler"] = __VERSION__;
    d["torch_version"] = DARE_KERNELS_TORCH_VERSION;
    d["cpu_blas"] = dare::cpu::blas::backend_name();
    return d;
  });
}
