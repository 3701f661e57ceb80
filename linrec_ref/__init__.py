"""linrec_ref: a readable NumPy reference of linear recurrent sequence models.

Every op exists in three forms that agree in float64 (``recurrent``, the definition; ``parallel``,
the quadratic attention-like form; ``chunkwise``, the form fast kernels use) plus ``step`` for
decoding, each with a hand-written backward (``<form>_vjp``). Conventions follow the field's main
GPU library: layout [B, T, H, D], natural-log decays g <= 0, ``scale=None`` -> K^-1/2,
``initial_state`` / ``output_final_state`` returning ``(o, final_state)``, ``cu_seqlens`` varlen.

    import numpy as np, linrec_ref
    q, k, v = (np.random.randn(1, 64, 2, 16) for _ in range(3))
    g = np.log(np.random.uniform(0.5, 0.99, size=(1, 64, 2, 16)))
    o, S = linrec_ref.gla(q, k, v, g, form="chunkwise", output_final_state=True)

Entry points: one per op (``linrec_ref.gla``, ``linrec_ref.mamba``, ...), each with ``.vjp``,
``.step`` and ``.attention_matrix``; the op modules themselves are in ``linrec_ref.ops``
(``linrec_ref.ops.gla.recurrent``). The catalogue is ``linrec_ref.registry``; testing tools are
``linrec_ref.testing``.

Forms whose memory grows with T^2 (``parallel``, its vjp, ``attention_matrix``) estimate it
before allocating and raise ``MemoryLimitError`` above ``memory_limit()``: half the physical
memory by default, or the environment variable LINREC_MEMORY_LIMIT (bytes, or e.g. "64GiB"),
or ``set_memory_limit(n_bytes)`` (None restores the default).
"""
from __future__ import annotations

__version__ = "0.1.0"

from typing import Optional  # noqa: E402

from . import ops, registry  # noqa: E402
from ._validation import InputError, MemoryLimitError, memory_limit, set_memory_limit  # noqa: E402


def set_backend(name: Optional[str]) -> str:
    """Make ``name`` ("numpy", "numba", "auto", ...) the backend of calls with backend=None
    (None restores "auto"); returns the previous default. See ``linrec_ref.backends``."""
    from . import backends
    return backends.set_backend(name)


def get_backend() -> str:
    """The backend that backend=None currently stands for ("auto" unless set_backend changed it)."""
    from . import backends
    return backends.get_backend()

FORMS = ("recurrent", "parallel", "chunkwise")


class _OpDoc:
    """``Op.__doc__``: the class's own text on the class, the op module's docstring (recurrence,
    glossary, forms, peers) on an instance, so that ``help(linrec_ref.gla)`` shows the math."""

    def __init__(self, text: str):
        self.text = text

    def __get__(self, instance, owner):
        return self.text if instance is None else instance._module_doc()


class Op:
    __doc__ = _OpDoc("""Top-level entry point of one op with a backend dispatch point.

    op(*inputs, form="chunkwise", backend=None, **kwargs)      -> (o, final_state or None)
    op.vjp(*inputs, do, form="chunkwise", backend=None, ...)   -> {input: gradient}
    op.step(*token_inputs, state, backend=None, ...)           -> (o_t, new_state)
    op.attention_matrix(...)                                   -> [B, H, T, T]
    backend=None is the default backend: "auto" (Numba's compiled kernels when Numba is
    installed, else the NumPy reference) unless ``set_backend`` chose another; "numpy" is the
    reference itself. See ``linrec_ref.backends``. The numba backend also takes num_threads=n.
    The keyword arguments are those of the form (see ``linrec_ref.ops.<name>``).
    """)

    def __init__(self, name: str):
        self.name = name

    @property
    def spec(self):
        return registry.spec(self.name)

    @property
    def module(self):
        return registry.module(self.name)

    def _module_doc(self):  # the op module's docstring: recurrence, glossary, forms, peers
        try:
            return self.module.__doc__
        except ImportError:  # pragma: no cover
            return type(self).__doc__

    def _resolve(self, form: str, backend: Optional[str]):
        from . import backends
        base = form[:-4] if form.endswith("_vjp") else form
        if base not in FORMS + ("step", "attention_matrix"):
            raise ValueError(f"{self.name}: unknown form {form!r}; expected one of {', '.join(FORMS)}")
        return backends.get(backend).resolve(self.name, form)

    def __call__(self, *args, form: str = "chunkwise", backend: Optional[str] = None, **kwargs):
        return self._resolve(form, backend)(*args, **kwargs)

    def vjp(self, *args, form: str = "chunkwise", backend: Optional[str] = None, **kwargs):
        if form not in FORMS:
            raise ValueError(f"{self.name}: unknown form {form!r}; expected one of {', '.join(FORMS)}")
        return self._resolve(form + "_vjp", backend)(*args, **kwargs)

    def step(self, *args, backend: Optional[str] = None, **kwargs):
        return self._resolve("step", backend)(*args, **kwargs)

    def attention_matrix(self, *args, backend: Optional[str] = None, **kwargs):
        return self._resolve("attention_matrix", backend)(*args, **kwargs)

    def __getattr__(self, attr: str):
        """Other public names of the op's module (e.g. ``linrec_ref.lru.kernel``)."""
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.module, attr)

    def __repr__(self) -> str:
        return f"<linrec_ref op {self.name!r}>"


linear_attention = Op("linear_attention")
retnet = Op("retnet")
simple_gla = Op("simple_gla")
gla = Op("gla")
mamba = Op("mamba")
hgrn = Op("hgrn")
rwkv6 = Op("rwkv6")
lru = Op("lru")
mlstm = Op("mlstm")
delta_rule = Op("delta_rule")
gated_delta_rule = Op("gated_delta_rule")
kda = Op("kda")
delta_product = Op("delta_product")
dplr = Op("dplr")
rwkv7 = Op("rwkv7")
softmax_attention = Op("softmax_attention")

__all__ = (["Op", "InputError", "MemoryLimitError", "memory_limit", "set_memory_limit", "ops",
            "set_backend", "get_backend",
            "registry", "FORMS"] + list(registry.OP_NAMES))
