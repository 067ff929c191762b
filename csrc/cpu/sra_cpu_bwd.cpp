// SRA attention on CPU (docs/SPEC.md §1): the backward (helpers in sra_cpu_common.h, entry point with checks
// and allocation in python/cpu/sra_attention_cpu.cpp).
//
// One task per (batch, head, query split); P is recomputed from the LSE, dK/dV/Σ_i dS are accumulated in
// acc precision per task and reduced over splits in a fixed order (with one split per (b, h), the usual
// case, dK/dV live in a per-thread buffer and are stored once per task: no full-size fp32 partials).
// fp32: the three row-major NN-able products (S = scale·Q K^T, dP = dO V^T, dQ = scale·dS K) go through
// the brgemm micro-kernel with scale·K^T and V^T built per task; dV and dK (transposed A) stay on
// cpu_blas. The bf16 backward with the forward's bf16 products takes S = Q·K^T and dP = dO·V^T by
// vdpbf16ps as well (K and V packed per task). bf16 / fp16 inputs with the brgemm products
// (DARE_KERNELS_CPU_GEMM, sra_brgemm16.h) take all five products through cpublas::brgemm: S and dP on K^T /
// V^T panels built per task, dV, dK and dQ with P and dS rounded to the input dtype (as PyTorch's CPU flash
// attention backward does) on dO / Q panels built per query block and K panels per key block.
#include "cpu/sra_attention.h"

#include <ATen/Dispatch.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/sra_cpu_common.h"

namespace dare::cpu {
namespace sra {
namespace {

struct BwdTensors {
  // dk/dv: the outputs (written per (b, h) by the task that owns it when nsplit == 1); dk_part/dv_part:
  // per-split fp32 partials, only when nsplit > 1 (a few (b, h) split over the threads)
  at::Tensor grad_out, grad_map, grad_lse, query, k_op, v_op, out, lse, bias, dq, dk, dv, dk_part, dv_part, colsum;
};

// Everything the backward tasks of one call share.
template <typename scalar_t, typename acc_t>
struct BwdPlan {
  static constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;

  int64_t B, H, N, D, M, Dv, map_start, map_stop, Mm;
  acc_t scale, inv_h;
  View4<const scalar_t> qv, gov, ov, kv, vv;
  OperandRows<scalar_t, acc_t> kops, vops;
  View4<scalar_t> dqv, dkv, dvv;
  int64_t ldk, ldv, ldq_direct, ldgo_direct;
  const acc_t* bias_p;
  const acc_t* lse_p;   // [B,H,N]
  const acc_t* glse_p;  // [B,H,N] or nullptr
  const acc_t* gmap_p;  // [B,N,Mm] or nullptr
  int64_t nsplit;
  bool direct_dkv;      // accumulate per task in a thread buffer, store into dk/dv at its end
  acc_t* dk_p;          // [nsplit,B,H,M,D] partials, or nullptr
  acc_t* dv_p;          // [nsplit,B,H,M,Dv]
  acc_t* cs_p;          // [nsplit,B,H,M] Σ_i dS, or nullptr without token weights
  int64_t bq, bk, nqb, ntasks;
  bool exact;
  BlockGemms<acc_t> gemms;
  // bf16 inputs with the bf16 products of the forward (bf16_dot_mode().qk): S = scale·Q K^T and
  // dP = dO V^T by vdpbf16ps as well. Both take bf16 operands as they are (products exact in fp32, only
  // the order of the sums differs), and S is then bitwise the S of the forward, which took the same
  // kernel. K and V of the task's (b, h) packed into VNNI pairs along D / Dv ([pairs][ldkp][2], ldkp with
  // room for a 32-column tile at any key offset); Q and dO rows read in place as pairs when their rows are
  // unit-stride with an even length, else copied per block (zero-padded to even). dV, dK, dQ stay fp32.
  bool bdot = false;
  int64_t kpairs, vpairs, ldkp;
  // The products through cpublas::brgemm (b16 != kNone): K^T and V^T of the task's (b, h) as panels(M)
  // panels of [dkp x 64] / [dvp x 64], K per key block as panels(D) panels of [even(cols) x 64] (block kb
  // at kb·panels(D)·bkp·64), Q and dO of a query block as panels of [even(rows) x 64]; Q and dO rows as
  // pairs like bdot for S and dP.
  brg16::Mode b16 = brg16::Mode::kNone;
  bool b16_packed = false;
  int64_t dkp, dvp, bkp, nkb;
  at::ScalarType dtype;

