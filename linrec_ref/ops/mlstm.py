r"""mlstm: xLSTM's matrix LSTM -- scalar decay, exponential input gate, normaliser, stabiliser.

Recurrence (one batch element, one head; inclusive read, the state after step t), unstabilised:

    C_t = exp(f_t) C_{t-1} + exp(i_t) k_t v_t^T          C: [K, V]
    n_t = exp(f_t) n_{t-1} + exp(i_t) k_t                n: [K]
    h_t = C_t^T q^_t / max(|n_t^T q^_t|, 1),   q^_t = scale * q_t

The scale enters through q^ only, before BOTH dot products (numerator and normaliser), as in
NX-AI mlstm_kernels; scale=None means K^-1/2. (The paper scales k by 1/sqrt(d) instead; the
output is the same.) f is the LOG forget gate, f <= 0: users pass logsigmoid(forget
pre-activation), never the pre-activation and never the probability sigmoid(.). i is the input
gate PRE-activation: the input gate is exp(i) and i may be large (i = 100 overflows exp in
float32, i = 710 in float64), which is why every form carries a stabiliser.

Stabiliser and the one state convention of every form. The state is the tuple
(C~, n~, m) = (C exp(-m), n exp(-m), m) with the running max

    m_t  = max(f_t + m_{t-1}, i_t)
    C~_t = exp(f_t + m_{t-1} - m_t) C~_{t-1} + exp(i_t - m_t) k_t v_t^T      (both exponents <= 0)
    n~_t = exp(f_t + m_{t-1} - m_t) n~_{t-1} + exp(i_t - m_t) k_t
    h_t  = C~_t^T q^_t / max(|n~_t^T q^_t|, exp(-m_t))

Without an initial state: C~_0 = 0, n~_0 = 0, m_0 = 0 (as NX-AI's native recurrent kernels
start). A given initial state (C~_0, n~_0, m_0) means the true state C_0 = C~_0 exp(m_0),
n_0 = n~_0 exp(m_0). Unrolled, with F_t = f_1 + ... + f_t:

    m_t = max(F_t + m_0, max_{s<=t} (F_t - F_s + i_s))

Every form returns the same final state (C~_T, n~_T, m_T) with this m_T (equal up to rounding
of the sums). The output h is mathematically independent of the stabiliser: any m gives the same
h, because the floor exp(-m_t) is the floor 1 of the unstabilised formula, rescaled.
The output gate of an xLSTM block (o_t * h_t) is not part of this op.

Glossary
    symbol   argument   shape           xLSTM paper           NX-AI mlstm_kernels (native)
    q_t      q          [B, T, H, K]    q_t                   q  (B, NH, S, DHQK)
    k_t      k          [B, T, H, K]    k_t (paper: / sqrt d) k
    v_t      v          [B, T, H, V]    v_t                   v  (B, NH, S, DHV)
    i_t      i          [B, T, H]       i~_t (pre-activation) i  (input gate pre-activation)
    f_t      f          [B, T, H]       log f_t               logsigmoid(f)  (NX-AI takes the
                                                              forget PRE-activation)
    C~_t     state[0]   [N, H, K, V]    C_t (stored as V x K) c_initial / matC_state
    n~_t     state[1]   [N, H, K]       n_t                   n_initial / vecN_state
    m_t      state[2]   [N, H]          m_t                   m_initial / scaM_state (B, NH, 1)
    scale    scale      float           1/sqrt(d) on k        DHQK^-1/2 on q (fixed)
NX-AI adds eps = 1e-6 to the denominator; this reference uses eps = 0 (compare with eps = 0).

Forms
    recurrent  the stabilised loop above (ground truth); O(K V) memory per head.
    parallel   log decay matrix D[t, s] = F_t - F_s + i_s (s <= t, via segsum), row stabiliser
               m_t = max(F_t + m_0, max_s D[t, s]) (the recurrent m_t), P = (Q^ K^T) * exp(D - m),
               h = (P V + w C~_0^T q^) / max(|P 1 + w n~_0^T q^|, exp(-m)),
               w_t = exp(F_t + m_0 - m_t) (the initial state's weight).
    chunkwise  chunks of C tokens: the parallel form inside a chunk with the stabilised state
               (C~, n~, m) entering it; the state is carried across chunks (numbered steps below).
    step       one token of the recurrence (decoding).
    attention_matrix  M [B, H, T, T] with h = M v (no initial state): M = P / den.

Gradients (hand-written). Because h does not depend on the stabiliser, the gradient is that of
the unstabilised formula; it is computed with every m held constant, in the scaled variables
G_t = exp(m_t) dL/dC_t and g_t = exp(m_t) dL/dn_t (the cotangents of C~_t, n~_t), which stay
bounded:
    den_t = max(|z_t|, exp(-m_t)), z_t = n~_t^T q^_t, sg_t = sign(z_t) where the floor does not
            bind (|z_t| > exp(-m_t)) and 0 where it binds (the derivative of the floor)
    dnum_t = do_t / den_t,   dz_t = -<do_t, h_t> sg_t / den_t
    G_t = q^_t dnum_t^T + a_{t+1} G_{t+1},  g_t = dz_t q^_t + a_{t+1} g_{t+1},
          a_t = exp(f_t + m_{t-1} - m_t); G_T, g_T start from the cotangents dC~_T, dn~_T
    dq_t = scale (C~_t dnum_t + dz_t n~_t),  dk_t = b_t (G_t v_t + g_t),  dv_t = b_t G_t^T k_t,
          b_t = exp(i_t - m_t),   di_t = k_t . dk_t,
    df_t = a_t (<G_t, C~_{t-1}> + <g_t, n~_{t-1}>)
The final state's m_T is a max, so it adds a path of its own: with
    dm_eff = dm_T - <dC~_T, C~_T> - <dn~_T, n~_T>
(the cotangent of m_T at fixed true state), dm_eff flows back along the argmax of m_T: to
di_s* for the maximising s* (the earliest one on a tie), to df_t for every t in (s*, T], or to
dm_0 when F_T + m_0 is the max. Initial state: dC~_0 = G_0, dn~_0 = g_0 and
    dm_0 = <G_0, C~_0> + <g_0, n~_0> (+ dm_eff when the argmax is m_0),
generally nonzero since the true initial state is C~_0 exp(m_0).
The parallel and chunkwise backwards are matrix products (with m fixed); instead of the gate
identity (dL/db_t = q_t . dq_t - k_t . dk_t, reverse-summed), df_j is summed directly over the log
weights that contain f_j: the pairs s < j <= t of a chunk (D[t, s]), the initial state's reads at
t >= j, and the writes s < j and the entering state carried to the chunk's end. The two agree
mathematically; the direct sum gives an exact 0 at a hard reset (f_j = -inf, every such weight is
exactly 0) where the identity leaves rounding noise. di_s = k_s . dk_s in every form. The
recurrent backward walks t backwards with ``_scan.reverse_steps`` (checkpointed: never all T
states kept).

Numerics. exp(i) is never formed: every exponent in every form is <= 0 (m is a running max of
the log weights), so i = 1000 runs in float64 and i = 100 in float32. exp(-m) falls below the
smallest normal number for m > 708 (float64); the denominator keeps that number as a last floor,
so that 0/0 (q = 0, or zero-padded rows of a chunk) gives 0, not NaN.

Conditioning. The output is ill-conditioned where the sums cancel: with the condition number
    kappa_t = sum_s |e^{D_ts} q^_t . k_s| / max(|n_t^T q^_t|, 1)
            + max_j sum_s |e^{D_ts} (q^_t . k_s) v_sj| / max_j |(C_t^T q^_t)_j|
(``testing.mlstm_condition`` computes it per token), any evaluation of h_t errs by about
u kappa_t relative (u = 6e-8 in float32). Measured (bench/float32_accuracy.py, T = 2048,
K = V = 64): the chunkwise and parallel float32 forms stay within 30-300 u kappa_t; the float32
loop loses up to a further min(T, 1/(1 - a)) (7000 u kappa_t at a = 0.9999). With slow decay,
input gates i ~ N(0, 3^2..10^2) and |q|, |k| ~ 1e3, kappa reaches 8e2..1.2e4 and float32 errors
reach 1e-3..9e-3 (chunkwise, parallel) and 6e-2 (recurrent): rounding, not a bug. Float32
exponents near 100 keep only ~4e-6 relative accuracy (ulp(100) = 7.6e-6). ``make_inputs`` keeps
the normaliser's part of kappa <= MAX_CANCELLATION and every token KINK_MARGIN away from the
floor's kink |n^T q^| = 1. docs/testing.md has the table.

Peers: NX-AI ``mlstm_kernels`` native forms (torch): ``mlstm_recurrent_sequence__native_fw``,
``mlstm_parallel__native_autograd``, ``mlstm_chunkwise__native_autograd`` with f -> the
forget pre-activation (ours is its logsigmoid), layout [B, H, T, D], eps = 0.

References: Beck et al., "xLSTM: Extended Long Short-Term Memory", 2024; NX-AI mlstm_kernels.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from .. import _regimes
from .._mlstm_condition import mlstm_keys, mlstm_queries
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import from_chunks, reverse_cumsum, reverse_steps, segsum, to_chunks
from .._spec import Arg, OpSpec

SPEC = OpSpec(
    name="mlstm",
    family="xLSTM matrix memory (mLSTM)",
    transition="scalar decay",
    math=("C_t = e^{f_t} C_{t-1} + e^{i_t} k_t v_t^T;  n_t = e^{f_t} n_{t-1} + e^{i_t} k_t;  "
          "h_t = C_t^T q^_t / max(|n_t^T q^_t|, 1), q^ = scale q; stabiliser m_t, m_0 = 0"),
    inputs=(Arg("q", "BTHK"), Arg("k", "BTHK"), Arg("v", "BTHV"), Arg("i", "BTH"),
            Arg("f", "BTH", log_gate=True)),
    output="BTHV",
    state=(Arg("C", "NHKV"), Arg("n", "NHK"), Arg("m", "NH")),
    default_scale=lambda dims: dims["K"] ** -0.5,
    peers=("mlstm_kernels.torch.recurrent.mlstm_recurrent_sequence__native_fw "
           "(our f = logsigmoid(its f), eps=0)",
           "mlstm_kernels.torch.parallel.mlstm_parallel__native_autograd",
           "mlstm_kernels.torch.chunkwise.mlstm_chunkwise__native_autograd"),
    regimes=tuple(_regimes.DECAY_REGIMES),
    default_dims={"B": 2, "H": 2, "K": 8, "V": 6},
)


# ----------------------------------------------------------------------------- recurrent
def _advance(k, v, i, f):
    """One stabilised step as a function of ((C~, n~, m)_{t-1}, t), for loops and reverse walks."""

    def advance(state, t):
        C, n, m = state                                              # [B,H,K,V], [B,H,K], [B,H]
        m_new = np.maximum(f[:, t] + m, i[:, t])                     # [B, H]
        decay = np.exp(f[:, t] + m - m_new)                          # [B, H], <= 1
        write = np.exp(i[:, t] - m_new)                              # [B, H], <= 1
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]               # [B, H, K, V]
        C = decay[..., None, None] * C + write[..., None, None] * kv
        n = decay[..., None] * n + write[..., None] * k[:, t]
        return C, n, m_new

    return advance


def _denominator(z, m):
    """max(|z|, exp(-m)), never below the smallest normal number of the dtype.

    The guard only acts where exp(-m) is below that number (m > 708 in float64, m > 87 in
    float32) AND |z| is below it too (e.g. q = 0, or the zero-padded rows of a chunk), where it
    turns 0/0 into 0 instead of NaN.
    """
    return np.maximum(np.maximum(np.abs(z), np.exp(-m)), np.finfo(z.dtype).tiny)


def _read(q_hat, state):
    """h = C~^T q^ / max(|n~^T q^|, exp(-m)). q_hat: [B, H, K] -> h: [B, H, V], z, den: [B, H]."""
    C, n, m = state
    num = (q_hat[..., None, :] @ C)[..., 0, :]                       # [B, H, V]
    z = np.sum(q_hat * n, axis=-1)                                   # [B, H]
    den = _denominator(z, m)                                         # [B, H]
    return num / den[..., None], z, den


def _floor_sign(z, m):
    """d|z|/dz where the floor exp(-m) does not bind, 0 where it binds (max(|z|, e^-m) = e^-m)."""
    return np.sign(z) * (np.abs(z) > np.exp(-m))


@forward_form(SPEC)
def recurrent(q, k, v, i, f, *, scale, initial_state):
    """The definition: the stabilised loop. q, k: [B, T, H, K]; v: [B, T, H, V]; i, f: [B, T, H];
    state (C~ [B, H, K, V], n~ [B, H, K], m [B, H])."""
    advance = _advance(k, v, i, f)
    state = initial_state
    o = np.empty(v.shape, dtype=v.dtype)                             # [B, T, H, V]
    for t in range(q.shape[1]):
        state = advance(state, t)
        o[:, t] = _read(scale * q[:, t], state)[0]
    return o, state


@step_form(SPEC)
def step(q, k, v, i, f, *, state, scale):
    """One token: q, k: [B, H, K]; v: [B, H, V]; i, f: [B, H]; state (C~, n~, m)."""
    one = lambda x: x[:, None]                                       # add a T axis of length 1
    new_state = _advance(one(k), one(v), one(i), one(f))(state, 0)
    return _read(scale * q, new_state)[0], new_state


@vjp_form(SPEC)
def recurrent_vjp(q, k, v, i, f, do, dht, *, scale, initial_state):
    """Backward of the loop, walking t = T-1 .. 0 with the scaled adjoints G, g (ground truth).

    Memory: states are recomputed from checkpoints (``_scan.reverse_steps``), never all T kept.
    """
    dq, dk, dv, di, df = (np.zeros_like(x) for x in (q, k, v, i, f))
    G, g = dht[0].copy(), dht[1].copy()                              # [B,H,K,V], [B,H,K]
    # the argmax path of m_T: on_i[t] (i_t is the max), on_f[t] (f_t lies on the path)
    on_i = np.zeros(i.shape, dtype=bool)                             # [B, T, H]
    on_f = np.zeros(i.shape, dtype=bool)                             # [B, T, H]
    open_path = np.ones(i.shape[:1] + i.shape[2:], dtype=bool)       # [B, H]
    T = q.shape[1]
    final_state = initial_state                                      # (C~, n~, m)_T; S_0 if T = 0
    for t, prev, cur in reverse_steps(_advance(k, v, i, f), initial_state, T):
        if t == T - 1:                                               # the first step walked back
            final_state = cur
        (C_p, n_p, m_p), (C_t, n_t, m_t) = prev, cur
        q_hat = scale * q[:, t]                                      # [B, H, K]
        h, z, den = _read(q_hat, cur)
        dnum = do[:, t] / den[..., None]                             # [B, H, V]
        dz = -np.sum(do[:, t] * h, axis=-1) * _floor_sign(z, m_t) / den   # [B, H]
        G = G + q_hat[..., :, None] * dnum[..., None, :]             # read of C~_t
        g = g + dz[..., None] * q_hat                                # read of n~_t
        decay = np.exp(f[:, t] + m_p - m_t)                          # [B, H]
        write = np.exp(i[:, t] - m_t)                                # [B, H]
        dq[:, t] = scale * ((C_t @ dnum[..., None])[..., 0] + dz[..., None] * n_t)
        dk[:, t] = write[..., None] * ((G @ v[:, t, :, :, None])[..., 0] + g)
        dv[:, t] = write[..., None] * (k[:, t, :, None, :] @ G)[..., 0, :]
        di[:, t] = np.sum(k[:, t] * dk[:, t], axis=-1)
        df[:, t] = decay * (np.sum(G * C_p, axis=(-2, -1)) + np.sum(g * n_p, axis=-1))
        G = decay[..., None, None] * G                               # to C~_{t-1}
        g = decay[..., None] * g
        input_wins = i[:, t] > f[:, t] + m_p                         # [B, H]; ties -> older
        on_i[:, t] = open_path & input_wins
        on_f[:, t] = open_path & ~input_wins
        open_path = open_path & ~input_wins
    C_T, n_T, _ = final_state
    dm_eff = dht[2] - np.sum(dht[0] * C_T, axis=(-2, -1)) - np.sum(dht[1] * n_T, axis=-1)  # [B, H]
    di += dm_eff[:, None] * on_i
    df += dm_eff[:, None] * on_f
    C_0, n_0, _ = initial_state
    dm0 = np.sum(G * C_0, axis=(-2, -1)) + np.sum(g * n_0, axis=-1) + dm_eff * open_path
    return {"q": dq, "k": dk, "v": dv, "i": di, "f": df, "initial_state": (G, g, dm0)}


# ----------------------------------------------------------------------------- blocks
# The parallel form is one block of T tokens; the chunkwise form applies the same block math to
# every chunk ([B, H, N, C, ...] arrays) with the state entering it. Leading dims are "...".
def _log_decay_matrix(i, f):
    """i, f: [..., L] -> log_D: [..., L, L], log_D[t, s] = f_{s+1} + .. + f_t + i_s (s <= t),
    -inf above the diagonal; b: [..., L], b_t = f_1 + .. + f_t (from the block start)."""
    return segsum(f) + i[..., None, :], np.cumsum(f, axis=-1)


class BlockForward(NamedTuple):
    """The parallel form of one block of L tokens: the output h and what its backward needs."""

    log_w: np.ndarray           # [..., L]     F_t + m_0, the log weight of the entering state
    m: np.ndarray               # [..., L]     the stabiliser, as the recurrence's m_t
    E: np.ndarray               # [..., L, L]  exp(log_D - m), causal, <= 1
    w: np.ndarray               # [..., L]     exp(log_w - m) <= 1
    P: np.ndarray               # [..., L, L]  (q^ k^T) * E
    z: np.ndarray               # [..., L]     n~_t^T q^_t
    den: np.ndarray             # [..., L]     max(|z|, exp(-m))
    h: np.ndarray               # [..., L, V]  the output


def _block_forward(q_hat, k, v, log_D, b, C0, n0, m0) -> BlockForward:
    """The parallel form of one block given the state (C0, n0, m0) entering it.

    q_hat, k: [..., L, K]; v: [..., L, V]; log_D: [..., L, L]; b: [..., L];
    C0: [..., K, V]; n0: [..., K]; m0: [...].
    """
    log_w = b + m0[..., None]                                        # [..., L]: F_t + m_0
    m = np.maximum(log_w, log_D.max(axis=-1))                        # [..., L]: the recurrent m_t
    E = np.exp(log_D - m[..., None])                                 # [..., L, L], <= 1, causal
    w = np.exp(log_w - m)                                            # [..., L], <= 1
    P = (q_hat @ k.swapaxes(-1, -2)) * E                             # [..., L, L]
    num = P @ v + w[..., None] * (q_hat @ C0)                        # [..., L, V]
    z = P.sum(axis=-1) + w * (q_hat @ n0[..., None])[..., 0]         # [..., L]
    den = _denominator(z, m)                                         # [..., L]
    h = num / den[..., None]                                         # [..., L, V]
    return BlockForward(log_w=log_w, m=m, E=E, w=w, P=P, z=z, den=den, h=h)


def _block_end_state(k, v, fw, C0, n0):
    """The stabilised state after the block's last token: (C~ [..., K, V], n~ [..., K], m [...])."""
    u = fw.E[..., -1, :, None]                                       # [..., L, 1]: decay s -> end
    w_end = fw.w[..., -1]                                            # [...]
    C = (k * u).swapaxes(-1, -2) @ v + w_end[..., None, None] * C0   # [..., K, V]
    n = np.sum(k * u, axis=-2) + w_end[..., None] * n0               # [..., K]
    return C, n, fw.m[..., -1]


