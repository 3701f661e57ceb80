r"""gated_delta_rule: the delta rule with a scalar decay per head and step (Gated DeltaNet).

Recurrence (one batch element, one value head; decay first, then the delta step):

    S'_t = exp(g_t) S_{t-1}
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T  =  exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t  = scale * S_t^T q_t                                       (inclusive read)

Glossary
    symbol   argument   shape            paper (Yang et al., Gated DeltaNet)   fla (chunk_gated_delta_rule)
    q_t      q          [B, T, H, K]     q_t                                   q
    k_t      k          [B, T, H, K]     k_t (unit norm)                       k
    v_t      v          [B, T, HV, V]    v_t                                   v
    g_t      g          [B, T, HV]       log alpha_t                           g
    beta_t   beta       [B, T, HV]       beta_t                                beta
    S_t      state      [N, HV, K, V]    S_t (stored transposed)               initial_state / final_state
    scale    scale      float            1/sqrt(d_k)                           scale (default K^-1/2)
Grouped heads: value head j reads q/k head j // (HV / H) (the form wrappers repeat q and k).

Options (as in fla)
    use_qk_l2norm_in_kernel=False: q and k are replaced by x / sqrt(sum(x^2) + 1e-6) inside the
        op (its gradient included).
    beta_activation="none": beta is the write strength itself and must lie in [0, 2] (an
        InputError otherwise); "sigmoid": beta holds raw logits and sigmoid(beta) is used (its
        gradient included), fla's usual pre-processing.

Stability (numerics.md hazard 8): the eigenvalues of I - beta k k^T are 1 and 1 - beta |k|^2, so
a step never expands the state when |k| = 1 and beta in [0, 2]. Keys should be unit norm (or use
``use_qk_l2norm_in_kernel=True``) and beta in (0, 2); with raw keys the state, and the UT matrix
of the chunkwise form, can grow exponentially.

The delta family (delta_rule, gated_delta_rule, kda, delta_product) shares the input maps
defined here (``prepare`` / ``pull_back``: the l2 norm of q and k, the activation of beta).
The loop on mapped inputs (``recurrence``, ``recurrence_step``, ``recurrence_vjp``) is also
delta_rule's, run with g = 0; kda keeps a loop of its own (so that their identity compares two
independent loops), and delta_product's quadratic forms run this op's forms on its expanded
sequence of sub-steps. The UT/WY chunk machinery of the parallel and chunkwise forms is
``linrec_ref._delta``.

Forms (the quadratic and chunkwise forms derived in ``linrec_ref._delta`` from the recurrence)
    recurrent  the loop above (ground truth); O(K V) memory per head.
    parallel   the quadratic form through the UT transform over the whole sequence:
               A = I + tril(diag(beta) (K K^T * D), -1), D[t, s] = exp(g_{s+1} + .. + g_t),
               Delta = A^{-1} diag(beta) (V - (Gamma * K) S_0),  Gamma_t = exp(g_1 + .. + g_t),
               o = scale [(Gamma * Q) S_0 + (Q K^T * D) Delta].
    chunkwise  the same inside chunks of C tokens (one triangular solve per chunk), the state
               carried as S_end = P S_in + K_end^T u, P = Gamma_C I - K_end^T w the WY form of the
               chunk's product of transitions. ``chunk_intermediates`` exposes S_in, T_mat, w, u.
    step       one token of the recurrence (decoding).
    attention_matrix  M = scale (Q K^T * D) A^{-1} diag(beta), o = M v when S_0 = 0.

Gradients (hand-written): recurrent_vjp is the direct adjoint (per step: dS' = dS_t + k dr^T with
dr = -beta (k^T dS_t), dg_t = <dS', S'>, dS_{t-1} = exp(g_t) dS'); parallel_vjp and chunkwise_vjp
go through the triangular solve (dR = A^{-T} dDelta, dA = -dR Delta^T) and get dg from the
gradients of the segment sums, reverse-summed inside each chunk. See ``linrec_ref._delta``.

Peers: fla ``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule`` (same argument names
and options; fla applies beta after its own sigmoid in the model layer, i.e. pass
beta_activation="none" with fla's post-sigmoid beta).

References: Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
2024; Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
2024 (UT/WY chunkwise form); Schlag et al., "Linear Transformers Are Secretly Fast Weight
Programmers", 2021.
"""
from __future__ import annotations