  BwdPlan(const BwdTensors& t, double scale_d, int64_t map_start_, int64_t map_stop_, int64_t nsplit_,
          const Blocks& blk)
      : B(t.query.size(0)), H(t.query.size(1)), N(t.query.size(2)), D(t.query.size(3)), M(t.k_op.size(2)),
        Dv(t.v_op.size(3)), map_start(map_start_), map_stop(map_stop_), Mm(map_stop_ - map_start_),
        scale(static_cast<acc_t>(scale_d)), inv_h(acc_t(1) / static_cast<acc_t>(t.query.size(1))),
        qv(t.query), gov(t.grad_out), ov(t.out), kv(t.k_op), vv(t.v_op), kops(t.k_op), vops(t.v_op),
        dqv(t.dq), dkv(t.dk), dvv(t.dv), ldk(kops.ld()), ldv(vops.ld()),
        ldq_direct(kSame ? gemm_ld(t.query, t.query.scalar_type()) : -1),
        ldgo_direct(kSame ? gemm_ld(t.grad_out, t.grad_out.scalar_type()) : -1),
        bias_p(t.bias.defined() ? t.bias.data_ptr<acc_t>() : nullptr), lse_p(t.lse.data_ptr<acc_t>()),
        glse_p(t.grad_lse.defined() ? t.grad_lse.data_ptr<acc_t>() : nullptr),
        gmap_p(t.grad_map.defined() ? t.grad_map.data_ptr<acc_t>() : nullptr), nsplit(nsplit_),
        direct_dkv(nsplit_ == 1), dk_p(direct_dkv ? nullptr : t.dk_part.data_ptr<acc_t>()),
        dv_p(direct_dkv ? nullptr : t.dv_part.data_ptr<acc_t>()),
        cs_p(t.colsum.defined() ? t.colsum.data_ptr<acc_t>() : nullptr), bq(blk.bq), bk(blk.bk), nqb(blk.nqb),
        ntasks(B * H * nsplit_), exact(blk.nkb == 1) {
    gemms.scale = scale;
    gemms.D = D;
    gemms.M = M;
    if constexpr (std::is_same_v<acc_t, float>) gemms.brg = blas::brgemm_f32_available();
    dtype = t.query.scalar_type();
    b16 = reduced_gemm_mode(dtype);
    b16_packed = b16 == brg16::Mode::kPacked;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (b16 == brg16::Mode::kNone) bdot = bf16_dot_mode().qk;
    }
    dkp = brg16::even(D);
    dvp = brg16::even(Dv);
    bkp = brg16::even(bk);
    nkb = (M + bk - 1) / bk;
    kpairs = (D + 1) / 2;
    vpairs = (Dv + 1) / 2;
    ldkp = bf16dot::round_up(M, bf16dot::kTileN) + bf16dot::kTileN;
  }
};

// The per-thread state of the backward tasks and the steps of one task: the (b, h) operands, then per
// query block the rows, Δ (online blocks), and per key block P, dP, dS and the four products.
template <typename scalar_t, typename acc_t>
class BwdWorker {
 public:
  using Plan = BwdPlan<scalar_t, acc_t>;

