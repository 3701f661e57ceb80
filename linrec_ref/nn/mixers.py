r"""Token mixers: the sequence layers of the SelectivBench models, each calling a library op.

Every mixer maps x [B, T, D] -> y [B, T, D] and has the layer protocol of
:mod:`linrec_ref.nn.layers` (``forward(x, ctx) -> (y, cache)``, ``backward(cache, dy) ->
(dx, grads)``). The recurrence itself is the op's public entry point (``linrec_ref.<op>`` and
``.vjp``) on the default backend ("auto": the Numba kernels when Numba is installed), in the
recurrent form where the backend compiles it and the chunkwise form otherwise.

LinearMixer (linear attention, retnet, gla, delta_net, gated_delta_net, gated_delta_product):

    q, k, v  = x Wq, x Wk, x Wv              [B, T, Dk], [B, T, nh Dk], [B, T, nh Dv]
    q, k, v <- silu(causal_conv4(.))         (use_conv; one depthwise conv per projection)
    heads:     q [B, T, H, dk], k [B, T, (nh,) H, dk], v [B, T, (nh,) H, dv]
    beta     = c sigmoid(x Wb)               delta family; c = 2 allows beta in (0, 2)
    gate     gla:  gk = logsigmoid(x W1 W2 + b) / tau   per key channel (rank 16, tau = 16)
             gdn:  g = -exp(A_log) softplus(x Wa + dt_bias) per head (alpha = e^g)
                   decay_floor a_min: alpha <- a_min + (1 - a_min) alpha; gate=False: alpha = 1
             retnet: g_h = log(1 - 2^(-5 - h)) fixed;   linear_attention, delta_net: none
    o        = op(q, k, v, gate, beta)       [B, T, H, dv]   (q, k L2-normalised in the op for
                                                               the delta family)
    o       <- rms_norm(o) w * silu(x Wg)    (output_gate) or rms_norm(o) w, per head
    y        = o Wo                          [B, T, D]

Mamba (Mamba-1, ``mamba_simple``): [u, z] = x W_in (E = expand D each); u <- silu(conv4(u) + b);
[dt_low, Bm, Cm] = u W_x (rank R = ceil(D / 16), state N); delta = dt_low W_dt; the selective scan
``linrec_ref.mamba(u, delta, A = -exp(A_log), Bm, Cm, D, z, delta_bias, delta_softplus=True)``
(which applies the silu(z) gate); y = scan W_out.

Mamba2 (scalar decay per head, the SSD form): [z, xBC, dt] = x W_in; xBC <- silu(conv4(xBC) + b);
x [B, T, H, P], Bm, Cm [B, T, N] shared by the heads; dt = softplus(dt + dt_bias) [B, T, H];
``linrec_ref.simple_gla(q=Cm, k=Bm, v=x dt, g=dt A, scale=1)`` + D x; rms_norm(.) w * silu(z);
y = . W_out.

TransformerBlock (the attention baseline, a whole block with its own residuals):
q, k, v = x W + b per head; q, k <- rms_norm per head; RoPE (base 1000) on q, k; causal softmax
attention (``linrec_ref.softmax_attention``); h = LN(x + drop(o Wo + bo)); y = LN(h + drop(FFN(h)))
with the SwiGLU FFN of width 4 D.

Initialisation as the reference implementations: PyTorch's Linear default; Mamba's A_log =
log(1..N), D = 1, dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 1e-1]; Mamba-2 and the
gated delta net A_log = log U(1, 16) (per head).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

import linrec_ref

from .._scan import sigmoid, softplus
from . import functional as F
from .layers import (EVAL, Dropout, GatedRMSNorm, LayerNorm, Linear, Module, RMSNorm, ShortConv,
                     SwiGLU, uniform)

# ------------------------------------------------------------------------------ the ops
_NUMBA_RECURRENT = ("linear_attention", "retnet", "simple_gla", "gla", "delta_rule",
                    "gated_delta_rule", "delta_product", "mamba")


def op_form(op: str, backend: Optional[str]) -> str:
    """The form a mixer runs op in: the recurrent loop where the backend compiles it (Numba:
    fastest on a CPU at these sizes), else the chunkwise form (NumPy: matrix products)."""
    from linrec_ref import backends, registry
    if backends.resolved_name(backend) == "numba" and "recurrent" in registry.numba_forms(op):
        return "recurrent"
    return "chunkwise"


class OpCall:
    """One op with its form and backend fixed: forward(**inputs) -> o; vjp(inputs, do) -> grads."""

    def __init__(self, op: str, backend: Optional[str] = None, form: Optional[str] = None, **options):
        self.op = linrec_ref.Op(op)
        self.backend = backend
        self.form = form or op_form(op, backend)
        self.options = options

    def forward(self, **inputs):
        o, _ = self.op(**inputs, form=self.form, backend=self.backend, **self.options)
        return o

    def vjp(self, inputs: dict, do):
        return self.op.vjp(**inputs, do=do, form=self.form, backend=self.backend, **self.options)


def _inv_softplus(y):
    return y + np.log(-np.expm1(-y))


def _dt_init(rng, n, dtype, dt_min=1e-3, dt_max=1e-1):
    """dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (Mamba's dt_init)."""
    dt = np.exp(rng.uniform(size=n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return _inv_softplus(np.maximum(dt, 1e-4)).astype(dtype)


# ------------------------------------------------------------------------------ LinearMixer
FAMILIES = {
    # op, gate kind, delta family (beta, l2 norm)
    "linear_attention": ("linear_attention", None, False),
    "retnet": ("retnet", "fixed", False),
    "gla": ("gla", "gla", False),
    "delta_net": ("delta_rule", None, True),
    "gated_delta_net": ("gated_delta_rule", "gdn", True),
    "gated_delta_product": ("delta_product", "gdn", True),
}


class LinearMixer(Module):
    """The linear-attention family of mixers (module docstring). kind: a key of FAMILIES."""

    def __init__(self, kind: str, D: int, n_heads: int, rng: np.random.Generator, *,
                 expand_v: float = 2.0, use_conv: bool = True, output_gate: bool = True,
                 n_householder: int = 2, allow_neg_eigval: bool = False,
                 gate_temperature: float = 16.0, gate_rank: int = 16,
                 decay_floor: float = 0.0, gate: bool = True,
                 backend: Optional[str] = None, dtype=np.float32):
        super().__init__()
        if kind not in FAMILIES:
            raise ValueError(f"LinearMixer: kind must be one of {sorted(FAMILIES)}, got {kind!r}")
        op, self.gate_kind, self.delta = FAMILIES[kind]
        if self.gate_kind == "gdn" and not gate:
            self.gate_kind = None                  # alpha = 1: the ungated delta rule's recurrence
            op = "delta_rule" if kind == "gated_delta_net" else op
        if not 0 <= decay_floor < 1:
            raise ValueError(f"LinearMixer: decay_floor must lie in [0, 1), got {decay_floor!r}")
        self.kind, self.H, self.D = kind, n_heads, D
        self.nh = n_householder if kind == "gated_delta_product" else 1
        Dk, Dv = D, int(round(D * expand_v))
        if Dk % n_heads or Dv % n_heads:
            raise ValueError(f"LinearMixer: the key width {Dk} and value width {Dv} must be "
                             f"multiples of n_heads = {n_heads}")
        self.dk, self.dv = Dk // n_heads, Dv // n_heads
        self.use_conv, self.output_gate = use_conv, output_gate
        self.beta_scale = 2.0 if allow_neg_eigval else 1.0
        self.tau, self.decay_floor = gate_temperature, decay_floor
        c = self.children
        c["q_proj"] = Linear(D, Dk, rng, bias=False, dtype=dtype)
        c["k_proj"] = Linear(D, self.nh * Dk, rng, bias=False, dtype=dtype)
        c["v_proj"] = Linear(D, self.nh * Dv, rng, bias=False, dtype=dtype)
        if use_conv:
            c["q_conv"] = ShortConv(Dk, rng, dtype=dtype)
            c["k_conv"] = ShortConv(self.nh * Dk, rng, dtype=dtype)
            c["v_conv"] = ShortConv(self.nh * Dv, rng, dtype=dtype)
        if self.delta:
            c["b_proj"] = Linear(D, self.nh * n_heads, rng, bias=False, dtype=dtype)
        if self.gate_kind == "gla":
            c["gk_down"] = Linear(D, gate_rank, rng, bias=False, dtype=dtype)
            c["gk_up"] = Linear(gate_rank, Dk, rng, bias=True, dtype=dtype)
        elif self.gate_kind == "gdn":
            c["a_proj"] = Linear(D, n_heads, rng, bias=False, dtype=dtype)
            self.params["A_log"] = np.log(rng.uniform(1, 16, size=n_heads)).astype(dtype)
            self.params["dt_bias"] = _dt_init(rng, n_heads, dtype)
        elif self.gate_kind == "fixed":
            self.fixed_g = np.log(1 - 2.0 ** (-5.0 - np.arange(n_heads))).astype(dtype)
        if output_gate:
            c["g_proj"] = Linear(D, Dv, rng, bias=False, dtype=dtype)
            c["o_norm"] = GatedRMSNorm(self.dv, dtype=dtype)
        else:
            c["o_norm"] = RMSNorm(self.dv, dtype=dtype)
        c["o_proj"] = Linear(Dv, D, rng, bias=False, dtype=dtype)
        options = {"use_qk_l2norm_in_kernel": True, "beta_activation": "none"} if self.delta else {}
        self.call = OpCall(op, backend, **options)

    # -- pieces
    def _gate(self, x):
        """The op's log decay and what its backward needs."""
        c = self.children
        if self.gate_kind == "gla":
            h, c1 = c["gk_down"].forward(x)
            a, c2 = c["gk_up"].forward(h)
            ls, c3 = F.logsigmoid(a)
            B, T = x.shape[:2]
            return (ls / self.tau).reshape(B, T, self.H, self.dk), (c1, c2, c3)
        if self.gate_kind == "gdn":
            a, c1 = c["a_proj"].forward(x)                               # [B, T, H]
            u = a + self.params["dt_bias"]
            sp = softplus(u)
            A = np.exp(self.params["A_log"])
            g = -A * sp                                                  # log alpha <= 0
            if self.decay_floor:
                alpha = np.exp(g)
                m = self.decay_floor + (1 - self.decay_floor) * alpha
                return np.log(m), (c1, u, sp, A, g, alpha, m)
            return g, (c1, u, sp, A, g, None, None)
        if self.gate_kind == "fixed":
            return self.fixed_g, None
        return None, None

    def _gate_vjp(self, cache, dg, grads):
        """dx of the gate's inputs; the gate parameters' gradients into grads."""
        c = self.children
        if self.gate_kind == "gla":
            c1, c2, c3 = cache
            da = F.logsigmoid_vjp(c3, dg.reshape(dg.shape[:2] + (-1,)) / self.tau)["x"]
            dh, g2 = c["gk_up"].backward(c2, da)
            dx, g1 = c["gk_down"].backward(c1, dh)
            grads.update(self.child_grads("gk_up", g2))
            grads.update(self.child_grads("gk_down", g1))
            return dx
        c1, u, sp, A, g, alpha, m = cache
        if alpha is not None:                    # g' = log(a_min + (1 - a_min) e^g)
            dg = dg * (1 - self.decay_floor) * alpha / m
        dsp = -A * dg
        du = dsp * sigmoid(u)
        grads["A_log"] = _sum_lead(dg * g)       # dg/dA_log = -A sp = g
        grads["dt_bias"] = _sum_lead(du)
        dx, g1 = c["a_proj"].backward(c1, du)
        grads.update(self.child_grads("a_proj", g1))
        return dx

    def forward(self, x, ctx=EVAL):
        c = self.children
        B, T, _ = x.shape
        H, nh, dk, dv = self.H, self.nh, self.dk, self.dv
        cache = {}
        streams = {}
        for name in ("q", "k", "v"):
            y, cache[name + "_proj"] = c[name + "_proj"].forward(x)
            if self.use_conv:
                y, cache[name + "_conv"] = c[name + "_conv"].forward(y)
            streams[name] = y
        q = streams["q"].reshape(B, T, H, dk)
        k = streams["k"].reshape(B, T, nh, H, dk)
        v = streams["v"].reshape(B, T, nh, H, dv)
        inputs = {"q": q}
        if self.nh == 1:
            inputs.update(k=k[:, :, 0], v=v[:, :, 0])
        else:
            inputs.update(k=k, v=v)
        if self.delta:
            b, cache["b_proj"] = c["b_proj"].forward(x)                 # [B, T, nh H]
            s = sigmoid(b)
            cache["beta_sigmoid"] = s
            beta = (self.beta_scale * s).astype(x.dtype).reshape(B, T, nh, H)
            inputs["beta"] = beta[:, :, 0] if nh == 1 else beta
        g, cache["gate"] = self._gate(x)
        if g is not None:
            inputs["g"] = g
        o = self.call.forward(**inputs)                                  # [B, T, H, dv]
        cache["inputs"] = inputs
        if self.output_gate:
            z, cache["g_proj"] = c["g_proj"].forward(x)
            on, cache["o_norm"] = c["o_norm"].forward((o, z.reshape(B, T, H, dv)))
        else:
            on, cache["o_norm"] = c["o_norm"].forward(o)
        y, cache["o_proj"] = c["o_proj"].forward(on.reshape(B, T, H * dv))
        return y, cache

    def backward(self, cache, dy):
        c = self.children
        B, T, _ = dy.shape
        H, nh, dk, dv = self.H, self.nh, self.dk, self.dv
        grads = {}

        def back(name, d):
            dx, g = c[name].backward(cache[name], d)
            grads.update(self.child_grads(name, g))
            return dx

        don = back("o_proj", dy).reshape(B, T, H, dv)
        dnorm, gn = c["o_norm"].backward(cache["o_norm"], don)
        grads.update(self.child_grads("o_norm", gn))
        dx = 0
        if self.output_gate:
            do, dz = dnorm
            dx = dx + back("g_proj", dz.reshape(B, T, H * dv))
        else:
            do = dnorm
        inputs = cache["inputs"]
        gi = self.call.vjp(inputs, do)
        if "g" in inputs:
            if self.gate_kind == "fixed":
                pass                                                     # not learnt
            else:
                dx = dx + self._gate_vjp(cache["gate"], gi["g"], grads)
        if self.delta:
            dbeta = gi["beta"].reshape(B, T, nh * H) * self.beta_scale
            s = cache["beta_sigmoid"]
            dx = dx + back("b_proj", (dbeta * s * (1 - s)).astype(dy.dtype))
        dstreams = {"q": gi["q"].reshape(B, T, H * dk),
                    "k": gi["k"].reshape(B, T, nh * H * dk),
                    "v": gi["v"].reshape(B, T, nh * H * dv)}
        for name in ("q", "k", "v"):
            d = dstreams[name]
            if self.use_conv:
                d = back(name + "_conv", d)
            dx = dx + back(name + "_proj", d)
        return dx, grads


def _sum_lead(d):
    """A per-head parameter's gradient from its per-token one [B, T, H]."""
    return d.sum(axis=(0, 1))


# ------------------------------------------------------------------------------ Mamba
class Mamba(Module):
    """Mamba-1 (module docstring): expand 2, state N = 16, conv 4, dt rank ceil(D / 16)."""

    def __init__(self, D: int, rng: np.random.Generator, *, expand: float = 2.0, d_state: int = 16,
                 backend: Optional[str] = None, dtype=np.float32):
        super().__init__()
        E = int(round(expand * D))
        R = math.ceil(D / 16)
        self.E, self.R, self.N = E, R, d_state
        c = self.children
        c["in_proj"] = Linear(D, 2 * E, rng, bias=False, dtype=dtype)
        c["conv"] = ShortConv(E, rng, bias=True, dtype=dtype)
        c["x_proj"] = Linear(E, R + 2 * d_state, rng, bias=False, dtype=dtype)
        c["dt_proj"] = Linear(R, E, rng, bias=False, dtype=dtype)
        c["dt_proj"].params["W"] = uniform(rng, (E, R), R ** -0.5, dtype)   # dt_init "random"
        self.params["dt_bias"] = _dt_init(rng, E, dtype)
        self.params["A_log"] = np.log(np.tile(np.arange(1, d_state + 1, dtype=np.float64), (E, 1))).astype(dtype)
        self.params["D"] = np.ones(E, dtype)
        c["out_proj"] = Linear(E, D, rng, bias=False, dtype=dtype)
        self.call = OpCall("mamba", backend, delta_softplus=True)

    def forward(self, x, ctx=EVAL):
        c = self.children
        E, R, N = self.E, self.R, self.N
        cache = {}
        xz, cache["in_proj"] = c["in_proj"].forward(x)
        u, z = xz[..., :E], xz[..., E:]
        u, cache["conv"] = c["conv"].forward(np.ascontiguousarray(u))
        p, cache["x_proj"] = c["x_proj"].forward(u)
        dt_low, Bm, Cm = p[..., :R], p[..., R:R + N], p[..., R + N:]
        delta, cache["dt_proj"] = c["dt_proj"].forward(dt_low)
        A = -np.exp(self.params["A_log"])
        inputs = {"u": u, "delta": delta, "A": A, "Bm": np.ascontiguousarray(Bm),
                  "Cm": np.ascontiguousarray(Cm), "D": self.params["D"],
                  "z": np.ascontiguousarray(z), "delta_bias": self.params["dt_bias"]}
        yscan = self.call.forward(**inputs)
        cache["inputs"] = inputs
        y, cache["out_proj"] = c["out_proj"].forward(yscan)
        return y, cache

    def backward(self, cache, dy):
        c = self.children
        grads = {}

        def back(name, d):
            dx, g = c[name].backward(cache[name], d)
            grads.update(self.child_grads(name, g))
            return dx

        inputs = cache["inputs"]
        gi = self.call.vjp(inputs, back("out_proj", dy))
        grads["A_log"] = gi["A"] * inputs["A"]                  # dA/dA_log = A
        grads["D"] = gi["D"]
        grads["dt_bias"] = gi["delta_bias"]
        ddt_low = back("dt_proj", gi["delta"])
        du = gi["u"] + back("x_proj", np.concatenate([ddt_low, gi["Bm"], gi["Cm"]], -1))
        du = back("conv", du)
        return back("in_proj", np.concatenate([du, gi["z"]], -1)), grads


class Mamba2(Module):
    """Mamba-2 (module docstring): expand 2, state N = 16, head dim P = E / n_heads."""

    def __init__(self, D: int, n_heads: int, rng: np.random.Generator, *, expand: float = 2.0,
                 d_state: int = 16, backend: Optional[str] = None, dtype=np.float32):
        super().__init__()
        E = int(round(expand * D))
        if E % n_heads:
            raise ValueError(f"Mamba2: the inner width {E} must be a multiple of n_heads = {n_heads}")
        self.E, self.N, self.H, self.P = E, d_state, n_heads, E // n_heads
        c = self.children
        c["in_proj"] = Linear(D, 2 * E + 2 * d_state + n_heads, rng, bias=False, dtype=dtype)
        c["conv"] = ShortConv(E + 2 * d_state, rng, bias=True, dtype=dtype)
        self.params["dt_bias"] = _dt_init(rng, n_heads, dtype)
        self.params["A_log"] = np.log(rng.uniform(1, 16, size=n_heads)).astype(dtype)
        self.params["D"] = np.ones(n_heads, dtype)
        c["norm"] = GatedRMSNorm(E, dtype=dtype)
        c["out_proj"] = Linear(E, D, rng, bias=False, dtype=dtype)
        self.call = OpCall("simple_gla", backend, scale=1.0)

    def forward(self, x, ctx=EVAL):
        c = self.children
        E, N, H, P = self.E, self.N, self.H, self.P
        B, T, _ = x.shape
        cache = {}
        p, cache["in_proj"] = c["in_proj"].forward(x)
        z, xBC, dtr = p[..., :E], p[..., E:2 * E + 2 * N], p[..., 2 * E + 2 * N:]
        xBC, cache["conv"] = c["conv"].forward(np.ascontiguousarray(xBC))
        xs = xBC[..., :E].reshape(B, T, H, P)
        Bm, Cm = xBC[..., E:E + N], xBC[..., E + N:]
        u = dtr + self.params["dt_bias"]
        dt = softplus(u)                                                  # [B, T, H]
        A = -np.exp(self.params["A_log"])                                 # [H]
        inputs = {"q": np.ascontiguousarray(np.broadcast_to(Cm[:, :, None], (B, T, H, N))),
                  "k": np.ascontiguousarray(np.broadcast_to(Bm[:, :, None], (B, T, H, N))),
                  "v": xs * dt[..., None], "g": dt * A}
        ys = self.call.forward(**inputs) + self.params["D"][:, None] * xs
        cache.update(inputs=inputs, xs=xs, u=u, dt=dt, A=A)
        yn, cache["norm"] = c["norm"].forward((ys.reshape(B, T, E), z))
        y, cache["out_proj"] = c["out_proj"].forward(yn)
        return y, cache

    def backward(self, cache, dy):
        c = self.children
        E, H, P = self.E, self.H, self.P
        B, T, _ = dy.shape
        grads = {}

        def back(name, d):
            dx, g = c[name].backward(cache[name], d)
            grads.update(self.child_grads(name, g))
            return dx

        (dys, dz), gn = c["norm"].backward(cache["norm"], back("out_proj", dy))
        grads.update(self.child_grads("norm", gn))
        dys = dys.reshape(B, T, H, P)
        xs, dt, A, u = cache["xs"], cache["dt"], cache["A"], cache["u"]
        grads["D"] = (dys * xs).sum(axis=(0, 1, 3))
        gi = self.call.vjp(cache["inputs"], dys)
        dxs = gi["v"] * dt[..., None] + self.params["D"][:, None] * dys
        ddt = (gi["v"] * xs).sum(-1) + gi["g"] * A                        # [B, T, H]
        grads["A_log"] = (gi["g"] * dt * A).sum(axis=(0, 1))             # dA/dA_log = A
        du = ddt * sigmoid(u)
        grads["dt_bias"] = du.sum(axis=(0, 1))
        dxBC = np.concatenate([dxs.reshape(B, T, E), gi["k"].sum(2), gi["q"].sum(2)], -1)
        dxBC = back("conv", dxBC)
        return back("in_proj", np.concatenate([dz, dxBC, du.astype(dy.dtype)], -1)), grads


# ------------------------------------------------------------------------------ Transformer
class TransformerBlock(Module):
    """Post-norm attention block with its own residuals and 4x SwiGLU FFN (module docstring)."""

    def __init__(self, D: int, n_heads: int, rng: np.random.Generator, *, rope_base: float = 1000.0,
                 ffn_mult: int = 4, dropout: float = 0.0, backend: Optional[str] = None,
                 dtype=np.float32):
        super().__init__()
        if D % n_heads:
            raise ValueError(f"TransformerBlock: D = {D} must be a multiple of n_heads = {n_heads}")
        self.H, self.hd, self.rope_base = n_heads, D // n_heads, rope_base
        c = self.children
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            c[name] = Linear(D, D, rng, bias=True, dtype=dtype)
        c["q_norm"] = RMSNorm(self.hd, dtype=dtype)
        c["k_norm"] = RMSNorm(self.hd, dtype=dtype)
        c["norm1"] = LayerNorm(D, dtype=dtype)
        c["ffn"] = SwiGLU(D, ffn_mult * D, rng, dtype=dtype)
        c["norm2"] = LayerNorm(D, dtype=dtype)
        c["drop1"] = Dropout(dropout)
        c["drop2"] = Dropout(dropout)
        self.call = OpCall("softmax_attention", backend, form="parallel")

    def forward(self, x, ctx=EVAL):
        c = self.children
        B, T, D = x.shape
        H, hd = self.H, self.hd
        cache = {}
        heads = {}
        for name in ("q", "k", "v"):
            y, cache[name + "_proj"] = c[name + "_proj"].forward(x)
            heads[name] = y.reshape(B, T, H, hd)
        for name in ("q", "k"):
            y, cache[name + "_norm"] = c[name + "_norm"].forward(heads[name])
            heads[name], cache[name + "_rope"] = F.rope(y, self.rope_base)
        inputs = {n: np.ascontiguousarray(heads[n]) for n in ("q", "k", "v")}
        o = self.call.forward(**inputs)
        cache["inputs"] = inputs
        a, cache["o_proj"] = c["o_proj"].forward(o.reshape(B, T, D))
        a, cache["drop1"] = c["drop1"].forward(a, ctx)
        h, cache["norm1"] = c["norm1"].forward(x + a)
        f, cache["ffn"] = c["ffn"].forward(h)
        f, cache["drop2"] = c["drop2"].forward(f, ctx)
        y, cache["norm2"] = c["norm2"].forward(h + f)
        return y, cache

    def backward(self, cache, dy):
        c = self.children
        B, T, D = dy.shape
        H, hd = self.H, self.hd
        grads = {}

        def back(name, d):
            dx, g = c[name].backward(cache[name], d)
            grads.update(self.child_grads(name, g))
            return dx

        dr2 = back("norm2", dy)                              # into h + f
        dh = dr2 + back("ffn", back("drop2", dr2))
        dr1 = back("norm1", dh)                              # into x + a
        do = back("o_proj", back("drop1", dr1)).reshape(B, T, H, hd)
        gi = self.call.vjp(cache["inputs"], do)
        dx = dr1
        for name in ("q", "k"):
            d = F.rope_vjp(cache[name + "_rope"], gi[name])["x"]
            d = back(name + "_norm", d)
            dx = dx + back(name + "_proj", d.reshape(B, T, D))
        return dx + back("v_proj", gi["v"].reshape(B, T, D)), grads
