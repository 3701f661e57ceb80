r"""mamba: the Mamba-1 selective scan (a diagonal SSM with input-dependent step size, B and C).

Recurrence (one batch element; for every channel d and state index n; inclusive read):

    dt_t[d]   = softplus(delta_t[d] + delta_bias[d])      (delta_softplus=True)
              =          delta_t[d] + delta_bias[d]       (delta_softplus=False; must be >= 0)
    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] Bm_t[n] u_t[d]
    y_t[d]    = sum_n Cm_t[n] h_t[d, n] + D[d] u_t[d]
    y_t[d]   <- y_t[d] * silu(z_t[d])                     (only when z is given)

This is exactly mamba_ssm's ``selective_scan_ref`` (zero-order hold for A, Euler for B), in the
library's sequence-first layout, with an initial state added. No scale (the read has weight 1).

Glossary
    symbol    argument     shape       paper (Gu & Dao, Mamba)    mamba_ssm selective_scan_fn
    u_t       u            [B, T, D]   x_t (the SSM input)        u            [batch, dim, L]
    delta_t   delta        [B, T, D]   Delta_t before softplus    delta        [batch, dim, L]
    A         A            [D, S]      A (real, diagonal, <= 0)   A            [dim, dstate]
    B_t       Bm           [B, T, S]   B_t (selective)            B            [batch, dstate, L]
    C_t       Cm           [B, T, S]   C_t (selective)            C            [batch, dstate, L]
    D         D            [D]         D (skip connection)        D            [dim]
    z_t       z            [B, T, D]   the gate branch z          z            [batch, dim, L]
    bias      delta_bias   [D]         bias of the Delta proj.    delta_bias   [dim]
    h_t       state        [N, D, S]   h_t                        last_state   [batch, dim, dstate]
    softplus  delta_softplus (bool)    Delta = softplus(...)      delta_softplus (default False)
Dimension letters: B batch, T time, D channels (d_inner), S state size (d_state), N number of
sequences in the state (B, or the number of segments with cu_seqlens). Mamba's B and C matrices are
called ``Bm`` and ``Cm`` because the letter B is the batch size and N is reserved for the number
of sequences; S is mamba_ssm's d_state (its "N"). The argument ``D`` (the skip weights) and the
dimension letter D (channels) are different things: D has shape [D].

Validation beyond shapes and dtypes: A must be finite and <= 0 (so that dt*A is a log decay and
exp(dt*A) lies in [0, 1]; mamba_ssm parametrises A = -exp(A_log)); without softplus,
delta + delta_bias must be >= 0 (a negative step size would make exp(dt*A) > 1). dt = 0 is legal
(the token neither writes nor decays). With softplus every delta is legal.

Regimes: slow_decay, typical and fast_forgetting place every exp(dt A) in the regime's range.
hard_reset (dt A = -inf at some steps) is not reachable with finite inputs and is left out; the
gla forms underneath are tested with it.

Not covered (documented differences from mamba_ssm): complex A; B/C shared over time
([dim, dstate]) or grouped ([batch, G, dstate, L]: broadcast them yourself); torch's softplus
switches to the identity above 20 (a relative change below 1e-10), here softplus is
log(1 + e^x) everywhere (np.logaddexp(0, x)).

Forms
    recurrent  the loop above (ground truth), O(B D S) memory besides the inputs.
    parallel   through the identity of recurrences.md section 4: mamba is gla with one head per
               channel (H = D), K = S, V = 1, q = Cm, k = Bm (broadcast over channels),
               v = dt u, g = dt A (broadcast to [B, T, D, S]), scale 1. It calls gla's raw cores,
               then adds the skip term D u and the gate.
    chunkwise  the same identity on gla's chunkwise core (chunks of C tokens).
    step       one token of the recurrence (decoding); mamba_ssm's ``selective_state_update``.
    attention_matrix  the hidden attention of each channel ("The Hidden Attention of Mamba"):
               alpha[b, d, t, s] = sum_n Cm_t[n] exp(sum_{j=s+1..t} dt_j[d] A[d, n])
                                        * Bm_s[n] dt_s[d]   (s <= t),
               so that y = alpha @ u + D u before the gate (without initial state).

Gradients (hand-written; the adjoint of the scan is a scan backwards in time). With
a_t = exp(dt_t A), y~_t the output before the gate and dy~_t = do_t * silu(z_t):
    dz_t  = do_t * y~_t * silu'(z_t),    silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
    dD    = sum_{b,t} dy~_t * u_t
    dh_t  = Cm_t dy~_t (outer, [D, S]) + a_{t+1} * dh_{t+1},   dh_T starts from dht
    dCm_t = sum_d dy~_t[d] h_t[d, :]
    dg_t  = dh_t * a_t * h_{t-1}       (gradient of the log decay g_t = dt_t A, [D, S])
    ddt_t = u_t * (dh_t Bm_t) + sum_n dg_t A         dA = sum_{b,t} dt_t dg_t
    du_t  = D dy~_t + dt_t (dh_t Bm_t)               dBm_t = sum_d dt_t u_t dh_t[d, :]
    ddelta_t = ddt_t * sigmoid(delta_t + bias) (softplus) or ddt_t,   dbias = sum_{b,t} ddelta_t
    dh_0  = a_1 * dh_1.
The parallel and chunkwise backwards call gla's vjp cores on the mapped inputs and chain back:
dCm = sum_d dq, dBm = sum_d dk, ddt = dv u + sum_n dg A, du = dv dt (+ skip), dA = sum dg dt.

Peers: mamba_ssm ``selective_scan_ref`` / ``selective_scan_fn`` (layout [batch, dim, L]; transpose
u, delta, z to [B, T, D] and B, C to [B, T, S]); ``selective_state_update`` for ``step``.

References: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023;
Ali, Zimerman & Wolf, "The Hidden Attention of Mamba Models", 2024; Dao & Gu, "Transformers are
SSMs" (Mamba-2), 2024, for the SSM-as-linear-attention view.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .. import _regimes
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import reverse_steps, segsum
from .._spec import Arg, OpSpec
from .._validation import InputError
from . import gla

SPEC = OpSpec(
    name="mamba",
    family="selective state space model (Mamba-1)",
    transition="diagonal decay",
    math="h_t = exp(dt_t A) * h_{t-1} + dt_t Bm_t u_t;  y_t = Cm_t . h_t + D u_t, * silu(z_t)",
    inputs=(Arg("u", "BTD"), Arg("delta", "BTD"), Arg("A", "DS"), Arg("Bm", "BTS"),
            Arg("Cm", "BTS"), Arg("D", "D", optional=True), Arg("z", "BTD", optional=True),
            Arg("delta_bias", "D", optional=True)),
    output="BTD",
    quadratic="B D S T T",  # the per-channel, per-state decay masks of the parallel form
    state=(Arg("state", "NDS"),),
    default_scale=None,
    peers=("mamba_ssm.ops.selective_scan_interface.selective_scan_ref",
           "mamba_ssm.ops.selective_scan_interface.selective_scan_fn",
           "mamba_ssm.ops.triton.selective_state_update.selective_state_update (step)"),
    # the decay ranges of make_inputs (_DECAY_RANGE); hard_reset is unreachable (see above)
    regimes=("slow_decay", "typical", "fast_forgetting"),
    default_dims={"B": 2, "D": 3, "S": 4},
    options={"delta_softplus": False},
    variants={"default": {"delta_softplus": True}, "plain": {"delta_softplus": False}},
)


# ----------------------------------------------------------------------------- recurrent
def _update(h, dt, u, A, Bm):
    """One token: h = exp(dt A) * h + dt Bm u. h: [B, D, S]; dt, u: [B, D]; Bm: [B, S]."""
    a = np.exp(dt[:, :, None] * A)                                  # [B, D, S]
    return a * h + (dt * u)[:, :, None] * Bm[:, None, :]            # [B, D, S]


def _advance(u, dt, A, Bm):
    """h_{t-1} -> h_t as a function of (h, t); decays are formed per step (O(B D S) memory)."""
    return lambda h, t: _update(h, dt[:, t], u[:, t], A, Bm[:, t])


@forward_form(SPEC)
def recurrent(u, delta, A, Bm, Cm, D, z, delta_bias, *, initial_state, delta_softplus):
    """The definition: a loop over t. u, delta, z: [B, T, D]; A: [D, S]; Bm, Cm: [B, T, S];
    D, delta_bias: [D]; state [N, D, S]. Returns y: [B, T, D]."""
    dt = _step_sizes(delta, A, delta_bias, delta_softplus).dt       # [B, T, D]
    advance = _advance(u, dt, A, Bm)
    h = initial_state                                               # [B, D, S]
    y = np.empty(u.shape, dtype=u.dtype)                            # [B, T, D]
    for t in range(u.shape[1]):
        h = advance(h, t)
        y[:, t] = (h @ Cm[:, t, :, None])[..., 0]                   # [B, D]
    return _gated_output(y, u, D, z), h


@step_form(SPEC)
def step(u, delta, A, Bm, Cm, D, z, delta_bias, *, state, delta_softplus):
    """One token: u, delta, z: [B, D]; A: [D, S]; Bm, Cm: [B, S]; state: [B, D, S]."""
    dt = _step_sizes(delta, A, delta_bias, delta_softplus).dt       # [B, D]
    h = _update(state, dt, u, A, Bm)                                # [B, D, S]
    y = (h @ Cm[:, :, None])[..., 0]                                # [B, D]
    return _gated_output(y, u, D, z), h


@vjp_form(SPEC)
def recurrent_vjp(u, delta, A, Bm, Cm, D, z, delta_bias, do, dht, *, initial_state,
                  delta_softplus):
    """Backward of the loop, walking t = T-1 .. 0 with the adjoint state dh (ground truth).

    Memory: states are recomputed from checkpoints (``_scan.reverse_steps``), never all T kept;
    the output before the gate (needed for dz) is re-read from the recomputed state at each t.
    """
    dt, dt_slope = _step_sizes(delta, A, delta_bias, delta_softplus)   # [B, T, D]
    du, ddt, dz = np.zeros_like(u), np.zeros_like(dt), (None if z is None else np.zeros_like(z))
    dBm, dCm, dA = np.zeros_like(Bm), np.zeros_like(Cm), np.zeros_like(A)
    dD = None if D is None else np.zeros_like(D)
    dh = dht.copy()                                                 # [B, D, S]
    for t, h_prev, h_t in reverse_steps(_advance(u, dt, A, Bm), initial_state, u.shape[1]):
        y_t = (h_t @ Cm[:, t, :, None])[..., 0]                     # [B, D]
        gate = _gated_output_vjp(y_t, u[:, t], D, None if z is None else z[:, t], do[:, t])
        if D is not None:
            du[:, t] += gate.du
            dD[...] += gate.dD
        if z is not None:
            dz[:, t] = gate.dz
        dy = gate.dy                                                # [B, D]
        dh = dh + dy[:, :, None] * Cm[:, t, None, :]                # read of h_t, [B, D, S]
        dCm[:, t] = (dy[:, None, :] @ h_t)[:, 0, :]                 # [B, S]
        a = np.exp(dt[:, t, :, None] * A)                           # [B, D, S]
        dg = dh * a * h_prev                                        # d/d(dt A), [B, D, S]
        dx = (dh @ Bm[:, t, :, None])[..., 0]                       # d/d(dt u) = sum_n dh Bm, [B, D]
        ddt[:, t] = u[:, t] * dx + np.sum(dg * A, axis=-1)
        du[:, t] += dt[:, t] * dx
        dBm[:, t] = ((dt[:, t] * u[:, t])[:, None, :] @ dh)[:, 0, :]  # [B, S]
        dA[...] += np.sum(dt[:, t, :, None] * dg, axis=0)           # [D, S]
        dh = a * dh                                                 # to h_{t-1}
    ddelta, dbias = _delta_grads(ddt, dt_slope, delta_bias)
    return {"u": du, "delta": ddelta, "A": dA, "Bm": dBm, "Cm": dCm, "D": dD, "z": dz,
            "delta_bias": dbias, "initial_state": dh}


# ----------------------------------------------------------------------------- step sizes, gate
class StepSizes(NamedTuple):
    """dt = softplus(delta + bias) (or delta + bias) and its slope d dt / d delta, [B, T, D]."""

    dt: np.ndarray
    dt_slope: np.ndarray


class GateGrads(NamedTuple):
    """The backward of the skip term and the gate, y = (y_ssm + D u) * silu(z).

    dy: cotangent of y_ssm (do * silu(z)); du: the skip term's part of du (None without D);
    dD: cotangent of D (None without D); dz: cotangent of z (None without z)."""

    dy: np.ndarray
    du: Optional[np.ndarray]
    dD: Optional[np.ndarray]
    dz: Optional[np.ndarray]


def _sigmoid(x):
    """1 / (1 + e^-x) without overflow, in x's dtype."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _check_A(A):
    bad = A > 0
    if bad.any():
        i = tuple(int(j) for j in np.unravel_index(int(np.argmax(bad)), A.shape))
        raise InputError(
            f"mamba: argument 'A' must be <= 0 (dt * A is the log decay, exp(dt * A) in [0, 1]; "
            f"mamba_ssm uses A = -exp(A_log)); got {float(A[i])!r} at index {i}")