  explicit BwdWorker(const Plan& p)
      : p_(p),
        kpack_(p.bdot ? p.kpairs * p.ldkp * 2 : 0),
        vpack_(p.bdot ? p.vpairs * p.ldkp * 2 : 0),
        q16buf_(p.bdot || p.b16 != brg16::Mode::kNone ? p.bq * 2 * p.kpairs : 0),
        go16buf_(p.bdot || p.b16 != brg16::Mode::kNone ? p.bq * 2 * p.vpairs : 0),
        kpan_(p.b16 != brg16::Mode::kNone ? brg16::panels(p.M) * p.dkp * brg16::kPanel : 0),
        vpan_(p.b16 != brg16::Mode::kNone ? brg16::panels(p.M) * p.dvp * brg16::kPanel : 0),
        pantmp_(p.b16 != brg16::Mode::kNone
                    ? std::max({p.dkp, p.dvp, brg16::even(p.bq), p.bkp}) * brg16::kPanel : 0),
        kblk_(p.b16 != brg16::Mode::kNone ? p.nkb * brg16::panels(p.D) * p.bkp * brg16::kPanel : 0),
        qpan_(p.b16 != brg16::Mode::kNone ? brg16::panels(p.D) * brg16::even(p.bq) * brg16::kPanel : 0),
        gopan_(p.b16 != brg16::Mode::kNone ? brg16::panels(p.Dv) * brg16::even(p.bq) * brg16::kPanel : 0),
        a16_(p.b16 != brg16::Mode::kNone ? std::max(p.bk * brg16::even(p.bq), p.bq * p.bkp) : 0),
        s16_(p.b16 != brg16::Mode::kNone ? p.bq * (brg16::panels(p.bk) + 1) * brg16::kPanel : 0),
        c16_(p.b16 != brg16::Mode::kNone
                 ? std::max(p.bk, p.bq) * std::max(brg16::panels(p.D), brg16::panels(p.Dv)) * brg16::kPanel : 0),
        qbuf_(p.ldq_direct < 0 ? p.bq * p.D : 0),
        gobuf_(p.ldgo_direct < 0 ? p.bq * p.Dv : 0),
        pbuf_(p.bq * p.bk),
        dsbuf_(p.bq * p.bk),
        dqbuf_(p.bq * p.D),
        delta_(p.bq),
        orow_(p.exact ? 0 : p.Dv),
        dkbuf_(p.direct_dkv ? p.M * p.D : 0),
        dvbuf_(p.direct_dkv ? p.M * p.Dv : 0) {}

  void run_task(int64_t task) {
    const int64_t split = task % p_.nsplit, bh = task / p_.nsplit;
    const int64_t qb_begin = split * p_.nqb / p_.nsplit, qb_end = (split + 1) * p_.nqb / p_.nsplit;
    const Head hd = load_head(split, bh);
    for (int64_t qb = qb_begin; qb < qb_end; ++qb) query_block(hd, qb * p_.bq, std::min(p_.bq, p_.N - qb * p_.bq));
    if (p_.direct_dkv) {
      store_block(hd.dk, p_.D, p_.M, p_.D, p_.dkv.at(hd.b, hd.h, 0), p_.dkv.sl, p_.dkv.sd);
      store_block(hd.dv, p_.Dv, p_.M, p_.Dv, p_.dvv.at(hd.b, hd.h, 0), p_.dvv.sl, p_.dvv.sd);
    }
  }

 private:
  // The (b, h) of a task: its K/V operands and where its dK, dV, Σ dS accumulate.
  struct Head {
    int64_t b, h, bh;
    const acc_t* kp;
    const acc_t* vp;  // nullptr with the bf16 products (dP reads packed V)
    const acc_t* brow;
    acc_t* dk;
    acc_t* dv;
    acc_t* cs;
  };
  // One query block [i0, i0 + rows) of a task: Q and dO rows as the products read them.
  struct Rows {
    int64_t i0, rows;
    const acc_t* qp;
    const acc_t* gop;
    int64_t ldq, ldgo;
    const uint16_t* q16;
    const uint16_t* go16;
    int64_t ldq16, ldgo16;
    const acc_t* lse_rows;
    const acc_t* glse_rows;
    const acc_t* gmap_rows;
  };

