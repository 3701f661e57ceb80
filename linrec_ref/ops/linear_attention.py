r"""linear_attention: causal linear attention, the recurrence with no transition (no decay).

Recurrence (one batch element, one head; inclusive read, the state after step t):

    S_t = S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t                                    (normalize=False, the default)

With ``normalize=True`` the read is divided by the running key sum z_t:

    z_t = z_{t-1} + k_t                                         (z_t = z_0 + k_1 + ... + k_t)
    o_t = (scale * S_t^T q_t) / (scale * q_t . z_t) = (S_t^T q_t) / (q_t . z_t)

so ``scale`` cancels and has no effect when normalize=True. The state is then the tuple
(S, z): carrying z is what makes splitting a sequence and carrying the final state exact.

Glossary
    symbol   argument          shape          paper (Katharopoulos et al.)   fla (chunk_linear_attn)
    q_t      q                 [B, T, H, K]   phi(Q_i)                      q
    k_t      k                 [B, T, H, K]   phi(K_j)                      k
    v_t      v                 [B, T, H, V]   V_j                           v
    S_t      state / S         [B, H, K, V]   S_i                           final_state
    z_t      z (normalize)     [B, H, K]      Z_i                           (not carried, see Peers)
    scale    scale             float          1 (no scale in the paper)     scale (default K^-1/2)
The feature map phi is not part of the op: pass q and k after it.

Forms
    recurrent  the loop above (ground truth); O(K V) memory per head.
    parallel   o = (scale * (Q K^T) * L) V + scale * Q S_0, L the causal (lower-triangular) mask.
    chunkwise  chunks of C tokens: the parallel form inside a chunk, S carried across chunks.
    step       one token of the recurrence (decoding).
With normalize=True, parallel and chunkwise compute numerator and denominator together: z_t is
the state of the same recurrence with a value column of ones (z_t = sum_j k_j * 1), so the
numerator and q_t . z_t are the V+1 columns of the plain op on [v, 1] with state [S, z] and
scale 1; the recurrent form and its backward carry z explicitly instead (a separate path).

The normaliser has no eps: the reference computes the exact ratio. Near a zero denominator the
output is ill-conditioned (relative condition number about |q_t| |z_t| / |q_t . z_t|), and an
exactly zero q_t . z_t raises InputError instead of returning Inf/NaN. Use positive feature maps
(e.g. elu(x) + 1 or exp) for q and k, which keep q_t . z_t > 0 when z_0 >= 0.
A consequence of the exact ratio: with S_0 = 0 and z_0 = 0 the first output is o_1 = v_1 for
any q_1, k_1, so its gradients through q_1 and k_1 are exactly 0 mathematically (every form
returns rounding-level values, ~1e-16, for them).

Gradients (hand-written vector-Jacobian products; the adjoint runs backwards in time):
    normalize=False:
        dS_t = dS_{t+1} + scale q_t do_t^T,   dS_T starts from the final-state cotangent dht
        dq_t = scale S_t do_t,  dk_t = dS_t v_t,  dv_t = dS_t^T k_t,  dS_0 = dS_1.
    normalize=True, with n_t = S_t^T q_t, d_t = q_t . z_t, o_t = n_t / d_t:
        dn_t = do_t / d_t,   dd_t = -(do_t . o_t) / d_t
        dS_t = dS_{t+1} + q_t dn_t^T,    dz_t = dz_{t+1} + dd_t q_t   (from dht = (dS_T, dz_T))
        dq_t = S_t dn_t + dd_t z_t,  dk_t = dS_t v_t + dz_t,  dv_t = dS_t^T k_t,
        d(S_0, z_0) = (dS_1, dz_1).

Peers: fla ``fused_recurrent_linear_attn`` and ``chunk_linear_attn`` (``normalize=True``). fla's
normaliser divides by q_t . (k_1 + ... + k_t) over the keys of the current call only (plus an eps
of 1e-10), ignoring any initial state; here z is part of the state so split-and-carry holds.
With z_0 = 0 and one unsplit call the two agree (up to fla's eps).

References: Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers with
Linear Attention", 2020; Yang et al., "Gated Linear Attention Transformers with
Hardware-Efficient Training", 2024 (chunkwise form).
"""
from __future__ import annotations

import numpy as np

