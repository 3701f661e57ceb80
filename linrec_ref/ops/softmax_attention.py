r"""softmax_attention: causal softmax attention, optional forget gate and sliding window.

The baseline every recurrence is measured against. Definition (one batch element, one value head):

    o_t = sum_{s <= t, s > t - W} p_{t,s} v_s,
    p_{t,s} = softmax_s( scale q_t . k_s + F_t - F_s ),     F_t - F_s = g_{s+1} + ... + g_t

g <= 0 is an optional log forget gate ("forgetting attention", Lin et al. 2025): the logit of an
old key is lowered by the log decays of the tokens after it; g = -inf gives everything before it
exactly zero weight. W = ``window`` (None: unbounded) keeps the last W keys (the query's own
token included). Without g and window this is the attention of ``scaled_dot_product_attention(
q, k, v, is_causal=True)``.

State: the KV cache. Softmax attention has no fixed-size state; a later call needs every past
key. The state is the cache of all keys seen so far, with each key's accumulated decay:

    k_cache [N, HV, L, K],  v_cache [N, HV, L, V],  a_cache [N, HV, L]

a_cache[i] = exp(sum of g from key i's step + 1 to the present) in [0, 1] (1 without a gate),
a linear weight on the key's softmax numerator: a cached key i enters the logits of the next call
as scale q_t . k_i + log a_i + G_t (G_t = g_1 + .. + g_t of the new call), and a = 0 is an exact
"absent / forgotten" entry (a hard reset, or padding). Cache entries are ordered oldest first;
entry i of an L-long cache sits at position i - L before the call's first token (this is what the
window measures). The final state of a call is the input cache with the call's T tokens appended
(L_out = L + T): MEMORY GROWS WITH T, as for every softmax-attention decoder. Nothing is dropped,
not even with a window (entries older than W - 1 tokens are never read again and may be cut by the
caller: ``truncate_cache``). Without an initial_state the cache is empty (L = 0). With
``cu_seqlens`` the final caches of segments of different lengths are padded at the FRONT (the old
end) with absent entries (k = v = 0, a = 0) to a common length, which is exact.
Grouped heads: the cache holds the keys of every value head (k repeated over the group).

Glossary
    symbol   argument   shape            paper (Vaswani et al.; Lin et al., FoX)   torch sdpa / fla
    q_t      q          [B, T, H, K]     q_t                                       query (B H T K)
    k_t      k          [B, T, H, K]     k_t                                       key
    v_t      v          [B, T, HV, V]    v_t                                       value
    g_t      g          [B, T, HV]       log f_t (forget gate)                     fla forgetting_attn g
    W        window     int or None      sliding window                            window_size
    cache    state      (k_cache, v_cache, a_cache)   KV cache                     past_key_values
    scale    scale      float            1/sqrt(d_k)                               scale (default K^-1/2)

Forms (``window`` is an option of every form)
    recurrent  token by token: append k_t, v_t to the cache, decay the cache weights a *= e^{g_t},
               read o_t = softmax over the cache (max-stabilised). The definition; ground truth.
    parallel   the T x (L + T) masked logits Z = scale Q [K_cache; K]^T + bias, with
               bias = [log a_i + G_t | segsum(g)_{t,s}] (and -inf outside the causal window),
               row-max stabilised softmax P, o = P [V_cache; V].
    chunkwise  flash-attention style: query chunks of C tokens against key chunks of C (first the
               cache in chunks of C, then the tokens), with a running max, running sum and running
               output per query; the gate bias of a block is assembled from in-chunk segment sums
               and sums of whole-chunk totals (never a difference of cumulative sums).
    step       one token of the recurrence (decoding): returns (o_t, cache with the token).
    attention_matrix  the softmax weights P [B, HV, T, T] of a call without cache (o = P v).

Gradients (hand-written; S = the logits, P = softmax(S), one row per query):
    dP = dO V^T,  dS = P * (dP - rowsum(dO * O))          (rowsum(dP * P) = dO . o)
    dq = scale dS K,  dk = scale dS^T Q,  dv = P^T dO
    da_i (cache weight) = sum_t E_ti (dP_ti - dO_t . o_t),  E = P / a (computed as exp(logit
                          without log a - rowmax) / rowsum, finite at a = 0)
    dg_j = sum_{t >= j} sum_{columns s before token j (cache included)} dS_ts   (the gate enters
           every logit whose segment (s, t] contains j), plus the final cache's terms
           d a_out / d g_j = a_out for the keys before j.
    recurrent_vjp walks t backwards (adjoint of the cache), recomputing the per-step cache weights
    from checkpoints (``_scan.reverse_steps``: never all T weight vectors; the keys and values are
    the cache itself, O(T)). parallel_vjp uses exclusive cumulative sums of dS along each row.
    chunkwise_vjp recomputes each (query chunk, key chunk) block from the saved row log-sum-exp,
    like flash attention's backward, and keeps per-row running sums of dS for dg.

Peers: torch ``scaled_dot_product_attention(is_causal=True)`` (no gate, no window); fla
``parallel_forgetting_attn`` (forget gate); flash-attn ``window_size=(W - 1, 0)``.

References: Vaswani et al., "Attention Is All You Need", 2017; Dao et al., "FlashAttention",
2022/2023 (online softmax, blockwise backward); Lin et al., "Forgetting Transformer: Softmax
Attention with a Forget Gate", 2025; Beltagy et al., "Longformer", 2020 (sliding window).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from .. import _regimes
from .. import _validation as V
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import from_chunks, reverse_steps, segsum, to_chunks
from .._spec import Arg, OpSpec

OP = "softmax_attention"


SPEC = OpSpec(
    name=OP,
    family="softmax attention (optional forget gate, sliding window)",
    transition="none (growing KV cache)",
    math="o_t = sum_{t-W < s <= t} softmax_s(scale q_t.k_s + g_{s+1} + .. + g_t) v_s",
    inputs=(Arg("q", "B T H K"), Arg("k", "B T H K"), Arg("v", "B T HV V"),
            Arg("g", "B T HV", log_gate=True, optional=True)),
    output="B T HV V",
    state=(Arg("k_cache", "N HV L K"), Arg("v_cache", "N HV L V"), Arg("a_cache", "N HV L", nonnegative=True)),
    growing_axis="L",
    default_scale=lambda dims: dims["K"] ** -0.5,
    peers=("torch.nn.functional.scaled_dot_product_attention(is_causal=True)",
           "fla.ops.forgetting_attn.parallel_forgetting_attn",
           "flash_attn.flash_attn_func(causal=True, window_size=(W - 1, 0))"),
    regimes=tuple(_regimes.DECAY_REGIMES),
    default_dims={"B": 2, "H": 1, "HV": 2, "K": 8, "V": 6, "L": 3},
    options={"window": None},
    variants={"default": {}, "forget_gate": {}, "window": {"window": 5}},
)


# ----------------------------------------------------------------------------- recurrent
def _read(q_t, K_c, V_c, a, scale, window):
    """Read the cache: q_t [B, H, K]; K_c [B, H, n, K]; V_c [B, H, n, V]; a [B, H, n] with the
    current token last. Returns o_t [B, H, V], P [B, H, n] and E = P / a [B, H, n]."""
    logit = scale * (K_c @ q_t[..., None])[..., 0]                  # [B, H, n]
    n = logit.shape[-1]
    if window is not None and n > window:
        logit[..., :n - window] = -np.inf                           # older than the window
    z = logit + _log(a)                                             # [B, H, n]
    m = z.max(axis=-1, keepdims=True)                               # finite: own token, a = 1
    w = np.exp(z - m)                                               # [B, H, n]
    den = w.sum(axis=-1, keepdims=True)                             # [B, H, 1]
    P = w / den
    E = np.exp(logit - m) / den                                     # d P / d a, finite at a = 0
    o = (P[..., None, :] @ V_c)[..., 0, :]                          # [B, H, V]
    return o, P, E


def _advance(gh):
    """a_t = [a_{t-1} * exp(g_t), 1]: decay every cached weight, append the new token's 1."""
    decay = np.exp(gh)                                              # [B, H, T]

    def advance(a, t):
        one = np.ones(a.shape[:-1] + (1,), dtype=a.dtype)
        return np.concatenate([a * decay[..., t, None], one], axis=-1)  # [B, H, n + 1]

    return advance