def _read_cotangents(do, fw):
    """dnum = do / den [..., L, V] and dz = -<do, h> sg / den [..., L] (sg: floor derivative)."""
    dnum = do / fw.den[..., None]
    dz = -np.sum(do * fw.h, axis=-1) * _floor_sign(fw.z, fw.m) / fw.den
    return dnum, dz


def _entering_state_cotangent(q_hat, fw, dnum, dz, G_end, g_end):
    """Cotangent (G, g) of the state entering a block, from its reads and its end state."""
    w = fw.w[..., :, None]                                           # [..., L, 1]
    w_end = fw.w[..., -1]                                            # [...]
    G = w_end[..., None, None] * G_end + (q_hat * w).swapaxes(-1, -2) @ dnum   # [..., K, V]
    g = w_end[..., None] * g_end + np.sum(q_hat * w * dz[..., None], axis=-2)  # [..., K]
    return G, g


def _exclusive_cumsum(x):
    """out[..., j] = sum_{s < j} x[..., s] (exact 0 at j = 0, no subtraction)."""
    out = np.zeros_like(x)
    np.cumsum(x[..., :-1], axis=-1, out=out[..., 1:])
    return out


def _block_vjp(q_hat, k, v, fw, dnum, dz, C0, n0, G_end, g_end):
    """Gradients of one block with all m held fixed (see the module docstring).

    Returns dq^ [..., L, K], dk [..., L, K], dv [..., L, V], di [..., L], df [..., L].
    df is summed directly over what f_j decays (no gate identity, so a hard reset gets an exact
    0): the pairs s < j <= t of the block, the initial state read at t >= j, and the writes s < j
    and the initial state carried to the block's end.
    """
    dP = (dnum @ v.swapaxes(-1, -2)) + dz[..., None]                 # [..., L, L]: d/dP_ts
    dA = dP * fw.E                                                   # [..., L, L]: d/d(q^_t . k_s)
    u = fw.E[..., -1, :, None]                                       # [..., L, 1]: decay s -> end
    w = fw.w[..., :, None]                                           # [..., L, 1]
    dq_from_C0 = w * (dnum @ C0.swapaxes(-1, -2) + dz[..., None] * n0[..., None, :])  # [..., L, K]
    dk_from_end = u * (v @ G_end.swapaxes(-1, -2) + g_end[..., None, :])            # [..., L, K]
    dq_hat = dA @ k + dq_from_C0
    dk = dA.swapaxes(-1, -2) @ q_hat + dk_from_end
    dv = fw.P.swapaxes(-1, -2) @ dnum + u * (k @ G_end)
    di = np.sum(k * dk, axis=-1)                                     # [..., L]
    # d/d(log weight) of every weight: pairs (t, s), initial-state reads, end-state terms
    d_log_pair = dP * fw.P                                           # [..., L, L]
    d_log_w = np.sum(q_hat * dq_from_C0, axis=-1)                    # [..., L]
    d_log_u = np.sum(k * dk_from_end, axis=-1)                       # [..., L]
    w_end = fw.w[..., -1]                                            # [...]
    d_log_w_end = w_end * (np.sum(G_end * C0, axis=(-2, -1)) + np.sum(g_end * n0, axis=-1))
    pairs = np.tril(_exclusive_cumsum(d_log_pair))                   # [..., t, j]: s < j <= t
    df = (pairs.sum(axis=-2) + reverse_cumsum(d_log_w, axis=-1)
          + _exclusive_cumsum(d_log_u) + d_log_w_end[..., None])     # [..., L]
    return dq_hat, dk, dv, di, df


