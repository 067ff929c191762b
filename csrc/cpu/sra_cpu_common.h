// Shared helpers of the CPU SRA attention kernels (docs/SPEC.md §1): switches as the kernels see them, row
// helpers (at::vec), strided views and block conversion, GEMM operands, scheduling and block sizes, the
// block products. Forward in sra_cpu_fwd.cpp, backward in sra_cpu_bwd.cpp, the entry points (checks,
// allocation, launch) in python/cpu/sra_attention_cpu.cpp. Mirrors csrc/cuda/sra_common.cuh.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <limits>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/cpu_blas.h"
#include "cpu/sra_bf16_dot.h"
#include "cpu/sra_brgemm16.h"

namespace dare::cpu::sra {

using at::vec::Vectorized;

constexpr int64_t kExactMaxKeys = 1024;   // one key block (exact softmax) up to this many keys
constexpr int64_t kKeyBlock = 512;        // key block of the online softmax
constexpr int64_t kBf16MapRows = 128;     // query rows of a map task with the bf16 products (pick_blocks)

// Non-temporal output threshold in bytes (DARE_KERNELS_CPU_STREAM_OUT_BYTES, switches.h).
int64_t stream_out_bytes();
// Score block budget in elements (DARE_KERNELS_CPU_SCORE_BLOCK, switches.h); default_score_budget() says
// whether it is the default (the bf16 map rows are tuned for that one).
int64_t score_budget();
bool default_score_budget();

// bf16 inputs: block products in bf16 with AVX512-BF16 (sra_bf16_dot.h) when the CPU has it.
// DARE_KERNELS_CPU_BF16_DOT: unset / "auto" / "1": S = Q·K^T and O += P·V in bf16 ("1" fails on a CPU
// without AVX512-BF16); "qk": only S in bf16; "0": the fp32 products. DARE_KERNELS_CPU_ISA=avx2 turns it
// off as well, and so does ATEN_CPU_CAPABILITY=default|avx2 unless "1".
struct Bf16DotMode {
  bool qk = false, pv = false;
};
Bf16DotMode bf16_dot_mode();

// bf16 / fp16 inputs: the block products through cpublas::brgemm (sra_brgemm16.h), or kNone for our own
// products (bf16_dot_mode / fp32). DARE_KERNELS_CPU_GEMM: auto = kPacked where brg16::could_pack(t), unless
// DARE_KERNELS_CPU_ISA=avx2, ATEN_CPU_CAPABILITY=default|avx2 or DARE_KERNELS_CPU_BLAS=fallback; brgemm =
// kPacked where the CPU packs, else kPlain; native = kNone. Other dtypes: kNone.
brg16::Mode reduced_gemm_mode(at::ScalarType t);

// "<rows ISA> / <product kernel>" of the SRA forward for inputs of dtype t as the switches stand now,
// e.g. "avx2 / cpublas::brgemm (amx, packed)" (what `dare-kernels info` prints).
std::string cpu_sra_path(at::ScalarType t);

// fp32 inputs: the exact softmax rows in one AVX-512 pass where the CPU has AVX-512 F/BW/VL, unless
// DARE_KERNELS_CPU_ISA=avx2 or ATEN_CPU_CAPABILITY=default|avx2 (those give the at::vec row helpers of the
// build, AVX2). The pass is built twice from one source: bf16dot::softmax_rows (with AVX512-BF16) and
// rows512::softmax_rows (without it, for CPUs that lack it), bitwise the same for fp32.
// DARE_KERNELS_CPU_ROWS=avx512f takes the second on a CPU that has both (to test it).
enum class F32Rows { Vec, Avx512Bf16, Avx512F };
F32Rows f32_rows_path();

// Allocator of 64-byte aligned storage for the per-thread block buffers. glibc returns large blocks 16 bytes
// past a page boundary, so rows of a plain std::vector<float> straddle cache lines on every other 32-byte
// load; GEMM operands (converted Q / K / V rows, K^T, the brgemm panels) and score rows then start on
// whole lines, as the tensors PyTorch allocates do.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const noexcept { return false; }
};
template <typename T>
using AVec = std::vector<T, Aligned64<T>>;

inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// ---------------------------------------------------------------------------------------------
// row helpers (vectorised with at::vec)
// ---------------------------------------------------------------------------------------------