from .. import _regimes
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import from_chunks, reverse_cumsum, reverse_steps, to_chunks
from .._spec import Arg, OpSpec
from .._validation import InputError

OP = "linear_attention"
PLAIN_STATE = (Arg("state", "NHKV"),)
NORMALIZED_STATE = (Arg("S", "NHKV"), Arg("z", "NHK"))


def _check_normalize(normalize) -> bool:
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"{OP}: option 'normalize' must be True or False, got {normalize!r} "
                        f"({type(normalize).__name__})")
    return bool(normalize)


def _state_parts(options: dict):
    """The state: S alone, or (S, z) with the normaliser (z is the running key sum)."""
    return NORMALIZED_STATE if _check_normalize(options["normalize"]) else PLAIN_STATE


SPEC = OpSpec(
    name=OP,
    family="linear attention",
    transition="none",
    math="S_t = S_{t-1} + k_t v_t^T;  o_t = scale S_t^T q_t  (normalize: / scale q_t.z_t, z_t = z_{t-1} + k_t)",
    inputs=(Arg("q", "BTHK"), Arg("k", "BTHK"), Arg("v", "BTHV")),
    output="BTHV",
    state=PLAIN_STATE,
    state_fn=_state_parts,
    default_scale=lambda dims: dims["K"] ** -0.5,
    options={"normalize": False},
    peers=("fla.ops.linear_attn.fused_recurrent_linear_attn",
           "fla.ops.linear_attn.chunk_linear_attn"),
    regimes=("typical",),
    default_dims={"B": 2, "H": 2, "K": 8, "V": 6},
    variants={"default": {}, "normalized": {"normalize": True}},
)


# ----------------------------------------------------------------------------- recurrent
def _advance(k, v, normalize):
    """One step as a function of (state_{t-1}, t), for loops and reverse walks."""

    def advance(state, t):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]              # [B, H, K, V]
        if normalize:
            S, z = state
            return S + kv, z + k[:, t]
        return state + kv

    return advance


def _read(q_t, state, scale, normalize):
    """o_t from q_t [B, H, K] and the state after step t."""
    if normalize:
        S, z = state
        numerator = (q_t[:, :, None, :] @ S)[:, :, 0, :]            # [B, H, V]
        return _divide(numerator, np.sum(q_t * z, axis=-1))         # [B, H, V]
    return scale * (q_t[:, :, None, :] @ state)[:, :, 0, :]         # [B, H, V]


@forward_form(SPEC)
def recurrent(q, k, v, *, scale, initial_state, normalize):
    """The definition: a loop over t. q, k: [B, T, H, K]; v: [B, T, H, V]."""
    advance = _advance(k, v, normalize)
    state = initial_state                                           # [B, H, K, V] (, [B, H, K])
    o = np.empty(v.shape, dtype=v.dtype)                            # [B, T, H, V]
    for t in range(q.shape[1]):
        state = advance(state, t)
        o[:, t] = _read(q[:, t], state, scale, normalize)
    return o, state


@step_form(SPEC)
def step(q, k, v, *, state, scale, normalize):
    """One token: q, k: [B, H, K]; v: [B, H, V]; state: [B, H, K, V] (or (S, z) if normalize)."""
    kv = k[:, :, :, None] * v[:, :, None, :]                        # [B, H, K, V]
    new = (state[0] + kv, state[1] + k) if normalize else state + kv
    return _read(q, new, scale, normalize), new


