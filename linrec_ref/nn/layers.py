"""Modules: parameters plus the forward/backward pair of :mod:`linrec_ref.nn.functional`.

The protocol, shared by every layer, mixer and model here:

    y, cache = module.forward(x, ctx)       ctx: Context (training or not, the dropout rng)
    dx, grads = module.backward(cache, dy)  grads: {parameter path: gradient}, every parameter

A module owns ``params`` (name -> array) and ``children`` (name -> module); ``parameters()``
flattens them to paths like ``"blocks.0.mixer.q_proj.W"``, and ``backward`` returns gradients
under the same paths, so the optimiser sees one flat dict. There is no tape and no autodiff
engine: each backward is written out and checked against finite differences in the tests.

Initialisation follows PyTorch's defaults: Linear weights and biases U(-1/sqrt(in), 1/sqrt(in)),
the depthwise conv U(-1/sqrt(J), 1/sqrt(J)), norm weights 1 and biases 0.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import numpy as np

from . import functional as F

Params = Dict[str, np.ndarray]


class Context(NamedTuple):
    """What a forward pass needs besides its input: training mode and the dropout generator."""
    training: bool = False
    rng: Optional[np.random.Generator] = None


EVAL = Context(False, None)


def uniform(rng: np.random.Generator, shape, bound: float, dtype) -> np.ndarray:
    """U(-bound, bound) of the given shape, cast to dtype (the layers' initialisation)."""
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Module:
    """Base class: ``params`` and ``children``, flattened by ``parameters()``."""

    def __init__(self):
        self.params: Params = {}
        self.children: Dict[str, Module] = {}

    def parameters(self, prefix: str = "") -> Params:
        out = {prefix + name: p for name, p in self.params.items()}
        for name, child in self.children.items():
            out.update(child.parameters(f"{prefix}{name}."))
        return out

    def load(self, params: Params, prefix: str = "") -> None:
        """Copy values into the parameters (same paths, shapes and dtypes), in place."""
        for name, p in self.params.items():
            new = params[prefix + name]
            if new.shape != p.shape or new.dtype != p.dtype:
                raise ValueError(f"load: parameter {prefix + name!r} is {p.shape} {p.dtype}, got "
                                 f"{new.shape} {new.dtype}")
            p[...] = new
        for name, child in self.children.items():
            child.load(params, f"{prefix}{name}.")

    def n_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters().values()))

    @staticmethod
    def child_grads(name: str, grads: Params) -> Params:
        """A child's gradients under the parent's paths."""
        return {f"{name}.{k}": v for k, v in grads.items()}


class Linear(Module):
    """y = x W^T + b; W [out, in] (PyTorch's layout), b [out] (bias=False: none)."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, bias: bool = True,
                 dtype=np.float32):
        super().__init__()
        bound = 1.0 / np.sqrt(n_in)
        self.params["W"] = uniform(rng, (n_out, n_in), bound, dtype)
        if bias:
            self.params["b"] = uniform(rng, (n_out,), bound, dtype)

    def forward(self, x, ctx=EVAL):
        return F.linear(x, self.params["W"], self.params.get("b"))

    def backward(self, cache, dy):
        g = F.linear_vjp(cache, dy)
        grads = {"W": g["W"]}
        if "b" in self.params:
            grads["b"] = g["b"]
        return g["x"], grads


class LayerNorm(Module):
    """LayerNorm over the last axis (D features), with weight and bias; hand-written backward."""
    def __init__(self, D: int, dtype=np.float32, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.params["w"] = np.ones(D, dtype)
        self.params["b"] = np.zeros(D, dtype)

    def forward(self, x, ctx=EVAL):
        return F.layer_norm(x, self.params["w"], self.params["b"], self.eps)

    def backward(self, cache, dy):
        g = F.layer_norm_vjp(cache, dy)
        return g["x"], {"w": g["w"], "b": g["b"]}


class RMSNorm(Module):
    """RMS norm over the last axis with a learnt weight of that size (per-head norms: D = head dim)."""

    def __init__(self, D: int, dtype=np.float32, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.params["w"] = np.ones(D, dtype)

    def forward(self, x, ctx=EVAL):
        return F.rms_norm(x, self.params["w"], self.eps)

    def backward(self, cache, dy):
        g = F.rms_norm_vjp(cache, dy)
        return g["x"], {"w": g["w"]}


class GatedRMSNorm(Module):
    """y = rms_norm(o) w * silu(z) over the last axis (per head in the mixers). forward((o, z))."""

    def __init__(self, D: int, dtype=np.float32, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.params["w"] = np.ones(D, dtype)

    def forward(self, oz, ctx=EVAL):
        o, z = oz
        return F.gated_rms_norm(o, z, self.params["w"], self.eps)

    def backward(self, cache, dy):
        g = F.gated_rms_norm_vjp(cache, dy)
        return (g["o"], g["z"]), {"w": g["w"]}


class ShortConv(Module):
    """Causal depthwise convolution of kernel J (4) over time on [B, T, C], then SiLU."""

    def __init__(self, C: int, rng: np.random.Generator, J: int = 4, bias: bool = False,
                 activation: Optional[str] = "silu", dtype=np.float32):
        super().__init__()
        self.activation = activation
        bound = 1.0 / np.sqrt(J)                                   # Conv1d: fan_in = J per channel
        self.params["w"] = uniform(rng, (C, J), bound, dtype)
        if bias:
            self.params["b"] = uniform(rng, (C,), bound, dtype)

    def forward(self, x, ctx=EVAL):
        return F.short_conv(x, self.params["w"], self.params.get("b"), self.activation)

    def backward(self, cache, dy):
        g = F.short_conv_vjp(cache, dy)
        grads = {"w": g["w"]}
        if "b" in self.params:
            grads["b"] = g["b"]
        return g["x"], grads


class Dropout(Module):
    """Dropout with probability p while training (Context.train), the identity in evaluation."""
    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must lie in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x, ctx=EVAL):
        return F.dropout(x, self.p if ctx.training else 0.0, ctx.rng)

    def backward(self, cache, dy):
        return F.dropout_vjp(cache, dy)["x"], {}


class SwiGLU(Module):
    """The feed-forward block W2 (silu(W1 x) * (W3 x)), hidden width F (no biases)."""

    def __init__(self, D: int, F_: int, rng: np.random.Generator, dtype=np.float32):
        super().__init__()
        self.params["W1"] = uniform(rng, (F_, D), 1 / np.sqrt(D), dtype)
        self.params["W3"] = uniform(rng, (F_, D), 1 / np.sqrt(D), dtype)
        self.params["W2"] = uniform(rng, (D, F_), 1 / np.sqrt(F_), dtype)

    def forward(self, x, ctx=EVAL):
        return F.swiglu(x, self.params["W1"], self.params["W3"], self.params["W2"])

    def backward(self, cache, dy):
        g = F.swiglu_vjp(cache, dy)
        return g["x"], {k: g[k] for k in ("W1", "W3", "W2")}
