"""A stand-in for ``hypothesis`` where it is not installed (an offline machine set up without the test
extras): test modules that import it still collect, and every ``@given`` test is skipped with the reason,
while the module's other tests run. tests/conftest.py installs it only when the real package is missing.
"""

from __future__ import annotations

import sys
import types

import pytest

REASON = "hypothesis is not installed here (pip install hypothesis, or the [test] extra)"


class _Anything:
    """Accepts any attribute access, call or decoration, returning itself: strategies, HealthCheck members."""

    def __getattr__(self, name):
        if name.startswith("__"):  # inspect and pytest probe dunders (__wrapped__, __file__): not ours
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __iter__(self):
        return iter(())


def _given(*args, **kwargs):
    def mark(fn):
        return pytest.mark.skip(reason=REASON)(fn)

    return mark


def _settings(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda fn: fn


def _composite(fn):
    return lambda *a, **k: _Anything()


def _module_getattr(make):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return make(name)

    return __getattr__


def install() -> None:
    """Register the stand-in as ``hypothesis`` (and ``hypothesis.strategies``) in sys.modules."""
    mod = types.ModuleType("hypothesis")
    strategies = types.ModuleType("hypothesis.strategies")
    strategies.__getattr__ = _module_getattr(lambda name: _composite if name == "composite" else _Anything())
    mod.given, mod.settings, mod.strategies = _given, _settings, strategies
    mod.HealthCheck = mod.Phase = mod.Verbosity = _Anything()
    mod.assume = mod.note = mod.example = lambda *a, **k: (lambda fn: fn) if k or not a else None
    mod.__getattr__ = _module_getattr(lambda name: _Anything())
    mod.__dare_stub__ = True
    sys.modules["hypothesis"] = mod
    sys.modules["hypothesis.strategies"] = strategies
