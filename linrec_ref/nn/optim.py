r"""Adam, global-norm gradient clipping and the warmup + cosine learning-rate schedule.

Adam (Kingma & Ba; PyTorch's ``torch.optim.Adam`` with weight_decay = 0, amsgrad = False):

    m <- b1 m + (1 - b1) g,      v <- b2 v + (1 - b2) g^2,          step n = 1, 2, ...
    p <- p - lr * (m / (1 - b1^n)) / (sqrt(v / (1 - b2^n)) + eps)

Clipping (``torch.nn.utils.clip_grad_norm_``): with G = sqrt(sum over all parameters of |g|^2),
every g is multiplied by min(1, max_norm / (G + 1e-6)).

Schedule: lr(n) = lr_max n / W for n <= W (linear warmup over W steps), then
lr_max (1 + cos(pi (n - W) / (N - W))) / 2, reaching 0 at the last step N.
"""
from __future__ import annotations

import math
from typing import Dict

import numpy as np

Params = Dict[str, np.ndarray]


def global_norm(grads: Params) -> float:
    """sqrt(sum of squares) over every gradient array (for clipping)."""
    return math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))


def clip_by_global_norm(grads: Params, max_norm: float) -> float:
    """Scale grads in place so that their global norm is at most max_norm; returns the norm before."""
    norm = global_norm(grads)
    factor = max_norm / (norm + 1e-6)
    if factor < 1:
        for g in grads.values():
            g *= g.dtype.type(factor)
    return norm


def warmup_cosine(step: int, total: int, lr_max: float, warmup: int) -> float:
    """The learning rate of step (1-based) of total (module docstring)."""
    if step <= warmup:
        return lr_max * step / max(warmup, 1)
    span = max(total - warmup, 1)
    return lr_max * 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


class Adam:
    """Adam over a flat parameter dict (updated in place). state(): what a checkpoint stores."""

    def __init__(self, params: Params, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.params = params
        self.b1, self.b2, self.eps = b1, b2, eps
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}
        self.n = 0

    def step(self, grads: Params, lr: float) -> None:
        missing = set(self.params) - set(grads)
        extra = set(grads) - set(self.params)
        if missing or extra:
            raise ValueError(f"Adam.step: gradients missing for {sorted(missing)}, unknown "
                             f"{sorted(extra)}")
        self.n += 1
        c1 = 1 - self.b1 ** self.n
        c2 = 1 - self.b2 ** self.n
        for k, p in self.params.items():
            g = grads[k]
            m, v = self.m[k], self.v[k]
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            p -= (lr * (m / c1) / (np.sqrt(v / c2) + self.eps)).astype(p.dtype, copy=False)

    def state(self) -> Params:
        out = {"n": np.array(self.n)}
        out.update({"m." + k: a for k, a in self.m.items()})
        out.update({"v." + k: a for k, a in self.v.items()})
        return out

    def load(self, state: Params) -> None:
        self.n = int(state["n"])
        for k in self.params:
            self.m[k][...] = state["m." + k]
            self.v[k][...] = state["v." + k]