import numpy as np

from .. import _delta, _regimes
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import reverse_steps, sigmoid
from .._spec import Arg, OpSpec
from .._validation import InputError

_OPTIONS = {"use_qk_l2norm_in_kernel": False, "beta_activation": "none"}
BETA_ACTIVATIONS = ("none", "sigmoid")
BETA_REGIMES = {
    "beta_extremes": "beta per token from {1e-3, 0.5, 1, 1.9} (post-activation), typical decays",
}
L2NORM_EPS = 1e-6

SPEC = OpSpec(
    name="gated_delta_rule",
    family="delta rule (Gated DeltaNet)",
    transition="rank-1 Householder",
    math="S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T;  o_t = scale S_t^T q_t",
    inputs=(Arg("q", "B T H K"), Arg("k", "B T H K"), Arg("v", "B T HV V"),
            Arg("g", "B T HV", log_gate=True), Arg("beta", "B T HV")),
    output="B T HV V",
    state=(Arg("state", "N HV K V"),),
    default_scale=lambda dims: dims["K"] ** -0.5,
    peers=("fla.ops.gated_delta_rule.chunk_gated_delta_rule",
           "fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule"),
    regimes=tuple(_regimes.DECAY_REGIMES) + tuple(BETA_REGIMES),
    default_dims={"B": 2, "H": 1, "HV": 2, "K": 8, "V": 6},
    options=dict(_OPTIONS),
    variants={"default": {},
              "l2norm_sigmoid": {"use_qk_l2norm_in_kernel": True, "beta_activation": "sigmoid"}},
)


# ----------------------------------------------------------------------------- recurrent
# The loop on mapped inputs (q, k after the l2 norm if asked for, beta after its activation),
# shared by the family: delta_rule calls it with g = 0 (exp(0) = 1 exactly).
def _advance(k, v, g, beta):
    """One step S_{t-1} -> S_t as a function of (S, t). k: [B, T, H, K]; v: [B, T, H, V]."""
    a = np.exp(g)                                                   # [B, T, H]

    def advance(S, t):
        S_dec = a[:, t, :, None, None] * S                          # [B, H, K, V]  S'
        read = (k[:, t, :, None, :] @ S_dec)[:, :, 0, :]            # [B, H, V]     S'^T k
        delta = beta[:, t, :, None] * (v[:, t] - read)              # [B, H, V]
        return S_dec + k[:, t, :, :, None] * delta[:, :, None, :]   # [B, H, K, V]

    return advance


def recurrence(q, k, v, g, beta, scale, initial_state):
    """The loop over t on mapped inputs. q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]."""
    advance = _advance(k, v, g, beta)
    S = initial_state                                               # [B, H, K, V]
    o = np.empty(v.shape, dtype=v.dtype)                            # [B, T, H, V]
    for t in range(q.shape[1]):
        S = advance(S, t)
        o[:, t] = scale * (q[:, t, :, None, :] @ S)[:, :, 0, :]     # [B, H, V]
    return o, S


def recurrence_step(q, k, v, g, beta, state, scale):
    """One token on mapped inputs: q, k: [B, H, K]; v: [B, H, V]; g, beta: [B, H];
    state: [B, H, K, V]."""
    S_dec = np.exp(g)[:, :, None, None] * state                     # [B, H, K, V]
    read = (k[:, :, None, :] @ S_dec)[:, :, 0, :]                   # [B, H, V]
    delta = beta[:, :, None] * (v - read)                           # [B, H, V]
    S = S_dec + k[:, :, :, None] * delta[:, :, None, :]             # [B, H, K, V]
    o = scale * (q[:, :, None, :] @ S)[:, :, 0, :]                  # [B, H, V]
    return o, S


