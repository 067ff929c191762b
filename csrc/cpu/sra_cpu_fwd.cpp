// SRA attention on CPU (docs/SPEC.md §1): the fused forward (helpers in sra_cpu_common.h, entry point with checks
// and allocation in python/cpu/sra_attention_cpu.cpp).
//
// Without a map, one task per (batch, head, query block), ordered so that consecutive tasks share K/V;
// with a map, one task per (batch, query block) with a loop over heads inside, so the head-averaged map
// rows of that query block are owned by the task and summed in head order (deterministic, no atomics, no
// [B,H,N,M] buffer). Per head and query block the scores S = scale·Q·K^T + bias are computed for one key
// block at a time; when all M keys fit one block (the usual cross-attention case) the softmax is exact (a
// read-only max pass, then exp + sum with the bias added on the fly), otherwise online (running max and
// sum, output rescaled) and the map columns are recomputed afterwards from the final LSE over the map key
// range only. O of a block accumulates in a dense per-thread buffer and is written once, normalised and
// converted, to the [B,N,H,Dv] output (non-temporal stores when that output is far larger than the
// caches); large outputs get a huge-page hint (cpu_memory.h, from the entry point).
//
// acc = float64 for float64 inputs (so gradcheck runs on this kernel), float32 otherwise. K and V that
// the GEMM cannot read in place (other dtype, strides) are converted per (b, h) inside the tasks into a
// per-thread buffer (never a full fp32 copy of K/V); Q is converted per block. fp32 block products go
// through oneDNN's brgemm micro-kernel when libtorch_cpu provides it (scale·K^T built per (b, h)), else
// cpu_blas (MKL's sgemm_/dgemm_ when the torch build exports them); softmax, exp and rescaling are
// vectorised with at::vec.
//
// bf16 inputs on a CPU with AVX512-BF16 (DARE_KERNELS_CPU_BF16_DOT, default auto; sra_bf16_dot.h) take
// the products in bf16 instead: K and V of every (b, h) packed once into VNNI pairs, S = Q·K^T
// by vdpbf16ps (exact bf16 products, fp32 sums, scale applied to the fp32 sum), P rounded to bf16 for
// O += P·V (as PyTorch's CPU flash attention does for bf16) while the softmax sum, LSE and map use the
// fp32 P; O is scaled and rounded in one AVX-512 pass. With all keys in one block (M <= 1024) the softmax
// of a row (max, exp, sum, map row, bf16 P) is one AVX-512 pass (bf16dot::softmax_rows), O is scaled and
// rounded to bf16 in the P·V product's epilogue, and a map task takes 128 query rows (pick_blocks).
// fp32 inputs on a CPU with AVX-512 F/BW/VL use the same softmax pass (built without BF16 where the CPU
// lacks it: rows512, sra_rows_avx512.h) with P normalised, P·V then writing the output rows
// (DARE_KERNELS_CPU_ISA=avx2 or ATEN_CPU_CAPABILITY=default|avx2: the at::vec rows); fp16 inputs, and bf16
// inputs without the bf16 products, use it with P unnormalised and O scaled on the store.
//
// bf16 / fp16 inputs with DARE_KERNELS_CPU_GEMM's brgemm products (default where cpublas::could_pack says the
// CPU has AMX tiles for the dtype; sra_brgemm16.h) take S = Q·K^T and O += P·V through PyTorch's
// cpublas::brgemm on 64-column panels of K^T and V packed once per call, P rounded to the input dtype, the
// scale applied to the fp32 S; the rows, bias, map and LSE stay the paths above.
#include "cpu/sra_attention.h"

#include <ATen/Dispatch.h>

#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cpu/sra_cpu_common.h"
#include "cpu/sra_rows_avx512.h"

namespace dare::cpu {
namespace sra {
namespace {

// rows x cols acc block (ld = cols) -> rows of dst (row stride sl, unit columns), each row multiplied by
// row_scale[r] and converted to the output dtype on the way. `stream`: fp32 rows aligned to 32 bytes are
// written with non-temporal stores (an output much larger than the caches is not read back by this call,
// and the stores then skip the read-for-ownership of every line); the caller fences before returning.
template <typename acc_t, typename scalar_t>
void store_rows_scaled(acc_t* src, int64_t ld_src, int64_t rows, int64_t cols, const acc_t* row_scale, scalar_t* dst,
                       int64_t sl, bool stream) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* s = src + r * ld_src;
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

// Everything the forward tasks of one call share: sizes, operands, the paths taken and the block sizes.
template <typename scalar_t, typename acc_t>
struct FwdPlan {
  static constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  static constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  static constexpr bool kReduced = kBf16 || std::is_same_v<scalar_t, c10::Half>;

