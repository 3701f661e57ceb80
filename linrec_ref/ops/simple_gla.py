r"""simple_gla: linear attention with a scalar, data-dependent decay per head (the Mamba-2 / SSD core).

Recurrence (one batch element, one head; inclusive read, the state after step t):

    S_t = a_t S_{t-1} + k_t v_t^T,     a_t = exp(g_t) in [0, 1]
    o_t = scale * S_t^T q_t

Glossary
    symbol   argument   shape          paper (Mamba-2 / SSD)         fla (chunk_simple_gla)
    q_t      q          [B, T, H, K]   C_t                            q
    k_t      k          [B, T, H, K]   B_t                            k
    v_t      v          [B, T, H, V]   x_t * dt_t                     v
    g_t      g          [B, T, H]      A * dt_t  (log of the decay)   g
    S_t      state      [B, H, K, V]   h_t (stored transposed)        final_state
    scale    scale      float          1 for SSD                      scale (default K^-1/2)

Forms
    recurrent  the loop above (ground truth); O(K V) memory per head.
    parallel   o = (scale * (Q K^T) * D) V  with D[t, s] = exp(g_{s+1} + ... + g_t) for s <= t,
               plus the initial-state term scale * exp(g_1 + ... + g_t) * S_0^T q_t.
    chunkwise  chunks of C tokens: the parallel form inside a chunk, the recurrence across chunks.
    step       one token of the recurrence (decoding).

Gradients (hand-written vector-Jacobian products; the adjoint of a linear recurrence is a linear
recurrence run backwards in time):
    dS_t = scale q_t do_t^T + a_{t+1} dS_{t+1},   dS_T starts from the final-state cotangent dht
    dq_t = scale S_t do_t,  dk_t = dS_t v_t,  dv_t = dS_t^T k_t,  dg_t = a_t <dS_t, S_{t-1}>,
    dS_0 = a_1 dS_1.
The parallel and chunkwise backwards use the gate identity: with G_t the cumulative log decay of
a chunk, dL/dG_t = q_t . dq_t - k_t . dk_t (+ <dS_end, S_end> at the chunk's last token), and
dg is its reverse cumulative sum inside the chunk (no sum across chunks, numerics.md hazard 2).

Peers: fla ``chunk_simple_gla`` / ``fused_recurrent_simple_gla``; mamba_ssm ``ssd_minimal_discrete``
with q=C, k=B, v=x*dt, g=A*dt, scale=1.

References: Dao & Gu, "Transformers are SSMs" (Mamba-2), 2024; Yang et al., "Gated Linear
Attention Transformers with Hardware-Efficient Training", 2024.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _regimes
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import from_chunks, reverse_cumsum, reverse_steps, segsum, to_chunks
from .._spec import Arg, OpSpec


SPEC = OpSpec(
    name="simple_gla",
    family="gated linear attention (scalar gate), Mamba-2 / SSD core",
    transition="scalar decay",
    math="S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale S_t^T q_t",
    inputs=(Arg("q", "BTHK"), Arg("k", "BTHK"), Arg("v", "BTHV"), Arg("g", "BTH", log_gate=True)),
    output="BTHV",
    state=(Arg("state", "NHKV"),),
    default_scale=lambda dims: dims["K"] ** -0.5,
    peers=("fla.ops.simple_gla.chunk_simple_gla", "fla.ops.simple_gla.fused_recurrent_simple_gla",
           "mamba_ssm ssd_minimal_discrete (q=C, k=B, v=x*dt, g=A*dt, scale=1)"),
    regimes=tuple(_regimes.DECAY_REGIMES),
    default_dims={"B": 2, "H": 2, "K": 8, "V": 6},
)


# ----------------------------------------------------------------------------- recurrent
def _advance(q, k, v, g):
    """One step of the recurrence as a function of (S_{t-1}, t), for loops and reverse walks."""
    a = np.exp(g)                                                   # [B, T, H]

    def advance(S, t):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]              # [B, H, K, V]
        return a[:, t, :, None, None] * S + kv

    return advance


@forward_form(SPEC)
def recurrent(q, k, v, g, *, scale, initial_state):
    """The definition: a loop over t. q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H]."""
    advance = _advance(q, k, v, g)
    S = initial_state                                               # [B, H, K, V]
    o = np.empty(v.shape, dtype=v.dtype)                            # [B, T, H, V]
    for t in range(q.shape[1]):
        S = advance(S, t)
        o[:, t] = scale * (q[:, t, :, None, :] @ S)[:, :, 0, :]     # [B, H, V]
    return o, S


@step_form(SPEC)
def step(q, k, v, g, *, state, scale):
    """One token: q, k: [B, H, K]; v: [B, H, V]; g: [B, H]; state: [B, H, K, V]."""
    S = np.exp(g)[:, :, None, None] * state + k[:, :, :, None] * v[:, :, None, :]
    o = scale * (q[:, :, None, :] @ S)[:, :, 0, :]                  # [B, H, V]
    return o, S


@vjp_form(SPEC)
def recurrent_vjp(q, k, v, g, do, dht, *, scale, initial_state):
    """Backward of the loop, walking t = T-1 .. 0 with the adjoint state dS (ground truth).

    Memory: states are recomputed from checkpoints (``_scan.reverse_steps``), never all T kept.
    """
    a = np.exp(g)                                                   # [B, T, H]
    dq, dk, dv, dg = (np.zeros_like(x) for x in (q, k, v, g))
    dS = dht.copy()                                                 # [B, H, K, V]
    for t, S_prev, S_t in reverse_steps(_advance(q, k, v, g), initial_state, q.shape[1]):
        dS = dS + scale * q[:, t, :, :, None] * do[:, t, :, None, :]   # read of S_t
        dq[:, t] = scale * (S_t @ do[:, t, :, :, None])[..., 0]        # [B, H, K]
        dk[:, t] = (dS @ v[:, t, :, :, None])[..., 0]                  # [B, H, K]
        dv[:, t] = (k[:, t, :, None, :] @ dS)[:, :, 0, :]              # [B, H, V]
        dg[:, t] = a[:, t] * np.sum(dS * S_prev, axis=(-2, -1))        # d/dg of a_t S_{t-1}
        dS = a[:, t, :, None, None] * dS                               # to S_{t-1}
    return {"q": dq, "k": dk, "v": dv, "g": dg, "initial_state": dS}


# ----------------------------------------------------------------------------- parallel
def _decay_mask(g):
    """g: [B, T, H] -> D: [B, H, T, T], D[t, s] = exp(g_{s+1} + ... + g_t) for s <= t, else 0."""
    return np.exp(segsum(np.moveaxis(g, 1, -1)))


@matrix_form(SPEC, names=("q", "k", "g"))
def attention_matrix(q, k, g, *, scale):
    """M = scale * (Q K^T) * D: [B, H, T, T]; the parallel form is o = M V."""
    qk = np.moveaxis(q, 1, 2) @ np.moveaxis(k, 1, 2).swapaxes(-1, -2)  # [B, H, T, T]
    return scale * qk * _decay_mask(g)


def _parallel_parts(q, k, g, scale):
    """Shared by the parallel forward and backward. Returns head-major views and decays."""
    qh, kh = np.moveaxis(q, 1, 2), np.moveaxis(k, 1, 2)             # [B, H, T, K]
    D = _decay_mask(g)                                              # [B, H, T, T]
    M = scale * (qh @ kh.swapaxes(-1, -2)) * D                      # [B, H, T, T]
    decay_from_start = np.exp(np.cumsum(np.moveaxis(g, 1, -1), -1))  # [B, H, T]: exp(g_1+..+g_t)
    return qh, kh, D, M, decay_from_start


@forward_form(SPEC)
def parallel(q, k, v, g, *, scale, initial_state):
    """o = (scale * (Q K^T) * D) V + scale * exp(G_t) S_0^T q_t. Shapes as ``recurrent``."""
    qh, kh, D, M, a_from0 = _parallel_parts(q, k, g, scale)
    vh = np.moveaxis(v, 1, 2)                                       # [B, H, T, V]
    o = M @ vh + scale * a_from0[..., None] * (qh @ initial_state)  # [B, H, T, V]
    to_end = D[:, :, -1, :]                                         # [B, H, T]: decay s -> T
    S_T = (a_from0[..., -1, None, None] * initial_state
           + (kh * to_end[..., None]).swapaxes(-1, -2) @ vh)        # [B, H, K, V]
    return np.moveaxis(o, 2, 1), S_T


@vjp_form(SPEC)
def parallel_vjp(q, k, v, g, do, dht, *, scale, initial_state):
    """Backward of the parallel form: matrix products, then the gate identity for dg."""
    qh, kh, D, M, a_from0 = _parallel_parts(q, k, g, scale)
    vh, doh = np.moveaxis(v, 1, 2), np.moveaxis(do, 1, 2)          # [B, H, T, V]
    to_end = D[:, :, -1, :, None]                                   # [B, H, T, 1]
    dM = doh @ vh.swapaxes(-1, -2)                                  # [B, H, T, T]
    dP = scale * dM * D                                             # d/d(Q K^T)
    h0_read = scale * a_from0[..., None]                            # [B, H, T, 1]
    dq = dP @ kh + h0_read * (doh @ initial_state.swapaxes(-1, -2))
    dk = dP.swapaxes(-1, -2) @ qh + to_end * (vh @ dht.swapaxes(-1, -2))
    dv = M.swapaxes(-1, -2) @ doh + (kh * to_end) @ dht
    dh0 = a_from0[..., -1, None, None] * dht + (qh * h0_read).swapaxes(-1, -2) @ doh
    S_T = a_from0[..., -1, None, None] * initial_state + (kh * to_end).swapaxes(-1, -2) @ vh
    # Gate identity over the whole sequence (it is one chunk here): dL/dG_t, then dg = rev-cumsum.
    dG = np.sum(qh * dq - kh * dk, axis=-1)                         # [B, H, T]
    dG[..., -1] += np.sum(dht * S_T, axis=(-2, -1))
    dg = reverse_cumsum(dG, axis=-1)
    back = lambda x: np.moveaxis(x, 2, 1)                           # [B, H, T, .] -> [B, T, H, .]
    return {"q": back(dq), "k": back(dk), "v": back(dv), "g": np.moveaxis(dg, -1, 1),
            "initial_state": dh0}


# ----------------------------------------------------------------------------- chunkwise
class ChunkParts(NamedTuple):
    """Steps 1-3 of the chunkwise form, shared by forward and backward; arrays [B, H, N, ...]."""

    qc: np.ndarray              # [B, H, N, C, K]  chunked inputs
    kc: np.ndarray              # [B, H, N, C, K]
    vc: np.ndarray              # [B, H, N, C, V]
    D: np.ndarray               # [B, H, N, C, C]  exp(g_{s+1} + .. + g_t), s <= t
    M: np.ndarray               # [B, H, N, C, C]  scale (Q K^T) * D
    a_from_start: np.ndarray    # [B, H, N, C]     exp(g_first + .. + g_t)
    a_to_end: np.ndarray        # [B, H, N, C]     exp(g_{s+1} + .. + g_last)
    S_in: np.ndarray            # [B, H, N, K, V]  the state entering each chunk
    final_state: np.ndarray     # [B, H, K, V]


def _chunk_parts(q, k, v, g, scale, initial_state, C) -> ChunkParts:
    """Steps 1-3 of the chunkwise form, shared by forward and backward."""
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(v, C)  # [B, H, N, C, K|V]
    gc = to_chunks(g, C)                                            # [B, H, N, C]
    # 1. intra-chunk decay mask and scores (the parallel form on each chunk)
    D = np.exp(segsum(gc))                                          # [B, H, N, C, C]
    M = scale * (qc @ kc.swapaxes(-1, -2)) * D                      # [B, H, N, C, C]
    a_from_start = np.exp(np.cumsum(gc, axis=-1))                   # [B, H, N, C]
    a_to_end = D[..., -1, :]                                        # [B, H, N, C]
    a_chunk = a_from_start[..., -1]                                 # [B, H, N]
    # 2. each chunk's own contribution to the state at its end
    U = (kc * a_to_end[..., None]).swapaxes(-1, -2) @ vc            # [B, H, N, K, V]
    # 3. carry across chunks: S_n = a_chunk_n S_{n-1} + U_n; keep the state entering each chunk
    S_in = np.empty_like(U)                                         # [B, H, N, K, V]
    S = initial_state
    for n in range(U.shape[2]):
        S_in[:, :, n] = S
        S = a_chunk[:, :, n, None, None] * S + U[:, :, n]
    return ChunkParts(qc=qc, kc=kc, vc=vc, D=D, M=M, a_from_start=a_from_start,
                      a_to_end=a_to_end, S_in=S_in, final_state=S)


@forward_form(SPEC, chunked=True)
def chunkwise(q, k, v, g, *, scale, initial_state, chunk_size):
    """Chunks of C = chunk_size tokens (T need not divide). Memory: O(T/C * K V) per head.

    1. intra-chunk: the parallel form on each chunk, (scale Q K^T * D) V
    2. chunk states: U_n = sum_s exp(g_{s+1} + .. + g_end) k_s v_s^T
    3. carry: S_n = exp(sum of the chunk's g) S_{n-1} + U_n, one loop over chunks
    4. output: intra + scale * exp(g_first + .. + g_t) S_{n-1}^T q_t
    """
    p = _chunk_parts(q, k, v, g, scale, initial_state, chunk_size)
    o = p.M @ p.vc + scale * p.a_from_start[..., None] * (p.qc @ p.S_in)   # 4. [B, H, N, C, V]
    return from_chunks(o, q.shape[1]), p.final_state


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(q, k, v, g, do, dht, *, scale, initial_state, chunk_size):
    """Backward of the chunkwise form. Keeps only the per-chunk states (O(T/C * K V) per head).

    1. recompute the chunk states S_in (forward steps 1-3)
    2. carry the state cotangent backwards: dS_end[n-1] = a_chunk_n dS_end[n] + scale Qt_n^T dO_n
    3. intra-chunk gradients by matrix products, plus the terms through S_in and the chunk end
    4. dg from the gate identity, reverse-summed inside each chunk
    """
    T, C = q.shape[1], chunk_size
    p = _chunk_parts(q, k, v, g, scale, initial_state, C)
    qc, kc, vc, S_in, S_T = p.qc, p.kc, p.vc, p.S_in, p.final_state
    D, M, a_from_start, a_to_end = p.D, p.M, p.a_from_start, p.a_to_end
    doc = to_chunks(do, C)                                          # [B, H, N, C, V]
    N = qc.shape[2]
    a_chunk = a_from_start[..., -1]                                 # [B, H, N]
    # 2. dS_end[n]: cotangent of the state at the end of chunk n
    q_read = scale * qc * a_from_start[..., None]                   # [B, H, N, C, K]
    local = q_read.swapaxes(-1, -2) @ doc                           # [B, H, N, K, V]
    dS_end = np.empty_like(S_in)
    dS = dht
    for n in reversed(range(N)):
        dS_end[:, :, n] = dS
        dS = a_chunk[:, :, n, None, None] * dS + local[:, :, n]
    dh0 = dS
    # 3. intra-chunk and state terms
    dP = scale * (doc @ vc.swapaxes(-1, -2)) * D                    # [B, H, N, C, C]
    dq = dP @ kc + scale * a_from_start[..., None] * (doc @ S_in.swapaxes(-1, -2))
    dk = dP.swapaxes(-1, -2) @ qc + a_to_end[..., None] * (vc @ dS_end.swapaxes(-1, -2))
    dv = M.swapaxes(-1, -2) @ doc + (kc * a_to_end[..., None]) @ dS_end
    # 4. gate identity per chunk; S_end[n] = S_in[n+1], the last one is the final state
    S_end = np.concatenate([S_in[:, :, 1:], S_T[:, :, None]], axis=2)  # [B, H, N, K, V]
    dG = np.sum(qc * dq - kc * dk, axis=-1)                         # [B, H, N, C]
    dG[..., -1] += np.sum(dS_end * S_end, axis=(-2, -1))
    dg = reverse_cumsum(dG, axis=-1)                                # [B, H, N, C]
    return {"q": from_chunks(dq, T), "k": from_chunks(dk, T), "v": from_chunks(dv, T),
            "g": from_chunks(dg, T), "initial_state": dh0}


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs: q, k, v ~ N(0, 1); g from the decay regime."""
    B, T, H, K, V = (dims[name] for name in "BTHKV")
    return {
        "q": _regimes.normal(rng, (B, T, H, K), dtype),
        "k": _regimes.normal(rng, (B, T, H, K), dtype),
        "v": _regimes.normal(rng, (B, T, H, V), dtype),
        "g": _regimes.log_decay(rng, (B, T, H), regime, dtype),
    }
