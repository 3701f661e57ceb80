r"""gla: gated linear attention with a per-key-channel decay and an optional value-side decay.

Recurrence (one batch element, one head; inclusive read, the state after step t):

    S_t = diag(a_t) S_{t-1} diag(b_t) + k_t v_t^T,     a_t = exp(g_t) in [0, 1]^K,
                                                        b_t = exp(gv_t) in [0, 1]^V (1 if no gv)
    o_t = scale * S_t^T q_t

Glossary
    symbol   argument   shape          paper (GLA, Yang et al.)        fla (chunk_gla / fused_recurrent_gla)
    q_t      q          [B, T, H, K]   q_t                             q
    k_t      k          [B, T, H, K]   k_t                             k
    v_t      v          [B, T, H, V]   v_t                             v
    g_t      g          [B, T, H, K]   log alpha_t (key-side gate)     g (chunk_gla), gk (fused_recurrent_gla)
    gv_t     gv         [B, T, H, V]   log beta_t (value-side gate)    gv (fused_recurrent_gla only)
    S_t      state      [N, H, K, V]   S_t                             initial_state / final_state
    scale    scale      float          1/sqrt(d_k)                     scale (default K^-1/2)
    G_t      -          per chunk      log b_t (cumulative decay)      gk after chunk_local_cumsum

Forms
    recurrent  the loop above (ground truth); O(K V) memory per head.
    parallel   o_t = scale * sum_{s<=t} A[t, s] (v_s * exp(Gv_t - Gv_s)) + read of S_0, with
               A[t, s] = sum_k q_t[k] k_s[k] exp(G_t[k] - G_s[k]) and the per-channel decay mask
               exp(segsum(g)) [B, H, K, T, T] (O(T^2 K) by nature).
    chunkwise  chunks of C tokens: the intra-chunk scores through ``linrec_ref._decay`` (one
               matmul per chunk where the chunk's decay range allows factoring, exact
               elementwise segment sums elsewhere), the state carried across chunks with
               exp(G_last - G_s) <= 1 and exp(G_last) <= 1 only.
    step       one token of the recurrence (decoding).
    attention_matrix(q, k, g)  scale * A [B, H, T, T]. It takes no gv: with a value gate the
               map from v to o is a different T x T matrix for every value channel.

Gradients (hand-written vector-Jacobian products):
    dS_t = scale q_t do_t^T + diag(a_{t+1}) dS_{t+1} diag(b_{t+1}),  dS_T = dht
    dq_t = scale S_t do_t,  dk_t = dS_t v_t,  dv_t = dS_t^T k_t,  dS_0 = diag(a_1) dS_1 diag(b_1)
    dg_t  = rowsum(dS_t * P_t),  dgv_t = colsum(dS_t * P_t),  P_t = diag(a_t) S_{t-1} diag(b_t)
The parallel and chunkwise backwards use the gate identity, per channel, with G (Gv) the
cumulative log decay inside a chunk:
    dL/dG_t  = q_t * dq_t - k_t * dk_t  (+ rowsum(dS_end * S_end) at the chunk's last token)
    dL/dGv_t = o_t * do_t - v_t * dv_t  (+ colsum(dS_end * S_end) at the chunk's last token)
and dg (dgv) is its reverse cumulative sum inside the chunk. At a hard reset (g_r = -inf) the
derivative is exactly 0 (d/dg of exp(g) X at g = -inf) and the terms from r on sum to exactly 0,
so the reverse sum restarts there (``_decay.reverse_cumsum_in_chunks(reset=...)``): dg is an
exact 0 wherever the recurrent ground truth gives one, with no rounding residual.

Reuse: ``chunked_forward`` / ``chunked_vjp`` are the dense chunkwise cores with two extra
keywords, ``strict`` (read the state before the update, mask s < t: rwkv6, which adds its bonus
term itself) and ``fast_bound`` (force the factored or the exact path, for tests). mamba calls
them with one head per channel, K = N, V = 1.

Peers: fla ``chunk_gla`` (g), ``fused_recurrent_gla`` (gk, gv).

References: Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with
Hardware-Efficient Training", ICML 2024 (the value-side gate of fla's fused_recurrent_gla is
the "gv" of the paper's general form S_t = (alpha_t^T beta_t) * S_{t-1} + k_t^T v_t).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .. import _regimes
from .._decay import (ChunkDecay, chunk_decay, decayed_mix, decayed_mix_t, decayed_scores,
                      reverse_cumsum_in_chunks)
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import chunk_view, from_chunks, reverse_steps, segsum, split_diagonal, to_chunks
from .._spec import Arg, OpSpec


SPEC = OpSpec(
    name="gla",
    family="gated linear attention (per-channel gate)",
    transition="diagonal decay",
    math="S_t = diag(exp(g_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T;  o_t = scale S_t^T q_t",
    inputs=(Arg("q", "BTHK"), Arg("k", "BTHK"), Arg("v", "BTHV"), Arg("g", "BTHK", log_gate=True),
            Arg("gv", "BTHV", log_gate=True, optional=True)),
    output="BTHV",
    quadratic="B H K T T",  # the per-channel decay masks of the parallel form
    state=(Arg("state", "NHKV"),),
    default_scale=lambda dims: dims["K"] ** -0.5,
    peers=("fla.ops.gla.chunk_gla (g)", "fla.ops.gla.fused_recurrent_gla (gk=g, gv=gv)"),
    regimes=tuple(_regimes.DECAY_REGIMES),
    default_dims={"B": 2, "H": 2, "K": 8, "V": 6},
    variants={"default": {}, "value_gate": {}},
)


# ----------------------------------------------------------------------------- recurrent
def _advance(q, k, v, g, gv):
    """One step of the recurrence as a function of (S_{t-1}, t), for loops and reverse walks."""
    a = np.exp(g)                                                   # [B, T, H, K]
    b = None if gv is None else np.exp(gv)                          # [B, T, H, V]

    def decayed(S, t):                                              # diag(a_t) S diag(b_t)
        S = a[:, t, :, :, None] * S                                 # [B, H, K, V]
        return S if b is None else S * b[:, t, :, None, :]

    def advance(S, t):
        return decayed(S, t) + k[:, t, :, :, None] * v[:, t, :, None, :]

    return advance, decayed


@forward_form(SPEC)
def recurrent(q, k, v, g, gv, *, scale, initial_state):
    """The definition: a loop over t. q, k, g: [B, T, H, K]; v, gv: [B, T, H, V]."""
    advance, _ = _advance(q, k, v, g, gv)
    S = initial_state                                               # [B, H, K, V]
    o = np.empty(v.shape, dtype=v.dtype)                            # [B, T, H, V]
    for t in range(q.shape[1]):
        S = advance(S, t)
        o[:, t] = scale * (q[:, t, :, None, :] @ S)[:, :, 0, :]     # [B, H, V]
    return o, S


@step_form(SPEC)
def step(q, k, v, g, gv, *, state, scale):
    """One token: q, k, g: [B, H, K]; v, gv: [B, H, V]; state: [B, H, K, V]."""
    S = np.exp(g)[..., :, None] * state                             # [B, H, K, V]
    if gv is not None:
        S = S * np.exp(gv)[..., None, :]
    S = S + k[..., :, None] * v[..., None, :]
    o = scale * (q[:, :, None, :] @ S)[:, :, 0, :]                  # [B, H, V]
    return o, S


@vjp_form(SPEC)
def recurrent_vjp(q, k, v, g, gv, do, dht, *, scale, initial_state):
    """Backward of the loop, walking t = T-1 .. 0 with the adjoint state dS (ground truth).

    dg_t = rowsum(dS_t * P_t) and dgv_t = colsum(dS_t * P_t) with P_t = diag(a_t) S_{t-1}
    diag(b_t), computed directly. Memory: states are recomputed from checkpoints
    (``_scan.reverse_steps``), never all T kept.
    """
    advance, decayed = _advance(q, k, v, g, gv)
    dq, dk, dv, dg = (np.zeros_like(x) for x in (q, k, v, g))
    dgv = None if gv is None else np.zeros_like(gv)
    dS = dht.copy()                                                 # [B, H, K, V]
    for t, S_prev, S_t in reverse_steps(advance, initial_state, q.shape[1]):
        dS = dS + scale * q[:, t, :, :, None] * do[:, t, :, None, :]   # read of S_t
        dq[:, t] = scale * (S_t @ do[:, t, :, :, None])[..., 0]        # [B, H, K]
        dk[:, t] = (dS @ v[:, t, :, :, None])[..., 0]                  # [B, H, K]
        dv[:, t] = (k[:, t, :, None, :] @ dS)[:, :, 0, :]              # [B, H, V]
        dSP = dS * decayed(S_prev, t)                                  # [B, H, K, V]
        dg[:, t] = dSP.sum(-1)                                         # [B, H, K]
        if gv is not None:
            dgv[:, t] = dSP.sum(-2)                                    # [B, H, V]
        dS = decayed(dS, t)                                            # to S_{t-1}
    return {"q": dq, "k": dk, "v": dv, "g": dg, "gv": dgv, "initial_state": dS}


# ----------------------------------------------------------------------------- parallel
def _decay_mask(g):
    """g: [B, T, H, D] -> [B, H, D, T, T], exp(g_{s+1} + ... + g_t) for s <= t, else 0."""
    return np.exp(segsum(np.moveaxis(g, 1, -1)))                  # [B, H, D, T, T]


def _heads(x):
    """[B, T, H, D] -> [B, H, T, D] (a view)."""
    return np.moveaxis(x, 1, 2)


@matrix_form(SPEC, names=("q", "k", "g"))
def attention_matrix(q, k, g, *, scale):
    """M[b, h, t, s] = scale * sum_k q_t[k] k_s[k] exp(g_{s+1}[k] + .. + g_t[k]): [B, H, T, T].

    Without gv, o = M v. Takes no gv: with a value gate the map from v to o differs for every
    value channel j (M[t, s] * exp(gv_{s+1}[j] + .. + gv_t[j])), so it is not one T x T matrix.
    """
    return scale * np.einsum("bhtk,bhsk,bhkts->bhts", _heads(q), _heads(k), _decay_mask(g))


class ParallelParts(NamedTuple):
    """Shared by the parallel forward and backward: masks, scores, output and final state."""

    qh: np.ndarray              # [B, H, T, K]  head-major inputs
    kh: np.ndarray              # [B, H, T, K]
    vh: np.ndarray              # [B, H, T, V]
    Dk: np.ndarray              # [B, H, K, T, T]  key-side decay mask exp(G_t - G_s), s <= t
    Dv: Optional[np.ndarray]    # [B, H, V, T, T]  value-side decay mask (None without gv)
    A: np.ndarray               # [B, H, T, T]  scale sum_k q_t k_s Dk[k, t, s]
    k_from_start: np.ndarray    # [B, H, T, K]  exp(G_t), G from the sequence start
    v_from_start: object        # [B, H, T, V]  exp(Gv_t), or 1.0 without gv
    k_end: np.ndarray           # [B, H, T, K]  k_s exp(G_T - G_s)
    v_end: np.ndarray           # [B, H, T, V]  v_s exp(Gv_T - Gv_s)
    o: np.ndarray               # [B, H, T, V]
    final_state: np.ndarray     # [B, H, K, V]


def _parallel_parts(q, k, v, g, gv, scale, initial_state) -> ParallelParts:
    """The parallel form's masks, scores, output and final state (``ParallelParts``)."""
    qh, kh, vh = _heads(q), _heads(k), _heads(v)                    # [B, H, T, K|V]
    Dk = _decay_mask(g)                                             # [B, H, K, T, T]
    Dv = None if gv is None else _decay_mask(gv)                    # [B, H, V, T, T]
    A = scale * np.einsum("bhtk,bhsk,bhkts->bhts", qh, kh, Dk)      # [B, H, T, T]
    k_from_start = np.exp(np.cumsum(_heads(g), axis=2))             # [B, H, T, K]: exp(G_t) from t=0
    v_from_start = 1.0 if gv is None else np.exp(np.cumsum(_heads(gv), axis=2))   # [B, H, T, V]
    k_end = kh * Dk[..., -1, :].swapaxes(-1, -2)                    # [B, H, T, K]: k_s exp(G_T - G_s)
    if gv is None:
        o = A @ vh                                                  # [B, H, T, V]
        v_end = vh
    else:
        o = np.einsum("bhts,bhsv,bhvts->bhtv", A, vh, Dv)           # [B, H, T, V]
        v_end = vh * Dv[..., -1, :].swapaxes(-1, -2)                # [B, H, T, V]
    o = o + scale * v_from_start * ((qh * k_from_start) @ initial_state)   # read of S_0
    decay_all = k_from_start[..., -1, :, None] * initial_state      # [B, H, K, V]
    if gv is not None:
        decay_all = decay_all * v_from_start[..., -1, None, :]
    S_T = decay_all + k_end.swapaxes(-1, -2) @ v_end                # [B, H, K, V]
    return ParallelParts(qh=qh, kh=kh, vh=vh, Dk=Dk, Dv=Dv, A=A, k_from_start=k_from_start,
                         v_from_start=v_from_start, k_end=k_end, v_end=v_end, o=o, final_state=S_T)


