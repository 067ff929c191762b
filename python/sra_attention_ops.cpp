// Schemas of the SRA attention ops. Per-device implementations: python/cpu/sra_attention_cpu.cpp,
// python/cuda/sra_attention_cuda.cpp; fake impls and autograd from Python (dare_kernels/sra.py).
#include <torch/library.h>

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
