// SRA attention on CPU (SPEC.md §1): fused forward and backward.
//
// Forward: without a map, one task per (batch, head, query block), ordered so that consecutive tasks
// share K/V; with a map, one task per (batch, query block) with a loop over heads inside, so the
// head-averaged map rows of that query block are owned by the task and summed in head order
// (deterministic, no atomics, no [B,H,N,M] buffer). Per head and query block the scores
// S = scale·Q·K^T + bias are computed for one key block at a time; when all M keys fit one block (the
// usual cross-attention case) the softmax is exact (a read-only max pass, then exp + sum with the bias
// added on the fly), otherwise online (running max and sum, output rescaled) and the map columns are
// recomputed afterwards from the final LSE over the map key range only. O of a block accumulates in a
// dense per-thread buffer and is written once, normalised and converted, to the [B,N,H,Dv] output
// (non-temporal stores when that output is far larger than the caches); large outputs get a huge-page
// hint (cpu_memory.h).
//
// Backward: one task per (batch, head, query split); P is recomputed from the LSE, dK/dV/Σ_i dS are
// accumulated in acc precision per task and reduced over splits in a fixed order (with one split per
// (b, h), the usual case, dK/dV live in a per-thread buffer and are stored once per task: no full-size
// fp32 partials).
//
// acc = float64 for float64 inputs (so gradcheck runs on this kernel), float32 otherwise. K and V that
// the GEMM cannot read in place (other dtype, strides) are converted per (b, h) inside the tasks into a
// per-thread buffer (never a full fp32 copy of K/V); Q, dO and O are converted per block. fp32 block
// products of row-major NN form (forward S and P·V; backward S, dP, dQ) go through oneDNN's brgemm
// micro-kernel when libtorch_cpu provides it (scale·K^T and V^T built per (b, h)); the others (backward
// dV, dK), float64 and builds without it use cpu_blas (MKL's sgemm_/dgemm_ when the torch build exports
// them); softmax, exp and rescaling are vectorised with at::vec.
//
// bf16 inputs on a CPU with AVX512-BF16 (DARE_KERNELS_CPU_BF16_DOT, default auto; sra_bf16_dot.h) take
// the forward's products in bf16 instead: K and V of every (b, h) packed once into VNNI pairs, S = Q·K^T
// by vdpbf16ps (exact bf16 products, fp32 sums, scale applied to the fp32 sum), P rounded to bf16 for
// O += P·V (as PyTorch's CPU flash attention does for bf16) while the softmax sum, LSE and map use the
// fp32 P; O is scaled and rounded in one AVX-512 pass. With all keys in one block (M <= 1024) the softmax
// of a row (max, exp, sum, map row, bf16 P) is one AVX-512 pass (bf16dot::softmax_rows), O is scaled and
// rounded to bf16 in the P·V product's epilogue, and a map task takes 128 query rows (pick_blocks).
// fp32 inputs on a CPU with AVX-512 F/BW/VL use the same softmax pass (built without BF16 where the CPU
// lacks it: rows512, sra_rows_avx512.h) with P normalised, P·V then writing the output rows
// (DARE_KERNELS_CPU_ISA=avx2 or ATEN_CPU_CAPABILITY=default|avx2: the at::vec rows); fp16 inputs, and bf16
// inputs without the bf16 products, use it with P unnormalised and O scaled on the store. The bf16
// backward takes S = Q·K^T and dP = dO·V^T by vdpbf16ps as well (K and V packed per task).
#include "cpu/sra_attention.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cpu/cpu_blas.h"
#include "cpu/cpu_isa.h"
#include "cpu/cpu_memory.h"
#include "cpu/sra_bf16_dot.h"
#include "cpu/sra_rows_avx512.h"

namespace dare::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kExactMaxKeys = 1024;   // one key block (exact softmax) up to this many keys
constexpr int64_t kKeyBlock = 512;        // key block of the online softmax
constexpr int64_t kStreamOutBytes = int64_t(48) << 20;  // outputs from this size written non-temporally

// Non-temporal output threshold; DARE_KERNELS_CPU_STREAM_OUT_BYTES overrides it (read on every call: the
// tests set it to 0 to run the streaming stores on small outputs).
int64_t stream_out_bytes() {
  const char* env = std::getenv("DARE_KERNELS_CPU_STREAM_OUT_BYTES");
  return env != nullptr ? std::atoll(env) : kStreamOutBytes;
}
constexpr int64_t kScoreBudget = 262144;  // elements of score block + map rows of a task: 1 MiB fp32 (L2)
constexpr int64_t kBf16MapRows = 128;     // query rows of a map task with the bf16 products (pick_blocks)

// Score block budget; DARE_KERNELS_CPU_SCORE_BLOCK overrides it (a tuning knob for other caches; read on
// every call so that block sizes can be compared side by side in one process).
int64_t score_budget() {
  const char* env = std::getenv("DARE_KERNELS_CPU_SCORE_BLOCK");
  const int64_t x = env != nullptr ? std::atoll(env) : 0;
  return x >= 1024 ? x : kScoreBudget;
}

// bf16 inputs: block products in bf16 with AVX512-BF16 (sra_bf16_dot.h) when the CPU has it.
// DARE_KERNELS_CPU_BF16_DOT (read on every call): unset / "auto" / "1": S = Q·K^T and O += P·V in bf16
// ("1" fails on a CPU without AVX512-BF16); "qk": only S in bf16; "0": the fp32 products.
// DARE_KERNELS_CPU_ISA=avx2 turns it off as well, and so does ATEN_CPU_CAPABILITY=default|avx2 unless "1".
struct Bf16DotMode {
  bool qk = false, pv = false;
};
Bf16DotMode bf16_dot_mode() {
  static const bool hw = bf16dot::supported();
  const char* env = std::getenv("DARE_KERNELS_CPU_BF16_DOT");
  const std::string v = env != nullptr ? env : "auto";
  TORCH_CHECK(v == "auto" || v == "0" || v == "1" || v == "qk" || v.empty(),
              "DARE_KERNELS_CPU_BF16_DOT must be auto, 0, 1 or qk, got '", v, "'");
  if (v == "0" || dare_isa_is_avx2()) return {};
  TORCH_CHECK(hw || v == "auto" || v.empty(), "DARE_KERNELS_CPU_BF16_DOT=", v,
              " but this CPU (or OS, or compiler) lacks AVX-512 F/BW/VL/BF16");
  if (!hw) return {};
  // auto / qk: also kept off where PyTorch itself is kept below AVX-512
  if (v != "1" && aten_capability_below_avx512()) return {};
  return {true, v != "qk"};
}

