r"""The layers' math: pure forward functions and their hand-written vjps.

Every layer is a pair

    y, cache = f(x, params...)          (forward: the output and what the backward needs)
    grads    = f_vjp(cache, dy)         (backward: a dict with the gradient of every input)

in the style of the ops' ``*_vjp`` forms: nothing is recorded on a tape, the forward returns what
its backward needs, and the backward returns every gradient (``d`` prefix = cotangent). Arrays
keep their dtype (float32 or float64); nothing is broadcast or cast silently. The modules in
:mod:`linrec_ref.nn.layers` hold the parameters and call these.

Shapes: x [..., D] for the per-token layers (any leading axes: [B, T, D] in the models),
[B, T, C] for the causal convolution, [B, T, H, D] for RoPE and the per-head norms.

Glossary (what each computes; the PyTorch name it matches)
    linear            y = x W^T + b,  W [out, in]                          nn.Linear
    layer_norm        y = (x - mean) / sqrt(var + eps) * w + b            nn.LayerNorm (eps 1e-5)
    rms_norm          y = x / sqrt(mean(x^2) + eps) * w                   nn.RMSNorm / fla RMSNorm
    gated_rms_norm    y = rms_norm(o) * silu(z)                          fla FusedRMSNormGated
    short_conv        y_t = sum_j w[:, j] x_{t-J+1+j} (+ b), causal,     fla ShortConvolution
                      depthwise, kernel J (4), then optional SiLU
    silu, sigmoid, softplus, logsigmoid   elementwise                     F.silu, ...
    l2_norm           y = x / sqrt(|x|^2 + 1e-6) over the last axis       fla l2norm
    dropout           y = x * m / (1 - p), m ~ Bernoulli(1 - p)           nn.Dropout (train mode)
    rope              half-split rotary embedding, angle t * base^(-2i/D) rotate_half RoPE
    swiglu            y = W2 (silu(W1 x) * (W3 x))                        LLaMA MLP
    cross_entropy     mean over masked steps of -log softmax(z)[y]        F.cross_entropy
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .._scan import sigmoid, softplus
from ..ops.gated_delta_rule import l2norm as _l2norm
from ..ops.gated_delta_rule import l2norm_vjp as _l2norm_vjp


def _sum_to(dx: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a parameter's per-token gradient [..., *shape] over its leading (token) axes."""
    lead = dx.ndim - len(shape)
    return dx.sum(axis=tuple(range(lead))) if lead else dx


# ----------------------------------------------------------------------------- linear
def linear(x, W, b=None):
    """y [..., out] = x [..., in] W^T [in, out] + b [out].

    The token axes are flattened first: one [N, in] x [in, out] product is one BLAS call, where
    x [B, T, in] @ W^T is B small ones (measured 2-3x slower at B = 32, T = 128, D = 64)."""
    x2 = x.reshape(-1, x.shape[-1])                               # [N, in]
    y = x2 @ W.T                                                  # [N, out]
    if b is not None:
        y += b
    return y.reshape(x.shape[:-1] + (W.shape[0],)), (x2, W, b is not None, x.shape)


def linear_vjp(cache, dy):
    """{x, W, b (None without bias)}: dx = dy W, dW = dy^T x summed over tokens, db = sum dy."""
    x2, W, has_b, shape = cache
    dy2 = dy.reshape(-1, dy.shape[-1])                            # [N, out]
    return {"x": (dy2 @ W).reshape(shape), "W": dy2.T @ x2, "b": dy2.sum(0) if has_b else None}


# ----------------------------------------------------------------------------- norms
def layer_norm(x, w, b, eps: float = 1e-5):
    """y = xhat w + b, xhat = (x - mean) r, r = 1 / sqrt(var + eps) (biased var, last axis)."""
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    r = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)    # [..., 1]
    xhat = xc * r
    return xhat * w + b, (xhat, r, w)


def layer_norm_vjp(cache, dy):
    """dx = r (g - mean(g) - xhat mean(g xhat)) with g = dy w; dw = sum dy xhat; db = sum dy."""
    xhat, r, w = cache
    g = dy * w
    dx = r * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return {"x": dx, "w": _sum_to(dy * xhat, w.shape), "b": _sum_to(dy, w.shape)}


def rms_norm(x, w=None, eps: float = 1e-6):
    """y = xn w, xn = x r, r = 1 / sqrt(mean(x^2) + eps) over the last axis (w None: no weight)."""
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)      # [..., 1]
    xn = x * r
    return (xn if w is None else xn * w), (xn, r, w)


