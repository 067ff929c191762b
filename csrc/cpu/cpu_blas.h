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

// Which implementation runs: "sgemm_ (libtorch_cpu)" or "at::vec fallback".
const char* backend_name();

}  // namespace dare::cpu::blas
