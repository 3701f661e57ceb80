r"""The SelectivBench network: input projection, L post-norm residual blocks, per-step decoder.

    h_0 = x W_in + b                              x [B, T, C] (one-hot letters, blanks, noise)
    h_l = LayerNorm(h_{l-1} + Dropout(mixer_l(h_{l-1})))    l = 1 .. L  (no FFN in these blocks)
    z   = h_L W_out + b                            [B, T, S] logits over the hidden-state classes

The transformer's blocks are ``nn.mixers.TransformerBlock`` (attention, then the 4x SwiGLU FFN,
each with its own post-norm residual). Every other model uses the block above with its mixer.

Models (``MODELS``; short aliases in ``ALIASES``):
    transformer, mamba, mamba2, gla, delta_net, gated_delta_net, gated_delta_product,
    and the controls linear_attention (no gate) and retnet (a fixed decay per head).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..nn import mixers
from ..nn.layers import EVAL, Dropout, LayerNorm, Linear, Module

MODELS = ("transformer", "mamba", "mamba2", "gla", "delta_net", "gated_delta_net",
          "gated_delta_product", "linear_attention", "retnet")
ALIASES = {"gdn": "gated_delta_net", "gdp": "gated_delta_product", "la": "linear_attention",
           "deltanet": "delta_net"}
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class ModelConfig:
    """The network's shape and the mixer options the ablations vary."""

    model: str = "gated_delta_net"
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 2
    dropout: float = 0.0
    expand_v: float = 2.0
    n_householder: int = 2            # gated_delta_product
    allow_neg_eigval: bool = False    # delta family: beta in (0, 2)
    decay_floor: float = 0.0          # gated_delta_net / product: alpha >= decay_floor
    gate: bool = True                 # gated_delta_net: False fixes alpha = 1
    gate_temperature: float = 16.0    # gla: logsigmoid(.) / temperature (1: off)
    d_state: int = 16                 # mamba, mamba2
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"model config: {name} must be an integer >= 1, got {value!r}")


def validate_model_config(c: ModelConfig) -> ModelConfig:
    """c with the model name resolved (aliases); a clear ValueError for anything invalid."""
    name = ALIASES.get(c.model, c.model)
    if name not in MODELS:
        raise ValueError(f"model config: unknown model {c.model!r}; expected one of "
                         f"{list(MODELS)} (aliases {ALIASES})")
    for field in ("d_model", "n_layers", "n_heads", "n_householder", "d_state"):
        _positive_int(field, getattr(c, field))
    if c.d_model % c.n_heads:
        raise ValueError(f"model config: n_heads = {c.n_heads} must divide d_model = {c.d_model}")
    if (c.d_model * c.expand_v) % c.n_heads or c.expand_v <= 0:
        raise ValueError(f"model config: expand_v = {c.expand_v} must be > 0 and give a value width "
                         f"d_model * expand_v divisible by n_heads = {c.n_heads}")
    if not 0 <= c.dropout < 1:
        raise ValueError(f"model config: dropout must lie in [0, 1), got {c.dropout!r}")
    if not 0 <= c.decay_floor < 1:
        raise ValueError(f"model config: decay_floor must lie in [0, 1), got {c.decay_floor!r}")
    if not c.gate_temperature > 0:
        raise ValueError(f"model config: gate_temperature must be > 0, got {c.gate_temperature!r}")
    if c.dtype not in DTYPES:
        raise ValueError(f"model config: dtype must be one of {DTYPES}, got {c.dtype!r}")
    return dataclasses.replace(c, model=name)


def make_mixer(c: ModelConfig, rng: np.random.Generator, backend: Optional[str]) -> Module:
    """The sequence mixer of one block for ModelConfig c (initialised from rng; backend for the
    ops)."""
    dtype = np.dtype(c.dtype)
    D, H = c.d_model, c.n_heads
    if c.model == "transformer":
        return mixers.TransformerBlock(D, H, rng, dropout=c.dropout, backend=backend, dtype=dtype)
    if c.model == "mamba":
        return mixers.Mamba(D, rng, d_state=c.d_state, backend=backend, dtype=dtype)
    if c.model == "mamba2":
        return mixers.Mamba2(D, H, rng, d_state=c.d_state, backend=backend, dtype=dtype)
    return mixers.LinearMixer(
        c.model, D, H, rng, expand_v=c.expand_v, output_gate=(c.model != "delta_net"),
        n_householder=c.n_householder, allow_neg_eigval=c.allow_neg_eigval,
        gate_temperature=c.gate_temperature, decay_floor=c.decay_floor, gate=c.gate,
        backend=backend, dtype=dtype)


class Block(Module):
    """x <- LayerNorm(x + Dropout(mixer(x)))."""

    def __init__(self, mixer: Module, D: int, dropout: float, dtype):
        super().__init__()
        self.children.update(mixer=mixer, drop=Dropout(dropout), norm=LayerNorm(D, dtype=dtype))

    def forward(self, x, ctx=EVAL):
        c = self.children
        m, cm = c["mixer"].forward(x, ctx)
        d, cd = c["drop"].forward(m, ctx)
        y, cn = c["norm"].forward(x + d)
        return y, (cm, cd, cn)

    def backward(self, cache, dy):
        cm, cd, cn = cache
        c = self.children
        dr, gn = c["norm"].backward(cn, dy)
        dd, _ = c["drop"].backward(cd, dr)
        dx, gm = c["mixer"].backward(cm, dd)
        return dr + dx, {**self.child_grads("norm", gn), **self.child_grads("mixer", gm)}


class SelectivBenchModel(Module):
    """The network of the module docstring. forward(x [B, T, C]) -> logits [B, T, S]."""

    def __init__(self, config: ModelConfig, n_inputs: int, n_classes: int, seed: int,
                 backend: Optional[str] = None):
        super().__init__()
        self.config = c = validate_model_config(config)
        _positive_int("n_inputs", n_inputs)
        _positive_int("n_classes", n_classes)
        dtype = np.dtype(c.dtype)
        rng = np.random.default_rng([seed, 0x5E1EC7])       # the initialisation stream of seed
        self.children["embed"] = Linear(n_inputs, c.d_model, rng, dtype=dtype)
        self.n_layers = c.n_layers
        for i in range(c.n_layers):
            mixer = make_mixer(c, rng, backend)
            self.children[f"blocks.{i}"] = (mixer if c.model == "transformer"
                                            else Block(mixer, c.d_model, c.dropout, dtype))
        self.children["decoder"] = Linear(c.d_model, n_classes, rng, dtype=dtype)

    def forward(self, x, ctx=EVAL):
        c = self.children
        if x.dtype != c["embed"].params["W"].dtype:
            x = x.astype(c["embed"].params["W"].dtype)    # the inputs are float32 one-hots
        h, ce = c["embed"].forward(x)
        caches = []
        for i in range(self.n_layers):
            h, ci = c[f"blocks.{i}"].forward(h, ctx)
            caches.append(ci)
        z, cd = c["decoder"].forward(h)
        return z, (ce, caches, cd)

    def backward(self, cache, dz):
        ce, caches, cd = cache
        c = self.children
        grads = {}
        dh, g = c["decoder"].backward(cd, dz)
        grads.update(self.child_grads("decoder", g))
        for i in reversed(range(self.n_layers)):
            dh, g = c[f"blocks.{i}"].backward(caches[i], dh)
            grads.update(self.child_grads(f"blocks.{i}", g))
        _, g = c["embed"].backward(ce, dh)
        grads.update(self.child_grads("embed", g))
        return None, grads