@vjp_form(SPEC)
def recurrent_vjp(q, k, v, do, dht, *, scale, initial_state, normalize):
    """Backward of the loop, walking t = T-1 .. 0 with the adjoint state (ground truth).

    Memory: states are recomputed from checkpoints (``_scan.reverse_steps``), never all T kept.
    """
    dq, dk, dv = (np.zeros_like(x) for x in (q, k, v))
    dS, dz = (dht[0].copy(), dht[1].copy()) if normalize else (dht.copy(), None)
    for t, _, state in reverse_steps(_advance(k, v, normalize), initial_state, q.shape[1]):
        q_t, do_t = q[:, t], do[:, t]                               # [B, H, K], [B, H, V]
        if normalize:
            S, z = state
            den = np.sum(q_t * z, axis=-1)                          # [B, H]
            o_t = _divide((q_t[:, :, None, :] @ S)[:, :, 0, :], den)  # [B, H, V]
            d_num = do_t / den[..., None]                           # [B, H, V]
            d_den = -np.sum(do_t * o_t, axis=-1) / den              # [B, H]
            dS = dS + q_t[..., :, None] * d_num[..., None, :]       # read of S_t
            dz = dz + d_den[..., None] * q_t                        # read of z_t
            dq[:, t] = (S @ d_num[..., None])[..., 0] + d_den[..., None] * z
            dk[:, t] = (dS @ v[:, t, :, :, None])[..., 0] + dz      # [B, H, K]
        else:
            dS = dS + scale * q_t[..., :, None] * do_t[..., None, :]
            dq[:, t] = scale * (state @ do_t[..., None])[..., 0]   # [B, H, K]
            dk[:, t] = (dS @ v[:, t, :, :, None])[..., 0]           # [B, H, K]
        dv[:, t] = (k[:, t, :, None, :] @ dS)[:, :, 0, :]           # [B, H, V]
        # no transition: the adjoint passes to S_{t-1} unchanged
    return {"q": dq, "k": dk, "v": dv, "initial_state": (dS, dz) if normalize else dS}


# ----------------------------------------------------------------------------- normaliser
def _divide(numerator, denominator):
    """numerator / denominator[..., None], refusing an exact zero denominator (no eps)."""
    zero = denominator == 0
    if zero.any():
        i = tuple(int(j) for j in np.unravel_index(int(np.argmax(zero)), zero.shape))
        raise InputError(
            f"{OP}: normalize=True divides by q_t . z_t, which is exactly 0 at index {i} of the "
            "denominator (shape [B, T, H], or [B, H] for step); the reference has no eps. Use a "
            "positive feature map for q and k (e.g. elu(x) + 1) or normalize=False"
        )
    return numerator / denominator[..., None]


def _with_ones(v):
    """[B, T, H, V] -> [B, T, H, V+1]: a value column of ones, whose state column is z."""
    return np.concatenate([v, np.ones(v.shape[:-1] + (1,), dtype=v.dtype)], axis=-1)


def _join(state):
    """(S [B, H, K, V], z [B, H, K]) -> [B, H, K, V+1]."""
    S, z = state
    return np.concatenate([S, z[..., None]], axis=-1)


def _split(S_aug):
    """[B, H, K, V+1] -> (S [B, H, K, V], z [B, H, K])."""
    return S_aug[..., :-1], S_aug[..., -1]


def _normalized_forward(dense, q, k, v, initial_state, **kw):
    """A plain dense forward on [v, 1] with state [S, z] and scale 1; o = numerator / q.z."""
    o_aug, S_aug = dense(q, k, _with_ones(v), _join(initial_state), scale=1.0, **kw)
    return _divide(o_aug[..., :-1], o_aug[..., -1]), _split(S_aug)


def _normalized_vjp(dense, dense_vjp, q, k, v, do, dht, initial_state, **kw):
    """Backward of _normalized_forward: d_num = do / den, d_den = -(do . o) / den, then the
    plain vjp."""
    v1, h0 = _with_ones(v), _join(initial_state)
    o_aug, _ = dense(q, k, v1, h0, scale=1.0, **kw)
    den = o_aug[..., -1]                                            # [B, T, H]
    o = _divide(o_aug[..., :-1], den)                               # [B, T, H, V]
    d_num = do / den[..., None]                                     # [B, T, H, V]
    d_den = -np.sum(do * o, axis=-1) / den                          # [B, T, H]
    do_aug = np.concatenate([d_num, d_den[..., None]], axis=-1)     # [B, T, H, V+1]
    g = dense_vjp(q, k, v1, do_aug, _join(dht), h0, scale=1.0, **kw)
    return {"q": g["q"], "k": g["k"], "v": g["v"][..., :-1], "initial_state": _split(g["initial_state"])}


# ----------------------------------------------------------------------------- parallel
def _causal_mask(T, dtype):
    """L: [T, T], L[t, s] = 1 for s <= t, else 0."""
    return np.tri(T, T, 0, dtype=dtype)


