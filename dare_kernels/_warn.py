"""One-time warnings: a fallback or a degraded path says so once per process, not once per call."""

from __future__ import annotations

import warnings

_warned: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    """Emit ``message`` as a RuntimeWarning once per process for ``key``."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