@forward_form(SPEC)
def parallel(q, k, v, g, gv, *, scale, initial_state):
    """o_t = sum_{s<=t} A[t, s] (v_s * exp(Gv_t - Gv_s)) + scale exp(Gv_t) * (S_0^T (q_t exp(G_t)))."""
    p = _parallel_parts(q, k, v, g, gv, scale, initial_state)
    return _heads(p.o), p.final_state


@vjp_form(SPEC)
def parallel_vjp(q, k, v, g, gv, do, dht, *, scale, initial_state):
    """Backward of the parallel form: einsums over the decay masks, then the gate identity."""
    p = _parallel_parts(q, k, v, g, gv, scale, initial_state)
    qh, kh, vh, Dk, Dv, A = p.qh, p.kh, p.vh, p.Dk, p.Dv, p.A
    k_from_start, v_from_start, k_end, v_end = p.k_from_start, p.v_from_start, p.k_end, p.v_end
    doh = _heads(do)                                                # [B, H, T, V]
    if gv is None:
        dA = scale * np.tril(doh @ vh.swapaxes(-1, -2))             # [B, H, T, T]
        dv = A.swapaxes(-1, -2) @ doh                               # [B, H, T, V]
    else:
        dA = scale * np.einsum("bhtv,bhsv,bhvts->bhts", doh, vh, Dv)
        dv = np.einsum("bhts,bhtv,bhvts->bhsv", A, doh, Dv)
    v_to_end = 1.0 if gv is None else Dv[..., -1, :].swapaxes(-1, -2)   # [B, H, T, V]
    k_to_end = Dk[..., -1, :].swapaxes(-1, -2)                      # [B, H, T, K]
    do_read = scale * doh * v_from_start                            # [B, H, T, V]
    dA, dA_diag = split_diagonal(dA)                                # s = t terms kept apart
    dq = (np.einsum("bhts,bhsk,bhkts->bhtk", dA, kh, Dk)
          + k_from_start * (do_read @ initial_state.swapaxes(-1, -2)))   # [B, H, T, K]
    dk = (np.einsum("bhts,bhtk,bhkts->bhsk", dA, qh, Dk)
          + k_to_end * (v_end @ dht.swapaxes(-1, -2)))              # [B, H, T, K]
    dv = dv + v_to_end * (k_end @ dht)                              # [B, H, T, V]
    dh0 = k_from_start[..., -1, :, None] * dht                      # [B, H, K, V]
    if gv is not None:
        dh0 = dh0 * v_from_start[..., -1, None, :]
    dh0 = dh0 + (qh * k_from_start).swapaxes(-1, -2) @ do_read
    # gate identity over the whole sequence (one chunk)
    dG = qh * dq - kh * dk                                          # [B, H, T, K]
    dG[..., -1, :] += np.sum(dht * p.final_state, axis=-1)
    dg = reverse_cumsum_in_chunks(dG, reset=np.isneginf(_heads(g)))  # [B, H, T, K]
    dq, dk = dq + dA_diag * kh, dk + dA_diag * qh                   # the s = t terms
    out = {"q": _heads(dq), "k": _heads(dk), "v": _heads(dv), "g": _heads(dg), "initial_state": dh0}
    if gv is not None:
        dGv = p.o * doh - vh * dv                                   # [B, H, T, V]
        dGv[..., -1, :] += np.sum(dht * p.final_state, axis=-2)
        out["gv"] = _heads(reverse_cumsum_in_chunks(dGv, reset=np.isneginf(_heads(gv))))
    return out