def recurrence_vjp(q, k, v, g, beta, do, dht, scale, initial_state):
    """Direct adjoint of ``recurrence``, walking t = T-1 .. 0 (ground-truth backward).

    Per step, with S' = a S_{t-1}, r = S'^T k, delta = beta (v - r), S_t = S' + k delta^T:
        dS_t += scale q_t do_t^T;  dq_t = scale S_t do_t
        dk_t = dS_t delta + S' dr,   ddelta = dS_t^T k,   dr = -beta ddelta
        dbeta_t = ddelta . (v - r),  dv_t = beta ddelta
        dS' = dS_t + k dr^T,   dg_t = <dS', S'>,   dS_{t-1} = a_t dS'.
    Gradients with respect to the mapped q, k, beta (``pull_back`` maps them back).
    Memory: states are recomputed from checkpoints (``_scan.reverse_steps``), never all T kept.
    """
    a = np.exp(g)                                                   # [B, T, H]
    dq, dk, dv, dbeta, dg = (np.zeros_like(x) for x in (q, k, v, beta, g))
    dS = dht.copy()                                                 # [B, H, K, V]
    for t, S_prev, S_t in reverse_steps(_advance(k, v, g, beta), initial_state, q.shape[1]):
        kt, bt = k[:, t], beta[:, t, :, None]                       # [B, H, K], [B, H, 1]
        dS = dS + scale * q[:, t, :, :, None] * do[:, t, :, None, :]   # read of S_t
        dq[:, t] = scale * (S_t @ do[:, t, :, :, None])[..., 0]        # [B, H, K]
        S_dec = a[:, t, :, None, None] * S_prev                        # [B, H, K, V]
        resid = v[:, t] - (kt[:, :, None, :] @ S_dec)[:, :, 0, :]      # [B, H, V]  v - r
        delta = bt * resid                                             # [B, H, V]
        ddelta = (kt[:, :, None, :] @ dS)[:, :, 0, :]                  # [B, H, V]
        dr = -bt * ddelta                                              # [B, H, V]
        dbeta[:, t] = np.sum(ddelta * resid, axis=-1)                  # [B, H]
        dv[:, t] = bt * ddelta
        dk[:, t] = (dS @ delta[..., None])[..., 0] + (S_dec @ dr[..., None])[..., 0]
        dS_dec = dS + kt[..., None] * dr[:, :, None, :]                # [B, H, K, V]
        dg[:, t] = np.sum(dS_dec * S_dec, axis=(-2, -1))               # a <dS', S_{t-1}>
        dS = a[:, t, :, None, None] * dS_dec                           # to S_{t-1}
    return {"q": dq, "k": dk, "v": dv, "beta": dbeta, "g": dg, "initial_state": dS}


@forward_form(SPEC)
def recurrent(q, k, v, g, beta, *, scale, initial_state, **opts):
    """The definition: a loop over t. q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return recurrence(q, k, v, g, beta, scale, initial_state)


@step_form(SPEC)
def step(q, k, v, g, beta, *, state, scale, **opts):
    """One token: q, k: [B, H, K]; v: [B, H, V]; g, beta: [B, H]; state: [B, H, K, V]."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return recurrence_step(q, k, v, g, beta, state, scale)


@vjp_form(SPEC)
def recurrent_vjp(q, k, v, g, beta, do, dht, *, scale, initial_state, **opts):
    """Direct adjoint of the loop (ground truth); checkpointed reverse walk, never all T states."""
    qm, km, bm = prepare(SPEC.name, q, k, beta, opts)
    grads = recurrence_vjp(qm, km, v, g, bm, do, dht, scale, initial_state)
    return pull_back(q, k, beta, grads, opts)


# ----------------------------------------------------------------------------- UT/WY forms
@forward_form(SPEC)
def parallel(q, k, v, g, beta, *, scale, initial_state, **opts):
    """The UT-transform quadratic form over the whole sequence (one chunk of length T)."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return _delta.chunkwise(q, k, v, beta, g, scale, initial_state, max(q.shape[1], 1))


@forward_form(SPEC, chunked=True)
def chunkwise(q, k, v, g, beta, *, scale, initial_state, chunk_size, **opts):
    """Chunks of C = chunk_size tokens, one triangular solve each (steps in ``_delta.chunkwise``)."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return _delta.chunkwise(q, k, v, beta, g, scale, initial_state, chunk_size)