def rms_norm_vjp(cache, dy):
    """dx = r (g - xn mean(g xn)) with g = dy w; dw = sum dy xn."""
    xn, r, w = cache
    g = dy if w is None else dy * w
    dx = r * (g - xn * (g * xn).mean(-1, keepdims=True))
    return {"x": dx, "w": None if w is None else _sum_to(dy * xn, w.shape)}


def gated_rms_norm(o, z, w, eps: float = 1e-6):
    """y = rms_norm(o, w) * silu(z) (the output gate of GLA, Mamba-2 and the delta nets)."""
    n, nc = rms_norm(o, w, eps)
    s, sc = silu(z)
    return n * s, (nc, sc, n, s)


def gated_rms_norm_vjp(cache, dy):
    """Backward of ``gated_rms_norm``: {"o", "z", "w"} cotangents from its cache and dy."""
    nc, sc, n, s = cache
    dn = rms_norm_vjp(nc, dy * s)
    return {"o": dn["x"], "z": silu_vjp(sc, dy * n)["x"], "w": dn["w"]}


def l2_norm(x):
    """y = x / sqrt(|x|^2 + 1e-6) over the last axis (per head: x [B, T, H, D])."""
    return _l2norm(x), x


def l2_norm_vjp(x, dy):
    """Backward of ``l2_norm``: {"x": dx} (with n = sqrt(|x|^2 + 1e-6), dx = (dy - y (y . dy)) / n)."""
    return {"x": _l2norm_vjp(x, dy)}


# ----------------------------------------------------------------------------- activations
def silu(x):
    """y = x sigmoid(x)."""
    s = sigmoid(x)
    return x * s, (x, s)


def silu_vjp(cache, dy):
    """dx = dy s (1 + x (1 - s))."""
    x, s = cache
    return {"x": dy * s * (1 + x * (1 - s))}


def sigmoid_(x):
    """y = 1 / (1 + e^-x) (trailing underscore: ``sigmoid`` is the plain helper it calls)."""
    s = sigmoid(x)
    return s, s


def sigmoid_vjp(s, dy):
    """Backward of ``sigmoid_`` from its output s: {"x": dy s (1 - s)}."""
    return {"x": dy * s * (1 - s)}


def softplus_(x):
    """y = log(1 + e^x), overflow-free."""
    return softplus(x), x


def softplus_vjp(x, dy):
    """dy sigmoid(x)."""
    return {"x": dy * sigmoid(x)}


def logsigmoid(x):
    """y = log sigmoid(x) = -softplus(-x)."""
    return -softplus(-x), x


def logsigmoid_vjp(x, dy):
    """dy sigmoid(-x)."""
    return {"x": dy * sigmoid(-x)}


# ----------------------------------------------------------------------------- convolution
def short_conv(x, w, b=None, activation: Optional[str] = "silu"):
    """Causal depthwise convolution over time: y_t[c] = sum_j w[c, j] x_{t-J+1+j}[c] (+ b[c]),
    zero before t = 0, then SiLU (activation "silu") or nothing (None).

    x [B, T, C], w [C, J] (PyTorch's Conv1d weight [C, 1, J] squeezed), b [C] or None.
    """
    B, T, C = x.shape
    J = w.shape[1]
    xp = np.concatenate([np.zeros((B, J - 1, C), x.dtype), x], axis=1)   # [B, T+J-1, C]
    u = np.zeros_like(x)
    for j in range(J):                                            # tap j reads x_{t-J+1+j}
        u += w[:, j] * xp[:, j:j + T]
    if b is not None:
        u = u + b
    if activation is None:
        return u, (xp, w, b is not None, None)
    if activation != "silu":
        raise ValueError(f"short_conv: activation must be 'silu' or None, got {activation!r}")
    y, sc = silu(u)
    return y, (xp, w, b is not None, sc)


def short_conv_vjp(cache, dy):
    """du = dy (through the SiLU); dx_s = sum_j w[:, j] du_{s+J-1-j}; dw[:, j] = sum_t du_t x_{t-J+1+j}."""
    xp, w, has_b, sc = cache
    du = dy if sc is None else silu_vjp(sc, dy)["x"]
    B, T, C = du.shape
    J = w.shape[1]
    dxp = np.zeros_like(xp)
    dw = np.empty_like(w)
    for j in range(J):
        dxp[:, j:j + T] += w[:, j] * du
        dw[:, j] = (du * xp[:, j:j + T]).sum(axis=(0, 1))
    return {"x": dxp[:, J - 1:], "w": dw, "b": du.sum(axis=(0, 1)) if has_b else None}