# ----------------------------------------------------------------------------- chunkwise
class ChunkParts(NamedTuple):
    """Steps 1-3 of the chunkwise form, shared by forward and backward; arrays [B, H, N, ...]."""

    qc: np.ndarray              # [B, H, N, C, K]  chunked inputs
    kc: np.ndarray              # [B, H, N, C, K]
    vc: np.ndarray              # [B, H, N, C, V]
    decay_k: ChunkDecay         # decays of g (the key side), [.., C, K]
    decay_v: Optional[ChunkDecay]   # decays of gv (the value side), [.., C, V]; None without gv
    A: np.ndarray               # [B, H, N, C, C]  masked intra-chunk scores (without the scale)
    S_in: np.ndarray            # [B, H, N, K, V]  the state entering each chunk
    final_state: np.ndarray     # [B, H, K, V]


def _chunk_parts(q, k, v, g, gv, initial_state, C, strict, fast_bound) -> ChunkParts:
    """Steps 1-3 of the chunkwise form, shared by forward and backward."""
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(v, C)        # [B, H, N, C, K|V]
    decay_k = chunk_decay(to_chunks(g, C), strict, fast_bound)      # decays [B, H, N, C, K]
    decay_v = None if gv is None else chunk_decay(to_chunks(gv, C), strict, fast_bound)   # [.., V]
    # 1. intra-chunk scores A[t, s] = sum_k q_t k_s exp(Gq_t - G_s), on the causal mask
    A = decayed_scores(qc, kc, decay_k)                             # [B, H, N, C, C]
    # 2. each chunk's own contribution to its end state: sum_s (k_s e^{G_end-G_s}) (v_s ...)^T
    v_end = vc if decay_v is None else vc * decay_v.to_end          # [B, H, N, C, V]
    U = (kc * decay_k.to_end).swapaxes(-1, -2) @ v_end              # [B, H, N, K, V]
    # 3. carry across chunks: S_n = diag(e^{G_end}) S_{n-1} diag(e^{Gv_end}) + U_n
    S_in = np.empty_like(U)                                         # [B, H, N, K, V]
    S = initial_state                                               # [B, H, K, V]
    for n in range(U.shape[2]):
        S_in[:, :, n] = S
        S = decay_k.total[:, :, n, :, None] * S
        if decay_v is not None:
            S = S * decay_v.total[:, :, n, None, :]
        S = S + U[:, :, n]
    return ChunkParts(qc=qc, kc=kc, vc=vc, decay_k=decay_k, decay_v=decay_v, A=A, S_in=S_in,
                      final_state=S)