@forward_form(SPEC)
def recurrent(q, k, v, g, *, scale, initial_state, window):
    """The definition, token by token against the growing cache. q, k: [B, T, H, K];
    v: [B, T, H, V]; g: [B, T, H] or None; cache (k_cache, v_cache, a_cache) [B, H, L, ...]."""
    window = _check_window(window)
    Kc, Vc, a = initial_state
    L, T = a.shape[-1], q.shape[1]
    K_all = np.concatenate([Kc, _heads(k)], axis=2)                 # [B, H, L+T, K]
    V_all = np.concatenate([Vc, _heads(v)], axis=2)                 # [B, H, L+T, V]
    advance = _advance(_gates(g, v))
    o = np.empty(v.shape, dtype=v.dtype)                            # [B, T, H, V]
    for t in range(T):
        a = advance(a, t)                                           # [B, H, L+t+1]
        n = L + t + 1
        o[:, t] = _read(q[:, t], K_all[:, :, :n], V_all[:, :, :n], a, scale, window)[0]
    return o, (K_all, V_all, a)


@step_form(SPEC)
def step(q, k, v, g, *, state, scale, window):
    """One token: q, k: [B, H, K]; v: [B, H, V]; g: [B, H] or None; state: the cache
    (k_cache [B, H, L, K], v_cache [B, H, L, V], a_cache [B, H, L]). Returns (o_t, cache with the
    token appended, L + 1 long)."""
    window = _check_window(window)
    Kc, Vc, a = state
    gh = np.zeros(v.shape[:2], v.dtype) if g is None else g         # [B, H]
    a = _advance(gh[..., None])(a, 0)                               # [B, H, L+1]
    Kc = np.concatenate([Kc, k[:, :, None]], axis=2)                # [B, H, L+1, K]
    Vc = np.concatenate([Vc, v[:, :, None]], axis=2)                # [B, H, L+1, V]
    o = _read(q, Kc, Vc, a, scale, window)[0]
    return o, (Kc, Vc, a)