  Head load_head(int64_t split, int64_t bh) {
    const int64_t b = bh / p_.H, h = bh % p_.H, M = p_.M;
    Head hd{b, h, bh, p_.kops.rows(b, h, p_.H, kbuf_, k_cached_), nullptr, nullptr, nullptr, nullptr, nullptr};
    const bool b16 = p_.b16 != brg16::Mode::kNone;
    hd.vp = p_.bdot || b16 ? nullptr : p_.vops.rows(b, h, p_.H, vbuf_, v_cached_);
    if (b16) {
      if (pack_cached_ != bh) {  // K^T [D x M] and V^T [Dv x M]: element (d, j) is K[j][d] / V[j][d]
        brg16::pack_panels(reinterpret_cast<const uint16_t*>(p_.kv.at(b, h, 0)), p_.kv.sd, p_.kv.sl, p_.D, M, p_.dtype,
                           p_.b16_packed, kpan_.data(), pantmp_.data());
        brg16::pack_panels(reinterpret_cast<const uint16_t*>(p_.vv.at(b, h, 0)), p_.vv.sd, p_.vv.sl, p_.Dv, M,
                           p_.dtype, p_.b16_packed, vpan_.data(), pantmp_.data());
        for (int64_t kb = 0; kb < p_.nkb; ++kb) {  // K rows of each key block: the B operand of dQ = dS K
          const int64_t j0 = kb * p_.bk;
          brg16::pack_panels(reinterpret_cast<const uint16_t*>(p_.kv.at(b, h, j0)), p_.kv.sl, p_.kv.sd,
                             std::min(p_.bk, M - j0), p_.D, p_.dtype, p_.b16_packed,
                             kblk_.data() + kb * brg16::panels(p_.D) * p_.bkp * brg16::kPanel, pantmp_.data());
        }
        pack_cached_ = bh;
      }
    } else if (p_.bdot) {
      if (pack_cached_ != bh) {
        bf16dot::pack_pairs(reinterpret_cast<const uint16_t*>(p_.kv.at(b, h, 0)), p_.kv.sd, p_.kv.sl, p_.D, M,
                            kpack_.data(), p_.ldkp);
        bf16dot::pack_pairs(reinterpret_cast<const uint16_t*>(p_.vv.at(b, h, 0)), p_.vv.sd, p_.vv.sl, p_.Dv, M,
                            vpack_.data(), p_.ldkp);
        pack_cached_ = bh;
      }
    } else {
      p_.gemms.prepare(hd.kp, p_.ldk, bh, ktbuf_, kt_cached_);
      if (p_.gemms.brg && vt_cached_ != bh) {
        transpose_rows(hd.vp, p_.ldv, M, p_.Dv, acc_t(1), vtbuf_);  // V^T [Dv x M]
        vt_cached_ = bh;
      }
    }
    hd.brow = p_.bias_p != nullptr ? p_.bias_p + bh * M : nullptr;
    hd.dk = p_.direct_dkv ? dkbuf_.data() : p_.dk_p + (split * p_.B * p_.H + bh) * M * p_.D;
    hd.dv = p_.direct_dkv ? dvbuf_.data() : p_.dv_p + (split * p_.B * p_.H + bh) * M * p_.Dv;
    if (p_.direct_dkv) {
      std::fill(dkbuf_.begin(), dkbuf_.end(), acc_t(0));
      std::fill(dvbuf_.begin(), dvbuf_.end(), acc_t(0));
    }
    hd.cs = p_.cs_p != nullptr ? p_.cs_p + (split * p_.B * p_.H + bh) * M : nullptr;
    return hd;
  }