// fp32 inputs: the exact softmax rows in one AVX-512 pass where the CPU has AVX-512 F/BW/VL, unless
// DARE_KERNELS_CPU_ISA=avx2 or ATEN_CPU_CAPABILITY=default|avx2 (those give the at::vec row helpers of the
// build, AVX2). The pass is built twice from one source: bf16dot::softmax_rows (with AVX512-BF16) and
// rows512::softmax_rows (without it, for CPUs that lack it), bitwise the same for fp32.
// DARE_KERNELS_CPU_ROWS=avx512f takes the second on a CPU that has both (to test it). Read on every call.
enum class F32Rows { Vec, Avx512Bf16, Avx512F };
F32Rows f32_rows_path() {
  static const bool hw_bf16 = bf16dot::supported(), hw_f = rows512::supported();
  const char* env = std::getenv("DARE_KERNELS_CPU_ROWS");
  const std::string v = env != nullptr ? env : "auto";
  TORCH_CHECK(v == "auto" || v == "avx512f" || v.empty(), "DARE_KERNELS_CPU_ROWS must be auto or avx512f, got '",
              v, "'");
  if (!hw_f || dare_isa_is_avx2() || aten_capability_below_avx512()) return F32Rows::Vec;
  return hw_bf16 && v != "avx512f" ? F32Rows::Avx512Bf16 : F32Rows::Avx512F;
}

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
int64_t gemm_ld(const at::Tensor& t, at::ScalarType acc) {
  if (t.scalar_type() != acc) return -1;
  const int64_t L = t.size(2), D = t.size(3);
  if (D != 1 && t.stride(3) != 1) return -1;
  const int64_t ld = L == 1 ? D : t.stride(2);
  if (ld < D || ld > INT_MAX) return -1;
  for (int d = 0; d < 2; ++d)
    if (t.stride(d) < 0) return -1;
  return ld;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// bias [B,H,M] acc (γ·log w for valid keys, -inf for invalid) and the validity mask; undefined when
// neither weight nor mask is given.
std::pair<at::Tensor, at::Tensor> make_bias(const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& mask,
                                            double strength, int64_t B, int64_t H, int64_t M, at::ScalarType acc) {
  const bool has_w = w.has_value() && w->defined();
  const bool has_mask = mask.has_value() && mask->defined();
  if (!has_w && !has_mask) return {};
  auto opts = at::TensorOptions().dtype(acc).device(at::kCPU);
  at::Tensor valid;
  if (has_mask) valid = mask->to(at::kBool).unsqueeze(1).expand({B, H, M});
  at::Tensor bias;
  if (has_w) {
    at::Tensor wf = w->to(acc).expand({B, H, M});
    at::Tensor pos = wf > 0;
    valid = valid.defined() ? (valid & pos) : pos;
    at::Tensor safe = at::where(valid, wf, at::ones({}, opts));
    bias = at::where(valid, at::log(safe) * strength, at::full({}, neg_inf<double>(), opts));
  } else {
    bias = at::where(valid, at::zeros({}, opts), at::full({}, neg_inf<double>(), opts));
  }
  return {bias.contiguous(), valid.contiguous()};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "sra_attention (cpu): query, key, value must be 4-D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "sra_attention (cpu): tensors must be on the CPU");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "sra_attention (cpu): query, key and value must share a dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "sra_attention (cpu): key must be [B, H, M, D] matching query");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == k.size(2),
              "sra_attention (cpu): value must be [B, H, M, Dv] matching key");
}

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
// the scores (the block budget is shared so both stay in L2).
// `max_map_rows`: cap of bq for a map task.
Blocks pick_blocks(int64_t B_tasks, int64_t N, int64_t M, int64_t min_tasks, int64_t map_cols = 0,
                   int64_t max_map_rows = 1024) {
  Blocks b{};
  b.bk = M <= kExactMaxKeys ? std::max<int64_t>(M, 1) : kKeyBlock;
  if (map_cols > 0) {
    // a map task loops over every head with its query rows: larger blocks amortise each head's K/V and
    // map-row traffic (measured on d128/M512 fp32: 1024 rows ~7 % faster than 256), at twice the score
    // budget. The bf16 products (K/V of a head packed in bf16, P rounded in the softmax pass) prefer 128
    // rows (scores, P, map and output rows of a head stay in L1/L2; d40/M77 and d128/M512: ~10 % faster).
    b.bq = std::clamp<int64_t>(std::min(2 * score_budget() / b.bk, max_map_rows), 16, 1024);
  } else {
    b.bq = std::clamp<int64_t>(score_budget() / b.bk, 16, 512);
  }
  while (b.bq > 16 && B_tasks * ((N + b.bq - 1) / b.bq) < min_tasks) b.bq /= 2;
  b.bq = std::max<int64_t>(1, std::min(b.bq, N));
  b.nqb = (N + b.bq - 1) / b.bq;
  b.nkb = (M + b.bk - 1) / b.bk;
  return b;
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// rows x cols acc block (ld = cols) -> rows of dst (row stride sl, unit columns), each row multiplied by
// row_scale[r] and converted to the output dtype on the way. `stream`: fp32 rows aligned to 32 bytes are
// written with non-temporal stores (an output much larger than the caches is not read back by this call,
// and the stores then skip the read-for-ownership of every line); the caller fences before returning.
template <typename acc_t, typename scalar_t>
void store_rows_scaled(acc_t* src, int64_t rows, int64_t cols, const acc_t* row_scale, scalar_t* dst, int64_t sl,
                       bool stream) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* s = src + r * cols;
    scalar_t* d = dst + r * sl;
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      using Vec = Vectorized<acc_t>;
      constexpr int64_t W = Vec::size();
      const Vec va(row_scale[r]);
      int64_t j = 0;
#if defined(__AVX__)
      if constexpr (std::is_same_v<acc_t, float>) {
        if (stream && reinterpret_cast<uintptr_t>(d) % 32 == 0) {
          const __m256 vs = _mm256_set1_ps(row_scale[r]);
          for (; j + 8 <= cols; j += 8) _mm256_stream_ps(d + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), vs));
        }
      }