def _stabiliser_path(input_wins, argmax, L):
    """Where the final m_T's argmax lies, walking blocks backwards.

    input_wins: [B, H, N] bool, block n's own best term beats the carried F + m_in (ties -> older);
    argmax: [B, H, N] the block's earliest maximising token. Returns on_i, on_f: [B, H, N, L]
    (i_s is the max; f_t lies on the path) and on_m0: [B, H] (m_0 is the max).
    """
    pos = np.arange(L)                                               # [L]
    on_i = np.zeros(input_wins.shape + (L,), dtype=bool)             # [B, H, N, L]
    on_f = np.zeros(input_wins.shape + (L,), dtype=bool)             # [B, H, N, L]
    open_path = np.ones(input_wins.shape[:-1], dtype=bool)           # [B, H]
    for n in reversed(range(input_wins.shape[-1])):
        inside = (open_path & input_wins[..., n])[..., None]         # [B, H, 1]
        through = (open_path & ~input_wins[..., n])[..., None]       # [B, H, 1]
        a = argmax[..., n, None]                                     # [B, H, 1]
        on_i[..., n, :] = inside & (pos == a)
        on_f[..., n, :] = through | (inside & (pos > a))
        open_path = open_path & ~input_wins[..., n]
    return on_i, on_f, open_path