# ----------------------------------------------------------------------------- dropout
def dropout(x, p: float, rng: Optional[np.random.Generator]):
    """y = x m / (1 - p), m ~ Bernoulli(1 - p) per entry; identity when p = 0 or rng is None
    (evaluation)."""
    if p == 0 or rng is None:
        return x, None
    keep = (rng.random(x.shape) >= p).astype(x.dtype) / x.dtype.type(1 - p)
    return x * keep, keep


def dropout_vjp(keep, dy):
    """Backward of ``dropout``: {"x": dy times the same scaled keep mask} (dy itself without one)."""
    return {"x": dy if keep is None else dy * keep}


# ----------------------------------------------------------------------------- rotary
def rope_angles(T: int, D: int, base: float, dtype, offset: int = 0):
    """(cos, sin) [T, D/2] of the angles (offset + t) * base^(-2i/D), i < D/2."""
    if D % 2:
        raise ValueError(f"rope: the head dimension must be even, got {D}")
    inv = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)     # [D/2]
    ang = np.outer(np.arange(offset, offset + T, dtype=np.float64), inv)
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


def rope(x, base: float = 10000.0):
    """Half-split rotary embedding of x [B, T, H, D]: with x = [x1, x2] (halves of D),
    y = [x1 cos - x2 sin, x2 cos + x1 sin]; cos, sin [T, D/2]."""
    T, D = x.shape[1], x.shape[3]
    cos, sin = rope_angles(T, D, base, x.dtype)
    cos, sin = cos[None, :, None], sin[None, :, None]             # [1, T, 1, D/2]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1), (cos, sin)


def rope_vjp(cache, dy):
    """The transposed rotation: dx = [dy1 cos + dy2 sin, dy2 cos - dy1 sin]."""
    cos, sin = cache
    D = dy.shape[-1]
    d1, d2 = dy[..., :D // 2], dy[..., D // 2:]
    return {"x": np.concatenate([d1 * cos + d2 * sin, d2 * cos - d1 * sin], -1)}


# ----------------------------------------------------------------------------- SwiGLU
def swiglu(x, W1, W3, W2):
    """y [..., D] = W2 (silu(W1 x) * (W3 x)); W1, W3 [F, D], W2 [D, F] (no biases)."""
    a, ca = linear(x, W1)
    c, cc = linear(x, W3)
    s, cs = silu(a)
    y, cy = linear(s * c, W2)
    return y, (ca, cc, cs, cy, s, c)


def swiglu_vjp(cache, dy):
    """Backward of ``swiglu``: {"x", "W1", "W3", "W2"} cotangents from its cache and dy."""
    ca, cc, cs, cy, s, c = cache
    dh = linear_vjp(cy, dy)
    da = silu_vjp(cs, dh["x"] * c)["x"]
    ga, gc = linear_vjp(ca, da), linear_vjp(cc, dh["x"] * s)
    return {"x": ga["x"] + gc["x"], "W1": ga["W"], "W3": gc["W"], "W2": dh["W"]}


# ----------------------------------------------------------------------------- loss
class CrossEntropy(NamedTuple):
    loss: float            # mean over the masked steps of -log softmax(z)[y]
    dlogits: np.ndarray    # its gradient w.r.t. the logits [B, T, S]
    n: int                 # how many steps the mean is over


def cross_entropy(logits, y, mask) -> CrossEntropy:
    """Mean cross-entropy over the steps where mask is True, and its gradient (softmax - onehot)
    * mask / n. logits [B, T, S]; y [B, T] int (any value where masked out); mask [B, T] bool."""
    if logits.shape[:2] != y.shape or y.shape != mask.shape:
        raise ValueError(f"cross_entropy: logits [B, T, S] {logits.shape}, y {y.shape} and mask "
                         f"{mask.shape} must agree on [B, T]")
    n = int(mask.sum())
    if n == 0:
        raise ValueError("cross_entropy: the mask selects no step")
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))           # [B, T, S]
    yy = np.where(mask, y, 0)
    picked = np.take_along_axis(logp, yy[..., None], -1)[..., 0]  # [B, T]
    loss = float(-(picked * mask).sum() / n)
    d = np.exp(logp)
    np.put_along_axis(d, yy[..., None], np.take_along_axis(d, yy[..., None], -1) - 1, -1)
    d *= (mask / n).astype(logits.dtype)[..., None]
    return CrossEntropy(loss, d.astype(logits.dtype, copy=False), n)

