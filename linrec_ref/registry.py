"""The catalogue of ops: name -> OpSpec, and name -> module with the forms.

Each op lives in ``linrec_ref/ops/<name>.py`` and defines ``SPEC`` plus the functions
``recurrent``, ``parallel``, ``chunkwise``, ``step``, ``attention_matrix`` (where one exists) and
the backward of each form, ``recurrent_vjp``, ``parallel_vjp``, ``chunkwise_vjp``; its closing
section defines ``make_inputs(rng, regime, dims, dtype, variant="default")``, the valid random
inputs behind ``linrec_ref.testing.make_inputs``.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, List

from ._spec import OpSpec

# In the order of recurrences.md section 3 (simplest first).
OP_NAMES = (
    "linear_attention", "retnet", "simple_gla", "gla", "mamba", "hgrn", "rwkv6", "lru", "mlstm",
    "delta_rule", "gated_delta_rule", "kda", "delta_product", "dplr", "rwkv7", "softmax_attention",
)

FORMS = ("recurrent", "parallel", "chunkwise")


def module(name: str) -> ModuleType:
    """The module implementing op ``name`` (raises KeyError with the known names)."""
    if name not in OP_NAMES:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(OP_NAMES)}")
    return importlib.import_module(f"linrec_ref.ops.{name}")


def available() -> tuple:
    """Names of the ops whose module is present (all of OP_NAMES in a complete checkout)."""
    import importlib.util
    return tuple(n for n in OP_NAMES if importlib.util.find_spec(f"linrec_ref.ops.{n}") is not None)


def spec(name: str) -> OpSpec:
    """The OpSpec of op ``name`` (arguments, shapes, state, options, peers, regimes)."""
    return module(name).SPEC


def all_specs() -> Dict[str, OpSpec]:
    """{op name: OpSpec} for every op of the catalogue."""
    return {name: spec(name) for name in available()}


def form(name: str, form_name: str):
    """The public function of one form: "recurrent", "parallel", "chunkwise", "step",
    "attention_matrix", or a backward "<form>_vjp"."""
    mod = module(name)
    if not hasattr(mod, form_name):
        raise KeyError(f"op {name!r} has no form {form_name!r}")
    return getattr(mod, form_name)


def catalogue() -> List[dict]:
    """One row per op: name, family, transition class, forms, inputs, state, peers."""
    rows = []
    for name, s in all_specs().items():
        forms = list(s.forms) + ["step"] + (["attention_matrix"] if s.has_attention_matrix else [])
        rows.append({
            "name": name,
            "family": s.family,
            "transition": s.transition,
            "math": s.math,
            "forms": forms,
            "inputs": [f"{a.name}[{','.join(a.dims)}]" + ("?" if a.optional else "") for a in s.inputs],
            "state": s.describe_state(),
            "options": dict(s.options),
            "peers": list(s.peers),
            "numba": list(numba_forms(name)),
        })
    return rows


def numba_forms(name: str) -> tuple:
    """The forms of op ``name`` that the Numba backend compiles (the others run the NumPy form
    there); read from the backend's table, without importing Numba."""
    from .backends import numba as numba_backend
    return numba_backend.accelerated(name)