  int64_t B, H, N, D, M, Dv, map_start, map_stop, Mm;
  acc_t scale, inv_h;
  View4<const scalar_t> qv;
  OperandRows<scalar_t, acc_t> kops, vops;
  int64_t ldk, ldv, ldq_direct;
  const acc_t* bias_p;
  scalar_t* out_p;  // [B, N, H, Dv] memory
  acc_t* lse_p;     // [B, H, N]
  acc_t* map_p;     // [B, N, Mm], or nullptr without a map
  // With a map a task owns its query rows for every head (the head average is summed in the task);
  // without one, tasks are (batch, head, query block), ordered so that consecutive tasks share K/V.
  int64_t heads_per_task, head_groups;
  Bf16DotMode bdot;
  int64_t bq = 0, bk = 0, nqb = 0, ntasks = 0;
  bool exact = false, stream_out = false;
  BlockGemms<acc_t> gemms;
  // bf16 products: K as [ceil(D/2)][ldkp][2] (pairs along D; ldkp leaves room for the 32-column tile at
  // any map start), V as [ceil(M/2)][ldvp][2] (pairs along M), per (b, h) of ksz / vsz elements
  int64_t kpairs, ldkp, vpairs, ldvp, ksz, vsz;
  at::Tensor kpack, vpack;
  const uint16_t* kpack_p = nullptr;
  const uint16_t* vpack_p = nullptr;
  // exact blocks through one AVX-512 pass per row (fused_rows; f32_rows names the build for fp32/fp16 and
  // bf16 without the bf16 products); norm_p: fp32 P normalised in that pass, P·V writing the output rows
  bool fused_rows = false, norm_p = false;
  F32Rows f32_rows = F32Rows::Vec;
  int64_t lds = 0, ldm = 0;  // row strides of the score block and of the per-thread map rows
  // bf16 / fp16 products through cpublas::brgemm (b16 != kNone; sra_brgemm16.h): K^T of a (b, h) as
  // panels(M) panels of [dkp x 64] (kpack, ksz per (b, h)), V per key block as vpan panels of [even(cols)
  // x 64] (vpack, block kb at kb·vpan·bkp·64, vsz per (b, h)); Q rows as pairs (q16), P rounded to the
  // input dtype for P·V, O accumulated in fp32 at a row stride ldo of whole panels, scaled by 1/l and
  // converted on the store. The scale is applied to the fp32 S; the softmax rows are those of the other
  // paths (the AVX-512 pass for an exact block where f32_rows says so, rounding bf16 P in it with the BF16
  // build; else the at::vec rows).
  static constexpr at::ScalarType qv_dtype() { return c10::CppTypeToScalarType<scalar_t>::value; }
  brg16::Mode b16 = brg16::Mode::kNone;
  bool b16_packed = false;
  int64_t dkp = 0, bkp = 0, vpan = 0, nkb = 1, ldo = 0;