#endif
      for (; j + W <= cols; j += W) (Vec::loadu(s + j) * va).store(d + j);
      for (; j < cols; ++j) d[j] = s[j] * row_scale[r];
    } else {
      scale_row(s, cols, row_scale[r]);
      at::vec::convert(s, d, cols);
    }
  }
}

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
  const acc_t* rows(int64_t b, int64_t h, int64_t H, std::vector<acc_t>& buf, int64_t& cached) const {
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
void transpose_rows(const acc_t* src, int64_t ld, int64_t rows, int64_t cols, acc_t a, std::vector<acc_t>& dst) {
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

// The forward's two block products. With `brg` (fp32, oneDNN micro-kernel available) they run through
// blas::brgemm_f32 with K^T pre-scaled per (b, h) (the micro-kernel has no alpha); otherwise through
// blas::gemm with K read in place and the scale as alpha.
template <typename acc_t>
struct FwdGemms {
  bool brg = false;
  acc_t scale = 1;
  int64_t D = 0, M = 0;

  // kt (brg only): scale·K^T of one (b, h), [D x M] row-major, rebuilt when the (b, h) key changes
  void prepare(const acc_t* kp, int64_t ldk, int64_t key, std::vector<acc_t>& kt, int64_t& cached) const {
    if (!brg || cached == key) return;
    transpose_rows(kp, ldk, M, D, scale, kt);
    cached = key;
  }
  // s[rows x cols] (ld = cols) = scale · Q K[j0 : j0 + cols]^T
  void scores(int64_t rows, int64_t cols, int64_t j0, const acc_t* qp, int64_t ldq, const acc_t* kp, int64_t ldk,
              const std::vector<acc_t>& kt, acc_t* s, int64_t lds = 0) const {
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

template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& query, const at::Tensor& k_op, const at::Tensor& v_op, const at::Tensor& bias,
                    double scale_d, int64_t map_start, int64_t map_stop, at::Tensor& out, at::Tensor& lse,
                    at::Tensor& amap) {
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  const int64_t M = k_op.size(2), Dv = v_op.size(3);
  const int64_t Mm = map_stop - map_start;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t inv_h = acc_t(1) / static_cast<acc_t>(H);
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;

  const View4<const scalar_t> qv(query);
  const OperandRows<scalar_t, acc_t> kops(k_op), vops(v_op);
  const int64_t ldk = kops.ld(), ldv = vops.ld();
  const int64_t ldq_direct = kSame ? gemm_ld(query, query.scalar_type()) : -1;
  const acc_t* bias_p = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  scalar_t* out_p = out.data_ptr<scalar_t>();  // [B, N, H, Dv] memory
  acc_t* lse_p = lse.data_ptr<acc_t>();        // [B, H, N]
  acc_t* map_p = Mm > 0 ? amap.data_ptr<acc_t>() : nullptr;  // [B, N, Mm]

  // With a map a task owns its query rows for every head (the head average is summed in the task);
  // without one, tasks are (batch, head, query block), ordered so that consecutive tasks share K/V.
  const int64_t heads_per_task = Mm > 0 ? H : 1, head_groups = H / heads_per_task;
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  Bf16DotMode bdot;
  if constexpr (kBf16) bdot = bf16_dot_mode();
  const int64_t max_map_rows = bdot.qk && score_budget() == kScoreBudget ? kBf16MapRows : 1024;
  const Blocks blk = pick_blocks(B * head_groups, N, M, 4 * at::get_num_threads(), Mm, max_map_rows);
  const int64_t bq = blk.bq, bk = blk.bk, nqb = blk.nqb;
  const bool exact = blk.nkb == 1;

  const bool stream_out = out.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= stream_out_bytes();
  const int64_t ntasks = B * head_groups * nqb;
  FwdGemms<acc_t> gemms;
  gemms.scale = scale;
  gemms.D = D;
  gemms.M = M;
  if constexpr (std::is_same_v<acc_t, float>) gemms.brg = blas::brgemm_f32_available();

  // bf16 inputs on a CPU with AVX512-BF16: K (and V for the P·V product) of every (b, h) packed once
  // into VNNI pairs (sra_bf16_dot.h): K as [ceil(D/2)][ldkp][2] (pairs along D; ldkp leaves room for the
  // 32-column tile at any map start), V as [ceil(M/2)][ldvp][2] (pairs along M); Q rows copied per block
  // as bf16 with D padded to even, P rounded to bf16 (to nearest even) for P·V. The map and the softmax
  // use the fp32 P.
  const int64_t kpairs = (D + 1) / 2, ldkp = bf16dot::round_up(M, bf16dot::kTileN) + bf16dot::kTileN;
  const int64_t vpairs = (M + 1) / 2, ldvp = bf16dot::round_up(Dv, bf16dot::kTileN);
  const int64_t ksz = kpairs * ldkp * 2, vsz = vpairs * ldvp * 2;
  at::Tensor kpack, vpack;
  if (bdot.qk) {
    const View4<const scalar_t> kv(k_op), vv(v_op);
    kpack = at::empty({B * H * ksz}, query.options().dtype(at::kShort));
    if (bdot.pv) vpack = at::empty({B * H * vsz}, query.options().dtype(at::kShort));
    uint16_t* kd = reinterpret_cast<uint16_t*>(kpack.data_ptr());
    uint16_t* vd = bdot.pv ? reinterpret_cast<uint16_t*>(vpack.data_ptr()) : nullptr;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        bf16dot::pack_pairs(reinterpret_cast<const uint16_t*>(kv.at(b, h, 0)), kv.sd, kv.sl, D, M, kd + bh * ksz, ldkp);
        if (vd != nullptr)
          bf16dot::pack_pairs(reinterpret_cast<const uint16_t*>(vv.at(b, h, 0)), vv.sl, vv.sd, M, Dv, vd + bh * vsz,
                              ldvp);
      }
    });
  }
  // bf16 products (or fp32 inputs with f32_rows_path() AVX-512) with all keys in one block: the softmax, map rows
  // (and bf16 P) of a head in one AVX-512 pass per row (bf16dot::softmax_rows). Score rows and the task's map rows are kept at a stride of whole 64-byte
  // lines (a masked store of one row's tail then never shares a line with the next row's loads: no stalled
  // store-to-load forwarding); the map rows of the task are summed over heads in a per-thread buffer, the
  // last head's pass writing the sum into the output rows.
  // (fp32, fp16 and bf16 without the bf16 products: the rows build f32_rows_path() names; fp16 / bf16 keep P
  // unnormalised and scale O on the store, as the at::vec rows do)
  bool fused_rows = false;
  F32Rows f32_rows = F32Rows::Vec;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (bdot.qk) {
      fused_rows = exact;
    } else {
      f32_rows = f32_rows_path();
      fused_rows = exact && f32_rows != F32Rows::Vec;
    }
  }
  // fp32 with fused rows: P normalised in the softmax pass, so P·V writes the output rows itself (a streamed
  // output: P·V into the block buffer, then the non-temporal stores with a row scale of 1, bitwise the same)
  const bool norm_p = fused_rows && std::is_same_v<scalar_t, float>;
  const int64_t lds = fused_rows ? bf16dot::round_up(M, 16) : bk;
  const int64_t ldm = bf16dot::round_up(Mm, 16);
  const uint16_t* kpack_p = bdot.qk ? reinterpret_cast<const uint16_t*>(kpack.data_ptr()) : nullptr;
  const uint16_t* vpack_p = bdot.pv ? reinterpret_cast<const uint16_t*>(vpack.data_ptr()) : nullptr;

  parallel_tasks(ntasks, [&](const auto& next) {
    blas::SequentialScope sequential_blas;
    std::vector<acc_t> ktbuf;
    int64_t kt_cached = -1;
    std::vector<uint16_t> qb16(bdot.qk ? bq * 2 * kpairs : 0), pb16(bdot.pv ? bq * (bk + 1) : 0);
    // O of a block is accumulated in a dense per-thread buffer (it stays in cache for the P·V GEMM and
    // the online rescaling) and written once, normalised and converted, to the [B,N,H,Dv] output.
    std::vector<acc_t> sbuf(bq * lds), mbuf(fused_rows && Mm > 0 ? bq * ldm : 0), qbuf(ldq_direct < 0 && !bdot.qk ? bq * D : 0), obuf(bq * Dv);
    std::vector<acc_t> row_m(bq), row_l(bq), row_scale(bq), kbuf, vbuf;
    int64_t k_cached = -1, v_cached = -1;
    for (int64_t task = next(); task < ntasks; task = next()) {
      const int64_t bg = task / nqb, b = bg / head_groups, h0 = (bg % head_groups) * heads_per_task;
      const int64_t i0 = (task % nqb) * bq, rows = std::min(bq, N - i0);
      acc_t* map_rows = map_p != nullptr ? map_p + (b * N + i0) * Mm : nullptr;
      if (map_rows != nullptr && !fused_rows) std::fill(map_rows, map_rows + rows * Mm, acc_t(0));
      for (int64_t h = h0; h < h0 + heads_per_task; ++h) {
        const acc_t* qp = nullptr;
        int64_t ldq = D;
        const uint16_t* q16 = qb16.data();
        int64_t ldq16 = 2 * kpairs;
        if (bdot.qk) {  // Q rows as bf16 pairs
          std::tie(q16, ldq16) = bf16_pair_rows(qv, b, h, i0, rows, D, qb16.data());
        } else if (ldq_direct >= 0) {
          qp = reinterpret_cast<const acc_t*>(qv.at(b, h, i0));
          ldq = ldq_direct;
        } else {
          load_block(qv.at(b, h, i0), qv.sl, qv.sd, rows, D, qbuf.data());
          qp = qbuf.data();
          ldq = D;
        }
        const acc_t* kp = nullptr;
        if (!bdot.qk) {
          kp = kops.rows(b, h, H, kbuf, k_cached);
          gemms.prepare(kp, ldk, b * H + h, ktbuf, kt_cached);
        }
        const acc_t* vp = bdot.pv ? nullptr : vops.rows(b, h, H, vbuf, v_cached);
        const int64_t bh = b * H + h;
        // s[rows x cols] (ld = cols, or ld_s for the bf16 products) = scale · Q K[j0 : j0 + cols]^T
        auto scores = [&](int64_t cols, int64_t j0, acc_t* s, int64_t ld_s = 0) {
          if constexpr (kBf16) {
            if (bdot.qk) {
              bf16dot::gemm(rows, cols, kpairs, q16, ldq16, kpack_p + bh * ksz + j0 * 2, ldkp, scale,
                            false, s, ld_s > 0 ? ld_s : cols);
              return;
            }
          }
          gemms.scores(rows, cols, j0, qp, ldq, kp, ldk, ktbuf, s, ld_s);
        };
        // o[rows x Dv] (+)= p[rows x cols] V[j0 : j0 + cols] (j0 even)
        auto pv = [&](int64_t cols, int64_t j0, const acc_t* p, bool add, acc_t* o, int64_t ldo_) {
          if constexpr (kBf16) {
            if (bdot.pv) {
              const int64_t ldp = cols + cols % 2;
              bf16dot::to_bf16_rows(p, cols, rows, cols, pb16.data(), ldp);
              bf16dot::gemm(rows, Dv, ldp / 2, pb16.data(), ldp, vpack_p + bh * vsz + (j0 / 2) * ldvp * 2, ldvp,
                            1.0f, add, o, ldo_);
              return;
            }
          }
          gemms.pv(rows, Dv, cols, p, vp + j0 * ldv, ldv, add, o, ldo_);
        };
        const acc_t* brow = bias_p != nullptr ? bias_p + (b * H + h) * M : nullptr;
        acc_t* op = obuf.data();
        const int64_t ldo = Dv;
        acc_t* lse_rows = lse_p + (b * H + h) * N + i0;

        if (fused_rows) {  // max, exp, sum, map rows and bf16 P in one AVX-512 pass per row
          if constexpr (std::is_same_v<acc_t, float>) {
            acc_t* s = sbuf.data();
            scores(M, 0, s, lds);
            const int64_t ldp = M + M % 2;
            // map rows: the first head writes the task's buffer, the others add to it, the last one adds
            // into the output rows
            const bool first = h == h0, last = h == h0 + heads_per_task - 1;
            acc_t* map_out = map_rows == nullptr ? nullptr : last ? map_rows : mbuf.data();
            // (the bf16 products need the BF16 build, which also writes bf16 P; other inputs take the build
            // f32_rows names)
            auto* rows_pass = f32_rows == F32Rows::Avx512F ? &rows512::softmax_rows : &bf16dot::softmax_rows;
            rows_pass(s, lds, rows, M, brow, bdot.pv ? pb16.data() : nullptr, ldp, map_out, last ? Mm : ldm,
                      first ? nullptr : mbuf.data(), ldm, map_start, map_stop, inv_h, norm_p, row_m.data(),
                      row_l.data(), row_scale.data());
            std::copy_n(row_m.data(), rows, lse_rows);
            add_log_rows(lse_rows, row_l.data(), rows);
            if (bdot.pv) {  // O = P·V scaled by 1/l and rounded to bf16 straight into the output rows
              bf16dot::gemm_rows_bf16(rows, Dv, ldp / 2, pb16.data(), ldp, vpack_p + bh * vsz, ldvp, row_scale.data(),
                                      reinterpret_cast<uint16_t*>(out_p + ((b * N + i0) * H + h) * Dv), H * Dv);
              continue;  // this head's rows are done
            }
            if (norm_p && !stream_out) {  // fp32: O = (P / l)·V straight into the output rows
              if constexpr (std::is_same_v<scalar_t, float>)
                gemms.pv(rows, Dv, M, s, vp, ldv, false, out_p + ((b * N + i0) * H + h) * Dv, H * Dv, lds);
              continue;  // this head's rows are done
            }
            if (norm_p) std::fill(row_scale.begin(), row_scale.begin() + rows, acc_t(1));
            gemms.pv(rows, Dv, M, s, vp, ldv, false, op, ldo, lds);  // bf16 "qk": P·V in fp32
          }
        } else if (exact) {
          acc_t* s = sbuf.data();
          scores(M, 0, s);
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* sr = s + r * M;
            const acc_t m = biased_max(sr, brow, M);
            if (m == neg_inf<acc_t>()) {  // no valid key
              std::fill(sr, sr + M, acc_t(0));
              lse_rows[r] = neg_inf<acc_t>();
              row_scale[r] = acc_t(0);
              row_l[r] = acc_t(1);
              continue;
            }
            const acc_t l = exp_sum<acc_t>(sr, brow, M, m);  // unnormalised; O is divided by l on the store
            row_scale[r] = acc_t(1) / l;
            if (bdot.qk) {  // the bf16 path takes the logs of the block at once (below)
              lse_rows[r] = m;
              row_l[r] = l;
            } else {
              lse_rows[r] = m + std::log(l);
            }
            if (map_rows != nullptr) axpy_row(map_rows + r * Mm, sr + map_start, Mm, inv_h * row_scale[r]);
          }
          if (bdot.qk) add_log_rows(lse_rows, row_l.data(), rows);
          pv(M, 0, s, false, op, ldo);
        } else {
          std::fill(row_m.begin(), row_m.end(), neg_inf<acc_t>());
          std::fill(row_l.begin(), row_l.end(), acc_t(0));
          for (int64_t j0 = 0; j0 < M; j0 += bk) {
            const int64_t cols = std::min(bk, M - j0);
            acc_t* s = sbuf.data();
            scores(cols, j0, s);
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* sr = s + r * cols;
              const acc_t* bj = brow != nullptr ? brow + j0 : nullptr;
              const acc_t bm = biased_max(sr, bj, cols);
              const acc_t m_new = std::max(row_m[r], bm);
              acc_t* orow = op + r * ldo;
              if (m_new == neg_inf<acc_t>()) {  // nothing valid so far
                std::fill(sr, sr + cols, acc_t(0));
                if (j0 == 0) std::fill(orow, orow + Dv, acc_t(0));
                continue;
              }
              const acc_t alpha = std::exp(row_m[r] - m_new);  // 0 when row_m was -inf
              row_l[r] = row_l[r] * alpha + exp_sum<acc_t>(sr, bj, cols, m_new);
              row_m[r] = m_new;
              if (j0 == 0) {
                std::fill(orow, orow + Dv, acc_t(0));
              } else if (alpha != acc_t(1)) {
                scale_row(orow, Dv, alpha);
              }
            }
            pv(cols, j0, s, true, op, ldo);
          }
          for (int64_t r = 0; r < rows; ++r) {
            if (row_l[r] > acc_t(0)) {
              row_scale[r] = acc_t(1) / row_l[r];
              lse_rows[r] = row_m[r] + std::log(row_l[r]);
            } else {
              std::fill(op + r * ldo, op + r * ldo + Dv, acc_t(0));
              row_scale[r] = acc_t(0);
              lse_rows[r] = neg_inf<acc_t>();
            }
          }
          if (map_rows != nullptr) {  // second pass over the map key range with the final LSE
            for (int64_t j0 = map_start; j0 < map_stop; j0 += bk) {
              const int64_t cols = std::min(bk, map_stop - j0);
              acc_t* s = sbuf.data();
              scores(cols, j0, s);
              for (int64_t r = 0; r < rows; ++r) {
                if (lse_rows[r] == neg_inf<acc_t>()) continue;
                acc_t* sr = s + r * cols;
                exp_sum<acc_t>(sr, brow != nullptr ? brow + j0 : nullptr, cols, lse_rows[r]);
                axpy_row(map_rows + r * Mm + (j0 - map_start), sr, cols, inv_h);
              }
            }
          }
        }
        scalar_t* out_rows = out_p + ((b * N + i0) * H + h) * Dv;
        bool stored = false;
        if constexpr (kBf16) {
          if (bdot.qk) {  // scale and round in one AVX-512 pass (c10's rounding)
            bf16dot::store_rows_bf16(op, ldo, rows, Dv, row_scale.data(), reinterpret_cast<uint16_t*>(out_rows), H * Dv);
            stored = true;
          }
        }
        if (!stored) store_rows_scaled(op, rows, Dv, row_scale.data(), out_rows, H * Dv, stream_out);
      }
    }