@matrix_form(SPEC, names=("q", "k", "g", "beta"))
def attention_matrix(q, k, g, beta, *, scale, **opts):
    """M = scale (Q K^T * D) A^{-1} diag(beta): [B, HV, T, T]; o = M v when the initial state is 0."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return _delta.attention_matrix(q, k, beta, g, scale)


@vjp_form(SPEC)
def parallel_vjp(q, k, v, g, beta, do, dht, *, scale, initial_state, **opts):
    """Backward of the parallel form, through the triangular solve over the whole sequence."""
    qm, km, bm = prepare(SPEC.name, q, k, beta, opts)
    grads = _delta.chunkwise_vjp(qm, km, v, bm, g, do, dht, scale, initial_state,
                                 max(q.shape[1], 1))
    return pull_back(q, k, beta, grads, opts)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(q, k, v, g, beta, do, dht, *, scale, initial_state, chunk_size, **opts):
    """Backward of the chunkwise form (per-chunk states only, O(T/C K V) per head)."""
    qm, km, bm = prepare(SPEC.name, q, k, beta, opts)
    grads = _delta.chunkwise_vjp(qm, km, v, bm, g, do, dht, scale, initial_state, chunk_size)
    return pull_back(q, k, beta, grads, opts)


def chunk_intermediates(q, k, v, g, beta, *, initial_state=None, chunk_size=64,
                        use_qk_l2norm_in_kernel=False, beta_activation="none"):
    """Per-chunk intermediates of the chunkwise form, for kernel writers (no grouped heads, no
    varlen: q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]; H == HV).

    The op's options are applied first (l2 norm of k, sigmoid of beta). Returns the dict of
    ``linrec_ref._delta.chunk_intermediates``: S_in [B, H, N, K, V] (state entering each chunk),
    T_mat [B, H, N, C, C] (A^{-1} diag(beta)), A_inv, w [B, H, N, C, K] (T_mat (Gamma * K)),
    u [B, H, N, C, V] (T_mat V), v_new (u - w S_in), gamma, D, final_state.
    """
    opts = {"use_qk_l2norm_in_kernel": use_qk_l2norm_in_kernel, "beta_activation": beta_activation}
    _, k, beta = prepare(SPEC.name, q, k, beta, opts)
    if initial_state is None:
        initial_state = np.zeros((v.shape[0], v.shape[2], k.shape[3], v.shape[3]), v.dtype)
    return _delta.chunk_intermediates(k, v, beta, g, initial_state, chunk_size)


# ----------------------------------------------------------------------------- input maps
# The options of the delta family, applied before the recurrence (and pulled back after a vjp).
def l2norm(x):
    """x / sqrt(sum(x^2) + 1e-6) over the last axis (the fla convention)."""
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def l2norm_vjp(x, dy):
    """Gradient of ``l2norm`` at x: dx = (dy - y (y . dy)) / n with n = sqrt(|x|^2 + eps)."""
    n = np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)
    y = x / n
    return (dy - y * np.sum(y * dy, axis=-1, keepdims=True)) / n


def _check_options(op, use_qk_l2norm_in_kernel, beta_activation):
    if not isinstance(use_qk_l2norm_in_kernel, (bool, np.bool_)):
        raise TypeError(f"{op}: option 'use_qk_l2norm_in_kernel' must be True or False, "
                        f"got {use_qk_l2norm_in_kernel!r}")
    if beta_activation not in BETA_ACTIVATIONS:
        raise InputError(f"{op}: option 'beta_activation' must be one of {BETA_ACTIVATIONS} ('none': "
                         f"beta is the write strength in [0, 2]; 'sigmoid': raw logits), got {beta_activation!r}")


def prepare(op, q, k, beta, opts):
    """The op's input maps: (q, k, beta) -> (q', k', beta') as the recurrence uses them.

    opts: the op's options (use_qk_l2norm_in_kernel, beta_activation). Checks them, and with
    beta_activation="none" that beta lies in [0, 2]; op names the op in the errors.
    """
    beta_activation = opts["beta_activation"]
    _check_options(op, opts["use_qk_l2norm_in_kernel"], beta_activation)
    if beta_activation == "none":
        bad = (beta < 0) | (beta > 2)
        if bad.any():
            i = tuple(int(j) for j in np.unravel_index(int(np.argmax(bad)), bad.shape))
            raise InputError(
                f"{op}: argument 'beta' must lie in [0, 2] with beta_activation='none' (beta is the "
                f"write strength after its activation; I - beta k k^T is a contraction for unit keys "
                f"only when 0 <= beta <= 2); got {beta[i]!r} at index {i}. Pass "
                "beta_activation='sigmoid' for raw logits.")
        b = beta
    else:
        b = sigmoid(beta)
    if opts["use_qk_l2norm_in_kernel"]:
        q, k = l2norm(q), l2norm(k)
    return q, k, b


def pull_back(q, k, beta, grads, opts):
    """Pull the gradients w.r.t. the mapped (q', k', beta') back to the raw (q, k, beta), in
    place on grads (a dict with "q", "k", "beta"); q, k, beta are the raw inputs."""
    if opts["use_qk_l2norm_in_kernel"]:
        grads["q"] = l2norm_vjp(q, grads["q"])
        grads["k"] = l2norm_vjp(k, grads["k"])
    if opts["beta_activation"] == "sigmoid":
        b = sigmoid(beta)
        grads["beta"] = grads["beta"] * b * (1 - b)
    return grads


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs: q, v ~ N(0, 1); unit-norm keys and beta in [0, 2] for "default",
    raw keys and beta logits for "l2norm_sigmoid"; g from the decay regime ("beta_extremes":
    typical decays, beta from {1e-3, 0.5, 1, 1.9})."""
    return family_inputs(rng, regime, dims, dtype, variant, gated=True)


def family_inputs(rng, regime, dims, dtype, variant, gated, per_channel=False):
    """Valid random inputs for delta_rule, gated_delta_rule and kda (their ``make_inputs``).

    q, v ~ N(0, 1). Variant "default": keys exactly unit norm and beta post-activation
    (U(0.01, 0.99), or from {1e-3, 0.5, 1, 1.9} in "beta_extremes"; 1e-3 stands for 0 because
    finite differences of beta = 0 would step outside the valid range [0, 2], and beta = 0
    exactly is covered by the ops' own tests); any other variant (the in-op l2 norm
    and sigmoid): raw N(0, 1) keys and raw beta logits (N(0, 2^2), or from {-20, 0, 20, N(0,1)}
    in "beta_extremes"). dims["HV"] (default H) must be a multiple of dims["H"].
    gated: add g from the decay regime, [B, T, HV] or, with per_channel (kda), [B, T, HV, K]
    (in "hard_reset" also with single (t, channel) resets, ``_regimes.log_decay_per_channel``).
    """
    B, T, H, K, V = (dims[name] for name in "BTHKV")
    HV = dims.get("HV", H)
    if HV % H:
        raise ValueError(f"make_inputs: HV={HV} value heads is not a multiple of H={H}; pass HV as well")
    raw = variant != "default"
    q = _regimes.normal(rng, (B, T, H, K), np.float64)
    k = _regimes.normal(rng, (B, T, H, K), np.float64)
    if not raw:
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)          # unit-norm keys
    if regime == "beta_extremes":
        values = (-20.0, 0.0, 20.0) if raw else (1e-3, 0.5, 1.0, 1.9)
        beta = rng.choice(np.array(values), size=(B, T, HV))
        if raw:
            beta = np.where(rng.uniform(size=beta.shape) < 0.25, rng.standard_normal(beta.shape), beta)
    else:
        beta = 2.0 * rng.standard_normal((B, T, HV)) if raw else rng.uniform(0.01, 0.99, (B, T, HV))
    x = {"q": q.astype(dtype), "k": k.astype(dtype),
         "v": _regimes.normal(rng, (B, T, HV, V), dtype), "beta": beta.astype(dtype)}
    if gated:
        decay_regime = "typical" if regime in BETA_REGIMES else regime
        if per_channel:
            x["g"] = _regimes.log_decay_per_channel(rng, (B, T, HV, K), decay_regime, dtype)
        else:
            x["g"] = _regimes.log_decay(rng, (B, T, HV), decay_regime, np.float64).astype(dtype)
    return x