def _chunk_output(p: ChunkParts, scale, out=None):
    """Step 4: scale * (intra-chunk output + read of the entering state) -> [B, H, N, C, V].

    out: optional [B, H, N, C, V] array (e.g. a chunked view of the final output) to write into.
    """
    qc, vc, decay_k, decay_v, A, S_in = p.qc, p.vc, p.decay_k, p.decay_v, p.A, p.S_in
    if decay_v is None:
        out = np.matmul(A, vc, out=out)                             # [B, H, N, C, V]
    elif out is None:
        out = decayed_mix(A, vc, decay_v)
    else:
        out[...] = decayed_mix(A, vc, decay_v)
    read = (qc * decay_k.exp_Gq) @ S_in                             # [B, H, N, C, V]
    if decay_v is not None:
        read *= decay_v.exp_Gq
    out += read
    out *= scale
    return out


def chunked_forward(q, k, v, g, gv=None, *, scale, initial_state, chunk_size, strict=False,
                    fast_bound=None):
    """Dense chunkwise forward (no checks), also used by rwkv6 (strict=True) and mamba.

    q, k, g: [B, T, H, K]; v, gv: [B, T, H, V] (gv may be None); initial_state: [B, H, K, V].
    strict: o_t reads the state before the update at t (o_t = scale S_{t-1}^T q_t).
    fast_bound: see ``_decay.chunk_decay`` (None: the dtype's default).
    Returns (o [B, T, H, V], final state [B, H, K, V]).
    """
    B, T, H, V = v.shape
    C = max(1, min(chunk_size, T))                                  # one chunk covers T <= C
    p = _chunk_parts(q, k, v, g, gv, initial_state, C, strict, fast_bound)
    N = p.qc.shape[2]
    o = np.empty((B, N * C, H, V), dtype=v.dtype)                   # [B, N*C, H, V]
    _chunk_output(p, scale, out=chunk_view(o, C))                   # 4. written into o
    return (o if N * C == T else np.ascontiguousarray(o[:, :T])), p.final_state