  Rows load_rows(const Head& hd, int64_t i0, int64_t rows) {
    const int64_t b = hd.b, h = hd.h, D = p_.D, Dv = p_.Dv;
    Rows r{i0, rows, nullptr, nullptr, D, Dv, nullptr, nullptr, 0, 0, p_.lse_p + hd.bh * p_.N + i0,
           p_.glse_p != nullptr ? p_.glse_p + hd.bh * p_.N + i0 : nullptr,
           p_.gmap_p != nullptr ? p_.gmap_p + (b * p_.N + i0) * p_.Mm : nullptr};
    std::tie(r.qp, r.ldq) = acc_rows(p_.qv, p_.ldq_direct, b, h, i0, rows, D, qbuf_.data());
    std::tie(r.gop, r.ldgo) = acc_rows(p_.gov, p_.ldgo_direct, b, h, i0, rows, Dv, gobuf_.data());
    if (p_.bdot || p_.b16 != brg16::Mode::kNone) {  // 16-bit pairs of the block's Q and dO rows
      std::tie(r.q16, r.ldq16) = bf16_pair_rows(p_.qv, b, h, i0, rows, D, q16buf_.data());
      std::tie(r.go16, r.ldgo16) = bf16_pair_rows(p_.gov, b, h, i0, rows, Dv, go16buf_.data());
    }
    if (p_.b16 != brg16::Mode::kNone) {  // Q and dO rows of the block: the B operands of dK and dV
      brg16::pack_panels(reinterpret_cast<const uint16_t*>(p_.qv.at(b, h, i0)), p_.qv.sl, p_.qv.sd, rows, D,
                         p_.dtype, p_.b16_packed, qpan_.data(), pantmp_.data());
      brg16::pack_panels(reinterpret_cast<const uint16_t*>(p_.gov.at(b, h, i0)), p_.gov.sl, p_.gov.sd, rows, Dv,
                         p_.dtype, p_.b16_packed, gopan_.data(), pantmp_.data());
    }
    return r;
  }

  // c[rows x cols] (ld = cols) = alpha · A · X[:, j0 : j0 + cols] through brgemm, X the panels `pan` of
  // kdp-row pairs: the product over the whole 64-column panels that hold the range into s16_, then copied
  void b16_product(int64_t rows, int64_t j0, int64_t cols, const uint16_t* a, int64_t lda, int64_t kdp,
                   const uint16_t* pan, acc_t alpha, acc_t* c) {
    const int64_t a0 = j0 / brg16::kPanel * brg16::kPanel, off = j0 - a0, np = brg16::panels(off + cols);
    const int64_t w = np * brg16::kPanel;
    if constexpr (std::is_same_v<acc_t, float>) {
      brg16::gemm(rows, np, kdp, a, lda, pan + a0 * kdp, s16_.data(), w, false, p_.dtype, p_.b16_packed);
      for (int64_t i = 0; i < rows; ++i) {
        std::copy_n(s16_.data() + i * w + off, cols, c + i * cols);
        if (alpha != acc_t(1)) scale_row(c + i * cols, cols, alpha);
      }
    }
  }

  // P of the keys [j0, j0 + cols) into p (ld = cols); rows without a valid key give P = 0
  void probs(const Head& hd, const Rows& r, int64_t j0, int64_t cols, acc_t* p) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (p_.b16 != brg16::Mode::kNone) {
        b16_product(r.rows, j0, cols, r.q16, r.ldq16, p_.dkp, kpan_.data(), p_.scale, p);
      } else if (p_.bdot) {
        bf16dot::gemm(r.rows, cols, p_.kpairs, r.q16, r.ldq16, kpack_.data() + j0 * 2, p_.ldkp, p_.scale, false, p,
                      cols);
      } else {
        p_.gemms.scores(r.rows, cols, j0, r.qp, r.ldq, hd.kp, p_.ldk, ktbuf_, p);
      }
    } else {
      p_.gemms.scores(r.rows, cols, j0, r.qp, r.ldq, hd.kp, p_.ldk, ktbuf_, p);
    }
    for (int64_t i = 0; i < r.rows; ++i) {
      acc_t* pr = p + i * cols;
      if (r.lse_rows[i] == neg_inf<acc_t>()) {
        std::fill(pr, pr + cols, acc_t(0));
      } else {
        exp_sum<acc_t>(pr, hd.brow != nullptr ? hd.brow + j0 : nullptr, cols, r.lse_rows[i]);
      }
    }
  }