// max(s + bias) (bias optional); s is only read (the exp pass adds the bias again)
template <typename T>
T biased_max(const T* s, const T* bias, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec vmax0(neg_inf<T>()), vmax1(neg_inf<T>());
  int64_t j = 0;
  if (bias != nullptr) {
    for (; j + 2 * W <= n; j += 2 * W) {
      vmax0 = at::vec::maximum(vmax0, Vec::loadu(s + j) + Vec::loadu(bias + j));
      vmax1 = at::vec::maximum(vmax1, Vec::loadu(s + j + W) + Vec::loadu(bias + j + W));
    }
    for (; j + W <= n; j += W) vmax0 = at::vec::maximum(vmax0, Vec::loadu(s + j) + Vec::loadu(bias + j));
  } else {
    for (; j + 2 * W <= n; j += 2 * W) {
      vmax0 = at::vec::maximum(vmax0, Vec::loadu(s + j));
      vmax1 = at::vec::maximum(vmax1, Vec::loadu(s + j + W));
    }
    for (; j + W <= n; j += W) vmax0 = at::vec::maximum(vmax0, Vec::loadu(s + j));
  }
  if (j < n) {  // tail as one partial vector (padding lanes -inf)
    const int64_t rem = n - j;
    Vec x = Vec::loadu(s + j, rem);
    if (bias != nullptr) x = x + Vec::loadu(bias + j, rem);
    vmax0 = at::vec::maximum(vmax0, Vec::set(Vec(neg_inf<T>()), x, rem));
  }
  vmax0 = at::vec::maximum(vmax0, vmax1);
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax0);
}

// s = exp(s + bias - m) (bias optional); returns the sum
template <typename T>
T exp_sum(T* s, const T* bias, int64_t n, T m) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vm(m);
  Vec vsum(T(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec x = Vec::loadu(s + j);
    if (bias != nullptr) x = x + Vec::loadu(bias + j);
    x = vexp(x - vm);
    x.store(s + j);
    vsum = vsum + x;
  }
  if (j < n) {  // tail as one partial vector (padding lanes excluded from the sum)
    const int64_t rem = n - j;
    Vec x = Vec::loadu(s + j, rem);
    if (bias != nullptr) x = x + Vec::loadu(bias + j, rem);
    x = vexp(x - vm);
    x.store(s + j, rem);
    vsum = vsum + Vec::set(Vec(T(0)), x, rem);
  }
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, vsum);
}

template <typename T>
void scale_row(T* x, int64_t n, T a) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec va(a);
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

// y += a * x
template <typename T>
void axpy_row(T* y, const T* x, int64_t n, T a) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec va(a);
  int64_t j = 0;
  for (; j + W <= n; j += W) at::vec::fmadd(Vec::loadu(x + j), va, Vec::loadu(y + j)).store(y + j);
  for (; j < n; ++j) y[j] += a * x[j];
}

template <typename T>
void add_row(T* y, const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec::loadu(y + j) + Vec::loadu(x + j)).store(y + j);
  for (; j < n; ++j) y[j] += x[j];
}

// y += log(x), vectorised (at::vec's log: Sleef, within 1 ulp)
template <typename T>
void add_log_rows(T* y, const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec::loadu(y + j) + Vec::loadu(x + j).log()).store(y + j);
  for (; j < n; ++j) y[j] += std::log(x[j]);
}

template <typename T>
T dot_row(const T* x, const T* y, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec acc(T(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) acc = at::vec::fmadd(Vec::loadu(x + j), Vec::loadu(y + j), acc);
  T s = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < n; ++j) s += x[j] * y[j];
  return s;
}

// ---------------------------------------------------------------------------------------------
// strided operands
// ---------------------------------------------------------------------------------------------

// A [B, H, L, D] tensor addressed by element strides.
template <typename T>
struct View4 {
  T* p = nullptr;
  int64_t sb = 0, sh = 0, sl = 0, sd = 0;
  View4() = default;
  explicit View4(const at::Tensor& t)
      : p(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)), sd(t.stride(3)) {}
  T* at(int64_t b, int64_t h, int64_t l) const { return p + b * sb + h * sh + l * sl; }
};

// rows x cols block starting at src (row stride sl, column stride sd) -> dense dst (ld = cols), converted
template <typename S, typename D>
void load_block(const S* src, int64_t sl, int64_t sd, int64_t rows, int64_t cols, D* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* s = src + r * sl;
    D* d = dst + r * cols;
    if (sd == 1) {
      at::vec::convert(s, d, cols);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<D>(s[c * sd]);
    }
  }
}

// dense src (ld = ld_src) -> rows x cols block at dst (row stride sl, column stride sd), converted
template <typename S, typename D>
void store_block(const S* src, int64_t ld_src, int64_t rows, int64_t cols, D* dst, int64_t sl, int64_t sd) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* s = src + r * ld_src;
    D* d = dst + r * sl;
    if (sd == 1) {
      at::vec::convert(s, d, cols);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c * sd] = static_cast<D>(s[c]);
    }
  }
}

