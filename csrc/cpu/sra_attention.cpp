// SRA attention on CPU. PLACEHOLDER: a composite of ATen ops that materialises [B,H,N,M];
// the fused kernel (issue: foundation, point 5) replaces it.
#include "cpu/sra_attention.h"

#include <ATen/ATen.h>
#include <limits>

namespace dare::cpu {
namespace {

struct Probs {
  at::Tensor p;      // [B,H,N,M] float
  at::Tensor lse;    // [B,H,N] float (-inf for empty rows)
  at::Tensor valid;  // [B,H,1,M] bool
};

Probs probabilities(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& w,
                    const std::optional<at::Tensor>& mask, double strength, double scale) {
  auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto s = at::matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale;
  const auto B = q.size(0), H = q.size(1), M = k.size(2);
  auto valid = at::ones({B, H, 1, M}, q.options().dtype(at::kBool));
  if (mask) valid = valid & mask->view({B, 1, 1, M});
  if (w) {
    auto wf = w->to(acc).unsqueeze(2);
    valid = valid & (wf > 0);
    s = s + strength * at::log(at::where(valid, wf, at::ones_like(wf)));
  }
  s = s.masked_fill(valid.logical_not(), -std::numeric_limits<double>::infinity());
  auto mx = std::get<0>(s.max(-1, true));
  mx = at::where(at::isfinite(mx), mx, at::zeros_like(mx));
  auto e = at::exp(s - mx);
  auto denom = e.sum(-1, true);
  auto has = denom > 0;
  auto p = e / at::where(has, denom, at::ones_like(denom));
  auto lse = at::where(has, at::log(denom) + mx, at::full_like(denom, -std::numeric_limits<double>::infinity()));
  return {p, lse.squeeze(-1), valid};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sra_attention_fwd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& token_weight, const std::optional<at::Tensor>& key_padding_mask,
    double strength, double scale, int64_t map_start, int64_t map_stop) {
  const auto B = query.size(0), H = query.size(1), N = query.size(2), Dv = value.size(3);
  auto pr = probabilities(query, key, token_weight, key_padding_mask, strength, scale);
  auto o = at::matmul(pr.p, value.to(pr.p.scalar_type()));
  auto out = at::empty({B, N, H, Dv}, query.options()).transpose(1, 2);
  out.copy_(o);
  auto amap = pr.p.narrow(-1, map_start, map_stop - map_start).mean(1);
  return {out, pr.lse, amap};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sra_attention_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_map,
    const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& token_weight, const std::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& lse,
    double strength, double scale, int64_t map_start, int64_t map_stop) {
  const auto H = query.size(1);
  auto pr = probabilities(query, key, token_weight, key_padding_mask, strength, scale);
  auto acc = pr.p.scalar_type();
  auto q = query.to(acc), k = key.to(acc), v = value.to(acc), dO = grad_out.to(acc);
  auto dP = at::matmul(dO, v.transpose(-1, -2));
  if (grad_map && grad_map->numel() > 0) {
    dP.narrow(-1, map_start, map_stop - map_start).add_(grad_map->to(acc).unsqueeze(1) / double(H));
  }
  auto delta = (pr.p * dP).sum(-1, true);
  if (grad_lse) delta = delta - grad_lse->to(acc).unsqueeze(-1);
  auto dS = pr.p * (dP - delta);
  auto dq = at::empty_like(query), dk = at::empty_like(key), dv = at::empty_like(value);
  dq.copy_(at::matmul(dS, k) * scale);
  dk.copy_(at::matmul(dS.transpose(-1, -2), q) * scale);
  dv.copy_(at::matmul(pr.p.transpose(-1, -2), dO));
  at::Tensor dw;
  if (token_weight) {
    auto w = token_weight->to(acc);
    auto col = dS.sum(2);  // [B,H,M]
    auto valid = pr.valid.squeeze(2);
    dw = at::where(valid, strength * col / at::where(valid, w, at::ones_like(w)), at::zeros_like(col));
  } else {
    dw = at::empty({0}, query.options().dtype(query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  }
  return {dq, dk, dv, dw};
}

}  // namespace dare::cpu
