"""diffusers integration: DARE (SRA) attention patching, captured maps, and DARE guidance.

    from dare_kernels.integrations.diffusers import apply_dare, DAREGuidance, dare_guidance
"""

from __future__ import annotations

from .patch import BRANCHES, SUPPORTED_MODELS, DAREHandle, apply_dare

__all__ = ["apply_dare", "DAREHandle", "SUPPORTED_MODELS", "BRANCHES"]