  FwdPlan(const at::Tensor& query, const at::Tensor& k_op, const at::Tensor& v_op, const at::Tensor& bias,
          double scale_d, int64_t map_start_, int64_t map_stop_, at::Tensor& out, at::Tensor& lse, at::Tensor& amap)
      : B(query.size(0)), H(query.size(1)), N(query.size(2)), D(query.size(3)), M(k_op.size(2)), Dv(v_op.size(3)),
        map_start(map_start_), map_stop(map_stop_), Mm(map_stop_ - map_start_),
        scale(static_cast<acc_t>(scale_d)), inv_h(acc_t(1) / static_cast<acc_t>(query.size(1))),
        qv(query), kops(k_op), vops(v_op), ldk(kops.ld()), ldv(vops.ld()),
        ldq_direct(kSame ? gemm_ld(query, query.scalar_type()) : -1),
        bias_p(bias.defined() ? bias.data_ptr<acc_t>() : nullptr), out_p(out.data_ptr<scalar_t>()),
        lse_p(lse.data_ptr<acc_t>()), map_p(Mm > 0 ? amap.data_ptr<acc_t>() : nullptr),
        heads_per_task(Mm > 0 ? H : 1), head_groups(H / heads_per_task) {
    if constexpr (kReduced) b16 = reduced_gemm_mode(query.scalar_type());
    b16_packed = b16 == brg16::Mode::kPacked;
    if constexpr (kBf16) {
      if (b16 == brg16::Mode::kNone) bdot = bf16_dot_mode();
    }
    const int64_t max_map_rows = bdot.qk && default_score_budget() ? kBf16MapRows : 1024;
    const Blocks blk = pick_blocks(B * head_groups, N, M, 4 * at::get_num_threads(), Mm, max_map_rows);
    bq = blk.bq;
    bk = blk.bk;
    nqb = blk.nqb;
    nkb = blk.nkb;
    exact = blk.nkb == 1;
    stream_out = out.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= stream_out_bytes();
    ntasks = B * head_groups * nqb;
    gemms.scale = scale;
    gemms.D = D;
    gemms.M = M;
    if constexpr (std::is_same_v<acc_t, float>) gemms.brg = blas::brgemm_f32_available();
    kpairs = (D + 1) / 2;
    ldkp = bf16dot::round_up(M, bf16dot::kTileN) + bf16dot::kTileN;
    vpairs = (M + 1) / 2;
    ldvp = bf16dot::round_up(Dv, bf16dot::kTileN);
    ksz = kpairs * ldkp * 2;
    vsz = vpairs * ldvp * 2;
    if (bdot.qk) pack_bf16(query, k_op, v_op);
    ldo = Dv;
    if (b16 != brg16::Mode::kNone) {
      dkp = brg16::even(D);
      bkp = brg16::even(bk);
      vpan = brg16::panels(Dv);
      ldo = vpan * brg16::kPanel;
      ksz = brg16::panels(M) * dkp * brg16::kPanel;
      vsz = nkb * vpan * bkp * brg16::kPanel;
      pack_brg16(k_op, v_op);
    }
    if constexpr (std::is_same_v<acc_t, float>) {
      if (bdot.qk) {
        fused_rows = exact;
      } else {
        f32_rows = f32_rows_path();
        fused_rows = exact && f32_rows != F32Rows::Vec;
      }
    }
    norm_p = fused_rows && std::is_same_v<scalar_t, float>;
    // score rows and the task's map rows at a stride of whole 64-byte lines (a masked store of one row's
    // tail then never shares a line with the next row's loads: no stalled store-to-load forwarding)
    lds = b16 != brg16::Mode::kNone ? brg16::panels(bk) * brg16::kPanel : fused_rows ? bf16dot::round_up(M, 16) : bk;
    ldm = bf16dot::round_up(Mm, 16);
  }

  // K (and V for the P·V product) of every (b, h) into VNNI pairs, once per call
  void pack_bf16(const at::Tensor& query, const at::Tensor& k_op, const at::Tensor& v_op) {
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
    kpack_p = kd;
    vpack_p = vd;
  }

  // K^T and V of every (b, h) into the panels of the brgemm products, once per call
  void pack_brg16(const at::Tensor& k_op, const at::Tensor& v_op) {
    const View4<const scalar_t> kv(k_op), vv(v_op);
    const at::ScalarType t = k_op.scalar_type();
    kpack = at::empty({B * H * ksz}, k_op.options().dtype(at::kShort));
    vpack = at::empty({B * H * vsz}, k_op.options().dtype(at::kShort));
    uint16_t* kd = reinterpret_cast<uint16_t*>(kpack.data_ptr());
    uint16_t* vd = reinterpret_cast<uint16_t*>(vpack.data_ptr());
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint16_t> tmp(std::max(dkp, bkp) * brg16::kPanel);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        // K^T [D x M]: element (d, j) is K[j][d]
        brg16::pack_panels(reinterpret_cast<const uint16_t*>(kv.at(b, h, 0)), kv.sd, kv.sl, D, M, t, b16_packed,
                           kd + bh * ksz, tmp.data());
        for (int64_t kb = 0; kb < nkb; ++kb) {
          const int64_t j0 = kb * bk;
          brg16::pack_panels(reinterpret_cast<const uint16_t*>(vv.at(b, h, j0)), vv.sl, vv.sd, std::min(bk, M - j0),
                             Dv, t, b16_packed, vd + bh * vsz + kb * vpan * bkp * brg16::kPanel, tmp.data());
        }
      }
    });
    kpack_p = kd;
    vpack_p = vd;
  }
};