def _final_m_cotangent(dht, final_state):
    """dm_eff = dm_T - <dC~_T, C~_T> - <dn~_T, n~_T>: the cotangent of m_T at fixed true state."""
    return (dht[2] - np.sum(dht[0] * final_state[0], axis=(-2, -1))
            - np.sum(dht[1] * final_state[1], axis=-1))


def _heads_first(*xs):
    return tuple(np.moveaxis(x, 1, 2) for x in xs)                   # [B, T, H, .] -> [B, H, T, .]


# ----------------------------------------------------------------------------- parallel
@matrix_form(SPEC, names=("q", "k", "i", "f"))
def attention_matrix(q, k, i, f, *, scale):
    """M: [B, H, T, T] with h = M v (no initial state; m_0 = 0): M = (Q^ K^T * exp(D - m)) / den."""
    qh, kh = _heads_first(q, k)                                      # [B, H, T, K]
    ih, fh = _heads_first(i, f)                                      # [B, H, T]
    log_D, b = _log_decay_matrix(ih, fh)
    B, H, T, K = qh.shape
    zeros = lambda *s: np.zeros((B, H) + s, dtype=q.dtype)
    fw = _block_forward(scale * qh, kh, zeros(T, 1), log_D, b, zeros(K, 1), zeros(K), zeros())
    return fw.P / fw.den[..., None]


