r"""hgrn: a gated elementwise linear recurrence, one scalar state per channel (no q, no k).

Recurrence (one batch element; every channel d on its own; inclusive read, the state AFTER t):

    h_t = a_t * h_{t-1} + x_t,     a_t = exp(g_t) in [0, 1]     (elementwise over D)
    o_t = h_t

There is no read-out projection and no scale (the output IS the state, scale 1). HGRN's input
gating (x_t = (1 - f_t) * c_t in the paper) happens before the op: ``x`` is the already gated
input, as in fla.

Glossary
    symbol   argument   shape        paper (HGRN, Qin et al. 2023)     fla (fused_recurrent_hgrn)
    x_t      x          [B, T, D]    (1 - lambda_t) * c_t              x
    g_t      g          [B, T, D]    log lambda_t (log forget gate)    g
    h_t      state      [B, D]       h_t                               initial_state / final_state
    o_t      (output)   [B, T, D]    h_t                               o

Forms
    recurrent  the loop above (ground truth); O(D) memory per sequence.
    parallel   o_t = sum_{s<=t} exp(g_{s+1} + ... + g_t) x_s + exp(g_1 + ... + g_t) h_0, per channel:
               a T x T decay mask per channel, M = exp(segsum(g)) of shape [B, D, T, T].
    chunkwise  chunks of C tokens, each channel on its own (``linrec_ref._decay`` picks the path per
               channel and chunk): where the channel's decay range over the chunk, -G_last, is
               below _decay.FAST_BOUND (60 float32, 600 float64), the factored cumulative sum
               o_t = exp(G_t) * sum_{s<=t} exp(-G_s) x_s (O(C)); elsewhere (fast forgetting, hard
               resets g = -inf) the exact [C, C] mask exp(segsum(g)) (segment sums, never a
               difference of cumulative sums). The recurrence carries h across chunks.
    step       one token of the recurrence (decoding).
    attention_matrix(g) -> M [B, D, T, T]: o[b, :, d] = M[b, d] @ x[b, :, d] (zero initial state).

Gradients (hand-written vector-Jacobian products; the adjoint runs the same recurrence backwards):
    dh_t = do_t + a_{t+1} dh_{t+1},   dh_T starts from do_T + dht (the final-state cotangent)
    dx_t = dh_t,   dg_t = a_t dh_t h_{t-1},   dh_0 = a_1 dh_1.
The recurrent backward (ground truth) walks t = T-1 .. 0 with ``_scan.reverse_steps``, which
recomputes states from checkpoints instead of keeping all T states. Because o_t = h_t, the
previous state h_{t-1} is the previous output, so the parallel and chunkwise backwards also use
the direct formula dg_t = a_t dx_t h_{t-1} (vectorised; h_{t-1} is the shifted output, or the
carried state at a chunk start). It is exact at a hard reset (a_t = 0 gives dg_t = 0 exactly).
The gate identity holds as well and is checked in tests/test_hgrn.py: with G_t = g_1 + ... + g_t,
    dL/dG_t = o_t do_t - x_t dx_t  (+ h_T dht at the last token),   dg_t = sum_{u >= t} dL/dG_u.

Peers: fla ``fused_recurrent_hgrn`` (x, g, initial_state, output_final_state), ``chunk_hgrn``.

References: Qin, Yang & Zhong, "Hierarchically Gated Recurrent Neural Network for Sequence
Modeling" (HGRN), NeurIPS 2023; Yang et al., flash-linear-attention (fla), ``fla.ops.hgrn``.
"""
from __future__ import annotations

import numpy as np

from .. import _regimes
from .._decay import _exact_blocks, chunk_decay, cumsum_in_chunks, reverse_cumsum_in_chunks
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import from_chunks, reverse_steps, segsum, to_chunks
from .._spec import Arg, OpSpec


SPEC = OpSpec(
    name="hgrn",
    family="gated elementwise recurrence (HGRN)",
    transition="vector state, diagonal",
    math="h_t = exp(g_t) * h_{t-1} + x_t (elementwise);  o_t = h_t",
    inputs=(Arg("x", "BTD"), Arg("g", "BTD", log_gate=True)),
    output="BTD",
    state=(Arg("state", "ND"),),
    default_scale=None,
    peers=("fla.ops.hgrn.fused_recurrent_hgrn", "fla.ops.hgrn.chunk_hgrn"),
    regimes=tuple(_regimes.DECAY_REGIMES),
    default_dims={"B": 2, "D": 8},
)


# ----------------------------------------------------------------------------- recurrent
def _advance(x, g):
    """One step of the recurrence as a function of (h_{t-1}, t), for loops and reverse walks."""
    a = np.exp(g)                                                   # [B, T, D]

    def advance(h, t):
        return a[:, t] * h + x[:, t]                                # [B, D]

    return advance