// The per-thread state of the forward tasks (buffers, the (b, h) whose K/V rows it holds) and the steps
// of one task: per head, the Q rows, one of three softmax paths, the store of O.
template <typename scalar_t, typename acc_t>
class FwdWorker {
 public:
  using Plan = FwdPlan<scalar_t, acc_t>;

  explicit FwdWorker(const Plan& p)
      : p_(p),
        qb16_(p.bdot.qk || p.b16 != brg16::Mode::kNone ? p.bq * 2 * p.kpairs : 0),
        pb16_(p.bdot.pv || p.b16 != brg16::Mode::kNone ? p.bq * (p.bk + 1) : 0),
        sbuf_(p.bq * p.lds),
        mbuf_(p.fused_rows && p.Mm > 0 ? p.bq * p.ldm : 0),
        qbuf_(p.ldq_direct < 0 && !p.bdot.qk && p.b16 == brg16::Mode::kNone ? p.bq * p.D : 0),
        obuf_(p.bq * p.ldo),
        row_m_(p.bq),
        row_l_(p.bq),
        row_scale_(p.bq) {}

  void run_task(int64_t task) {
    const int64_t bg = task / p_.nqb, b = bg / p_.head_groups, h0 = (bg % p_.head_groups) * p_.heads_per_task;
    const int64_t i0 = (task % p_.nqb) * p_.bq, rows = std::min(p_.bq, p_.N - i0);
    acc_t* map_rows = p_.map_p != nullptr ? p_.map_p + (b * p_.N + i0) * p_.Mm : nullptr;
    if (map_rows != nullptr && !p_.fused_rows) std::fill(map_rows, map_rows + rows * p_.Mm, acc_t(0));
    for (int64_t h = h0; h < h0 + p_.heads_per_task; ++h) {
      const Head hd = load_head(b, h, i0, rows);
      if (p_.fused_rows) {
        if (fused_rows_head(hd, map_rows, h == h0, h == h0 + p_.heads_per_task - 1)) continue;  // rows written
      } else if (p_.exact) {
        exact_head(hd, map_rows);
      } else {
        online_head(hd, map_rows);
      }
      store_head(hd);
    }
  }

 private:
  // One head of a task's query rows [i0, i0 + rows): its operands as the products read them.
  struct Head {
    int64_t b, h, bh, i0, rows;
    const acc_t* qp;       // Q rows (acc; unused with the bf16 products)
    int64_t ldq;
    const uint16_t* q16;   // Q rows as bf16 pairs (bf16 products)
    int64_t ldq16;
    const acc_t* kp;       // K rows (acc), nullptr with the bf16 products
    const acc_t* vp;       // V rows (acc), nullptr with the bf16 P·V
    const acc_t* brow;     // bias of (b, h), or nullptr
    acc_t* lse_rows;
  };

  Head load_head(int64_t b, int64_t h, int64_t i0, int64_t rows) {
    Head hd{b, h, b * p_.H + h, i0, rows, nullptr, p_.D, qb16_.data(), 2 * p_.kpairs, nullptr, nullptr, nullptr,
            p_.lse_p + (b * p_.H + h) * p_.N + i0};
    const bool b16 = p_.b16 != brg16::Mode::kNone;
    if (p_.bdot.qk || b16) {  // Q rows as 16-bit pairs (zero-padded to an even D)
      std::tie(hd.q16, hd.ldq16) = bf16_pair_rows(p_.qv, b, h, i0, rows, p_.D, qb16_.data());
    } else {
      std::tie(hd.qp, hd.ldq) = acc_rows(p_.qv, p_.ldq_direct, b, h, i0, rows, p_.D, qbuf_.data());
    }
    if (!p_.bdot.qk && !b16) {
      hd.kp = p_.kops.rows(b, h, p_.H, kbuf_, k_cached_);
      p_.gemms.prepare(hd.kp, p_.ldk, b * p_.H + h, ktbuf_, kt_cached_);
    }
    hd.vp = p_.bdot.pv || b16 ? nullptr : p_.vops.rows(b, h, p_.H, vbuf_, v_cached_);
    hd.brow = p_.bias_p != nullptr ? p_.bias_p + (b * p_.H + h) * p_.M : nullptr;
    return hd;
  }

