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
log(1 + e^x) everywhere (``_scan.softplus``, overflow-free).

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
from .._decay import FAST_BOUND, cumsum_in_chunks, reverse_cumsum_in_chunks
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import reverse_steps, segsum, sigmoid, softplus
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
    dt = _step_sizes(delta, A, delta_bias, delta_softplus)          # [B, T, D]
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
    dt = _step_sizes(delta, A, delta_bias, delta_softplus)          # [B, D]
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
    dt = _step_sizes(delta, A, delta_bias, delta_softplus)          # [B, T, D]
    dt_slope = _step_size_slope(delta, delta_bias, delta_softplus)  # d dt / d delta, [B, T, D]
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
class GateGrads(NamedTuple):
    """The backward of the skip term and the gate, y = (y_ssm + D u) * silu(z).

    dy: cotangent of y_ssm (do * silu(z)); du: the skip term's part of du (None without D);
    dD: cotangent of D (None without D); dz: cotangent of z (None without z)."""

    dy: np.ndarray
    du: Optional[np.ndarray]
    dD: Optional[np.ndarray]
    dz: Optional[np.ndarray]


def _check_A(A):
    bad = A > 0
    if bad.any():
        i = tuple(int(j) for j in np.unravel_index(int(np.argmax(bad)), A.shape))
        raise InputError(
            f"mamba: argument 'A' must be <= 0 (dt * A is the log decay, exp(dt * A) in [0, 1]; "
            f"mamba_ssm uses A = -exp(A_log)); got {float(A[i])!r} at index {i}")


def _step_sizes(delta, A, delta_bias, delta_softplus):
    """dt = softplus(delta + bias) or delta + bias. Validates A and dt.

    delta: [B, T, D] (or [B, D] for a step) -> dt of the same shape.
    """
    _check_A(A)                       # (the form wrappers check that delta_softplus is a bool)
    x = delta if delta_bias is None else delta + delta_bias
    if delta_softplus:
        return softplus(x)
    bad = x < 0
    if bad.any():
        i = tuple(int(j) for j in np.unravel_index(int(np.argmax(bad)), x.shape))
        what = "delta + delta_bias" if delta_bias is not None else "delta"
        raise InputError(
            f"mamba: with delta_softplus=False the step size {what} must be >= 0 (it is used as "
            f"is); got {float(x[i])!r} at index {i}. Pass delta_softplus=True to apply softplus")
    return x


def _step_size_slope(delta, delta_bias, delta_softplus):
    """d dt / d delta (= d dt / d delta_bias): sigmoid(delta + bias) with softplus, else 1."""
    x = delta if delta_bias is None else delta + delta_bias
    return sigmoid(x) if delta_softplus else np.ones_like(x)


def _gated_output(y_ssm, u, D, z):
    """y = (y_ssm + D u) * silu(z), the optional parts skipped when None. All [B, T, D]."""
    y = y_ssm if D is None else y_ssm + D * u
    return y if z is None else y * (z * sigmoid(z))


def _gated_output_vjp(y_ssm, u, D, z, do) -> GateGrads:
    """Backward of ``_gated_output``. y_ssm is only read when z is given (the gate's derivative
    needs the output before it)."""
    if z is None:
        dy, dz = do, None
    else:
        y = y_ssm if D is None else y_ssm + D * u                   # output before the gate
        sig = sigmoid(z)
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
    dt = _step_sizes(delta, A, delta_bias, delta_softplus)          # [B, T, D]
    dth = np.moveaxis(dt, 1, -1)                                    # [B, D, T]
    B, D, T = dth.shape
    alpha = np.zeros((B, D, T, T), dtype=dt.dtype)
    for n in range(A.shape[1]):
        decay = np.exp(segsum(dth * A[:, n, None]))                 # [B, D, T, T]
        cb = Cm[:, :, n, None] * Bm[:, None, :, n]                  # [B, T, T]: Cm_t[n] Bm_s[n]
        alpha += cb[:, None] * decay
    return alpha * dth[:, :, None, :]                               # times dt_s[d]


# ----------------------------------------------------------------------------- parallel
# Through the identity of docs/recurrences.md section 4: gla with one head per channel.
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


@forward_form(SPEC)
def parallel(u, delta, A, Bm, Cm, D, z, delta_bias, *, initial_state, delta_softplus):
    """gla's parallel form on the mapped inputs (per-channel decay masks [B, D, S, T, T]), then
    the skip term and the gate. Shapes as ``recurrent``."""
    dt = _step_sizes(delta, A, delta_bias, delta_softplus)          # [B, T, D]
    q, k, v, g, gv, h0 = _as_gla(u, dt, A, Bm, Cm, initial_state)
    o, S = gla.parallel.core(q, k, v, g, gv, scale=1.0, initial_state=h0)
    return _gated_output(o[..., 0], u, D, z), S[..., 0]             # [B, T, D], [B, D, S]