def chunked_vjp(q, k, v, g, gv=None, *, do, dht, scale, initial_state, chunk_size, strict=False,
                fast_bound=None):
    """Dense chunkwise backward (no checks) matching ``chunked_forward``; returns the grad dict.

    1. recompute the chunk states S_in (forward steps 1-3)
    2. carry the state cotangent backwards:
       dS_end[n-1] = diag(e^{G_end}) dS_end[n] diag(e^{Gv_end}) + scale (Q e^{Gq})^T (dO e^{Gvq})
    3. intra-chunk gradients through ``_decay`` (dA, then dq, dk, dv), plus the terms through
       S_in and the chunk end
    4. dg (dgv) from the gate identity, reverse-summed inside each chunk
    """
    T = q.shape[1]
    C = max(1, min(chunk_size, T))
    p = _chunk_parts(q, k, v, g, gv, initial_state, C, strict, fast_bound)
    qc, kc, vc, A, S_in, S_T = p.qc, p.kc, p.vc, p.A, p.S_in, p.final_state
    decay_k, decay_v = p.decay_k, p.decay_v
    doc = to_chunks(do, C)                                            # [B, H, N, C, V]
    N = qc.shape[2]
    # 2. dS_end[n]: cotangent of the state at the end of chunk n
    q_read = scale * qc * decay_k.exp_Gq                            # [B, H, N, C, K]
    do_read = doc if decay_v is None else doc * decay_v.exp_Gq      # [B, H, N, C, V]
    local = q_read.swapaxes(-1, -2) @ do_read                       # [B, H, N, K, V]
    dS_end = np.empty_like(S_in)                                    # [B, H, N, K, V]
    dS = dht
    for n in reversed(range(N)):
        dS_end[:, :, n] = dS
        dS = decay_k.total[:, :, n, :, None] * dS
        if decay_v is not None:
            dS = dS * decay_v.total[:, :, n, None, :]
        dS = dS + local[:, :, n]
    dh0 = dS
    # 3. intra-chunk and state terms
    k_end = kc * decay_k.to_end                                     # [B, H, N, C, K]
    v_end = vc if decay_v is None else vc * decay_v.to_end          # [B, H, N, C, V]
    if decay_v is None:
        dA = scale * (doc @ vc.swapaxes(-1, -2))                    # [B, H, N, C, C] (masked below)
        dv = scale * (A.swapaxes(-1, -2) @ doc)                     # A is masked
        dv += k_end @ dS_end                                        # [B, H, N, C, V]
    else:
        dA = scale * decayed_scores(doc, vc, decay_v)               # [B, H, N, C, C]
        dv = scale * decayed_mix_t(A, doc, decay_v) + decay_v.to_end * (k_end @ dS_end)
    if strict:                                                      # s < t: no diagonal
        dA_diag = np.zeros(dA.shape[:-1] + (1,), dtype=dA.dtype)    # [.., C, 1]
    else:                                                           # s = t terms kept apart
        dA, dA_diag = split_diagonal(dA)                            # [.., C, C], [.., C, 1]
    dq = decayed_mix(dA, kc, decay_k) + scale * decay_k.exp_Gq * (do_read @ S_in.swapaxes(-1, -2))
    dk = decayed_mix_t(dA, qc, decay_k) + decay_k.to_end * (v_end @ dS_end.swapaxes(-1, -2))
    # 4. gate identity per chunk (without the s = t terms); S_end[n] = S_in[n+1]
    S_end = np.concatenate([S_in[:, :, 1:], S_T[:, :, None]], axis=2)  # [B, H, N, K, V]
    dSS = dS_end * S_end                                            # [B, H, N, K, V]
    dg = _gate_grad(qc * dq, kc * dk, dSS.sum(-1), decay_k)         # [B, H, N, C, K]
    dq, dk = dq + dA_diag * kc, dk + dA_diag * qc                   # the s = t terms
    grads = {"q": from_chunks(dq, T), "k": from_chunks(dk, T), "v": from_chunks(dv, T),
             "g": from_chunks(dg, T), "gv": None, "initial_state": dh0}
    if decay_v is not None:
        o = _chunk_output(p, scale)                                 # [B, H, N, C, V]
        grads["gv"] = from_chunks(_gate_grad(o * doc, vc * dv, dSS.sum(-2), decay_v), T)
    return grads