@forward_form(SPEC)
def parallel(q, k, v, i, f, *, scale, initial_state):
    """h = (P V + w C~_0^T q^) / max(|P 1 + w n~_0^T q^|, exp(-m)), P = Q^ K^T * exp(D - m)."""
    qh, kh, vh = _heads_first(scale * q, k, v)                       # [B, H, T, K|V]
    ih, fh = _heads_first(i, f)                                      # [B, H, T]
    log_D, b = _log_decay_matrix(ih, fh)                             # [B, H, T, T], [B, H, T]
    fw = _block_forward(qh, kh, vh, log_D, b, *initial_state)
    return np.moveaxis(fw.h, 2, 1), _block_end_state(kh, vh, fw, *initial_state[:2])


@vjp_form(SPEC)
def parallel_vjp(q, k, v, i, f, do, dht, *, scale, initial_state):
    """Backward of the parallel form: matrix products, df summed directly, then the m_T path."""
    qh, kh, vh, doh = _heads_first(scale * q, k, v, do)              # [B, H, T, K|V]
    ih, fh = _heads_first(i, f)                                      # [B, H, T]
    C0, n0, m0 = initial_state
    log_D, b = _log_decay_matrix(ih, fh)
    fw = _block_forward(qh, kh, vh, log_D, b, C0, n0, m0)
    final = _block_end_state(kh, vh, fw, C0, n0)
    dnum, dz = _read_cotangents(doh, fw)
    dq_hat, dk, dv, di, df = _block_vjp(qh, kh, vh, fw, dnum, dz, C0, n0, dht[0], dht[1])
    G0, g0 = _entering_state_cotangent(qh, fw, dnum, dz, dht[0], dht[1])
    # path of m_T = max(F_T + m_0, max_s D[T, s]) (one block)
    last = log_D[..., -1, :]                                         # [B, H, T]
    input_wins = last.max(axis=-1) > fw.log_w[..., -1]               # [B, H]
    on_i, on_f, on_m0 = _stabiliser_path(input_wins[..., None], last.argmax(axis=-1)[..., None],
                                         q.shape[1])                 # [B, H, 1, T]
    dm_eff = _final_m_cotangent(dht, final)[..., None]               # [B, H, 1]
    di = di + dm_eff * on_i[..., 0, :]
    df = df + dm_eff * on_f[..., 0, :]
    dm0 = np.sum(G0 * C0, axis=(-2, -1)) + np.sum(g0 * n0, axis=-1) + dm_eff[..., 0] * on_m0
    back = lambda x: np.moveaxis(x, 2, 1)                            # [B, H, T, .] -> [B, T, H, .]
    return {"q": back(scale * dq_hat), "k": back(dk), "v": back(dv), "i": back(di), "f": back(df),
            "initial_state": (G0, g0, dm0.astype(m0.dtype))}