@forward_form(SPEC)
def recurrent(x, g, *, initial_state):
    """The definition: a loop over t. x, g: [B, T, D]; initial_state: [B, D]."""
    advance = _advance(x, g)
    h = initial_state                                               # [B, D]
    o = np.empty_like(x)                                            # [B, T, D]
    for t in range(x.shape[1]):
        h = advance(h, t)
        o[:, t] = h
    return o, h


@step_form(SPEC)
def step(x, g, *, state):
    """One token: x, g: [B, D]; state: [B, D]. Returns (o_t, h_t) with o_t = h_t."""
    h = np.exp(g) * state + x                                       # [B, D]
    return h.copy(), h                                              # o_t and the state share no memory


@vjp_form(SPEC)
def recurrent_vjp(x, g, do, dht, *, initial_state):
    """Backward of the loop, walking t = T-1 .. 0 with the adjoint state dh (ground truth).

    Memory: states are recomputed from checkpoints (``_scan.reverse_steps``), never all T kept.
    """
    a = np.exp(g)                                                   # [B, T, D]
    dx, dg = np.zeros_like(x), np.zeros_like(g)
    dh = dht.copy()                                                 # [B, D]
    for t, h_prev, _ in reverse_steps(_advance(x, g), initial_state, x.shape[1]):
        dh = dh + do[:, t]                                          # read o_t = h_t
        dx[:, t] = dh                                               # h_t = ... + x_t
        dg[:, t] = a[:, t] * dh * h_prev                            # d/dg of a_t h_{t-1}
        dh = a[:, t] * dh                                           # to h_{t-1}
    return {"x": dx, "g": dg, "initial_state": dh}


# ----------------------------------------------------------------------------- parallel
def _decay_mask(g):
    """g: [B, T, D] -> M: [B, D, T, T], M[t, s] = exp(g_{s+1} + ... + g_t) for s <= t, else 0."""
    return np.exp(segsum(np.moveaxis(g, 1, -1)))


@matrix_form(SPEC, names=("g",))
def attention_matrix(g):
    """M: [B, D, T, T], one lower-triangular decay mask per channel.

    o[b, :, d] = M[b, d] @ x[b, :, d] (zero initial state).
    """
    return _decay_mask(g)


def _previous_states(o, h0):
    """h_{t-1} for every t: the output shifted by one step, h_0 first. [B, T, D] -> [B, T, D]."""
    return np.concatenate([h0[:, None], o[:, :-1]], axis=1)


def _parallel_parts(x, g, initial_state):
    """Shared by the parallel forward and backward: channel-major mask, decays, outputs."""
    M = _decay_mask(g)                                              # [B, D, T, T]
    xd = np.moveaxis(x, 1, -1)                                      # [B, D, T]
    a_from0 = np.exp(np.cumsum(np.moveaxis(g, 1, -1), axis=-1))     # [B, D, T]: exp(g_1+..+g_t)
    o = (M @ xd[..., None])[..., 0] + a_from0 * initial_state[..., None]  # [B, D, T]
    return M, a_from0, np.moveaxis(o, -1, 1)                        # o: [B, T, D]


def _last(o, h0):
    """The final state: the last output (o_t = h_t), or h_0 for an empty sequence."""
    return o[:, -1].copy() if o.shape[1] else h0


@forward_form(SPEC)
def parallel(x, g, *, initial_state):
    """o = M x + exp(G_t) h_0 per channel, M = exp(segsum(g)). Shapes as ``recurrent``."""
    _, _, o = _parallel_parts(x, g, initial_state)
    return o, _last(o, initial_state)


@vjp_form(SPEC)
def parallel_vjp(x, g, do, dht, *, initial_state):
    """Backward of the parallel form: dx = M^T do + (decay to T) dht, dg = a dx h_prev."""
    if x.shape[1] == 0:  # an empty sequence is the identity on the state
        return {"x": np.zeros_like(x), "g": np.zeros_like(g), "initial_state": dht.copy()}
    M, a_from0, o = _parallel_parts(x, g, initial_state)
    dod = np.moveaxis(do, 1, -1)                                    # [B, D, T]
    to_end = M[..., -1, :]                                          # [B, D, T]: decay s -> T
    dxd = (M.swapaxes(-1, -2) @ dod[..., None])[..., 0] + to_end * dht[..., None]  # [B, D, T]
    dh0 = np.sum(a_from0 * dod, axis=-1) + a_from0[..., -1] * dht  # [B, D]
    dx = np.moveaxis(dxd, -1, 1)                                    # [B, T, D]
    dg = np.exp(g) * dx * _previous_states(o, initial_state)        # [B, T, D]
    return {"x": dx, "g": dg, "initial_state": dh0}