// Can a [B,H,L,D] tensor of dtype `acc` serve as a GEMM operand in place (unit column stride, row
// stride >= D that fits a BLAS int)? Returns the leading dimension, or -1.
int64_t gemm_ld(const at::Tensor& t, at::ScalarType acc);

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// bias [B,H,M] acc (γ·log w for valid keys, -inf for invalid) and the validity mask; undefined when
// neither weight nor mask is given.
std::pair<at::Tensor, at::Tensor> make_bias(const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& mask,
                                            double strength, int64_t B, int64_t H, int64_t M, at::ScalarType acc);

// Runs worker(next) once on each thread of an at::parallel_for; workers pull task ids from a shared
// counter until next() >= ntasks (dynamic scheduling: a thread slowed down by other load does not hold
// the others up). Every task writes only its own outputs, so results never depend on the schedule.
template <typename Worker>
void parallel_tasks(int64_t ntasks, const Worker& worker) {
  std::atomic<int64_t> counter{0};
  auto next = [&counter]() { return counter.fetch_add(1, std::memory_order_relaxed); };
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, nworkers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) worker(next);
  });
}

struct Blocks {
  int64_t bq, bk, nqb, nkb;
};

// Query block bq and key block bk. `map_cols`: columns of the map rows a forward task keeps hot besides
// the scores (the block budget is shared so both stay in L2). `max_map_rows`: cap of bq for a map task.
Blocks pick_blocks(int64_t B_tasks, int64_t N, int64_t M, int64_t min_tasks, int64_t map_cols = 0,
                   int64_t max_map_rows = 1024);

// K or V of one (batch, head) as acc-typed GEMM rows: either read in place from an acc tensor already
// usable by the GEMM, or converted from the input on demand into a per-thread buffer (kept while
// consecutive tasks use the same (b, h)), so no fp32 copy of all of K/V is ever made.
template <typename scalar_t, typename acc_t>
class OperandRows {
 public:
  // `t`: [B,H,L,Dx] tensor, either acc-typed with gemm_ld >= 0 (direct) or of dtype scalar_t (converted)
  explicit OperandRows(const at::Tensor& t) : L_(t.size(2)), Dx_(t.size(3)), ld_(gemm_ld(t, acc_scalar())) {
    if (ld_ >= 0) {
      direct_ = View4<const acc_t>(t);
    } else {
      src_ = View4<const scalar_t>(t);
    }
  }
  int64_t ld() const { return ld_ >= 0 ? ld_ : Dx_; }
  // pointer to row 0 of (b, h); `buf` and `cached` are the calling thread's buffer and its (b, h) key
  const acc_t* rows(int64_t b, int64_t h, int64_t H, AVec<acc_t>& buf, int64_t& cached) const {
    if (ld_ >= 0) return direct_.at(b, h, 0);
    const int64_t key = b * H + h;
    if (cached != key) {
      buf.resize(L_ * Dx_);
      load_block(src_.at(b, h, 0), src_.sl, src_.sd, L_, Dx_, buf.data());
      cached = key;
    }
    return buf.data();
  }

 private:
  static at::ScalarType acc_scalar() { return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat; }
  int64_t L_, Dx_, ld_;
  View4<const acc_t> direct_;
  View4<const scalar_t> src_;
};

// dst [cols x rows] row-major = a · src^T, src [rows x cols] with row stride ld: 8 x 8 tiles through
// at::vec's register transpose, the edges element-wise, then one scaling pass (skipped for a == 1)
template <typename acc_t>
void transpose_rows(const acc_t* src, int64_t ld, int64_t rows, int64_t cols, acc_t a, AVec<acc_t>& dst) {
  dst.resize(rows * cols);
  constexpr int64_t T = 8;
  const int64_t Rt = rows / T * T, Ct = cols / T * T;
  for (int64_t j0 = 0; j0 < Rt; j0 += T)
    for (int64_t d0 = 0; d0 < Ct; d0 += T)
      at::vec::transpose_mxn<acc_t, T, T>(src + j0 * ld + d0, ld, dst.data() + d0 * rows + j0, rows);
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t d_begin = j < Rt ? Ct : 0;  // tiles covered [0, Ct) of the first Rt rows
    for (int64_t d = d_begin; d < cols; ++d) dst[d * rows + j] = src[j * ld + d];
  }
  if (a != acc_t(1)) scale_row(dst.data(), rows * cols, a);
}