def _step_sizes(delta, A, delta_bias, delta_softplus) -> StepSizes:
    """dt = softplus(delta + bias) or delta + bias, and d dt / d delta. Validates A and dt.

    delta: [B, T, D] (or [B, D] for a step) -> StepSizes of the same shape.
    """
    _check_A(A)                       # (the form wrappers check that delta_softplus is a bool)
    x = delta if delta_bias is None else delta + delta_bias
    if delta_softplus:
        return StepSizes(np.logaddexp(0, x), _sigmoid(x))            # softplus, its derivative
    bad = x < 0
    if bad.any():
        i = tuple(int(j) for j in np.unravel_index(int(np.argmax(bad)), x.shape))
        what = "delta + delta_bias" if delta_bias is not None else "delta"
        raise InputError(
            f"mamba: with delta_softplus=False the step size {what} must be >= 0 (it is used as "
            f"is); got {float(x[i])!r} at index {i}. Pass delta_softplus=True to apply softplus")
    return StepSizes(x, np.ones_like(x))


def _gated_output(y_ssm, u, D, z):
    """y = (y_ssm + D u) * silu(z), the optional parts skipped when None. All [B, T, D]."""
    y = y_ssm if D is None else y_ssm + D * u
    return y if z is None else y * (z * _sigmoid(z))


