// Row-major GEMM for the CPU kernels (see cpu_blas.h).
//
// libtorch_cpu on x86 links MKL statically and exports its Fortran entry points (sgemm_, dgemm_), but not
// the C++ at::native::cpublas::gemm overloads that would reach them. Linking those symbols directly would
// make the extension fail to load on a torch build without them, so they are looked up at run time in the
// library that holds libtorch's own symbols; when absent, a portable at::vec loop nest computes the product.
// DARE_KERNELS_CPU_BLAS=fallback forces the fallback (used by the tests).
#include "cpu/cpu_blas.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <climits>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#define DARE_HAVE_DLFCN 1
#endif

#include "switches.h"

namespace dare::cpu::blas {
namespace {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*,
                          const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);

using set_threads_local_fn = int (*)(int);

struct Fns {
  sgemm_fn s = nullptr;
  dgemm_fn d = nullptr;
  set_threads_local_fn set_threads_local = nullptr;  // MKL_Set_Num_Threads_Local (C interface)
};

Fns load() {
  Fns f;
#ifdef DARE_HAVE_DLFCN
  // the library that defines at::get_num_threads is libtorch_cpu
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) != 0 && info.dli_fname != nullptr) {
    if (void* h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) {
      f.s = reinterpret_cast<sgemm_fn>(dlsym(h, "sgemm_"));
      f.d = reinterpret_cast<dgemm_fn>(dlsym(h, "dgemm_"));
      f.set_threads_local = reinterpret_cast<set_threads_local_fn>(dlsym(h, "MKL_Set_Num_Threads_Local"));
    }
  }
  if (f.s == nullptr) f.s = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "sgemm_"));
  if (f.d == nullptr) f.d = reinterpret_cast<dgemm_fn>(dlsym(RTLD_DEFAULT, "dgemm_"));
#endif
  return f;
}

// the symbols are looked up once; DARE_KERNELS_CPU_BLAS=fallback (switches.h) hides them
const Fns& fns() {
  static const Fns loaded = load();
  static const Fns none{};
  return switches().blas_fallback ? none : loaded;
}

bool fits_int(int64_t x) { return x >= 0 && x <= INT_MAX; }

// Portable row-major GEMM: rows of C are built with vectorised axpy (op(B) = B) or dot products (op(B) = B^T).
template <typename T>
void gemm_fallback(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                   const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  auto a_at = [&](int64_t i, int64_t p) { return ta ? a[p * lda + i] : a[i * lda + p]; };
  for (int64_t i = 0; i < m; ++i) {
    T* crow = c + i * ldc;
    if (!tb) {
      if (beta == T(0)) {
        std::fill(crow, crow + n, T(0));
      } else if (beta != T(1)) {
        for (int64_t j = 0; j < n; ++j) crow[j] *= beta;
      }
      for (int64_t p = 0; p < k; ++p) {
        const T s = alpha * a_at(i, p);
        const T* brow = b + p * ldb;
        const Vec vs(s);
        int64_t j = 0;
        for (; j + W <= n; j += W) {
          at::vec::fmadd(vs, Vec::loadu(brow + j), Vec::loadu(crow + j)).store(crow + j);
        }
        for (; j < n; ++j) crow[j] += s * brow[j];
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const T* brow = b + j * ldb;  // op(B)[:, j] = row j of B
        T acc = 0;
        if (!ta) {
          const T* arow = a + i * lda;
          Vec vacc(T(0));
          int64_t p = 0;
          for (; p + W <= k; p += W) vacc = at::vec::fmadd(Vec::loadu(arow + p), Vec::loadu(brow + p), vacc);
          acc = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, vacc);
          for (; p < k; ++p) acc += arow[p] * brow[p];
        } else {
          for (int64_t p = 0; p < k; ++p) acc += a_at(i, p) * brow[p];
        }
        crow[j] = alpha * acc + (beta == T(0) ? T(0) : beta * crow[j]);
      }
    }
  }
}

template <typename T, typename Fn>
bool try_blas(Fn fn, bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
              const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (fn == nullptr) return false;
  // row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T on the same memory
  const int64_t a_row = ta ? m : k, b_row = tb ? k : n;
  if (!(fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) && fits_int(ldc))) return false;
  if (lda < std::max<int64_t>(1, a_row) || ldb < std::max<int64_t>(1, b_row) || ldc < std::max<int64_t>(1, n)) return false;
  const char opb = tb ? 'T' : 'N', opa = ta ? 'T' : 'N';
  const int M_ = static_cast<int>(n), N_ = static_cast<int>(m), K_ = static_cast<int>(k);
  const int lb = static_cast<int>(ldb), la = static_cast<int>(lda), lc = static_cast<int>(ldc);
  fn(&opb, &opa, &M_, &N_, &K_, &alpha, b, &lb, a, &la, &beta, c, &lc);
  return true;
}

// the BLAS entry point for T (null when absent or hidden)
sgemm_fn blas_entry(float) { return fns().s; }
dgemm_fn blas_entry(double) { return fns().d; }

// The body of both public overloads: k == 0 only scales C by beta, otherwise BLAS when it is there and
// takes the shapes, else the portable fallback.
template <typename T>
void gemm_rows(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  if (try_blas<T>(blas_entry(T()), ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) return;
  gemm_fallback<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_rows<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_rows<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

namespace {
#ifdef CPUBLAS_BRGEMM_F32F32F32
// one small product through the micro-kernel, compared with a plain loop: false when the call throws
// (no supported ISA, oneDNN micro-kernels not built) or the result is wrong
bool probe_brgemm() {
  try {
    constexpr int64_t m = 5, n = 19, k = 7;
    float a[m * k], b[k * n], c[m * n];
    for (int64_t i = 0; i < m * k; ++i) a[i] = static_cast<float>((i * 7) % 11) - 5.f;
    for (int64_t i = 0; i < k * n; ++i) b[i] = static_cast<float>((i * 5) % 13) - 6.f;
    at::native::cpublas::brgemm(m, n, k, k, n, n, false, a, b, c, false);
    at::native::cpublas::brgemm_release(false);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        float ref = 0.f;
        for (int64_t p = 0; p < k; ++p) ref += a[i * k + p] * b[p * n + j];
        if (c[i * n + j] != ref) return false;  // small integers: exact in any summation order
      }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}
#endif
}  // namespace

bool brgemm_f32_available() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  static const bool probed = probe_brgemm();
  return probed && at::globalContext().userEnabledMkldnn() && switches().brgemm && !switches().blas_fallback;
#else
  return false;
#endif
}

void brgemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                float* c, int64_t ldc, bool add_c) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!add_c)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
    return;
  }
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add_c, a, b, c, false);
#else
  gemm(false, false, m, n, k, 1.f, a, lda, b, ldb, add_c ? 1.f : 0.f, c, ldc);
#endif
}

void brgemm_f32_release() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm_release(false);
#endif
}

SequentialScope::SequentialScope() {
  if (auto fn = fns().set_threads_local) previous_ = fn(1);
}

SequentialScope::~SequentialScope() {
  if (auto fn = fns().set_threads_local; fn != nullptr && previous_ >= 0) fn(previous_);
}

const char* backend_name() { return fns().s != nullptr ? "sgemm_ (libtorch_cpu)" : "at::vec fallback"; }

}  // namespace dare::cpu::blas