@vjp_form(SPEC)
def recurrent_vjp(q, k, v, g, do, dht, *, scale, initial_state, window):
    """Backward of the loop (ground truth), walking t = T-1 .. 0 with the cache's adjoint.

    Per step, the read adds dq_t, and to the adjoints of the cache keys, values and weights
    (dK += scale dS q_t, dV += P do_t, da += E (dP - do_t . o_t)); the update
    a_t = [a_{t-1} e^{g_t}, 1] gives dg_t = <da_t, a_t> over the old entries and
    da_{t-1} = e^{g_t} da_t; dk_t, dv_t are the adjoints of the entry written at t.
    Memory: the per-step weight vectors a_t are recomputed from checkpoints (reverse_steps).
    """
    window = _check_window(window)
    Kc, Vc, a0 = initial_state
    L, T = a0.shape[-1], q.shape[1]
    K_all = np.concatenate([Kc, _heads(k)], axis=2)                 # [B, H, L+T, K]
    V_all = np.concatenate([Vc, _heads(v)], axis=2)                 # [B, H, L+T, V]
    gh = _gates(g, v)                                               # [B, H, T]
    decay = np.exp(gh)
    dK, dV, da = (x.copy() for x in dht)                            # adjoint of the final cache
    dq = np.zeros_like(q)
    dg = np.zeros(gh.shape, dtype=q.dtype)                          # [B, H, T]
    for t, _, a_t in reverse_steps(_advance(gh), a0, T):
        n = L + t + 1
        q_t, do_t = q[:, t], do[:, t]                               # [B, H, K], [B, H, V]
        o_t, P, E = _read(q_t, K_all[:, :, :n], V_all[:, :, :n], a_t, scale, window)
        dP = (V_all[:, :, :n] @ do_t[..., None])[..., 0]            # [B, H, n]
        centred = dP - np.sum(do_t * o_t, axis=-1, keepdims=True)   # dP - do_t . o_t
        dS = P * centred                                            # [B, H, n]
        dq[:, t] = scale * (dS[..., None, :] @ K_all[:, :, :n])[..., 0, :]
        dK[:, :, :n] += scale * dS[..., None] * q_t[:, :, None, :]
        dV[:, :, :n] += P[..., None] * do_t[:, :, None, :]
        da[:, :, :n] += E * centred
        dg[..., t] = np.sum(da[:, :, :n - 1] * a_t[..., :n - 1], axis=-1)
        da[:, :, :n - 1] *= decay[..., t, None]                     # to a_{t-1}
    grads = {"q": dq, "k": _heads(dK[:, :, L:]), "v": _heads(dV[:, :, L:]),
             "initial_state": (dK[:, :, :L], dV[:, :, :L], da[:, :, :L])}
    grads["g"] = None if g is None else np.moveaxis(dg, -1, 1)
    return grads


# ----------------------------------------------------------------------------- checks, helpers
def _check_window(window):
    """window: None or an int >= 1 (the query's own token counts)."""
    if window is None:
        return None
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, numbers.Integral):
        raise TypeError(f"{OP}: option 'window' must be a positive integer or None, "
                        f"got {type(window).__name__} {window!r}")
    if window < 1:
        raise V.InputError(f"{OP}: option 'window' must be a positive integer (the number of keys "
                           f"a query sees, itself included) or None, got {window}")
    return int(window)


def _heads(x):
    """[B, T, H, ...] -> [B, H, T, ...]"""
    return np.moveaxis(x, 1, 2)


def _log(a):
    """log of cache weights; log 0 = -inf (an absent entry), no warning."""
    with np.errstate(divide="ignore"):
        return np.log(a)


