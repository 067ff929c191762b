// Shared helpers of the CPU SRA attention kernels that are not templates (see sra_cpu_common.h).
#include "cpu/sra_cpu_common.h"

#include <string>

#include "cpu/cpu_isa.h"
#include "cpu/sra_attention.h"
#include "cpu/sra_rows_avx512.h"
#include "switches.h"

namespace dare::cpu::sra {

int64_t stream_out_bytes() { return switches().stream_out_bytes; }
int64_t score_budget() { return switches().score_budget; }
bool default_score_budget() { return switches().score_budget == Switches::kDefaultScoreBudget; }

Bf16DotMode bf16_dot_mode() {
  static const bool hw = bf16dot::supported();
  const Switches& sw = switches();
  TORCH_CHECK(sw.bf16_dot_error.empty(), sw.bf16_dot_error);
  using Dot = Switches::Bf16Dot;
  if (sw.bf16_dot == Dot::kOff || dare_isa_is_avx2()) return {};
  TORCH_CHECK(hw || sw.bf16_dot == Dot::kAuto, "DARE_KERNELS_CPU_BF16_DOT=", sw.bf16_dot == Dot::kOn ? "1" : "qk",
              " but this CPU (or OS, or compiler) lacks AVX-512 F/BW/VL/BF16");
  if (!hw) return {};
  // auto / qk: also kept off where PyTorch itself is kept below AVX-512
  if (sw.bf16_dot != Dot::kOn && aten_capability_below_avx512()) return {};
  return {true, sw.bf16_dot != Dot::kQk};
}

brg16::Mode reduced_gemm_mode(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return brg16::Mode::kNone;
  const Switches& sw = switches();
  TORCH_CHECK(sw.cpu_gemm_error.empty(), sw.cpu_gemm_error);
  using Gemm = Switches::CpuGemm;
  if (sw.cpu_gemm == Gemm::kNative) return brg16::Mode::kNone;
  const bool pack = brg16::could_pack(t);
  if (sw.cpu_gemm == Gemm::kBrgemm) return pack ? brg16::Mode::kPacked : brg16::Mode::kPlain;
  if (!pack || dare_isa_is_avx2() || aten_capability_below_avx512() || sw.blas_fallback) return brg16::Mode::kNone;
  return brg16::Mode::kPacked;
}

std::string cpu_sra_path(at::ScalarType t) {
  const F32Rows rows = f32_rows_path();
  const brg16::Mode mode = reduced_gemm_mode(t);
  const bool reduced = t == at::kBFloat16 || t == at::kHalf;
  const char* isa = rows == F32Rows::Vec ? "avx2" : rows == F32Rows::Avx512Bf16 ? "avx512-bf16" : "avx512f";
  if (mode == brg16::Mode::kPacked)  // (the softmax rows of an exact block; online blocks take the avx2 rows)
    return std::string(t == at::kHalf ? "amx-fp16" : "amx-bf16") + " / cpublas::brgemm (packed tiles), " + isa +
           " softmax rows";
  if (mode == brg16::Mode::kPlain)
    return std::string(isa) + " / cpublas::brgemm (plain panels: PyTorch's reference fallback)";
  const std::string f32 = blas::brgemm_f32_available() ? "oneDNN fp32 brgemm" : std::string(blas::backend_name());
  if (t == at::kBFloat16) {
    const Bf16DotMode dot = bf16_dot_mode();
    if (dot.qk) return std::string("avx512-bf16 / vdpbf16ps ") + (dot.pv ? "(S and P·V)" : "(S; P·V: " + f32 + ")");
  }
  return std::string(isa) + " / " + f32 + (reduced ? " (blocks converted to fp32)" : "");
}

F32Rows f32_rows_path() {
  static const bool hw_bf16 = bf16dot::supported(), hw_f = rows512::supported();
  const Switches& sw = switches();
  TORCH_CHECK(sw.rows_error.empty(), sw.rows_error);
  if (!hw_f || dare_isa_is_avx2() || aten_capability_below_avx512()) return F32Rows::Vec;
  return hw_bf16 && !sw.rows_avx512f ? F32Rows::Avx512Bf16 : F32Rows::Avx512F;
}

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

Blocks pick_blocks(int64_t B_tasks, int64_t N, int64_t M, int64_t min_tasks, int64_t map_cols,
                   int64_t max_map_rows) {
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

}  // namespace dare::cpu::sra

namespace dare::cpu {

std::string sra_cpu_path(at::ScalarType t) {
  try {
    return sra::cpu_sra_path(t);
  } catch (const c10::Error& e) {
    return std::string("error: ") + e.what_without_backtrace();
  }
}

}  // namespace dare::cpu