@vjp_form(SPEC)
def parallel_vjp(u, delta, A, Bm, Cm, D, z, delta_bias, do, dht, *, initial_state, delta_softplus):
    """gla's parallel backward on the mapped inputs, chained back to mamba's inputs:
    dCm = sum_d dq, dBm = sum_d dk, ddt = dv u + sum_n dg A, du = dv dt, dA = sum_{b,t} dg dt."""
    dt = _step_sizes(delta, A, delta_bias, delta_softplus)          # [B, T, D]
    dt_slope = _step_size_slope(delta, delta_bias, delta_softplus)  # d dt / d delta, [B, T, D]
    q, k, v, g, gv, h0 = _as_gla(u, dt, A, Bm, Cm, initial_state)
    y_ssm = None
    if z is not None:                                               # the gate needs y before it
        y_ssm = gla.parallel.core(q, k, v, g, gv, scale=1.0, initial_state=h0)[0][..., 0]
    gate = _gated_output_vjp(y_ssm, u, D, z, do)                    # [B, T, D]
    gr = gla.parallel_vjp.core(q, k, v, g, gv, gate.dy[..., None], dht[..., None], scale=1.0,
                               initial_state=h0)
    dx, dg = gr["v"][..., 0], gr["g"]                               # [B, T, D], [B, T, D, S]
    du = dx * dt if gate.du is None else dx * dt + gate.du
    ddt = dx * u + np.sum(dg * A, axis=-1)                          # [B, T, D]
    ddelta, dbias = _delta_grads(ddt, dt_slope, delta_bias)
    return {"u": du, "delta": ddelta, "A": np.sum(dg * dt[..., None], axis=(0, 1)),
            "Bm": gr["k"].sum(axis=2), "Cm": gr["q"].sum(axis=2), "D": gate.dD, "z": gate.dz,
            "delta_bias": dbias, "initial_state": gr["initial_state"][..., 0]}


# ----------------------------------------------------------------------------- chunkwise
# The state is D * S independent scalar recurrences h_t = a_t h_{t-1} + b_t, one per channel d
# and state index n, with a_t = exp(dt_t[d] A[d, n]) and b_t = x_t[d] Bm_t[n], x_t = dt_t u_t.
# Inside a piece of tokens i..j (the piece's first token i is its anchor), with
#     Lam_t = dt_{i+1} + ... + dt_t  (Lam_i = 0)   and   E_t = exp(Lam_t A) in (0, 1],
# the decay from s to t is a_{s+1} ... a_t = E_t / E_s, so
#     h_t = E_t * W_t,   W_t = a_i h_in + sum_{s=i..t} b_s / E_s              (per d, n)
# is one cumulative sum over the piece instead of j - i + 1 dependent steps (the factored form
# of docs/numerics.md hazard 1). 1 / E_s grows with the piece's decay range
#     max over (b, d, n) of Lam_j |A|  <=  sum_{t=i+1..j} max_{b,d}(dt_t[b, d] max_n |A[d, n]|),
# so pieces are cut where that bound would reach ``_decay.FAST_BOUND`` (60 in float32, 600 in
# float64, far from overflow; the factored decay's relative error is about eps times the
# range), and never exceed chunk_size tokens. The anchor's own decay a_i multiplies only the
# entering state, so a token whose decay alone passes the bound (exp(dt A) underflowing to 0,
# a reset) starts a piece and resets it exactly. Lam is a cumulative sum inside the piece only
# (hazard 2). The state is carried from piece to piece; only the states entering the pieces are
# kept ([B, D, S] each), and each piece's temporaries are [B, L, D, S] with L <= chunk_size.
def _pieces(dt, A, chunk_size):
    """Split the T tokens into pieces (slices) of at most chunk_size tokens whose factored decay
    range stays below FAST_BOUND[dtype]. dt: [B, T, D]; A: [D, S]."""
    T, bound = dt.shape[1], FAST_BOUND[dt.dtype]
    rate = np.max(dt * np.max(-A, axis=1, initial=0), axis=(0, 2), initial=0)  # [T]: >= every dt |A|
    pieces, start = [], 0
    while start < T:
        stop = min(start + chunk_size, T)
        if np.sum(rate[start + 1:stop]) >= bound:                   # cut the piece short
            ranges = np.cumsum(rate[start + 1:stop])                # range of [start, start + 2 + j)
            stop = start + 1 + int(np.searchsorted(ranges, bound))  # the longest range < bound
        pieces.append(slice(start, stop))
        start = stop
    return pieces