  // Δ_i = dO_i·O_i + (1/H) Σ_{j in map} P_ij dA_ij - grad_lse_i, before the key loop (online blocks; with
  // one key block Δ comes from that block's P and dP)
  void online_delta(const Head& hd, const Rows& r) {
    for (int64_t i = 0; i < r.rows; ++i) {
      load_block(p_.ov.at(hd.b, hd.h, r.i0 + i), p_.ov.sl, p_.ov.sd, 1, p_.Dv, orow_.data());
      delta_[i] = dot_row(r.gop + i * r.ldgo, orow_.data(), p_.Dv);
      if (r.glse_rows != nullptr) delta_[i] -= r.glse_rows[i];
    }
    if (r.gmap_rows == nullptr) return;
    for (int64_t j0 = p_.map_start; j0 < p_.map_stop; j0 += p_.bk) {
      const int64_t cols = std::min(p_.bk, p_.map_stop - j0);
      probs(hd, r, j0, cols, pbuf_.data());
      for (int64_t i = 0; i < r.rows; ++i)
        delta_[i] += p_.inv_h * dot_row(pbuf_.data() + i * cols, r.gmap_rows + i * p_.Mm + (j0 - p_.map_start), cols);
    }
  }

  // ds[rows x cols] = dP = dO V[j0 : j0 + cols]^T (+ dA / H on the map columns)
  void grad_probs(const Head& hd, const Rows& r, int64_t j0, int64_t cols, acc_t* ds) {
    if (p_.b16 != brg16::Mode::kNone) {
      b16_product(r.rows, j0, cols, r.go16, r.ldgo16, p_.dvp, vpan_.data(), acc_t(1), ds);
    } else if (p_.bdot) {
      if constexpr (std::is_same_v<acc_t, float>)
        bf16dot::gemm(r.rows, cols, p_.vpairs, r.go16, r.ldgo16, vpack_.data() + j0 * 2, p_.ldkp, 1.0f, false, ds,
                      cols);
    } else if (p_.gemms.brg) {
      if constexpr (std::is_same_v<acc_t, float>)
        blas::brgemm_f32(r.rows, cols, p_.Dv, r.gop, r.ldgo, vtbuf_.data() + j0, p_.M, ds, cols, false);
    } else {
      blas::gemm(false, true, r.rows, cols, p_.Dv, acc_t(1), r.gop, r.ldgo, hd.vp + j0 * p_.ldv, p_.ldv, acc_t(0), ds,
                 cols);
    }
    const int64_t m0 = std::max(j0, p_.map_start), m1 = std::min(j0 + cols, p_.map_stop);
    if (r.gmap_rows != nullptr && m0 < m1) {
      for (int64_t i = 0; i < r.rows; ++i)
        axpy_row(ds + i * cols + (m0 - j0), r.gmap_rows + i * p_.Mm + (m0 - p_.map_start), m1 - m0, p_.inv_h);
    }
  }

  // One key block: P, dP, dS = P (dP - Δ) (and Σ_i dS), then dV += P^T dO, dK += scale dS^T Q, dQ (+)= dS K
  void key_block(const Head& hd, const Rows& r, int64_t j0, int64_t cols) {
    const int64_t D = p_.D, Dv = p_.Dv;
    acc_t* p = pbuf_.data();
    acc_t* ds = dsbuf_.data();
    probs(hd, r, j0, cols, p);
    grad_probs(hd, r, j0, cols, ds);
    for (int64_t i = 0; i < r.rows; ++i) {
      acc_t* pr = p + i * cols;
      acc_t* dr = ds + i * cols;
      if (p_.exact) delta_[i] = dot_row(pr, dr, cols) - (r.glse_rows != nullptr ? r.glse_rows[i] : acc_t(0));
      using Vec = Vectorized<acc_t>;
      constexpr int64_t W = Vec::size();
      const Vec vd(delta_[i]);
      int64_t j = 0;
      for (; j + W <= cols; j += W) (Vec::loadu(pr + j) * (Vec::loadu(dr + j) - vd)).store(dr + j);
      for (; j < cols; ++j) dr[j] = pr[j] * (dr[j] - delta_[i]);
      if (hd.cs != nullptr) add_row(hd.cs + j0, dr, cols);
    }
    if (p_.b16 != brg16::Mode::kNone) {
      b16_grads(hd, r, j0, cols, p, ds);
      return;
    }
    blas::gemm(true, false, cols, Dv, r.rows, acc_t(1), p, cols, r.gop, r.ldgo, acc_t(1), hd.dv + j0 * Dv, Dv);
    blas::gemm(true, false, cols, D, r.rows, p_.scale, ds, cols, r.qp, r.ldq, acc_t(1), hd.dk + j0 * D, D);
    if (p_.gemms.brg) {  // dS K unscaled; the scale is applied once on the store (query_block)
      if constexpr (std::is_same_v<acc_t, float>)
        brgemm_f32_tail_split(r.rows, D, cols, ds, cols, hd.kp + j0 * p_.ldk, p_.ldk, dqbuf_.data(), D, j0 != 0);
    } else {
      blas::gemm(false, false, r.rows, D, cols, p_.scale, ds, cols, hd.kp + j0 * p_.ldk, p_.ldk,
                 acc_t(j0 == 0 ? 0 : 1), dqbuf_.data(), D);
    }
  }