def _gates(g, v):
    """g: [B, T, H] or None -> [B, H, T] (zeros without a gate)."""
    if g is None:
        return np.zeros(v.shape[:3], dtype=v.dtype).swapaxes(1, 2)
    return np.moveaxis(g, 1, -1)                                    # [B, H, T]


def _window_keep(t, pos, window):
    """t: query positions [..., Tq, 1]-broadcastable, pos: key positions -> bool mask s > t - W."""
    if window is None:
        return None
    return pos > t - window


def _exclusive_cumsum(x, axis=-1):
    """out[i] = sum_{j < i} x[j] along axis."""
    c = np.cumsum(x, axis=axis)
    c = np.moveaxis(c, axis, -1)
    out = np.concatenate([np.zeros_like(c[..., :1]), c[..., :-1]], axis=-1)
    return np.moveaxis(out, -1, axis)


# ----------------------------------------------------------------------------- parallel
def _bias(gh, log_a, window, with_window=True, gated=True):
    """Logit bias of the parallel form: [B, H, T, L+T] = [log a_i + G_t | segsum(g)_{t,s}],
    -inf above the diagonal and (with_window) outside the window. gh: [B, H, T]; log_a: [B, H, L].
    gated=False (no g: gh is zeros) builds the same bias without the segment sums: G = 0 and
    segsum(0) is the causal mask (0 on and below the diagonal, -inf above)."""
    T, L = gh.shape[-1], log_a.shape[-1]
    if gated:
        G = np.cumsum(gh, axis=-1)                                  # [B, H, T]: g_1 + .. + g_t
        cache = log_a[..., None, :] + G[..., :, None]               # [B, H, T, L]
        tokens = segsum(gh)                                         # [B, H, T, T]
    else:
        cache = np.broadcast_to(log_a[..., None, :], gh.shape + (L,))
        causal = np.where(np.tril(np.ones((T, T), dtype=bool)), 0.0, -np.inf).astype(gh.dtype)
        tokens = np.broadcast_to(causal, gh.shape + (T,))
        if L == 0 and not (with_window and window is not None):
            return tokens                                           # a broadcast view [T, T]
    bias = np.concatenate([cache, tokens], axis=-1)                 # [B, H, T, L+T]
    if with_window and window is not None:
        keep = _window_keep(np.arange(T)[:, None], np.arange(L + T) - L, window)  # [T, L+T]
        bias = np.where(keep, bias, -np.inf)
    return bias


def _softmax_rows(Z):
    """Row-max stabilised softmax of Z [..., T, S] (every row has a finite entry)."""
    m = Z.max(axis=-1, keepdims=True)                               # [..., T, 1]
    w = np.exp(Z - m)
    den = w.sum(axis=-1, keepdims=True)
    return w / den, m, den


class ParallelParts(NamedTuple):
    """Shared by the parallel forward and backward; the cache's L entries come first."""

    qh: np.ndarray              # [B, H, T, K]
    K_all: np.ndarray           # [B, H, L+T, K]  cached keys, then the call's keys
    V_all: np.ndarray           # [B, H, L+T, V]
    gh: np.ndarray              # [B, H, T]       log gates (zeros without a gate)
    qk: np.ndarray              # [B, H, T, L+T]  scale q_t . k_s
    bias: np.ndarray            # [B, H, T, L+T]  the gate / cache-weight / mask bias
    P: np.ndarray               # [B, H, T, L+T]  softmax weights
    m: np.ndarray               # [B, H, T, 1]    row max of the logits
    den: np.ndarray             # [B, H, T, 1]    row sum of exp(logits - m)


def _parallel_parts(q, k, v, g, scale, initial_state, window) -> ParallelParts:
    """The parallel form's logits, bias and softmax weights (``ParallelParts``)."""
    Kc, Vc, a = initial_state
    qh = _heads(q)                                                  # [B, H, T, K]
    K_all = np.concatenate([Kc, _heads(k)], axis=2)                 # [B, H, L+T, K]
    V_all = np.concatenate([Vc, _heads(v)], axis=2)                 # [B, H, L+T, V]
    gh = _gates(g, v)                                               # [B, H, T]
    qk = scale * (qh @ K_all.swapaxes(-1, -2))                      # [B, H, T, L+T]
    bias = _bias(gh, _log(a), window, gated=g is not None)          # [B, H, T, L+T]
    P, m, den = _softmax_rows(qk + bias)                            # [B, H, T, L+T]
    return ParallelParts(qh=qh, K_all=K_all, V_all=V_all, gh=gh, qk=qk, bias=bias, P=P, m=m,
                         den=den)