def _gated_output_vjp(y_ssm, u, D, z, do) -> GateGrads:
    """Backward of ``_gated_output``. y_ssm is only read when z is given (the gate's derivative
    needs the output before it)."""
    if z is None:
        dy, dz = do, None
    else:
        y = y_ssm if D is None else y_ssm + D * u                   # output before the gate
        sig = _sigmoid(z)
        dy = do * z * sig                                           # do * silu(z)
        dz = do * y * sig * (1 + z * (1 - sig))                     # do * y * silu'(z)
    if D is None:
        return GateGrads(dy, None, None, dz)
    return GateGrads(dy, D * dy, np.sum(dy * u, axis=tuple(range(dy.ndim - 1))), dz)


def _delta_grads(ddt, dt_slope, delta_bias):
    """Chain d/d dt back through softplus and the bias: (ddelta, ddelta_bias)."""
    ddelta = ddt * dt_slope                                         # [B, T, D]
    dbias = None if delta_bias is None else np.sum(ddelta, axis=(0, 1))  # [D]
    return ddelta, dbias


# ----------------------------------------------------------------------------- attention matrix
@matrix_form(SPEC, names=("delta", "A", "Bm", "Cm", "delta_bias"))
def attention_matrix(delta, A, Bm, Cm, delta_bias, *, delta_softplus):
    """alpha: [B, D, T, T], alpha[b, d, t, s] = sum_n Cm_t[n] exp(sum_{j=s+1..t} dt_j A[d, n])
    Bm_s[n] dt_s[d] for s <= t (0 above the diagonal); y = alpha @ u + D u before the gate.

    The sum over the state index n is a loop, so memory stays O(B D T^2) (the output's size).
    """
    dt = _step_sizes(delta, A, delta_bias, delta_softplus).dt       # [B, T, D]
    dth = np.moveaxis(dt, 1, -1)                                    # [B, D, T]
    B, D, T = dth.shape
    alpha = np.zeros((B, D, T, T), dtype=dt.dtype)
    for n in range(A.shape[1]):
        decay = np.exp(segsum(dth * A[:, n, None]))                 # [B, D, T, T]
        cb = Cm[:, :, n, None] * Bm[:, None, :, n]                  # [B, T, T]: Cm_t[n] Bm_s[n]
        alpha += cb[:, None] * decay
    return alpha * dth[:, :, None, :]                               # times dt_s[d]