  // s[rows x cols] (ld = cols, or ld_s) = scale · Q K[j0 : j0 + cols]^T (brgemm: j0 a multiple of 64, ld_s
  // at least panels(cols)·64, the columns up to there written too)
  void scores(const Head& hd, int64_t cols, int64_t j0, acc_t* s, int64_t ld_s = 0) {
    if constexpr (Plan::kReduced) {
      if (p_.b16 != brg16::Mode::kNone) {
        brg16::gemm(hd.rows, brg16::panels(cols), p_.dkp, hd.q16, hd.ldq16,
                    p_.kpack_p + hd.bh * p_.ksz + (j0 / brg16::kPanel) * p_.dkp * brg16::kPanel, s, ld_s,
                    false, p_.qv_dtype(), p_.b16_packed);
        for (int64_t r = 0; r < hd.rows; ++r) scale_row(s + r * ld_s, cols, p_.scale);
        return;
      }
    }
    if constexpr (Plan::kBf16) {
      if (p_.bdot.qk) {
        bf16dot::gemm(hd.rows, cols, p_.kpairs, hd.q16, hd.ldq16, p_.kpack_p + hd.bh * p_.ksz + j0 * 2, p_.ldkp,
                      p_.scale, false, s, ld_s > 0 ? ld_s : cols);
        return;
      }
    }
    p_.gemms.scores(hd.rows, cols, j0, hd.qp, hd.ldq, hd.kp, p_.ldk, ktbuf_, s, ld_s);
  }

  // o[rows x Dv] (+)= p[rows x cols] (ld = ld_p, default cols) V[j0 : j0 + cols] (j0 even; brgemm: j0 at a
  // key block, o at a row stride of whole panels)
  void pv(const Head& hd, int64_t cols, int64_t j0, const acc_t* p, bool add, acc_t* o, int64_t ldo, int64_t ld_p = 0) {
    if (ld_p <= 0) ld_p = cols;
    if constexpr (Plan::kReduced) {
      if (p_.b16 != brg16::Mode::kNone) {  // P rounded to the input dtype (zero pad column when cols is odd)
        const int64_t colsp = brg16::even(cols);
        auto* p16 = reinterpret_cast<scalar_t*>(pb16_.data());
        for (int64_t r = 0; r < hd.rows; ++r) {
          at::vec::convert(p + r * ld_p, p16 + r * colsp, cols);
          if (colsp > cols) p16[r * colsp + cols] = scalar_t(0);
        }
        brg16::gemm(hd.rows, p_.vpan, colsp, pb16_.data(), colsp,
                    p_.vpack_p + hd.bh * p_.vsz + (j0 / p_.bk) * p_.vpan * p_.bkp * brg16::kPanel, o, ldo, add,
                    p_.qv_dtype(), p_.b16_packed);
        return;
      }
    }
    if constexpr (Plan::kBf16) {
      if (p_.bdot.pv) {
        const int64_t ldp = cols + cols % 2;
        bf16dot::to_bf16_rows(p, ld_p, hd.rows, cols, pb16_.data(), ldp);
        bf16dot::gemm(hd.rows, p_.Dv, ldp / 2, pb16_.data(), ldp, p_.vpack_p + hd.bh * p_.vsz + (j0 / 2) * p_.ldvp * 2,
                      p_.ldvp, 1.0f, add, o, ldo);
        return;
      }
    }
    p_.gemms.pv(hd.rows, p_.Dv, cols, p, hd.vp + j0 * p_.ldv, p_.ldv, add, o, ldo, ld_p);
  }

  scalar_t* out_rows(const Head& hd) const { return p_.out_p + ((hd.b * p_.N + hd.i0) * p_.H + hd.h) * p_.Dv; }