# ----------------------------------------------------------------------------- chunkwise
# Every channel is its own scalar recurrence, so a chunk here is ONE channel over C tokens: the
# gates are viewed as [B, D, N, C, 1] ([..., C, 1]: C tokens, one channel) and handed to
# ``linrec_ref._decay``, which picks the path per (b, d, n) chunk from its decay range -G_last:
#   fast  (range < _decay.FAST_BOUND[dtype]: 60 float32, 600 float64): with G the chunk-local
#         cumulative log decay, exp(G_t - G_s) = exp(G_t) * exp(-G_s) with both factors bounded,
#         so the intra-chunk sums are O(C) cumulative sums per channel;
#   exact (fast forgetting, hard resets g = -inf): the [C, C] mask exp(segsum(g)) of the chunk
#         (``_decay.exact_decay``: segment sums, exact 0 at -inf), selected by boolean indexing
#         and processed in blocks of at most ``_decay.EXACT_BLOCK`` elements.
# ``chunked_forward`` / ``chunked_vjp`` take ``fast_bound`` (0 -> all exact, inf -> factored
# wherever a chunk has no -inf gate) so that tests can force either path.
def _channel_chunks(a, C):
    """[B, T, D] -> [B, D, N, C, 1]: one-channel chunks in _decay's [..., C, D] layout (D = 1).

    A view of ``_scan.to_chunks`` (zero padding: x = 0, g = 0 are neutral) with a unit channel
    axis; in memory it stays [B, N, C, D], so _decay's loops over C read contiguous rows."""
    return to_chunks(a, C)[..., None]


def _exact_chunks(decay):
    """Yield (sel, E) for the chunks of decay that take the exact path: sel indexes [B, D, N],
    E = exp(segsum(g)) of those chunks, [M, C, C] with E[m, t, s] = exp(g_{s+1} + .. + g_t)."""
    for sel, E in _exact_blocks(decay):                             # E: [M, C, C, 1]
        yield sel, E[..., 0]                                        # [M, C, C]


def _chunk_parts(x, g, initial_state, C, fast_bound):
    """Steps 1-4 of the chunkwise form, shared by forward and backward.

    Returns the chunked inputs xc [B, D, N, C], the decays (``_decay.ChunkDecay`` over
    [B, D, N, C, 1]), the state entering every chunk h_in [B, D, N], the chunked outputs
    oc [B, D, N, C] and the final state [B, D].
    """
    xc = to_chunks(x, C)                                            # [B, D, N, C]
    decay = chunk_decay(_channel_chunks(g, C), fast_bound=fast_bound)   # [B, D, N, C, 1]
    exp_G = decay.exp_Gq[..., 0]                                    # [B, D, N, C]: exp(G_t) <= 1
    # 1. intra-chunk, from a zero state: o_t = sum_{s<=t} exp(G_t - G_s) x_s
    #    fast chunks: exp(G_t) * cumsum_s(exp(-G_s) x_s), O(C) (exp_neg_G = 0 in the other chunks)
    intra = cumsum_in_chunks(decay.exp_neg_G * xc[..., None])[..., 0]   # [B, D, N, C]
    intra *= exp_G
    #    exact chunks: the chunk's [C, C] decay mask times its inputs
    for sel, E in _exact_chunks(decay):
        intra[sel] = (E @ xc[sel][..., None])[..., 0]               # [M, C]
    # 2. chunk states: the intra-chunk state at the chunk's last token, and the chunk's decay
    U, a_chunk = intra[..., -1], decay.total[..., 0]                # [B, D, N]
    # 3. carry across chunks: h_n = a_chunk_n h_{n-1} + U_n; keep the state entering each chunk
    h_in = np.empty_like(U)                                         # [B, D, N]
    h = initial_state                                               # [B, D]
    for n in range(U.shape[-1]):
        h_in[..., n] = h
        h = a_chunk[..., n] * h + U[..., n]
    # 4. output: intra + the carried state decayed from the chunk start
    oc = exp_G * h_in[..., None]                                    # [B, D, N, C]
    oc += intra
    return xc, decay, h_in, oc, h


def chunked_forward(x, g, *, initial_state, chunk_size, fast_bound=None):
    """Dense chunkwise forward (no checks). x, g: [B, T, D]; initial_state: [B, D].

    fast_bound: see ``_decay.chunk_decay`` (None: the dtype's default). Returns (o, h_T).
    """
    T = x.shape[1]
    C = max(1, min(chunk_size, T))                                  # one chunk covers T <= C
    *_, oc, hT = _chunk_parts(x, g, initial_state, C, fast_bound)
    return from_chunks(oc, T), hT


