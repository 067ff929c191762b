"""Compatibility of the Triton interpreter (``TRITON_INTERPRET=1``) across the Triton versions we support.

Triton ≤ 3.6's interpreter holds every scalar kernel argument as a 1-element 1-D numpy array and
converts it to a Python int with ``int(array)`` when the kernel uses it as an index, e.g. as a bound of
``range(0, M, BLOCK_M)``. NumPy 2.4 turned that conversion (deprecated since NumPy 1.25) into
``TypeError: only 0-dimensional arrays can be converted to Python scalars``, so every kernel with a
runtime loop bound fails in the interpreter of Triton 3.6 with NumPy ≥ 2.4. Triton 3.7 squeezes the
array first. The compiled (GPU) path is unaffected: its code generator lowers such loops to ``scf.for``
and never converts a value to a Python int (``aot_check`` compiles every kernel under 3.6).

``patch_interpreter_index`` gives the old interpreter the 3.7 conversion; it touches nothing else and
does nothing on Triton ≥ 3.7 or when the kernels are compiled.
"""

from __future__ import annotations

import functools


def _version(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


@functools.lru_cache(maxsize=None)
def patch_interpreter_index() -> bool:
    """Make the interpreter's ``tensor.__index__`` accept 1-element arrays; True when it was patched."""
    import triton

    if _version(triton.__version__) >= (3, 7):
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:  # no interpreter in this build: nothing to fix
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False

    def index(self):
        return int(self.handle.data.squeeze())

    def _patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        if scope:  # Triton 3.6: the scope restores the previous value after the launch
            scope[0].set_attr(tensor, "__index__", index)
        else:  # older interpreters set it for good
            tensor.__index__ = index

    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
