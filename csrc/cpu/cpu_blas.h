// Row-major GEMM for the CPU kernels: the BLAS that libtorch_cpu carries (MKL's sgemm_/dgemm_ on x86
// wheels), found at run time, with a portable at::vec fallback when a torch build exports none.
#pragma once

#include <cstdint>

namespace dare::cpu::blas {

// C[m x n] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions (row strides)
// lda, ldb, ldc. op(X) = X^T when the trans flag is set. beta == 0 overwrites C (NaN in C ignored).
// Row-major operand shapes: op(A) is [m x k] (A is [k x m] when trans_a), op(B) is [k x n].
// Leading dimensions must be >= the row length of the stored operand and fit in int32.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// While alive, BLAS calls of this thread run single-threaded (the kernels parallelise themselves; a
// nested BLAS thread team on top of at::parallel_for oversubscribes the cores). No-op without MKL.
class SequentialScope {
 public:
  SequentialScope();
  ~SequentialScope();
  SequentialScope(const SequentialScope&) = delete;
  SequentialScope& operator=(const SequentialScope&) = delete;

 private:
  int previous_ = -1;
};

// oneDNN's fp32 batch-reduce GEMM micro-kernel as exported by libtorch_cpu (at::native::cpublas::brgemm):
// C[m x n] = A[m x k] B[k x n] (+ C when add_c), row-major with leading dimensions; on this AVX-512 CPU
// ~13 % faster than MKL's sgemm_ on the attention block shapes (no alpha: callers pre-scale).
// brgemm_f32_available(): the torch build has it, a one-time probe call succeeded, oneDNN is enabled
// (torch.backends.mkldnn), and neither DARE_KERNELS_CPU_BRGEMM=0 nor DARE_KERNELS_CPU_BLAS=fallback is
// set (csrc/include/switches.h). Call it on the calling thread before a parallel region, never inside one.
bool brgemm_f32_available();
void brgemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                float* c, int64_t ldc, bool add_c);
// Releases the calling thread's micro-kernel context (call once per worker after its last brgemm_f32).
void brgemm_f32_release();

// Which implementation runs: "sgemm_ (libtorch_cpu)" or "at::vec fallback".
const char* backend_name();

}  // namespace dare::cpu::blas