# ----------------------------------------------------------------------------- parallel, chunkwise
# Both go through the identity of recurrences.md section 4 and gla's dense cores.
class GlaInputs(NamedTuple):
    """mamba's inputs mapped to gla's (one head per channel, H = D, K = S, V = 1, scale 1)."""

    q: np.ndarray              # Cm broadcast over channels, [B, T, D, S] (a view)
    k: np.ndarray              # Bm broadcast over channels, [B, T, D, S] (a view)
    v: np.ndarray              # dt u, [B, T, D, 1]
    g: np.ndarray              # dt A, [B, T, D, S]
    gv: None                   # no value-side gate
    initial_state: np.ndarray  # [N, D, S, 1]


def _as_gla(u, dt, A, Bm, Cm, initial_state) -> GlaInputs:
    """mamba -> gla with one head per channel (H = D), K = S, V = 1, scale 1."""
    shape = u.shape + A.shape[-1:]                                  # [B, T, D, S]
    q = np.broadcast_to(Cm[:, :, None, :], shape)                   # [B, T, D, S] (a view)
    k = np.broadcast_to(Bm[:, :, None, :], shape)                   # [B, T, D, S] (a view)
    v = (dt * u)[..., None]                                         # [B, T, D, 1]
    g = dt[..., None] * A                                           # [B, T, D, S]
    return GlaInputs(q, k, v, g, None, initial_state[..., None])    # state [N, D, S, 1]