@matrix_form(SPEC, names=("q", "k"))
def attention_matrix(q, k, *, scale, normalize):
    """M: [B, H, T, T]; the parallel form is o = M V (no initial state).

    normalize=False: M = scale * (Q K^T) * L.  normalize=True: the same rows divided by their
    sums, M[t, s] = (q_t . k_s) / (q_t . (k_1 + ... + k_t)) (each row sums to 1).
    """
    normalize = _check_normalize(normalize)
    qh, kh = np.moveaxis(q, 1, 2), np.moveaxis(k, 1, 2)             # [B, H, T, K]
    P = (qh @ kh.swapaxes(-1, -2)) * _causal_mask(q.shape[1], q.dtype)  # [B, H, T, T]
    if normalize:
        return _divide(P, np.sum(P, axis=-1))
    return scale * P


def _parallel_dense(q, k, v, initial_state, *, scale):
    """Plain (unnormalised) parallel form on dense arrays; returns (o, S_T)."""
    qh, kh, vh = (np.moveaxis(x, 1, 2) for x in (q, k, v))         # [B, H, T, K|V]
    M = scale * (qh @ kh.swapaxes(-1, -2)) * _causal_mask(q.shape[1], q.dtype)  # [B, H, T, T]
    o = M @ vh + scale * (qh @ initial_state)                       # [B, H, T, V]
    S_T = initial_state + kh.swapaxes(-1, -2) @ vh                  # [B, H, K, V]
    return np.moveaxis(o, 2, 1), S_T


def _parallel_vjp_dense(q, k, v, do, dht, initial_state, *, scale):
    """Backward of _parallel_dense: matrix products only."""
    qh, kh, vh, doh = (np.moveaxis(x, 1, 2) for x in (q, k, v, do))  # [B, H, T, .]
    L = _causal_mask(q.shape[1], q.dtype)                           # [T, T]
    M = scale * (qh @ kh.swapaxes(-1, -2)) * L                      # [B, H, T, T]
    dP = scale * (doh @ vh.swapaxes(-1, -2)) * L                    # d/d(Q K^T)
    dq = dP @ kh + scale * (doh @ initial_state.swapaxes(-1, -2))   # [B, H, T, K]
    dk = dP.swapaxes(-1, -2) @ qh + vh @ dht.swapaxes(-1, -2)       # [B, H, T, K]
    dv = M.swapaxes(-1, -2) @ doh + kh @ dht                        # [B, H, T, V]
    dh0 = dht + scale * (qh.swapaxes(-1, -2) @ doh)                 # [B, H, K, V]
    back = lambda x: np.moveaxis(x, 2, 1)                           # [B, H, T, .] -> [B, T, H, .]
    return {"q": back(dq), "k": back(dk), "v": back(dv), "initial_state": dh0}


@forward_form(SPEC)
def parallel(q, k, v, *, scale, initial_state, normalize):
    """o = (scale * (Q K^T) * L) V + scale * Q S_0 (normalised: see the module docstring)."""
    if normalize:
        return _normalized_forward(_parallel_dense, q, k, v, initial_state)
    return _parallel_dense(q, k, v, initial_state, scale=scale)


@vjp_form(SPEC)
def parallel_vjp(q, k, v, do, dht, *, scale, initial_state, normalize):
    """Backward of the parallel form (matrix products; O(T^2) memory per head)."""
    if normalize:
        return _normalized_vjp(_parallel_dense, _parallel_vjp_dense, q, k, v, do, dht, initial_state)
    return _parallel_vjp_dense(q, k, v, do, dht, initial_state, scale=scale)


# ----------------------------------------------------------------------------- chunkwise
def _chunk_parts(q, k, v, initial_state, scale, C):
    """Steps 1-3 of the chunkwise form, shared by forward and backward."""
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(v, C)  # [B, H, N, C, K|V]
    # 1. intra-chunk scores (the parallel form on each chunk)
    M = scale * (qc @ kc.swapaxes(-1, -2)) * _causal_mask(C, q.dtype)  # [B, H, N, C, C]
    # 2. each chunk's own contribution to the state
    U = kc.swapaxes(-1, -2) @ vc                                    # [B, H, N, K, V]
    # 3. carry: S_in[n] = S_0 + U_0 + ... + U_{n-1} (no decay: a running sum over chunks)
    S_in = np.cumsum(np.concatenate([initial_state[:, :, None], U[:, :, :-1]], axis=2), axis=2)
    S_T = S_in[:, :, -1] + U[:, :, -1]                              # [B, H, K, V]
    return qc, kc, vc, M, S_in, S_T