  // All keys in one block, max, exp, sum, map rows (and bf16 P) in one AVX-512 pass per row. The map rows
  // of the task are summed over heads in a per-thread buffer: the first head writes it, the others add
  // to it, the last one adds into the output rows. Returns true when the head's output rows are written.
  bool fused_rows_head(const Head& hd, acc_t* map_rows, bool first, bool last) {
    if constexpr (std::is_same_v<acc_t, float>) {
      const int64_t rows = hd.rows, M = p_.M, Dv = p_.Dv;
      acc_t* s = sbuf_.data();
      scores(hd, M, 0, s, p_.lds);
      const int64_t ldp = M + M % 2;
      acc_t* map_out = map_rows == nullptr ? nullptr : last ? map_rows : mbuf_.data();
      // (the bf16 products need the BF16 build, which also writes bf16 P; other inputs take the build
      // f32_rows names)
      auto* rows_pass = p_.f32_rows == F32Rows::Avx512F ? &rows512::softmax_rows : &bf16dot::softmax_rows;
      // brgemm products of bf16 with the BF16 build: P rounded to bf16 in the pass as well
      const bool b16 = p_.b16 != brg16::Mode::kNone;
      const bool p16 = p_.bdot.pv || (b16 && Plan::kBf16 && p_.f32_rows == F32Rows::Avx512Bf16);
      rows_pass(s, p_.lds, rows, M, hd.brow, p16 ? pb16_.data() : nullptr, ldp, map_out, last ? p_.Mm : p_.ldm,
                first ? nullptr : mbuf_.data(), p_.ldm, p_.map_start, p_.map_stop, p_.inv_h, p_.norm_p, row_m_.data(),
                row_l_.data(), row_scale_.data());
      std::copy_n(row_m_.data(), rows, hd.lse_rows);
      add_log_rows(hd.lse_rows, row_l_.data(), rows);
      if (p_.bdot.pv) {  // O = P·V scaled by 1/l and rounded to bf16 straight into the output rows
        bf16dot::gemm_rows_bf16(rows, Dv, ldp / 2, pb16_.data(), ldp, p_.vpack_p + hd.bh * p_.vsz, p_.ldvp,
                                row_scale_.data(), reinterpret_cast<uint16_t*>(out_rows(hd)), p_.H * Dv);
        return true;
      }
      if (b16) {  // O = P·V through brgemm into the block buffer, scaled by 1/l and converted on the store
        if (p16) {
          brg16::gemm(rows, p_.vpan, ldp, pb16_.data(), ldp, p_.vpack_p + hd.bh * p_.vsz, obuf_.data(), p_.ldo, false,
                      p_.qv_dtype(), p_.b16_packed);
        } else {
          pv(hd, M, 0, s, false, obuf_.data(), p_.ldo, p_.lds);
        }
        return false;
      }
      if (p_.norm_p && !p_.stream_out) {  // fp32: O = (P / l)·V straight into the output rows
        if constexpr (std::is_same_v<scalar_t, float>)
          p_.gemms.pv(rows, Dv, M, s, hd.vp, p_.ldv, false, out_rows(hd), p_.H * Dv, p_.lds);
        return true;
      }
      // a streamed fp32 output: P·V into the block buffer, then the non-temporal stores with a row scale
      // of 1 (bitwise the same); bf16 "qk" and fp16: P·V in fp32, O scaled on the store
      if (p_.norm_p) std::fill(row_scale_.begin(), row_scale_.begin() + rows, acc_t(1));
      p_.gemms.pv(rows, Dv, M, s, hd.vp, p_.ldv, false, obuf_.data(), Dv, p_.lds);
    }
    return false;
  }