def _final_cache(K_all, V_all, gh, a):
    """(K, V, a_out): a_out = [a_i exp(G_T) | exp(g_{s+1} + .. + g_T)], [B, H, L+T]."""
    G_T = np.sum(gh, axis=-1, keepdims=True)                        # [B, H, 1]
    to_end = _exclusive_cumsum(gh[..., ::-1], axis=-1)[..., ::-1]   # [B, H, T]: g after s
    return (K_all, V_all, np.concatenate([a * np.exp(G_T), np.exp(to_end)], axis=-1))


@matrix_form(SPEC, names=("q", "k", "g"))
def attention_matrix(q, k, g, *, scale, window):
    """The softmax weights P: [B, H, T, T] (no cache); the parallel form is o = P v."""
    window = _check_window(window)
    qh, kh = _heads(q), _heads(k)                                   # [B, H, T, K]
    gh = np.zeros(q.shape[:3], q.dtype).swapaxes(1, 2) if g is None else np.moveaxis(g, 1, -1)
    bias = _bias(gh, np.zeros(gh.shape[:-1] + (0,), gh.dtype), window)   # [B, H, T, T]
    return _softmax_rows(scale * (qh @ kh.swapaxes(-1, -2)) + bias)[0]


@forward_form(SPEC)
def parallel(q, k, v, g, *, scale, initial_state, window):
    """o = softmax(scale Q [K_cache; K]^T + bias) [V_cache; V]. Shapes as ``recurrent``."""
    window = _check_window(window)
    p = _parallel_parts(q, k, v, g, scale, initial_state, window)
    o = p.P @ p.V_all                                               # [B, H, T, V]
    return _heads(o), _final_cache(p.K_all, p.V_all, p.gh, initial_state[2])


@vjp_form(SPEC)
def parallel_vjp(q, k, v, g, do, dht, *, scale, initial_state, window):
    """Backward of the parallel form: dS = P (dP - dO . O), matrix products, and dg from
    exclusive cumulative sums of dS along each row (cache columns first)."""
    window = _check_window(window)
    p = _parallel_parts(q, k, v, g, scale, initial_state, window)
    qh, K_all, V_all, gh, qk, P, m, den = p.qh, p.K_all, p.V_all, p.gh, p.qk, p.P, p.m, p.den
    a = initial_state[2]
    L, T = a.shape[-1], q.shape[1]
    doh = _heads(do)                                                # [B, H, T, V]
    o = P @ V_all                                                   # [B, H, T, V]
    centred = doh @ V_all.swapaxes(-1, -2) - np.sum(doh * o, -1, keepdims=True)  # [B, H, T, L+T]
    dS = P * centred
    dq = scale * dS @ K_all                                         # [B, H, T, K]
    dK = scale * dS.swapaxes(-1, -2) @ qh + dht[0]                  # [B, H, L+T, K]
    dV = P.swapaxes(-1, -2) @ doh + dht[1]                          # [B, H, L+T, V]
    # cache weights: E = P / a = exp(logit without log a - m) / den on the attended entries
    no_a = qk[..., :L] + np.cumsum(gh, axis=-1)[..., :, None]       # [B, H, T, L]
    keep = _window_keep(np.arange(T)[:, None], np.arange(L) - L, window)  # [T, L] or None
    if keep is not None:
        no_a = np.where(keep, no_a, -np.inf)
    E = np.exp(no_a - m) / den                                      # [B, H, T, L]
    _, _, a_out = _final_cache(K_all, V_all, gh, a)
    G_T = np.sum(gh, axis=-1, keepdims=True)
    da = np.sum(E * centred[..., :L], axis=-2) + dht[2][..., :L] * np.exp(G_T)   # [B, H, L]
    grads = {"q": _heads(dq), "k": _heads(dK[:, :, L:]), "v": _heads(dV[:, :, L:]),
             "initial_state": (dK[:, :, :L], dV[:, :, :L], da), "g": None}
    if g is not None:
        # gates: dg_j = sum_{t >= j} (sum of dS[t, columns before token j]) + final-cache terms
        before = _exclusive_cumsum(dS, axis=-1)[..., L:]            # [B, H, T, T]: cols < L+j
        dg = np.sum(np.tril(before), axis=-2)                       # [B, H, T]: rows t >= j
        dg = dg + _exclusive_cumsum(dht[2] * a_out, axis=-1)[..., L:]   # d a_out / d g_j = a_out
        grads["g"] = np.moveaxis(dg, -1, 1)
    return grads


