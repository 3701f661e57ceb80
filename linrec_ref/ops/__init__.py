"""The op modules, one per op (``linrec_ref.ops.gla``, ...); ``linrec_ref.registry`` lists them.

A module is imported on first access, so ``import linrec_ref; linrec_ref.ops.gla.recurrent``
works without importing every op up front.
"""
import importlib as _importlib

from ..registry import OP_NAMES as _OP_NAMES


def __getattr__(name: str):
    if name in _OP_NAMES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}; "
                         f"the ops are: {', '.join(_OP_NAMES)}")


def __dir__():
    return sorted(set(globals()) | set(_OP_NAMES))