# ----------------------------------------------------------------------------- chunkwise
def _chunk_input_gate(i, C):
    """to_chunks for i, padding with -inf (a padded token writes nothing and leaves m unchanged;
    zero padding would write exp(0) into the stabiliser)."""
    real = to_chunks(np.ones(i.shape, dtype=bool), C)                # [B, H, N, C]
    return np.where(real, to_chunks(i, C), -np.inf)                  # [B, H, N, C]


class ChunkParts(NamedTuple):
    """Steps 1-4 of the chunkwise form, shared by forward and backward; arrays [B, H, N, ...]."""

    qc: np.ndarray              # [B, H, N, C, K]  chunked scale * q
    kc: np.ndarray              # [B, H, N, C, K]
    vc: np.ndarray              # [B, H, N, C, V]
    log_D: np.ndarray           # [B, H, N, C, C]  intra-chunk log decay matrix
    fw: BlockForward            # the parallel form of every chunk from its entering state
    C_in: np.ndarray            # [B, H, N, K, V]  the state entering each chunk
    n_in: np.ndarray            # [B, H, N, K]
    m_in: np.ndarray            # [B, H, N]
    m_loc: np.ndarray           # [B, H, N]        the chunk's own max over its writes
    final: Tuple[np.ndarray, np.ndarray, np.ndarray]   # (C~, n~, m) after the last chunk