  // All keys in one block, the at::vec rows: a read-only max pass, then exp + sum with the bias added on
  // the fly; P stays unnormalised and O is divided by l on the store.
  void exact_head(const Head& hd, acc_t* map_rows) {
    const int64_t rows = hd.rows, M = p_.M, Mm = p_.Mm, ls = p_.lds;  // lds == M but with brgemm
    acc_t* s = sbuf_.data();
    scores(hd, M, 0, s, ls);
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* sr = s + r * ls;
      const acc_t m = biased_max(sr, hd.brow, M);
      if (m == neg_inf<acc_t>()) {  // no valid key
        std::fill(sr, sr + M, acc_t(0));
        hd.lse_rows[r] = neg_inf<acc_t>();
        row_scale_[r] = acc_t(0);
        row_l_[r] = acc_t(1);
        continue;
      }
      const acc_t l = exp_sum<acc_t>(sr, hd.brow, M, m);
      row_scale_[r] = acc_t(1) / l;
      if (p_.bdot.qk) {  // the bf16 path takes the logs of the block at once (below)
        hd.lse_rows[r] = m;
        row_l_[r] = l;
      } else {
        hd.lse_rows[r] = m + std::log(l);
      }
      if (map_rows != nullptr) axpy_row(map_rows + r * Mm, sr + p_.map_start, Mm, p_.inv_h * row_scale_[r]);
    }
    if (p_.bdot.qk) add_log_rows(hd.lse_rows, row_l_.data(), rows);
    pv(hd, M, 0, s, false, obuf_.data(), p_.ldo, ls);
  }

  // Keys in blocks of bk: running max and sum, O rescaled; then the map columns from the final LSE.
  void online_head(const Head& hd, acc_t* map_rows) {
    const int64_t rows = hd.rows, M = p_.M, Dv = p_.Dv, bk = p_.bk, ldo = p_.ldo;
    const bool b16 = p_.b16 != brg16::Mode::kNone;
    acc_t* op = obuf_.data();
    std::fill(row_m_.begin(), row_m_.end(), neg_inf<acc_t>());
    std::fill(row_l_.begin(), row_l_.end(), acc_t(0));
    for (int64_t j0 = 0; j0 < M; j0 += bk) {
      const int64_t cols = std::min(bk, M - j0), ls = b16 ? p_.lds : cols;
      acc_t* s = sbuf_.data();
      scores(hd, cols, j0, s, ls);
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* sr = s + r * ls;
        const acc_t* bj = hd.brow != nullptr ? hd.brow + j0 : nullptr;
        const acc_t bm = biased_max(sr, bj, cols);
        const acc_t m_new = std::max(row_m_[r], bm);
        acc_t* orow = op + r * ldo;
        if (m_new == neg_inf<acc_t>()) {  // nothing valid so far
          std::fill(sr, sr + cols, acc_t(0));
          if (j0 == 0) std::fill(orow, orow + Dv, acc_t(0));
          continue;
        }
        const acc_t alpha = std::exp(row_m_[r] - m_new);  // 0 when row_m was -inf
        row_l_[r] = row_l_[r] * alpha + exp_sum<acc_t>(sr, bj, cols, m_new);
        row_m_[r] = m_new;
        if (j0 == 0) {
          std::fill(orow, orow + Dv, acc_t(0));
        } else if (alpha != acc_t(1)) {
          scale_row(orow, Dv, alpha);
        }
      }
      pv(hd, cols, j0, s, true, op, ldo, ls);
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (row_l_[r] > acc_t(0)) {
        row_scale_[r] = acc_t(1) / row_l_[r];
        hd.lse_rows[r] = row_m_[r] + std::log(row_l_[r]);
      } else {
        std::fill(op + r * ldo, op + r * ldo + Dv, acc_t(0));
        row_scale_[r] = acc_t(0);
        hd.lse_rows[r] = neg_inf<acc_t>();
      }
    }
    if (map_rows != nullptr) online_map_rows(hd, map_rows);
  }

  // second pass over the map key range with the final LSE
  void online_map_rows(const Head& hd, acc_t* map_rows) {
    if (p_.b16 != brg16::Mode::kNone) {  // the products take whole key blocks: the map columns of each
      for (int64_t j0 = p_.map_start / p_.bk * p_.bk; j0 < p_.map_stop; j0 += p_.bk) {
        const int64_t cols = std::min(p_.bk, p_.M - j0);
        const int64_t lo = std::max(j0, p_.map_start), hi = std::min(j0 + cols, p_.map_stop);
        acc_t* s = sbuf_.data();
        scores(hd, cols, j0, s, p_.lds);
        for (int64_t r = 0; r < hd.rows; ++r) {
          if (hd.lse_rows[r] == neg_inf<acc_t>()) continue;
          acc_t* sr = s + r * p_.lds + (lo - j0);
          exp_sum<acc_t>(sr, hd.brow != nullptr ? hd.brow + lo : nullptr, hi - lo, hd.lse_rows[r]);
          axpy_row(map_rows + r * p_.Mm + (lo - p_.map_start), sr, hi - lo, p_.inv_h);
        }
      }
      return;
    }
    for (int64_t j0 = p_.map_start; j0 < p_.map_stop; j0 += p_.bk) {
      const int64_t cols = std::min(p_.bk, p_.map_stop - j0);
      acc_t* s = sbuf_.data();
      scores(hd, cols, j0, s);
      for (int64_t r = 0; r < hd.rows; ++r) {
        if (hd.lse_rows[r] == neg_inf<acc_t>()) continue;
        acc_t* sr = s + r * cols;
        exp_sum<acc_t>(sr, hd.brow != nullptr ? hd.brow + j0 : nullptr, cols, hd.lse_rows[r]);
        axpy_row(map_rows + r * p_.Mm + (j0 - p_.map_start), sr, cols, p_.inv_h);
      }
    }
  }

  // O of the block, scaled by row_scale and converted, into the [B,N,H,Dv] output rows
  void store_head(const Head& hd) {
    if constexpr (Plan::kBf16) {
      if (p_.bdot.qk) {  // scale and round in one AVX-512 pass (c10's rounding)
        bf16dot::store_rows_bf16(obuf_.data(), p_.ldo, hd.rows, p_.Dv, row_scale_.data(),
                                 reinterpret_cast<uint16_t*>(out_rows(hd)), p_.H * p_.Dv);
        return;
      }
    }
    store_rows_scaled(obuf_.data(), p_.ldo, hd.rows, p_.Dv, row_scale_.data(), out_rows(hd), p_.H * p_.Dv,
                      p_.stream_out);
  }

  const Plan& p_;
  AVec<acc_t> ktbuf_;
  int64_t kt_cached_ = -1;
  AVec<uint16_t> qb16_, pb16_;
  // O of a block is accumulated in a dense per-thread buffer (it stays in cache for the P·V GEMM and the
  // online rescaling) and written once, normalised and converted, to the [B,N,H,Dv] output.
  AVec<acc_t> sbuf_, mbuf_, qbuf_, obuf_;
  AVec<acc_t> row_m_, row_l_, row_scale_, kbuf_, vbuf_;
  int64_t k_cached_ = -1, v_cached_ = -1;
};