def _forward_via_gla(gla_core, u, delta, A, Bm, Cm, D, z, delta_bias, initial_state,
                     delta_softplus, **chunking):
    """y and the final state from a gla forward core on the mapped inputs."""
    dt = _step_sizes(delta, A, delta_bias, delta_softplus).dt       # [B, T, D]
    q, k, v, g, gv, h0 = _as_gla(u, dt, A, Bm, Cm, initial_state)
    o, S = gla_core(q, k, v, g, gv, scale=1.0, initial_state=h0, **chunking)
    return _gated_output(o[..., 0], u, D, z), S[..., 0]             # [B, T, D], [B, D, S]


def _vjp_via_gla(gla_core, gla_vjp_core, u, delta, A, Bm, Cm, D, z, delta_bias, do, dht,
                 initial_state, delta_softplus, **chunking):
    """Gradients from a gla vjp core, chained back through the mapping of ``_as_gla``:
    dCm = sum_d dq, dBm = sum_d dk, ddt = dv u + sum_n dg A, du = dv dt, dA = sum_{b,t} dg dt."""
    dt, dt_slope = _step_sizes(delta, A, delta_bias, delta_softplus)   # [B, T, D]
    q, k, v, g, gv, h0 = _as_gla(u, dt, A, Bm, Cm, initial_state)
    y_ssm = None
    if z is not None:                                               # the gate needs y before it
        y_ssm = gla_core(q, k, v, g, gv, scale=1.0, initial_state=h0, **chunking)[0][..., 0]
    gate = _gated_output_vjp(y_ssm, u, D, z, do)                    # [B, T, D]
    gr = gla_vjp_core(q, k, v, g, gv, gate.dy[..., None], dht[..., None], scale=1.0,
                      initial_state=h0, **chunking)
    dx, dg = gr["v"][..., 0], gr["g"]                               # [B, T, D], [B, T, D, S]
    du = dx * dt if gate.du is None else dx * dt + gate.du
    ddt = dx * u + np.sum(dg * A, axis=-1)                          # [B, T, D]
    ddelta, dbias = _delta_grads(ddt, dt_slope, delta_bias)
    return {"u": du, "delta": ddelta, "A": np.sum(dg * dt[..., None], axis=(0, 1)),
            "Bm": gr["k"].sum(axis=2), "Cm": gr["q"].sum(axis=2), "D": gate.dD, "z": gate.dz,
            "delta_bias": dbias, "initial_state": gr["initial_state"][..., 0]}


@forward_form(SPEC)
def parallel(u, delta, A, Bm, Cm, D, z, delta_bias, *, initial_state, delta_softplus):
    """gla's parallel form on the mapped inputs (per-channel decay masks [B, D, S, T, T]), then
    the skip term and the gate. Shapes as ``recurrent``."""
    return _forward_via_gla(gla.parallel.core, u, delta, A, Bm, Cm, D, z, delta_bias,
                            initial_state, delta_softplus)