# ----------------------------------------------------------------------------- chunkwise
class ChunkParts(NamedTuple):
    """Chunked inputs and the pieces of the gate bias (all sums of log gates inside one segment).

    from_start[n, t] = g over chunk n's tokens up to t; to_end[n, s] = g after s to chunk n's end;
    before[n] = g over chunks < n; between[n, j] = g over chunks j+1 .. n-1 (n > j)."""

    qc: np.ndarray              # [B, H, N, C, K]  chunked inputs
    kc: np.ndarray              # [B, H, N, C, K]
    vc: np.ndarray              # [B, H, N, C, V]
    gc: np.ndarray              # [B, H, N, C]     log gates (zeros without a gate)
    segsum_in: np.ndarray       # [B, H, N, C, C]  g_{s+1} + .. + g_t inside each chunk (s <= t)
    from_start: np.ndarray      # [B, H, N, C]
    to_end: np.ndarray          # [B, H, N, C]
    totals: np.ndarray          # [B, H, N]        g over each whole chunk
    before: np.ndarray          # [B, H, N]
    between: np.ndarray         # [B, H, N, N]


def _chunk_parts(q, k, v, g, C) -> ChunkParts:
    """The chunked inputs and gate sums of ``ChunkParts``."""
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(v, C)  # [B, H, N, C, K|V]
    gh = np.zeros(v.shape[:3], v.dtype) if g is None else g
    gc = to_chunks(gh, C)                                           # [B, H, N, C]
    segsum_in = segsum(gc)                                          # [B, H, N, C, C]
    from_start = np.cumsum(gc, axis=-1)                             # [B, H, N, C]
    to_end = segsum_in[..., -1, :]                                  # [B, H, N, C]
    totals = from_start[..., -1]                                    # [B, H, N]
    before = _exclusive_cumsum(totals, axis=-1)                     # [B, H, N]
    seg = segsum(totals)                                            # [B, H, N, N]: chunks j+1..n
    between = np.concatenate([np.full_like(seg[..., :1, :], -np.inf), seg[..., :-1, :]], axis=-2)
    return ChunkParts(qc=qc, kc=kc, vc=vc, gc=gc, segsum_in=segsum_in, from_start=from_start,
                      to_end=to_end, totals=totals, before=before, between=between)


def _block_logits(parts, Kc_b, log_a_b, c0, j, L, scale, window):
    """Logits of every query chunk n >= j (j = None: a cache block starting at c0) against one key
    block. Returns Z [B, H, N', C, Cb], its part without log a (cache) and the first query chunk."""
    qc, kc, from_start, to_end = parts.qc, parts.kc, parts.from_start, parts.to_end
    N, C = qc.shape[2], qc.shape[3]
    t_pos = np.arange(N * C).reshape(N, C)                          # query positions [N, C]
    if j is None:                                                   # cache block
        n0 = 0
        pos = np.arange(c0, c0 + Kc_b.shape[2]) - L                 # key positions [Cb]
        qk = scale * (qc @ Kc_b[:, :, None].swapaxes(-1, -2))       # [B, H, N, C, Cb]
        G = (parts.before[..., None] + from_start)[..., None]       # [B, H, N, C, 1]
        no_a = qk + G
        Z = no_a + log_a_b[:, :, None, None, :]
    else:                                                           # token chunk j
        n0 = j
        pos = np.arange(j * C, (j + 1) * C)
        qk = scale * (qc[:, :, j:] @ kc[:, :, j, None].swapaxes(-1, -2))  # [B, H, N-j, C, C]
        off = (from_start[:, :, j + 1:, :, None] + parts.between[:, :, j + 1:, j, None, None]
               + to_end[:, :, j, None, None, :])                    # [B, H, N-j-1, C, C]
        bias = np.concatenate([parts.segsum_in[:, :, j, None], off], axis=2)   # [B, H, N-j, C, C]
        Z, no_a = qk + bias, None
    keep = _window_keep(t_pos[n0:, :, None], pos, window)           # [N', C, Cb]
    if keep is not None:
        Z = np.where(keep, Z, -np.inf)
        no_a = None if no_a is None else np.where(keep, no_a, -np.inf)
    return Z, no_a, n0, pos


def _online_update(m, den, acc, Z, Vb):
    """One flash-attention step: fold the block logits Z [..., C, Cb] with values Vb into the
    running max m, running sum den [..., C] and running output acc [..., C, V]."""
    m_new = np.maximum(m, Z.max(axis=-1))                           # [..., C]
    m_safe = np.where(np.isneginf(m_new), 0.0, m_new)               # nothing attended yet
    alpha = np.exp(m - m_safe)                                      # rescale the old sums
    w = np.exp(Z - m_safe[..., None])                               # [..., C, Cb]
    return m_new, alpha * den + w.sum(axis=-1), alpha[..., None] * acc + w @ Vb