def _chunk_parts(q, k, v, i, f, scale, initial_state, C) -> ChunkParts:
    """Steps 1-4 of the chunkwise form, shared by forward and backward."""
    qc, kc, vc = to_chunks(scale * q, C), to_chunks(k, C), to_chunks(v, C)   # [B, H, N, C, K|V]
    ic, fc = _chunk_input_gate(i, C), to_chunks(f, C)                # [B, H, N, C]
    # 1. intra-chunk log decay matrix D[t, s] = b_t - b_s + i_s and cumulative gates b
    log_D, b = _log_decay_matrix(ic, fc)                             # [B, H, N, C, C], [B, H, N, C]
    # 2. each chunk's own contribution to its end state, stabilised by its own max m_loc
    last = log_D[..., -1, :]                                         # [B, H, N, C]
    m_loc = last.max(axis=-1)                                        # [B, H, N]
    u = np.exp(last - m_loc[..., None])[..., None]                   # [B, H, N, C, 1]
    U = (kc * u).swapaxes(-1, -2) @ vc                               # [B, H, N, K, V]
    u_n = np.sum(kc * u, axis=-2)                                    # [B, H, N, K]
    # 3. carry (C~, n~, m) across chunks; keep the state entering each chunk
    N = qc.shape[2]
    C_in, n_in = np.empty_like(U), np.empty_like(u_n)                # [B, H, N, K|V]
    m_in = np.empty_like(m_loc)                                      # [B, H, N]
    C_s, n_s, m_s = initial_state
    for c in range(N):
        C_in[:, :, c], n_in[:, :, c], m_in[:, :, c] = C_s, n_s, m_s
        carried = b[:, :, c, -1] + m_s                               # [B, H]
        m_out = np.maximum(carried, m_loc[:, :, c])                  # [B, H]
        a_old = np.exp(carried - m_out)                              # [B, H], <= 1
        a_new = np.exp(m_loc[:, :, c] - m_out)                       # [B, H], <= 1
        C_s = a_old[..., None, None] * C_s + a_new[..., None, None] * U[:, :, c]
        n_s = a_old[..., None] * n_s + a_new[..., None] * u_n[:, :, c]
        m_s = m_out
    # 4. the parallel form on every chunk, from the state entering it
    fw = _block_forward(qc, kc, vc, log_D, b, C_in, n_in, m_in)
    return ChunkParts(qc=qc, kc=kc, vc=vc, log_D=log_D, fw=fw, C_in=C_in, n_in=n_in, m_in=m_in,
                      m_loc=m_loc, final=(C_s, n_s, m_s))


@forward_form(SPEC, chunked=True)
def chunkwise(q, k, v, i, f, *, scale, initial_state, chunk_size):
    """Chunks of C = chunk_size tokens (T need not divide). Memory: O(T/C * K V) per head.

    1. intra-chunk log decay matrix D[t, s] = b_t - b_s + i_s (segsum) and cumulative gates b
    2. chunk end contributions U = sum_s exp(D[end, s] - m_loc) k_s v_s^T (and u for n)
    3. carry: m_out = max(b_end + m_in, m_loc); C~_out = exp(b_end + m_in - m_out) C~_in
       + exp(m_loc - m_out) U (same for n~), one loop over chunks
    4. output: the parallel form on each chunk with the carried state (C~_in, n~_in, m_in)
    """
    p = _chunk_parts(q, k, v, i, f, scale, initial_state, chunk_size)
    return from_chunks(p.fw.h, q.shape[1]), p.final


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(q, k, v, i, f, do, dht, *, scale, initial_state, chunk_size):
    """Backward of the chunkwise form. Keeps only per-chunk states (O(T/C * K V) per head).

    1. recompute the chunk states and the chunk reads (forward steps 1-4)
    2. carry the state cotangents backwards: G_end[n-1] = w_end[n] G_end[n] + reads of chunk n
    3. intra-chunk gradients by matrix products, with m held fixed; df summed directly inside
       each chunk (the chunk-end terms carry what later chunks see)
    4. the path of the final m_T through the chunks' maxima; dm_0
    """
    T, C = q.shape[1], chunk_size
    p = _chunk_parts(q, k, v, i, f, scale, initial_state, C)
    fw, qc, kc, vc = p.fw, p.qc, p.kc, p.vc
    doc = to_chunks(do, C)                                           # [B, H, N, C, V]
    N = qc.shape[2]
    # 2. cotangent of the state at the end of every chunk
    dnum, dz = _read_cotangents(doc, fw)
    zero_end = (np.zeros_like(p.C_in), np.zeros_like(p.n_in))
    loc_G, loc_g = _entering_state_cotangent(qc, fw, dnum, dz, *zero_end)   # [B, H, N, K|V]
    w_end = fw.w[..., -1]                                            # [B, H, N]
    G_end, g_end = np.empty_like(loc_G), np.empty_like(loc_g)
    G, g = dht[0], dht[1]
    for c in reversed(range(N)):
        G_end[:, :, c], g_end[:, :, c] = G, g
        G = w_end[:, :, c, None, None] * G + loc_G[:, :, c]
        g = w_end[:, :, c, None] * g + loc_g[:, :, c]
    # 3. intra-chunk and state terms
    dq_hat, dk, dv, di, df = _block_vjp(qc, kc, vc, fw, dnum, dz, p.C_in, p.n_in, G_end, g_end)
    # 4. m_T path: chunk n holds the max when its own best term beats the carried one
    last = p.log_D[..., -1, :]                                       # [B, H, N, C]
    on_i, on_f, on_m0 = _stabiliser_path(p.m_loc > fw.log_w[..., -1], last.argmax(axis=-1), C)
    dm_eff = _final_m_cotangent(dht, p.final)                        # [B, H]
    di = di + dm_eff[..., None, None] * on_i
    df = df + dm_eff[..., None, None] * on_f
    C0, n0, m0 = initial_state
    dm0 = np.sum(G * C0, axis=(-2, -1)) + np.sum(g * n0, axis=-1) + dm_eff * on_m0
    return {"q": from_chunks(scale * dq_hat, T), "k": from_chunks(dk, T), "v": from_chunks(dv, T),
            "i": from_chunks(di, T), "f": from_chunks(df, T),
            "initial_state": (G, g, dm0.astype(m0.dtype))}