// rows x len rows of x (rows l0.. of (b, h)) as an acc_t GEMM operand: read in place when ld_direct >= 0
// (gemm_ld() of a tensor that already has the acc dtype), else converted into buf (ld = len). Returns the
// rows and their stride.
template <typename scalar_t, typename acc_t>
std::pair<const acc_t*, int64_t> acc_rows(const View4<const scalar_t>& x, int64_t ld_direct, int64_t b, int64_t h,
                                          int64_t l0, int64_t rows, int64_t len, acc_t* buf) {
  if (ld_direct >= 0) return {reinterpret_cast<const acc_t*>(x.at(b, h, l0)), ld_direct};
  load_block(x.at(b, h, l0), x.sl, x.sd, rows, len, buf);
  return {buf, len};
}

// rows x len rows of a bf16 tensor (rows l0.. of (b, h)) as the A operand of bf16dot::gemm (pairs along the
// row): read in place when the rows are unit-stride with an even length, else copied into buf (rows x
// 2·ceil(len / 2), zero-padded to even). Returns the rows and their stride.
template <typename scalar_t>
std::pair<const uint16_t*, int64_t> bf16_pair_rows(const View4<const scalar_t>& x, int64_t b, int64_t h, int64_t l0,
                                                   int64_t rows, int64_t len, uint16_t* buf) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.at(b, h, l0));
  if (x.sd == 1 && len % 2 == 0) return {src, rows == 1 ? len : x.sl};
  const int64_t ld = len + len % 2;
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* d = buf + r * ld;
    for (int64_t c = 0; c < len; ++c) d[c] = src[r * x.sl + c * x.sd];
    if (len % 2 != 0) d[len] = 0;
  }
  return {buf, ld};
}

// c[m x n] (+)= a[m x k]·b[k x n] through brgemm, with a tail of 8 or fewer columns (n > 16) as a product of
// its own: brgemm pays a whole 16-lane product for it. Each output column's sum is the same either way
// (measured on d40/M77 fp32: P·V bitwise the same as one product, forward ~4 % faster).
inline void brgemm_f32_tail_split(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                                  int64_t ldb, float* c, int64_t ldc, bool add) {
  const int64_t tail = n > 16 && n % 16 != 0 && n % 16 <= 8 ? n % 16 : 0;
  blas::brgemm_f32(m, n - tail, k, a, lda, b, ldb, c, ldc, add);
  if (tail > 0) blas::brgemm_f32(m, tail, k, a, lda, b + (n - tail), ldb, c + (n - tail), ldc, add);
}

// The block products S = scale·Q·K^T and O (+)= P·V (the backward also takes S from here). With `brg` (fp32, oneDNN micro-kernel available) they run through
// blas::brgemm_f32 with K^T pre-scaled per (b, h) (the micro-kernel has no alpha); otherwise through
// blas::gemm with K read in place and the scale as alpha.
template <typename acc_t>
struct BlockGemms {
  bool brg = false;
  acc_t scale = 1;
  int64_t D = 0, M = 0;

  // kt (brg only): scale·K^T of one (b, h), [D x M] row-major, rebuilt when the (b, h) key changes
  void prepare(const acc_t* kp, int64_t ldk, int64_t key, AVec<acc_t>& kt, int64_t& cached) const {
    if (!brg || cached == key) return;
    transpose_rows(kp, ldk, M, D, scale, kt);
    cached = key;
  }
  // s[rows x cols] (ld = cols) = scale · Q K[j0 : j0 + cols]^T
  void scores(int64_t rows, int64_t cols, int64_t j0, const acc_t* qp, int64_t ldq, const acc_t* kp, int64_t ldk,
              const AVec<acc_t>& kt, acc_t* s, int64_t lds = 0) const {
    if (lds <= 0) lds = cols;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (brg) {
        blas::brgemm_f32(rows, cols, D, qp, ldq, kt.data() + j0, M, s, lds, false);
        return;
      }
    }
    blas::gemm(false, true, rows, cols, D, scale, qp, ldq, kp + j0 * ldk, ldk, acc_t(0), s, lds);
  }
  // o[rows x Dv] (ld = ldo) (+)= p[rows x cols] (ld = ldp, default cols) V[j0 : j0 + cols]
  void pv(int64_t rows, int64_t Dv, int64_t cols, const acc_t* p, const acc_t* vrows, int64_t ldv, bool add,
          acc_t* o, int64_t ldo, int64_t ldp = 0) const {
    if (ldp <= 0) ldp = cols;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (brg) {
        brgemm_f32_tail_split(rows, Dv, cols, p, ldp, vrows, ldv, o, ldo, add);
        return;
      }
    }
    blas::gemm(false, false, rows, Dv, cols, acc_t(1), p, ldp, vrows, ldv, add ? acc_t(1) : acc_t(0), o, ldo);
  }
};

}  // namespace dare::cpu::sra