template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& query, const at::Tensor& k_op, const at::Tensor& v_op, const at::Tensor& bias,
                    double scale, int64_t map_start, int64_t map_stop, at::Tensor& out, at::Tensor& lse,
                    at::Tensor& amap) {
  const FwdPlan<scalar_t, acc_t> plan(query, k_op, v_op, bias, scale, map_start, map_stop, out, lse, amap);
  parallel_tasks(plan.ntasks, [&](const auto& next) {
    blas::SequentialScope sequential_blas;
    FwdWorker<scalar_t, acc_t> worker(plan);
    for (int64_t task = next(); task < plan.ntasks; task = next()) worker.run_task(task);
#if defined(__AVX__)
    if (plan.stream_out) _mm_sfence();  // non-temporal stores visible before the parallel region ends
#endif
    if (plan.gemms.brg) blas::brgemm_f32_release();
    brg16::release(plan.b16_packed);
  });
}

}  // namespace
}  // namespace sra

void sra_attention_fwd_launch(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                              const std::optional<at::Tensor>& token_weight,
                              const std::optional<at::Tensor>& key_padding_mask, double strength, double scale,
                              int64_t map_start, int64_t map_stop, at::Tensor& out, at::Tensor& lse,
                              at::Tensor& amap) {
  const int64_t B = query.size(0), H = query.size(1), M = key.size(2);
  auto [bias, valid] = sra::make_bias(token_weight, key_padding_mask, strength, B, H, M, sra::acc_type(query.scalar_type()));
  (void)valid;
  // K/V that the GEMM cannot read in place are converted per (b, h) inside the tasks (OperandRows)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "sra_attention_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    sra::forward_kernel<scalar_t, acc_t>(query, key, value, bias, scale, map_start, map_stop, out, lse, amap);
  });
}

}  // namespace dare::cpu