class PieceStates(NamedTuple):
    """The states of one piece of L tokens in factored form, h_t = E_t * W_t, state-major:
    [B, L, S, D] (the state index n before the channel d, so that every broadcast runs along
    the D channels, not along the short S axis).

    E: [B, L, S, D] exp(Lam_t A), the decay from the piece's first token to t, in (0, 1]
    W: [B, L, S, D] a_first h_in + sum_{s <= t} b_s / E_s
    a_first: [B, S, D] exp(dt A) of the piece's first token (decays the entering state h_in)
    """

    E: np.ndarray
    W: np.ndarray
    a_first: np.ndarray


def _piece_states(dt, x, A_t, Bm, h_in) -> PieceStates:
    """dt, x = dt u: [B, L, D]; A_t = A^T: [S, D]; Bm: [B, L, S]; h_in: [B, S, D] the state
    before the piece (state-major, like the result)."""
    B, L, D = dt.shape
    Lam = np.zeros_like(dt)                                         # [B, L, D]
    if L > 1:
        Lam[:, 1:] = cumsum_in_chunks(dt[:, 1:])                    # dt_{i+1} + ... + dt_t
    E = np.multiply(Lam[:, :, None, :], A_t)                        # [B, L, S, D], <= 0
    np.exp(E, out=E)                                                # in (0, 1]
    b = np.multiply(Bm[..., None], x[:, :, None, :])                # [B, L, S, D]: b_s
    b /= E                                                          # |b_s| exp(range) at most
    a_first = np.exp(dt[:, 0, None, :] * A_t)                       # [B, S, D]
    b[:, 0] += a_first * h_in
    W = cumsum_in_chunks(b.reshape(B, L, -1)).reshape(b.shape)      # [B, L, S, D]
    return PieceStates(E, W, a_first)


class ChunkScan(NamedTuple):
    """The forward sweep over pieces: what the backward needs besides the inputs."""

    y: np.ndarray        # [B, T, D] the SSM output before the skip term and the gate
    pieces: list         # slices of the time axis (``_pieces``)
    h_in: list           # the state entering each piece, state-major [B, S, D] each
    h_last: np.ndarray   # [B, D, S] the final state


def _chunk_scan(u, dt, A, Bm, Cm, initial_state, chunk_size) -> ChunkScan:
    """Steps 1-3 of ``chunkwise``: every piece's states from the carried state, their read."""
    x = dt * u                                                      # [B, T, D]
    A_t = np.ascontiguousarray(A.T)                                 # [S, D]
    y = np.empty_like(u)                                            # [B, T, D]
    pieces, h_in = _pieces(dt, A, chunk_size), []
    h = initial_state.swapaxes(1, 2)                                # [B, S, D] (a view)
    for p in pieces:
        h_in.append(h)
        E, W, _ = _piece_states(dt[:, p], x[:, p], A_t, Bm[:, p], h)
        states = np.multiply(E, W, out=W)                           # h_t, [B, L, S, D]
        y[:, p] = (Cm[:, p, None, :] @ states)[:, :, 0, :]          # sum_n Cm_t[n] h_t[n, :]
        h = states[:, -1].copy()                                    # [B, S, D] (not a view)
    return ChunkScan(y, pieces, h_in, np.ascontiguousarray(h.swapaxes(1, 2)))  # h: [B, D, S]


