// Schemas of the SRA attention ops and their per-device implementations.
#include <torch/library.h>

#include "cpu/sra_attention.h"

TORCH_LIBRARY_FRAGMENT(dare_kernels, m) {
  m.def(
      "sra_attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? token_weight, "
      "Tensor? key_padding_mask, float strength, float scale, int map_start, int map_stop) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "sra_attention_bwd(Tensor grad_out, Tensor? grad_map, Tensor? grad_lse, Tensor query, "
      "Tensor key, Tensor value, Tensor? token_weight, Tensor? key_padding_mask, Tensor out, "
      "Tensor lse, float strength, float scale, int map_start, int map_stop) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dare_kernels, CPU, m) {
  m.impl("sra_attention_fwd", &dare::cpu::sra_attention_fwd);
  m.impl("sra_attention_bwd", &dare::cpu::sra_attention_bwd);
}