# ----------------------------------------------------------------------------- random inputs
# make_inputs keeps every token's normaliser away from the floor's kink and well conditioned:
KINK_MARGIN = 0.05      # |log |n_t^T q^_t|| >= this (n, q^ unstabilised; the kink is at 1)
MAX_CANCELLATION = 50   # mlstm_condition's normaliser measure <= this
REDRAWS = 20            # redraws of an offending q_t before it is rescaled instead
CHECK_BLOCK = 32        # mlstm_condition's block: exact for T <= 64, an upper bound beyond


def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs: q, k, v ~ N(0, 1); f from the decay regime; i ~ 2 N(0, 1).

    Then q_t (which enters h_t only) is redrawn, up to REDRAWS times, where its normaliser is
    within KINK_MARGIN of the kink |n_t^T q^_t| = 1 (finite differences would straddle it) or
    cancels by more than MAX_CANCELLATION (``testing.mlstm_condition``'s normaliser measure
    sum_s |e^{D_ts} q^_t . k_s| / max(|n_t^T q^_t|, 1): h_t is then ill-conditioned, float32
    loses ~1e-7 times that ratio, and a random initial state of O(1) can move such a token onto
    the kink). A token still offending is rescaled to |n_t^T q^_t| = 1/2. The floor binds at
    some tokens and not at others. Checked without an initial state (a random one perturbs n by
    O(1) only), exactly for T <= 2 CHECK_BLOCK and through an upper bound of the measure beyond;
    O(T) time, a redraw re-measuring only the redrawn tokens.
    """
    if variant != "default":
        raise ValueError(f"mlstm: unknown variant {variant!r}; expected 'default'")
    B, T, H, K, V = (dims[d] for d in "BTHKV")
    q = _regimes.normal(rng, (B, T, H, K), dtype).astype(np.float64)
    k = _regimes.normal(rng, (B, T, H, K), dtype).astype(np.float64)
    v = _regimes.normal(rng, (B, T, H, V), dtype)
    f = _regimes.log_decay(rng, (B, T, H), regime, dtype).astype(np.float64)
    i = (2.0 * _regimes.normal(rng, (B, T, H), dtype)).astype(np.float64)

    C = max(1, min(CHECK_BLOCK, T))
    keys = mlstm_keys(k, v.astype(np.float64), i, f, None, C)          # all that q does not change
    offending = lambda c: (abs(c.log_normaliser) < KINK_MARGIN) | (c.normaliser > MAX_CANCELLATION)
    measured = mlstm_queries(keys, K ** -0.5 * q)                        # [B, T, H] each
    log_ratio, bad = measured.log_normaliser, offending(measured)       # [B, T, H]
    for _ in range(REDRAWS):
        if not bad.any():
            break
        fresh = _regimes.normal(rng, q.shape, dtype).astype(np.float64)          # [B, T, H, K]
        q = np.where(bad[..., None], fresh, q)
        b, t, h = np.nonzero(bad)                      # q_t changed, and only h_t depends on it
        again = mlstm_queries(keys, K ** -0.5 * q, rows=(b, h, t // C, t % C))   # [n_bad] each
        log_ratio[b, t, h], bad[b, t, h] = again.log_normaliser, offending(again)
    factor = np.where(bad, 0.5 * np.exp(-np.where(bad, log_ratio, 0.0)), 1.0)   # [B, T, H]
    return {"q": (q * factor[..., None]).astype(dtype), "k": k.astype(dtype), "v": v,
            "i": i.astype(dtype), "f": f.astype(dtype)}