def chunked_vjp(x, g, *, do, dht, initial_state, chunk_size, fast_bound=None):
    """Dense chunkwise backward (no checks) matching ``chunked_forward``; returns the grad dict.

    1. recompute the forward (states entering each chunk, outputs)
    2. carry the state cotangent backwards:
       dh_end[n-1] = a_chunk_n dh_end[n] + sum_t exp(G_t) do_t
    3. dx inside each chunk: dx_s = sum_{t>=s} exp(G_t - G_s) do_t + exp(G_last - G_s) dh_end;
       fast chunks: exp(-G_s) * (reverse cumsum of exp(G_t) do_t), O(C); exact chunks: E^T do
    4. dg = a_t dx_t h_{t-1} (direct formula, an exact 0 at a reset), with h_{t-1} the previous
       output or, at a chunk start, h_in
    """
    T = x.shape[1]
    C = max(1, min(chunk_size, T))
    xc, decay, h_in, oc, _ = _chunk_parts(x, g, initial_state, C, fast_bound)
    doc = to_chunks(do, C)                                          # [B, D, N, C]
    # 2. dh_end[n]: cotangent of the state at the end of chunk n (from the later chunks)
    from_t = reverse_cumsum_in_chunks(decay.exp_Gq * doc[..., None])[..., 0]   # [B, D, N, C]
    local = from_t[..., 0].copy()                                   # [B, D, N]: sum_t exp(G_t) do_t
    dh_end = np.empty_like(h_in)                                    # [B, D, N]
    dh = dht                                                        # [B, D]
    for n in reversed(range(h_in.shape[-1])):
        dh_end[..., n] = dh
        dh = decay.total[..., n, 0] * dh + local[..., n]
    # 3. dx inside each chunk: fast chunks factored (exp_neg_G = 0 elsewhere), then the exact ones
    dxc = np.multiply(decay.exp_neg_G[..., 0], from_t, out=from_t)  # [B, D, N, C] (in from_t)
    for sel, E in _exact_chunks(decay):
        dxc[sel] = (E.swapaxes(-1, -2) @ doc[sel][..., None])[..., 0]  # [M, C]
    dxc += decay.to_end[..., 0] * dh_end[..., None]                 # [B, D, N, C]
    # 4. dg from the direct formula; h_prev shifts the outputs by one inside each chunk
    h_prev = np.empty_like(oc)                                      # [B, D, N, C] (oc's memory order)
    h_prev[..., 0], h_prev[..., 1:] = h_in, oc[..., :-1]
    dgc = np.exp(decay.g[..., 0])                                   # [B, D, N, C]: a_t
    dgc *= dxc
    dgc *= h_prev
    return {"x": from_chunks(dxc, T), "g": from_chunks(dgc, T), "initial_state": dh}


@forward_form(SPEC, chunked=True)
def chunkwise(x, g, *, initial_state, chunk_size):
    """Chunks of C = chunk_size tokens (T need not divide). Memory: O(T/C * D) states.

    Per one-channel chunk, fast (factored, O(C)) where its decay range -G_last is below
    ``_decay.FAST_BOUND[dtype]``, exact ([C, C] segment-sum mask, O(C^2)) elsewhere:
    1. intra-chunk: o_t = sum_{s<=t in chunk} exp(G_t - G_s) x_s
       fast: exp(G_t) * cumsum_s(exp(-G_s) x_s);  exact: exp(segsum(g)) @ x
    2. chunk states: U_n = the intra-chunk output at the chunk's last token
    3. carry: h_n = exp(sum of the chunk's g) h_{n-1} + U_n, one loop over chunks
    4. output: intra + exp(g_first + .. + g_t) h_{n-1}
    """
    return chunked_forward(x, g, initial_state=initial_state, chunk_size=chunk_size)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(x, g, do, dht, *, initial_state, chunk_size):
    """Backward of the chunkwise form (see ``chunked_vjp``). Keeps only per-chunk states
    (O(T/C * D)); fast chunks use reverse cumulative sums, exact chunks their [C, C] mask."""
    return chunked_vjp(x, g, do=do, dht=dht, initial_state=initial_state, chunk_size=chunk_size)


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs: x ~ N(0, 1); g from the decay regime (per channel and step)."""
    B, T, D = (dims[name] for name in "BTD")
    return {
        "x": _regimes.normal(rng, (B, T, D), dtype),
        "g": _regimes.log_decay(rng, (B, T, D), regime, dtype),
    }