def _chunk_forward(q, k, v, g, scale, initial_state, C, window):
    """Steps 1-3 of the chunkwise form; returns parts, o (chunked) and the row log-sum-exp."""
    Kc, Vc, a = initial_state
    L = a.shape[-1]
    parts = _chunk_parts(q, k, v, g, C)
    qc, vc = parts.qc, parts.vc
    N = qc.shape[2]
    log_a = _log(a)                                                 # [B, H, L]
    m = np.full(qc.shape[:-1], -np.inf, dtype=q.dtype)              # [B, H, N, C]
    den = np.zeros(qc.shape[:-1], dtype=q.dtype)                    # [B, H, N, C]
    acc = np.zeros(qc.shape[:-1] + (vc.shape[-1],), dtype=q.dtype)  # [B, H, N, C, V]
    # 1. the cache, in blocks of C keys, against every query chunk
    for c0 in range(0, L, C):
        Z, _, _, _ = _block_logits(parts, Kc[:, :, c0:c0 + C], log_a[..., c0:c0 + C], c0, None,
                                   L, scale, window)
        m, den, acc = _online_update(m, den, acc, Z, Vc[:, :, None, c0:c0 + C])
    # 2. token chunk j against the query chunks n >= j (diagonal block: in-chunk causal mask)
    for j in range(N):
        Z, _, n0, _ = _block_logits(parts, None, None, 0, j, L, scale, window)
        m[:, :, n0:], den[:, :, n0:], acc[:, :, n0:] = _online_update(
            m[:, :, n0:], den[:, :, n0:], acc[:, :, n0:], Z, vc[:, :, j, None])
    # 3. normalise
    o = acc / den[..., None]                                        # [B, H, N, C, V]
    lse = m + np.log(den)                                           # [B, H, N, C]
    return parts, o, lse


def _chunk_final_cache(parts, initial_state, T):
    """a_out = [a_i exp(G_T) | exp(to_end_s + g over the later chunks)], [B, H, L+T]."""
    kc, vc, to_end, totals = parts.kc, parts.vc, parts.to_end, parts.totals
    Kc, Vc, a = initial_state
    after = np.flip(_exclusive_cumsum(np.flip(totals, -1), -1), -1)  # [B, H, N]: chunks > n
    a_tok = np.exp(to_end + after[..., None]).reshape(a.shape[:2] + (-1,))[..., :T]
    a_old = a * np.exp(np.sum(totals, axis=-1, keepdims=True))
    K_all = np.concatenate([Kc, from_chunks(kc, T).swapaxes(1, 2)], axis=2)
    V_all = np.concatenate([Vc, from_chunks(vc, T).swapaxes(1, 2)], axis=2)
    return K_all, V_all, np.concatenate([a_old, a_tok], axis=-1)