def _chunkwise_dense(q, k, v, initial_state, *, scale, chunk_size):
    qc, _, vc, M, S_in, S_T = _chunk_parts(q, k, v, initial_state, scale, chunk_size)
    o = M @ vc + scale * (qc @ S_in)                                # 4. [B, H, N, C, V]
    return from_chunks(o, q.shape[1]), S_T


def _chunkwise_vjp_dense(q, k, v, do, dht, initial_state, *, scale, chunk_size):
    T, C = q.shape[1], chunk_size
    qc, kc, vc, M, S_in, _ = _chunk_parts(q, k, v, initial_state, scale, C)
    doc = to_chunks(do, C)                                          # [B, H, N, C, V]
    # 2. dS_end[n] = dht + sum_{m > n} scale Q_m^T dO_m: a reverse running sum over chunks
    local = scale * (qc.swapaxes(-1, -2) @ doc)                     # [B, H, N, K, V]
    dS_end = reverse_cumsum(np.concatenate([local[:, :, 1:], dht[:, :, None]], axis=2), axis=2)
    dh0 = dS_end[:, :, 0] + local[:, :, 0]                          # [B, H, K, V]
    # 3. intra-chunk gradients plus the terms through S_in and the chunk end
    dP = scale * (doc @ vc.swapaxes(-1, -2)) * _causal_mask(C, q.dtype)  # [B, H, N, C, C]
    dq = dP @ kc + scale * (doc @ S_in.swapaxes(-1, -2))           # [B, H, N, C, K]
    dk = dP.swapaxes(-1, -2) @ qc + vc @ dS_end.swapaxes(-1, -2)   # [B, H, N, C, K]
    dv = M.swapaxes(-1, -2) @ doc + kc @ dS_end                    # [B, H, N, C, V]
    return {"q": from_chunks(dq, T), "k": from_chunks(dk, T), "v": from_chunks(dv, T),
            "initial_state": dh0}


@forward_form(SPEC, chunked=True)
def chunkwise(q, k, v, *, scale, initial_state, chunk_size, normalize):
    """Chunks of C = chunk_size tokens (T need not divide). Memory: O(T/C * K V) per head.

    1. intra-chunk: (scale Q K^T * L) V on each chunk
    2. chunk states: U_n = K_n^T V_n
    3. carry: S_in[n] = S_0 + U_0 + ... + U_{n-1}
    4. output: intra + scale * Q_n S_in[n]
    With normalize=True the same steps run on [v, 1] and state [S, z] (module docstring).
    """
    if normalize:
        return _normalized_forward(_chunkwise_dense, q, k, v, initial_state, chunk_size=chunk_size)
    return _chunkwise_dense(q, k, v, initial_state, scale=scale, chunk_size=chunk_size)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(q, k, v, do, dht, *, scale, initial_state, chunk_size, normalize):
    """Backward of the chunkwise form; keeps only per-chunk states (O(T/C * K V) per head).

    1. recompute the chunk states S_in (forward steps 1-3)
    2. dS_end[n], the cotangent of the state after chunk n: dht plus the later chunks' reads
    3. intra-chunk gradients by matrix products, plus the terms through S_in and dS_end
    """
    if normalize:
        return _normalized_vjp(_chunkwise_dense, _chunkwise_vjp_dense, q, k, v, do, dht,
                               initial_state, chunk_size=chunk_size)
    return _chunkwise_vjp_dense(q, k, v, do, dht, initial_state, scale=scale, chunk_size=chunk_size)


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs. default: q, k, v ~ N(0, 1) (signed).

    normalized: q = exp(x), k = exp(y) with x, y ~ N(0, 0.5^2), a positive feature map, so the
    denominator q_t . z_t stays away from 0 (numerics.md, hazard 7); v ~ N(0, 1).
    No decay regimes apply (the op has no gate); regime is "typical".
    """
    B, T, H, K, V = (dims[name] for name in "BTHKV")
    if variant == "normalized":
        q = np.exp(0.5 * rng.standard_normal((B, T, H, K))).astype(dtype)
        k = np.exp(0.5 * rng.standard_normal((B, T, H, K))).astype(dtype)
    else:
        q = _regimes.normal(rng, (B, T, H, K), dtype)
        k = _regimes.normal(rng, (B, T, H, K), dtype)
    return {"q": q, "k": k, "v": _regimes.normal(rng, (B, T, H, V), dtype)}
