// Memory helpers for the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace dare::cpu {

// Asks the OS to back the untouched pages of a large, freshly allocated output with transparent huge
// pages (Linux madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior of its storage). A fresh output of
// tens of MB otherwise costs one page fault per 4 KiB page on first write (~10 % of a CPU attention
// call). A hint only: without THP, on other systems, for small tensors, or when
// DARE_KERNELS_CPU_HUGE_PAGES=0, nothing happens. Values are never affected.
void advise_huge_pages(const at::Tensor& t);

}  // namespace dare::cpu
