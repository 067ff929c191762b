// Memory helpers for the CPU kernels (see cpu_memory.h).
#include "cpu/cpu_memory.h"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "switches.h"

namespace dare::cpu {

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.defined() || !t.device().is_cpu() || !switches().huge_pages) return;
  const size_t nbytes = t.storage().nbytes();
  if (nbytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + nbytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)t;
#endif
}

}  // namespace dare::cpu