def _gate_grad(read, write, end, decay):
    """dL/dg inside each chunk from the gate identity.

    read:  [..., C, D] x_t * dx_t of the query side (its decay is Gq_t: G_t, or G_{t-1} if strict)
    write: [..., C, D] y_s * dy_s of the key side (decay -G_s)
    end:   [..., D] the explicit derivative by G_last of the chunk's end state
    dL/dG_u = read at the t whose Gq_t is G_u - write_u (+ end at the last u); dg = rev-cumsum.
    """
    dG = -write                                                     # [..., C, D]
    if decay.strict:
        dG[..., :-1, :] += read[..., 1:, :]                         # Gq_t = G_{t-1}; Gq_0 = 0
    else:
        dG += read
    dG[..., -1, :] += end
    return reverse_cumsum_in_chunks(dG, reset=np.isneginf(decay.g))   # [..., C, D], 0 at resets


@forward_form(SPEC, chunked=True)
def chunkwise(q, k, v, g, gv, *, scale, initial_state, chunk_size):
    """Chunks of C = chunk_size tokens (T need not divide). Memory: O(T/C * K V) per head.

    1. intra-chunk scores A[t, s] = scale sum_k q_t[k] k_s[k] exp(G_t[k] - G_s[k]) (s <= t):
       one matmul (q e^{G}) (k e^{-G})^T per chunk whose decay range allows it, exact segment
       sums elsewhere (``linrec_ref._decay``)
    2. chunk states: U_n = sum_s (k_s e^{G_end - G_s}) (v_s e^{Gv_end - Gv_s})^T
    3. carry: S_n = diag(e^{G_end}) S_{n-1} diag(e^{Gv_end}) + U_n, one loop over chunks
    4. output: A v (with the value decay if gv) + scale e^{Gv_t} * (S_{n-1}^T (q_t e^{G_t}))
    """
    return chunked_forward(q, k, v, g, gv, scale=scale, initial_state=initial_state,
                           chunk_size=chunk_size)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(q, k, v, g, gv, do, dht, *, scale, initial_state, chunk_size):
    """Backward of the chunkwise form (see ``chunked_vjp``). Keeps only per-chunk states."""
    return chunked_vjp(q, k, v, g, gv, do=do, dht=dht, scale=scale, initial_state=initial_state,
                       chunk_size=chunk_size)


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs: q, k, v ~ N(0, 1); g (and gv for "value_gate") from the regime, per
    channel; "hard_reset" also resets single (t, channel) entries
    (``_regimes.log_decay_per_channel``)."""
    B, T, H, K, V = (dims[name] for name in "BTHKV")
    x = {
        "q": _regimes.normal(rng, (B, T, H, K), dtype),
        "k": _regimes.normal(rng, (B, T, H, K), dtype),
        "v": _regimes.normal(rng, (B, T, H, V), dtype),
        "g": _regimes.log_decay_per_channel(rng, (B, T, H, K), regime, dtype),
    }
    if variant == "value_gate":
        x["gv"] = _regimes.log_decay_per_channel(rng, (B, T, H, V), regime, dtype)
    return x