#if defined(__AVX__)
    if (stream_out) _mm_sfence();  // non-temporal stores visible before the parallel region ends
#endif
    if (gemms.brg) blas::brgemm_f32_release();
  });
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

struct BwdTensors {
  // dk/dv: the outputs (written per (b, h) by the task that owns it when nsplit == 1); dk_part/dv_part:
  // per-split fp32 partials, only when nsplit > 1 (a few (b, h) split over the threads)
  at::Tensor grad_out, grad_map, grad_lse, query, k_op, v_op, out, lse, bias, dq, dk, dv, dk_part, dv_part, colsum;
};

template <typename scalar_t, typename acc_t>
void backward_kernel(const BwdTensors& t, double scale_d, int64_t map_start, int64_t map_stop, int64_t nsplit,
                     const Blocks& blk) {
  const int64_t B = t.query.size(0), H = t.query.size(1), N = t.query.size(2), D = t.query.size(3);
  const int64_t M = t.k_op.size(2), Dv = t.v_op.size(3);
  const int64_t Mm = map_stop - map_start;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t inv_h = acc_t(1) / static_cast<acc_t>(H);
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;

  const View4<const scalar_t> qv(t.query), gov(t.grad_out), ov(t.out);
  const OperandRows<scalar_t, acc_t> kops(t.k_op), vops(t.v_op);
  const View4<scalar_t> dqv(t.dq);
  const int64_t ldk = kops.ld(), ldv = vops.ld();
  const int64_t ldq_direct = kSame ? gemm_ld(t.query, t.query.scalar_type()) : -1;
  const int64_t ldgo_direct = kSame ? gemm_ld(t.grad_out, t.grad_out.scalar_type()) : -1;
  const acc_t* bias_p = t.bias.defined() ? t.bias.data_ptr<acc_t>() : nullptr;
  const acc_t* lse_p = t.lse.data_ptr<acc_t>();                                      // [B,H,N]
  const acc_t* glse_p = t.grad_lse.defined() ? t.grad_lse.data_ptr<acc_t>() : nullptr;  // [B,H,N]
  const acc_t* gmap_p = t.grad_map.defined() ? t.grad_map.data_ptr<acc_t>() : nullptr;  // [B,N,Mm]
  const bool direct_dkv = nsplit == 1;  // accumulate per task in a thread buffer, store into dk/dv at its end
  const View4<scalar_t> dkv(t.dk), dvv(t.dv);
  acc_t* dk_p = direct_dkv ? nullptr : t.dk_part.data_ptr<acc_t>();  // [nsplit,B,H,M,D]
  acc_t* dv_p = direct_dkv ? nullptr : t.dv_part.data_ptr<acc_t>();  // [nsplit,B,H,M,Dv]
  acc_t* cs_p = t.colsum.defined() ? t.colsum.data_ptr<acc_t>() : nullptr;  // [nsplit,B,H,M]

  const int64_t bq = blk.bq, bk = blk.bk, nqb = blk.nqb;
  const bool exact = blk.nkb == 1;

  // fp32: the three row-major NN-able products (S = scale·Q K^T, dP = dO V^T, dQ = scale·dS K) through
  // the brgemm micro-kernel with scale·K^T and V^T built per task; dV and dK (transposed A) stay on gemm
  FwdGemms<acc_t> gemms;
  gemms.scale = scale;
  gemms.D = D;
  gemms.M = M;
  if constexpr (std::is_same_v<acc_t, float>) gemms.brg = blas::brgemm_f32_available();
  // bf16 inputs with the bf16 products of the forward (bf16_dot_mode().qk): S = scale·Q K^T and
  // dP = dO V^T by vdpbf16ps as well. Both take bf16 operands as they are (products exact in fp32, only
  // the order of the sums differs), and S is then bitwise the S of the forward, which took the same
  // kernel. K and V of the task's (b, h) packed into VNNI pairs along D / Dv ([pairs][ldkp][2], ldkp with
  // room for a 32-column tile at any key offset); Q and dO rows read in place as pairs when their rows are
  // unit-stride with an even length, else copied per block (zero-padded to even). dV, dK, dQ stay fp32.
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  bool bdot = false;
  if constexpr (kBf16) bdot = bf16_dot_mode().qk;
  const int64_t kpairs = (D + 1) / 2, vpairs = (Dv + 1) / 2;
  const int64_t ldkp = bf16dot::round_up(M, bf16dot::kTileN) + bf16dot::kTileN;
  const int64_t ntasks = B * H * nsplit;
  parallel_tasks(ntasks, [&](const auto& next) {
    blas::SequentialScope sequential_blas;
    std::vector<acc_t> ktbuf, vtbuf;
    int64_t kt_cached = -1, vt_cached = -1;
    std::vector<uint16_t> kpack(bdot ? kpairs * ldkp * 2 : 0), vpack(bdot ? vpairs * ldkp * 2 : 0);
    std::vector<uint16_t> q16buf(bdot ? bq * 2 * kpairs : 0), go16buf(bdot ? bq * 2 * vpairs : 0);
    int64_t pack_cached = -1;
    std::vector<acc_t> qbuf(ldq_direct < 0 ? bq * D : 0), gobuf(ldgo_direct < 0 ? bq * Dv : 0);
    std::vector<acc_t> pbuf(bq * bk), dsbuf(bq * bk), dqbuf(bq * D), delta(bq), orow(exact ? 0 : Dv);
    std::vector<acc_t> kbuf, vbuf, dkbuf(direct_dkv ? M * D : 0), dvbuf(direct_dkv ? M * Dv : 0);
    int64_t k_cached = -1, v_cached = -1;
    for (int64_t task = next(); task < ntasks; task = next()) {
      const int64_t split = task % nsplit, bh = task / nsplit, b = bh / H, h = bh % H;
      const int64_t qb_begin = split * nqb / nsplit, qb_end = (split + 1) * nqb / nsplit;
      const acc_t* kp = kops.rows(b, h, H, kbuf, k_cached);
      const acc_t* vp = bdot ? nullptr : vops.rows(b, h, H, vbuf, v_cached);  // (bdot: dP reads packed V)
      if (bdot) {
        if (pack_cached != bh) {
          const View4<const scalar_t> kv(t.k_op), vv(t.v_op);
          bf16dot::pack_pairs(reinterpret_cast<const uint16_t*>(kv.at(b, h, 0)), kv.sd, kv.sl, D, M, kpack.data(), ldkp);
          bf16dot::pack_pairs(reinterpret_cast<const uint16_t*>(vv.at(b, h, 0)), vv.sd, vv.sl, Dv, M, vpack.data(), ldkp);
          pack_cached = bh;
        }
      } else {
        gemms.prepare(kp, ldk, bh, ktbuf, kt_cached);
        if (gemms.brg && vt_cached != bh) {
          transpose_rows(vp, ldv, M, Dv, acc_t(1), vtbuf);  // V^T [Dv x M]
          vt_cached = bh;
        }
      }
      const acc_t* brow = bias_p != nullptr ? bias_p + bh * M : nullptr;
      acc_t* dk = direct_dkv ? dkbuf.data() : dk_p + (split * B * H + bh) * M * D;
      acc_t* dv = direct_dkv ? dvbuf.data() : dv_p + (split * B * H + bh) * M * Dv;
      if (direct_dkv) {
        std::fill(dkbuf.begin(), dkbuf.end(), acc_t(0));
        std::fill(dvbuf.begin(), dvbuf.end(), acc_t(0));
      }
      acc_t* cs = cs_p != nullptr ? cs_p + (split * B * H + bh) * M : nullptr;

      for (int64_t qb = qb_begin; qb < qb_end; ++qb) {
        const int64_t i0 = qb * bq, rows = std::min(bq, N - i0);
        const acc_t* qp;
        const acc_t* gop;
        int64_t ldq, ldgo;
        if (ldq_direct >= 0) {
          qp = reinterpret_cast<const acc_t*>(qv.at(b, h, i0));
          ldq = ldq_direct;
        } else {
          load_block(qv.at(b, h, i0), qv.sl, qv.sd, rows, D, qbuf.data());
          qp = qbuf.data();
          ldq = D;
        }
        if (ldgo_direct >= 0) {
          gop = reinterpret_cast<const acc_t*>(gov.at(b, h, i0));
          ldgo = ldgo_direct;
        } else {
          load_block(gov.at(b, h, i0), gov.sl, gov.sd, rows, Dv, gobuf.data());
          gop = gobuf.data();
          ldgo = Dv;
        }
        // bf16 pairs of the block's Q and dO rows (bdot)
        const uint16_t *q16 = nullptr, *go16 = nullptr;
        int64_t ldq16 = 0, ldgo16 = 0;
        if (bdot) {
          std::tie(q16, ldq16) = bf16_pair_rows(qv, b, h, i0, rows, D, q16buf.data());
          std::tie(go16, ldgo16) = bf16_pair_rows(gov, b, h, i0, rows, Dv, go16buf.data());
        }
        const acc_t* lse_rows = lse_p + bh * N + i0;
        const acc_t* glse_rows = glse_p != nullptr ? glse_p + bh * N + i0 : nullptr;
        const acc_t* gmap_rows = gmap_p != nullptr ? gmap_p + (b * N + i0) * Mm : nullptr;

        // P of the keys [j0, j0 + cols) into p (ld = cols); rows without a valid key give P = 0
        auto probs = [&](int64_t j0, int64_t cols, acc_t* p) {
          if constexpr (std::is_same_v<acc_t, float>) {
            if (bdot) {
              bf16dot::gemm(rows, cols, kpairs, q16, ldq16, kpack.data() + j0 * 2, ldkp, scale, false, p, cols);
            } else {
              gemms.scores(rows, cols, j0, qp, ldq, kp, ldk, ktbuf, p);
            }
          } else {
            gemms.scores(rows, cols, j0, qp, ldq, kp, ldk, ktbuf, p);
          }
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* pr = p + r * cols;
            if (lse_rows[r] == neg_inf<acc_t>()) {
              std::fill(pr, pr + cols, acc_t(0));
            } else {
              exp_sum<acc_t>(pr, brow != nullptr ? brow + j0 : nullptr, cols, lse_rows[r]);
            }
          }
        };

        if (!exact) {
          // Δ_i = dO_i·O_i + (1/H) Σ_{j in map} P_ij dA_ij - grad_lse_i
          for (int64_t r = 0; r < rows; ++r) {
            load_block(ov.at(b, h, i0 + r), ov.sl, ov.sd, 1, Dv, orow.data());
            delta[r] = dot_row(gop + r * ldgo, orow.data(), Dv);
            if (glse_rows != nullptr) delta[r] -= glse_rows[r];
          }
          if (gmap_rows != nullptr) {
            for (int64_t j0 = map_start; j0 < map_stop; j0 += bk) {
              const int64_t cols = std::min(bk, map_stop - j0);
              probs(j0, cols, pbuf.data());
              for (int64_t r = 0; r < rows; ++r)
                delta[r] += inv_h * dot_row(pbuf.data() + r * cols, gmap_rows + r * Mm + (j0 - map_start), cols);
            }
          }
        }

        for (int64_t j0 = 0; j0 < M; j0 += bk) {
          const int64_t cols = std::min(bk, M - j0);
          acc_t* p = pbuf.data();
          acc_t* ds = dsbuf.data();
          probs(j0, cols, p);
          // dP = dO V^T (+ dA / H on the map columns)
          if (bdot) {
            if constexpr (std::is_same_v<acc_t, float>)
              bf16dot::gemm(rows, cols, vpairs, go16, ldgo16, vpack.data() + j0 * 2, ldkp, 1.0f, false, ds, cols);
          } else if (gemms.brg) {
            if constexpr (std::is_same_v<acc_t, float>)
              blas::brgemm_f32(rows, cols, Dv, gop, ldgo, vtbuf.data() + j0, M, ds, cols, false);
          } else {
            blas::gemm(false, true, rows, cols, Dv, acc_t(1), gop, ldgo, vp + j0 * ldv, ldv, acc_t(0), ds, cols);
          }
          const int64_t m0 = std::max(j0, map_start), m1 = std::min(j0 + cols, map_stop);
          if (gmap_rows != nullptr && m0 < m1) {
            for (int64_t r = 0; r < rows; ++r)
              axpy_row(ds + r * cols + (m0 - j0), gmap_rows + r * Mm + (m0 - map_start), m1 - m0, inv_h);
          }
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* pr = p + r * cols;
            acc_t* dr = ds + r * cols;
            if (exact) delta[r] = dot_row(pr, dr, cols) - (glse_rows != nullptr ? glse_rows[r] : acc_t(0));
            // dS = P (dP - Δ)
            using Vec = Vectorized<acc_t>;
            constexpr int64_t W = Vec::size();
            const Vec vd(delta[r]);
            int64_t j = 0;
            for (; j + W <= cols; j += W) (Vec::loadu(pr + j) * (Vec::loadu(dr + j) - vd)).store(dr + j);
            for (; j < cols; ++j) dr[j] = pr[j] * (dr[j] - delta[r]);
            if (cs != nullptr) add_row(cs + j0, dr, cols);
          }
          // dV += P^T dO ; dK += scale dS^T Q ; dQ (+)= scale dS K
          blas::gemm(true, false, cols, Dv, rows, acc_t(1), p, cols, gop, ldgo, acc_t(1), dv + j0 * Dv, Dv);
          blas::gemm(true, false, cols, D, rows, scale, ds, cols, qp, ldq, acc_t(1), dk + j0 * D, D);
          if (gemms.brg) {  // dS K unscaled; the scale is applied once on the store below
            if constexpr (std::is_same_v<acc_t, float>)
              brgemm_f32_tail_split(rows, D, cols, ds, cols, kp + j0 * ldk, ldk, dqbuf.data(), D, j0 != 0);
          } else {
            blas::gemm(false, false, rows, D, cols, scale, ds, cols, kp + j0 * ldk, ldk, acc_t(j0 == 0 ? 0 : 1),
                       dqbuf.data(), D);
          }
        }
        if (gemms.brg) scale_row(dqbuf.data(), rows * D, scale);
        store_block(dqbuf.data(), D, rows, D, dqv.at(b, h, i0), dqv.sl, dqv.sd);
      }
      if (direct_dkv) {
        store_block(dk, D, M, D, dkv.at(b, h, 0), dkv.sl, dkv.sd);
        store_block(dv, Dv, M, Dv, dvv.at(b, h, 0), dvv.sl, dvv.sd);
      }
    }
    if (gemms.brg) blas::brgemm_f32_release();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_forward(const at::Tensor& query, int64_t M, int64_t Dv,
                                                             int64_t Mm) {
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2);
  auto acc = acc_type(query.scalar_type());
  auto out = at::zeros({B, N, H, Dv}, query.options()).transpose(1, 2);
  auto lse = at::full({B, H, N}, neg_inf<double>(), query.options().dtype(acc));
  auto amap = at::zeros({B, N, Mm}, query.options().dtype(acc));
  (void)M;
  return {out, lse, amap};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sra_attention_fwd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& token_weight, const std::optional<at::Tensor>& key_padding_mask,
    double strength, double scale, int64_t map_start, int64_t map_stop) {
  check_inputs(query, key, value);
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2);
  const int64_t M = key.size(2), Dv = value.size(3);
  TORCH_CHECK(0 <= map_start && map_start <= map_stop && map_stop <= M,
              "sra_attention (cpu): bad map key range [", map_start, ", ", map_stop, ") for M=", M);
  const int64_t Mm = map_stop - map_start;
  const auto acc = acc_type(query.scalar_type());
  if (B == 0 || H == 0 || N == 0 || M == 0) return empty_forward(query, M, Dv, Mm);

  auto [bias, valid] = make_bias(token_weight, key_padding_mask, strength, B, H, M, acc);
  (void)valid;
  // K/V that the GEMM cannot read in place are converted per (b, h) inside the tasks (OperandRows)
  const at::Tensor& k_op = key;
  const at::Tensor& v_op = value;
  at::Tensor out = at::empty({B, N, H, Dv}, query.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, H, N}, query.options().dtype(acc));
  at::Tensor amap = at::empty({B, N, Mm}, query.options().dtype(acc));
  advise_huge_pages(out);
  advise_huge_pages(amap);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "sra_attention_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(query, k_op, v_op, bias, scale, map_start, map_stop, out, lse, amap);
  });
  return {out, lse, amap};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sra_attention_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_map,
    const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& token_weight, const std::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& lse,
    double strength, double scale, int64_t map_start, int64_t map_stop) {
  check_inputs(query, key, value);
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  const int64_t M = key.size(2), Dv = value.size(3);
  TORCH_CHECK(0 <= map_start && map_start <= map_stop && map_stop <= M,
              "sra_attention (cpu): bad map key range [", map_start, ", ", map_stop, ") for M=", M);
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "sra_attention (cpu): grad_out must have the shape of out");
  const auto acc = acc_type(query.scalar_type());
  const bool has_w = token_weight.has_value() && token_weight->defined();

  at::Tensor dq = at::empty_like(query), dk = at::empty_like(key), dv = at::empty_like(value);
  at::Tensor dw = has_w ? at::zeros({B, H, M}, query.options().dtype(acc)) : at::empty({0}, query.options().dtype(acc));
  if (B == 0 || H == 0 || N == 0 || M == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dw};
  }

  BwdTensors t;
  auto [bias, valid] = make_bias(token_weight, key_padding_mask, strength, B, H, M, acc);
  t.bias = bias;
  t.grad_out = grad_out.scalar_type() == query.scalar_type() ? grad_out : grad_out.to(query.scalar_type());
  t.out = out.scalar_type() == query.scalar_type() ? out : out.to(query.scalar_type());
  t.query = query;
  t.k_op = key;  // converted per (b, h) inside the tasks when the GEMM cannot read it in place
  t.v_op = value;
  t.lse = lse.to(acc).contiguous();
  const int64_t Mm = map_stop - map_start;
  if (grad_map.has_value() && grad_map->defined() && grad_map->numel() > 0 && Mm > 0) {
    TORCH_CHECK(grad_map->dim() == 3 && grad_map->size(0) == B && grad_map->size(1) == N && grad_map->size(2) == Mm,
                "sra_attention (cpu): grad_map must be [B, N, map_stop - map_start]");
    t.grad_map = grad_map->to(acc).contiguous();
  }
  if (grad_lse.has_value() && grad_lse->defined() && grad_lse->numel() > 0) {
    t.grad_lse = grad_lse->to(acc).contiguous();
  }
  t.dq = dq;

  const Blocks blk = pick_blocks(B * H, N, M, 1);
  const int64_t nthreads = at::get_num_threads();
  const int64_t nsplit = std::clamp<int64_t>((2 * nthreads + B * H - 1) / (B * H), 1, blk.nqb);
  auto opts = query.options().dtype(acc);
  t.dk = dk;
  t.dv = dv;
  if (nsplit > 1) {
    t.dk_part = at::zeros({nsplit, B, H, M, D}, opts);
    t.dv_part = at::zeros({nsplit, B, H, M, Dv}, opts);
  }
  if (has_w) t.colsum = at::zeros({nsplit, B, H, M}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "sra_attention_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, acc_t>(t, scale, map_start, map_stop, nsplit, blk);
  });

  if (nsplit > 1) {
    dk.copy_(t.dk_part.sum(0));
    dv.copy_(t.dv_part.sum(0));
  }
  if (has_w) {
    at::Tensor cs = nsplit == 1 ? t.colsum.select(0, 0) : t.colsum.sum(0);
    at::Tensor wf = token_weight->to(acc).expand({B, H, M});
    at::Tensor safe = at::where(valid, wf, at::ones({}, opts));
    dw = at::where(valid, cs * strength / safe, at::zeros({}, opts)).contiguous();
  }
  return {dq, dk, dv, dw};
}

}  // namespace dare::cpu