@vjp_form(SPEC)
def parallel_vjp(u, delta, A, Bm, Cm, D, z, delta_bias, do, dht, *, initial_state, delta_softplus):
    """gla's parallel backward on the mapped inputs, chained back to mamba's inputs."""
    return _vjp_via_gla(gla.parallel.core, gla.parallel_vjp.core, u, delta, A, Bm, Cm, D, z,
                        delta_bias, do, dht, initial_state, delta_softplus)


@forward_form(SPEC, chunked=True)
def chunkwise(u, delta, A, Bm, Cm, D, z, delta_bias, *, initial_state, chunk_size, delta_softplus):
    """gla's chunkwise form on the mapped inputs (chunks of C tokens, per-chunk states
    [B, D, N, S, 1]), then the skip term and the gate.

    1. dt = softplus(delta + bias) (or delta + bias); q = Cm, k = Bm, v = dt u, g = dt A
    2. gla chunkwise: intra-chunk scores, chunk end states, carry across chunks, state read
    3. y = (o + D u) * silu(z)
    """
    return _forward_via_gla(gla.chunkwise.core, u, delta, A, Bm, Cm, D, z, delta_bias,
                            initial_state, delta_softplus, chunk_size=chunk_size)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(u, delta, A, Bm, Cm, D, z, delta_bias, do, dht, *, initial_state, chunk_size,
                  delta_softplus):
    """gla's chunkwise backward on the mapped inputs, chained back to mamba's inputs (only
    per-chunk states are kept)."""
    return _vjp_via_gla(gla.chunkwise.core, gla.chunkwise_vjp.core, u, delta, A, Bm, Cm, D, z,
                        delta_bias, do, dht, initial_state, delta_softplus, chunk_size=chunk_size)


# ----------------------------------------------------------------------------- random inputs
# Range of the decay exp(dt * A) per regime (the ranges of _regimes.DECAY_REGIMES). A hard reset
# (dt * A = -inf at some steps) is not reachable with finite inputs, so that regime is left out.
_DECAY_RANGE = {"slow_decay": (0.999, 0.9999), "typical": (0.5, 0.99),
                "fast_forgetting": (0.05, 0.3)}


def _softplus_inverse(y):
    """x with softplus(x) = y, for y > 0."""
    return y + np.log(-np.expm1(-y))


def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs with every decay exp(dt * A) in the regime's range.

    |A| ~ U(c, c s) and dt ~ U(0.5, 0.5 R / s), where R = log(lo) / log(hi) is the ratio of the
    regime's log-decay bounds, s = sqrt(R) and c = 2 |log hi|: then dt |A| lies in
    [|log hi|, |log lo|]. A is strictly negative and dt >= 0.5, so the small perturbations of a
    finite-difference check keep the inputs valid. u, Bm, Cm, z, D, delta_bias ~ N(0, 1).
    "default": D, z, delta_bias given and delta = softplus^-1(dt) - delta_bias; "plain": none of
    them, delta = dt (no softplus).
    """
    B, T, D, S = (dims[d] for d in "BTDS")
    lo, hi = _DECAY_RANGE[regime]
    g_hi, g_lo = -np.log(hi), -np.log(lo)                           # 0 < g_hi < g_lo
    s = np.sqrt(g_lo / g_hi)
    c, dt0 = 2.0 * g_hi, 0.5
    A = -rng.uniform(c, c * s, size=(D, S))                         # [D, S]
    dt = rng.uniform(dt0, dt0 * (g_lo / g_hi) / s, size=(B, T, D))  # [B, T, D]
    x = {
        "u": _regimes.normal(rng, (B, T, D), dtype),
        "A": A.astype(dtype),
        "Bm": _regimes.normal(rng, (B, T, S), dtype),
        "Cm": _regimes.normal(rng, (B, T, S), dtype),
    }
    if variant == "plain":
        x["delta"] = dt.astype(dtype)
        return x
    bias = 0.5 * rng.standard_normal(D)                             # [D]
    x["delta"] = (_softplus_inverse(dt) - bias).astype(dtype)
    x["delta_bias"] = bias.astype(dtype)
    x["D"] = _regimes.normal(rng, (D,), dtype)
    x["z"] = _regimes.normal(rng, (B, T, D), dtype)
    return x