@forward_form(SPEC, chunked=True)
def chunkwise(q, k, v, g, *, scale, initial_state, chunk_size, window):
    """Flash-attention style, chunks of C = chunk_size queries and keys (T need not divide).

    1. the cache in blocks of C keys, against all query chunks at once (running max/sum/output)
    2. token chunk j against the query chunks n >= j, one loop over j; the gate bias of block
       (n, j) is from_start_n[t] + between[n, j] + to_end_j[s] (diagonal: in-chunk segsum)
    3. o = running output / running sum
    4. the final cache: the call's keys appended, weights decayed to the end of the call
    Memory: O(T C) per head for the blocks of one key chunk, plus the O(L + T) cache.
    """
    window = _check_window(window)
    T = q.shape[1]
    parts, o, _ = _chunk_forward(q, k, v, g, scale, initial_state, chunk_size, window)
    return from_chunks(o, T), _chunk_final_cache(parts, initial_state, T)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(q, k, v, g, do, dht, *, scale, initial_state, chunk_size, window):
    """Backward of the chunkwise form, block by block like flash attention's backward.

    1. forward pass for o and the row log-sum-exp lse (P of any block = exp(Z - lse))
    2. per key block (cache blocks, then token chunks j, all query chunks n >= j at once):
       dS = P (dO V^T - dO . o); dq += scale dS K; dk, dv of the block summed over n
    3. dg: with Pre_t the running row sum of dS over the blocks already visited,
       dg_s = sum_{t >= s} (Pre_t + sum_{s' < s in the block} dS_ts'); then Pre += rowsum(dS)
    4. the final cache's terms (d a_out / d g_j = a_out for keys before j)
    """
    window = _check_window(window)
    C, T = chunk_size, q.shape[1]
    Kc, Vc, a = initial_state
    L = a.shape[-1]
    parts, oc, lse = _chunk_forward(q, k, v, g, scale, initial_state, C, window)
    qc, kc, vc = parts.qc, parts.kc, parts.vc
    N = qc.shape[2]
    doc = to_chunks(do, C)                                          # [B, H, N, C, V]
    delta = np.sum(doc * oc, axis=-1)                               # [B, H, N, C]: dO . o
    log_a = _log(a)
    dqc = np.zeros_like(qc, dtype=q.dtype)                          # [B, H, N, C, K]
    dkc, dvc = np.zeros_like(kc, dtype=q.dtype), np.zeros_like(vc, dtype=q.dtype)
    dgc = np.zeros(qc.shape[:-1], dtype=q.dtype)                    # [B, H, N, C]
    dK, dV, da = (np.zeros_like(x) for x in initial_state)
    pre = np.zeros(qc.shape[:-1], dtype=q.dtype)                    # [B, H, N, C]: Pre_t

    def block_grads(Z, Vb, n0):
        P = np.exp(Z - lse[:, :, n0:, :, None])                     # [B, H, N', C, Cb]
        centred = doc[:, :, n0:] @ Vb.swapaxes(-1, -2) - delta[:, :, n0:, :, None]
        return P, centred, P * centred

    # 2. cache blocks
    for c0 in range(0, L, C):
        Kb, Vb = Kc[:, :, None, c0:c0 + C], Vc[:, :, None, c0:c0 + C]   # [B, H, 1, Cb, K|V]
        Z, no_a, _, _ = _block_logits(parts, Kb[:, :, 0], log_a[..., c0:c0 + C], c0, None,
                                      L, scale, window)
        P, centred, dS = block_grads(Z, Vb, 0)
        dqc += scale * dS @ Kb
        dK[:, :, c0:c0 + C] = scale * np.sum(dS.swapaxes(-1, -2) @ qc, axis=2)
        dV[:, :, c0:c0 + C] = np.sum(P.swapaxes(-1, -2) @ doc, axis=2)
        E = np.exp(no_a - lse[..., None])                           # P / a, finite at a = 0
        da[..., c0:c0 + C] = np.sum(E * centred, axis=(2, 3))
        pre += dS.sum(axis=-1)
    # 2-3. token chunks
    causal = np.tri(C, C, 0, dtype=bool)                            # t >= s inside a chunk
    for j in range(N):
        Z, _, n0, _ = _block_logits(parts, None, None, 0, j, L, scale, window)
        P, centred, dS = block_grads(Z, vc[:, :, j, None], n0)      # [B, H, N-j, C, C]
        dqc[:, :, j:] += scale * dS @ kc[:, :, j, None]
        dkc[:, :, j] = scale * np.sum(dS.swapaxes(-1, -2) @ qc[:, :, j:], axis=2)
        dvc[:, :, j] = np.sum(P.swapaxes(-1, -2) @ doc[:, :, j:], axis=2)
        X = pre[:, :, j:, :, None] + _exclusive_cumsum(dS, axis=-1)  # [B, H, N-j, C, C]
        dgc[:, :, j] = (np.sum(X[:, :, 0] * causal, axis=-2)         # rows t >= s of chunk j
                        + np.sum(X[:, :, 1:], axis=(2, 3)))         # every row of later chunks
        pre[:, :, j:] += dS.sum(axis=-1)
    # 4. the final cache
    K_all, V_all, a_out = _chunk_final_cache(parts, initial_state, T)
    G_T = np.sum(parts.totals, axis=-1, keepdims=True)              # [B, H, 1]
    da += dht[2][..., :L] * np.exp(G_T)
    dg = from_chunks(dgc, T) + np.moveaxis(_exclusive_cumsum(dht[2] * a_out, -1)[..., L:], -1, 1)
    grads = {"q": from_chunks(dqc, T), "k": from_chunks(dkc, T) + _heads(dht[0][:, :, L:]),
             "v": from_chunks(dvc, T) + _heads(dht[1][:, :, L:]),
             "initial_state": (dK + dht[0][:, :, :L], dV + dht[1][:, :, :L], da)}
    grads["g"] = None if g is None else dg
    return grads


# ----------------------------------------------------------------------------- cache utilities
def truncate_cache(cache, window):
    """Keep the last window - 1 entries of a cache (k_cache, v_cache, a_cache): with a sliding
    window W, older keys are never read again, so the next call's results are identical."""
    window = _check_window(window)
    keep = max(window - 1, 0)
    L = cache[2].shape[-1]
    return tuple(x[:, :, L - min(keep, L):] for x in cache)


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """q, k, v ~ N(0, 1); "forget_gate" and "window" add g from the decay regime."""
    B, T, H, K, V_ = (dims[name] for name in "BTHKV")
    HV = dims.get("HV", H)
    x = {
        "q": _regimes.normal(rng, (B, T, H, K), dtype),
        "k": _regimes.normal(rng, (B, T, H, K), dtype),
        "v": _regimes.normal(rng, (B, T, HV, V_), dtype),
    }
    if variant != "default":
        x["g"] = _regimes.log_decay(rng, (B, T, HV), regime, dtype)
    return x