  // a[j·lda + i] = x[i·cols + j] rounded to the input dtype (x [rows x cols] -> a [cols x lda]), zero at
  // i == rows when lda > rows
  void to_reduced_t(const acc_t* x, int64_t rows, int64_t cols, int64_t lda) {
    auto* a = reinterpret_cast<scalar_t*>(a16_.data());
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = 0; i < rows; ++i) a[j * lda + i] = static_cast<scalar_t>(x[i * cols + j]);
    if (lda > rows)
      for (int64_t j = 0; j < cols; ++j) a[j * lda + rows] = scalar_t(0);
  }

  // dV += P^T dO, dK += scale·dS^T Q, dQ (+)= dS K (unscaled; scaled on the store) through brgemm, P and dS
  // rounded to the input dtype; each product into c16_ at whole panels, then added to the accumulators
  void b16_grads(const Head& hd, const Rows& r, int64_t j0, int64_t cols, const acc_t* p, const acc_t* ds) {
    if constexpr (std::is_same_v<acc_t, float>) {
      const int64_t rows = r.rows, er = brg16::even(rows), ec = brg16::even(cols), D = p_.D, Dv = p_.Dv;
      const int64_t pd = brg16::panels(D), pv = brg16::panels(Dv), wd = pd * brg16::kPanel, wv = pv * brg16::kPanel;
      acc_t* c = c16_.data();
      to_reduced_t(p, rows, cols, er);
      brg16::gemm(cols, pv, er, a16_.data(), er, gopan_.data(), c, wv, false, p_.dtype, p_.b16_packed);
      for (int64_t j = 0; j < cols; ++j) add_row(hd.dv + (j0 + j) * Dv, c + j * wv, Dv);
      to_reduced_t(ds, rows, cols, er);
      brg16::gemm(cols, pd, er, a16_.data(), er, qpan_.data(), c, wd, false, p_.dtype, p_.b16_packed);
      for (int64_t j = 0; j < cols; ++j) axpy_row(hd.dk + (j0 + j) * D, c + j * wd, D, p_.scale);
      auto* a = reinterpret_cast<scalar_t*>(a16_.data());
      for (int64_t i = 0; i < rows; ++i) {
        at::vec::convert(ds + i * cols, a + i * ec, cols);
        if (ec > cols) a[i * ec + cols] = scalar_t(0);
      }
      brg16::gemm(rows, pd, ec, a16_.data(), ec,
                  kblk_.data() + (j0 / p_.bk) * pd * p_.bkp * brg16::kPanel, c, wd, false, p_.dtype, p_.b16_packed);
      for (int64_t i = 0; i < rows; ++i) {
        if (j0 == 0) {
          std::copy_n(c + i * wd, D, dqbuf_.data() + i * D);
        } else {
          add_row(dqbuf_.data() + i * D, c + i * wd, D);
        }
      }
    }
  }

  void query_block(const Head& hd, int64_t i0, int64_t rows) {
    const Rows r = load_rows(hd, i0, rows);
    if (!p_.exact) online_delta(hd, r);
    for (int64_t j0 = 0; j0 < p_.M; j0 += p_.bk) key_block(hd, r, j0, std::min(p_.bk, p_.M - j0));
    if (p_.gemms.brg || p_.b16 != brg16::Mode::kNone) scale_row(dqbuf_.data(), rows * p_.D, p_.scale);
    store_block(dqbuf_.data(), p_.D, rows, p_.D, p_.dqv.at(hd.b, hd.h, i0), p_.dqv.sl, p_.dqv.sd);
  }

  const Plan& p_;
  AVec<acc_t> ktbuf_, vtbuf_;
  int64_t kt_cached_ = -1, vt_cached_ = -1;
  AVec<uint16_t> kpack_, vpack_, q16buf_, go16buf_, kpan_, vpan_, pantmp_, kblk_, qpan_, gopan_, a16_;
  AVec<acc_t> s16_, c16_;
  int64_t pack_cached_ = -1;
  AVec<acc_t> qbuf_, gobuf_, pbuf_, dsbuf_, dqbuf_, delta_, orow_;
  AVec<acc_t> kbuf_, vbuf_, dkbuf_, dvbuf_;
  int64_t k_cached_ = -1, v_cached_ = -1;
};