@forward_form(SPEC, chunked=True)
def chunkwise(u, delta, A, Bm, Cm, D, z, delta_bias, *, initial_state, chunk_size, delta_softplus):
    """Pieces of at most C = chunk_size tokens, each solved in closed form (see the comment
    above ``_pieces``), the state carried between them. Memory: O(T/C * B D S) besides the
    inputs and outputs, and [B, C, S, D] temporaries per piece.

    1. dt = softplus(delta + bias) (or delta + bias); x = dt u; cut the pieces
    2. per piece: E_t = exp(Lam_t A), W_t = a_first h_in + cumsum_s(x_s Bm_s / E_s), h_t = E_t W_t
    3. read y_t = sum_n Cm_t[n] h_t[:, n]; carry h at the piece's last token to the next piece
    4. y = (y + D u) * silu(z)
    """
    dt = _step_sizes(delta, A, delta_bias, delta_softplus)          # [B, T, D]
    scan = _chunk_scan(u, dt, A, Bm, Cm, initial_state, chunk_size)
    return _gated_output(scan.y, u, D, z), scan.h_last


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(u, delta, A, Bm, Cm, D, z, delta_bias, do, dht, *, initial_state, chunk_size,
                  delta_softplus):
    """Backward of the chunkwise form: the adjoint recurrence dh_t = Cm_t dy_t + a_{t+1} dh_{t+1}
    solved per piece in the same factored form, pieces walked from the last to the first.

    1. forward sweep (``_chunk_scan``): y before the gate, the state entering every piece
    2. the gate's backward: dy = do * silu(z) (and du, dD, dz of the skip term and the gate)
    3. per piece, last to first, with the piece's E, W recomputed from its entering state:
       dh_t = (1 / E_t) (sum_{t' >= t} E_t' Cm_t' dy_t' + E_last dh_out)   (reverse cumsum)
       dCm_t = sum_d dy_t h_t,  dBm_t = sum_d x_t dh_t,  dx_t = sum_n Bm_t dh_t,
       dg_t = dh_t * a_t h_{t-1} with a_t h_{t-1} = E_t W_{t-1} (a_first h_in at the first token),
       ddt_t = u_t dx_t + sum_n dg_t A,  dA += sum_{b,t} dt_t dg_t,  dh_out <- a_first dh_first
    Arrays inside the loop are state-major, [B, L, S, D], as in ``PieceStates``.
    """
    dt = _step_sizes(delta, A, delta_bias, delta_softplus)          # [B, T, D]
    dt_slope = _step_size_slope(delta, delta_bias, delta_softplus)  # d dt / d delta, [B, T, D]
    scan = _chunk_scan(u, dt, A, Bm, Cm, initial_state, chunk_size)
    gate = _gated_output_vjp(scan.y, u, D, z, do)                   # gate.dy: [B, T, D]
    x = dt * u                                                      # [B, T, D]
    A_t = np.ascontiguousarray(A.T)                                 # [S, D]
    dx, ddt = np.empty_like(u), np.empty_like(dt)                   # [B, T, D]
    dBm, dCm, dA = np.empty_like(Bm), np.empty_like(Cm), np.zeros_like(A)
    dh = dht.swapaxes(1, 2)                                         # [B, S, D]: from later pieces
    for p, h_in in zip(reversed(scan.pieces), reversed(scan.h_in)):
        E, W, a_first = _piece_states(dt[:, p], x[:, p], A_t, Bm[:, p], h_in)
        B, L, S, D_ = E.shape
        dy = gate.dy[:, p]                                          # [B, L, D]
        # adjoint states: E_t dh_t = sum_{t' >= t} E_t' (Cm_t' dy_t') + E_last dh_out
        read = np.multiply(Cm[:, p, :, None], dy[:, :, None, :])    # [B, L, S, D]
        read[:, -1] += dh
        read *= E
        dstates = reverse_cumsum_in_chunks(read.reshape(B, L, -1)).reshape(E.shape)
        dstates /= E                                                # dh_t, [B, L, S, D]
        states = np.multiply(E, W)                                  # h_t, [B, L, S, D]
        dCm[:, p] = (states @ dy[..., None])[..., 0]                # [B, L, S]
        dBm[:, p] = (dstates @ x[:, p, :, None])[..., 0]            # [B, L, S]
        dx[:, p] = (Bm[:, p, None, :] @ dstates)[:, :, 0, :]        # [B, L, D]
        # dg_t = dh_t * a_t h_{t-1}; a_t h_{t-1} = E_t W_{t-1} inside the piece
        decayed = states                                            # reuse: a_t h_{t-1}
        decayed[:, 0] = a_first * h_in
        np.multiply(E[:, 1:], W[:, :-1], out=decayed[:, 1:])
        dg = np.multiply(dstates, decayed, out=decayed)             # [B, L, S, D]
        ddt[:, p] = np.einsum("blnd,nd->bld", dg, A_t)              # sum_n dg A
        dA += np.einsum("bld,blnd->dn", dt[:, p], dg)               # sum_{b,t} dt dg
        dh = a_first * dstates[:, 0]                                # to the previous piece
    ddt += u * dx
    du = dt * dx if gate.du is None else dt * dx + gate.du
    ddelta, dbias = _delta_grads(ddt, dt_slope, delta_bias)
    return {"u": du, "delta": ddelta, "A": dA, "Bm": dBm, "Cm": dCm, "D": gate.dD, "z": gate.dz,
            "delta_bias": dbias, "initial_state": np.ascontiguousarray(dh.swapaxes(1, 2))}


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
