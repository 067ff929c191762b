"""diffusers integration: DARE (SRA) attention patching, captured maps, and DARE guidance.

    from dare_kernels.integrations.diffusers import apply_dare, DAREGuidance, dare_guidance

Importing this package imports diffusers only when ``DAREGuidance`` is first used or a model is patched.
"""

from __future__ import annotations

from .guidance import CFG_MODES, dare_guidance
from .models import MODEL_TABLE, ModelEntry
from .patch import BRANCHES, SUPPORTED_MODELS, DAREHandle, apply_dare

__all__ = ["apply_dare", "DAREHandle", "SUPPORTED_MODELS", "MODEL_TABLE", "ModelEntry", "BRANCHES", "DAREGuidance",
           "dare_guidance", "CFG_MODES"]


def __getattr__(name):
    if name == "DAREGuidance":
        from . import guidance

        return guidance.DAREGuidance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