template <typename scalar_t, typename acc_t>
void backward_kernel(const BwdTensors& t, double scale, int64_t map_start, int64_t map_stop, int64_t nsplit,
                     const Blocks& blk) {
  const BwdPlan<scalar_t, acc_t> plan(t, scale, map_start, map_stop, nsplit, blk);
  parallel_tasks(plan.ntasks, [&](const auto& next) {
    blas::SequentialScope sequential_blas;
    BwdWorker<scalar_t, acc_t> worker(plan);
    for (int64_t task = next(); task < plan.ntasks; task = next()) worker.run_task(task);
    if (plan.gemms.brg) blas::brgemm_f32_release();
    brg16::release(plan.b16_packed);
  });
}

}  // namespace
}  // namespace sra

void sra_attention_bwd_launch(const SraBwdArgs& a) {
  using sra::acc_type;
  const at::Tensor& query = a.query;
  const int64_t B = query.size(0), H = query.size(1), N = query.size(2), D = query.size(3);
  const int64_t M = a.key.size(2), Dv = a.value.size(3);
  const auto acc = acc_type(query.scalar_type());
  const bool has_w = a.token_weight.has_value() && a.token_weight->defined();

  sra::BwdTensors t;
  auto [bias, valid] = sra::make_bias(a.token_weight, a.key_padding_mask, a.strength, B, H, M, acc);
  t.bias = bias;
  t.grad_out = a.grad_out;
  t.out = a.out;
  t.query = query;
  t.k_op = a.key;  // converted per (b, h) inside the tasks when the GEMM cannot read it in place
  t.v_op = a.value;
  t.lse = a.lse;
  t.grad_map = a.grad_map;
  t.grad_lse = a.grad_lse;
  t.dq = a.dq;
  t.dk = a.dk;
  t.dv = a.dv;

  const sra::Blocks blk = sra::pick_blocks(B * H, N, M, 1);
  const int64_t nthreads = at::get_num_threads();
  const int64_t nsplit = std::clamp<int64_t>((2 * nthreads + B * H - 1) / (B * H), 1, blk.nqb);
  auto opts = query.options().dtype(acc);
  if (nsplit > 1) {
    t.dk_part = at::zeros({nsplit, B, H, M, D}, opts);
    t.dv_part = at::zeros({nsplit, B, H, M, Dv}, opts);
  }
  if (has_w) t.colsum = at::zeros({nsplit, B, H, M}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "sra_attention_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    sra::backward_kernel<scalar_t, acc_t>(t, a.scale, a.map_start, a.map_stop, nsplit, blk);
  });

  if (nsplit > 1) {
    a.dk.copy_(t.dk_part.sum(0));
    a.dv.copy_(t.dv_part.sum(0));
  }
  if (has_w) {  // dw = Σ_i dS · γ / w over the valid keys
    at::Tensor cs = nsplit == 1 ? t.colsum.select(0, 0) : t.colsum.sum(0);
    at::Tensor wf = a.token_weight->to(acc).expand({B, H, M});
    at::Tensor safe = at::where(valid, wf, at::ones({}, opts));
    a.dw.copy_(at::where(valid, cs * a.strength / safe, at::zeros({}, opts)));
  }
}

}  // namespace dare::cpu
