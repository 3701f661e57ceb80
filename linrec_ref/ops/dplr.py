r"""dplr: diagonal plus low rank, the generalised delta rule (the state-update family of RWKV-7).

Recurrence (one batch element, one head; the low-rank term reads the UNDECAYED S_{t-1}):

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
        = (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t                                         (inclusive read)

Order of the update (recurrences.md section 2, "correct from the undecayed state"): a_t^T S_{t-1}
is read before the decay is applied. This differs from decay-then-correct (KDA, Gated DeltaNet),
which read diag(e^{w_t}) S_{t-1}; the identity below maps one onto the other.

Glossary
    symbol    argument   shape          paper (generalised delta rule)    fla (chunk_dplr_delta_rule)
    q_t       q          [B, T, H, K]   q_t                               q
    k_t       k          [B, T, H, K]   k_t                               k
    v_t       v          [B, T, HV, V]  v_t                               v
    a_t       a          [B, T, HV, K]  the read vector ("alpha" in fla's  a
                                        naive dplr_recurrence)
    b_t       b          [B, T, HV, K]  the write vector ("beta" there)   b
    w_t       w          [B, T, HV, K]  log of the per-channel decay      gk
                                        (<= 0; -inf is a hard reset of
                                        the diagonal part only)
    S_t       state      [N, HV, K, V]  S_t (stored K x V)                initial_state / final_state
    scale     scale      float          1/sqrt(d_k)                       scale (default K^-1/2)
Grouped heads: q and k have H heads, shared by HV / H value heads (value head j reads q/k head
j // (HV / H)); v, a, b, w and the state have HV heads, as g and beta do in the delta family, so
that the mapping onto kda holds head by head. HV = H is the plain case (fla's layout).

Forms (derived in ``linrec_ref._dplr`` from the recurrence; see its docstring for the equations)
    recurrent  the loop above (ground truth); O(K V) memory per head.
    parallel   the chunkwise form with ONE chunk of length T: with a state-dependent transition
               the quadratic form is the UT/WY form, (I - Wab) X = (A * e^{G_{t-1}}) S_0 + Wak V
               for the low-rank reads x_t = a_t^T S_{t-1}, then
               O = scale [(Q * e^{G}) S_0 + Wqk V + Wqb X]; O(T^2 K) memory.
    chunkwise  the same inside chunks of C tokens, one triangular solve per chunk, the state
               carried as S_end = P S_in + U; ``chunk_intermediates`` exposes S_in, the solved
               matrix A_inv = (I - Wab)^{-1}, the scores, the WY factors and P, U per chunk.
               Per-channel decays through ``linrec_ref._decay`` (factored where the chunk's decay
               range allows, exact segment sums elsewhere; never exp of a positive number).
    step       one token of the recurrence (decoding).
    attention_matrix(q, k, a, b, w)  M = scale (Wqk + Wqb (I - Wab)^{-1} Wak): o = M v when S_0 = 0.

Gradients (hand-written). recurrent_vjp is the direct adjoint (dS_t the cotangent of S_t):
    dS_t += scale q_t do_t^T,  dq_t = scale S_t do_t,  dx_t = dS_t^T b_t,  x_t = a_t^T S_{t-1}
    dk_t = dS_t v_t,  dv_t = dS_t^T k_t,  db_t = dS_t x_t,  da_t = S_{t-1} dx_t
    dw_t = exp(w_t) * rowsum(dS_t * S_{t-1}),  dS_{t-1} = diag(exp(w_t)) dS_t + a_t dx_t^T,
walking t backwards with ``_scan.reverse_steps`` (checkpointed: never all T states).
parallel_vjp and chunkwise_vjp go through the triangular solve (dR = A_inv^T dX, dWab = dR X^T)
and get dw from the gate identity dL/dG_u = q_u.dq_u + a_{u+1}.da_{u+1} - k_u.dk_u - b_u.db_u
(+ the end-state term), reverse-summed inside each chunk and exactly 0 at w = -inf.

Identity (recurrences.md section 4): dplr(q, k, beta*v, a=-exp(g)*k, b=beta*k, w=g) is KDA,
S' = diag(e^{g_t}) S_{t-1};  S_t = S' + beta_t k_t (v_t - S'^T k_t)^T.

Stability: diag(e^w) + b a^T has no norm bound by itself. ``make_inputs`` draws RWKV-7-structured
inputs (a = -kappa, b = beta_t c * kappa, |kappa| = 1, c in [0.2, 1]^K fixed per head,
beta_t in [0, 1]) for which every transition contracts in a fixed weighted norm (see ``_dplr``).

Peers: fla ``chunk_dplr_delta_rule(q, k, v, a, b, gk, scale=None, initial_state=None,
output_final_state=False, cu_seqlens=None)`` and ``fused_recurrent_dplr_delta_rule`` (same order);
fla's naive ``dplr_recurrence`` reads (S * alpha).sum over K from the state before the decay, the
convention here. Checked against fla's source (argument order q, k, v, a, b, gk); not run.

References: Peng et al., "RWKV-7 'Goose' with Expressive Dynamic State Evolution", 2025;
Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence Length", 2024
(UT/WY chunkwise form); fla's generalized_delta_rule/dplr.
"""
from __future__ import annotations

import numpy as np

from .. import _dplr, _regimes
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._spec import Arg, OpSpec



SPEC = OpSpec(
    name="dplr",
    family="diagonal plus low rank (generalised delta rule)",
    transition="diagonal plus low rank",
    math="S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T;  o_t = scale S_t^T q_t",
    # grouped heads as in the delta family: q, k shared by HV / H value heads; v, the
    # transition (a, b, w) and the state per value head (so that dplr-as-kda holds per head)
    inputs=(Arg("q", "B T H K"), Arg("k", "B T H K"), Arg("v", "B T HV V"), Arg("a", "B T HV K"),
            Arg("b", "B T HV K"), Arg("w", "B T HV K", log_gate=True)),
    output="B T HV V",
    state=(Arg("state", "N HV K V"),),
    default_scale=lambda dims: dims["K"] ** -0.5,
    peers=("fla.ops.generalized_delta_rule.chunk_dplr_delta_rule (q, k, v, a, b, gk=w)",
           "fla.ops.generalized_delta_rule.fused_recurrent_dplr_delta_rule (q, k, v, a, b, gk=w)"),
    regimes=tuple(_regimes.DECAY_REGIMES),
    default_dims={"B": 2, "H": 1, "HV": 2, "K": 8, "V": 6},
)


@forward_form(SPEC)
def recurrent(q, k, v, a, b, w, *, scale, initial_state):
    """The definition: a loop over t. q, k, a, b, w: [B, T, H, K]; v: [B, T, H, V]."""
    return _dplr.recurrent(q, k, v, a, b, w, scale=scale, initial_state=initial_state)


@step_form(SPEC)
def step(q, k, v, a, b, w, *, state, scale):
    """One token: q, k, a, b, w: [B, H, K]; v: [B, H, V]; state: [B, H, K, V]."""
    return _dplr.step(q, k, v, a, b, w, state=state, scale=scale)


@vjp_form(SPEC)
def recurrent_vjp(q, k, v, a, b, w, do, dht, *, scale, initial_state):
    """Direct adjoint of the loop (ground truth), checkpointed reverse walk (``_dplr``)."""
    return _dplr.recurrent_vjp(q, k, v, a, b, w, do=do, dht=dht, scale=scale,
                               initial_state=initial_state)


@forward_form(SPEC)
def parallel(q, k, v, a, b, w, *, scale, initial_state):
    """The quadratic form: the chunkwise form with one chunk of length T (one T x T solve)."""
    return _dplr.chunked_forward(q, k, v, a, b, w, scale=scale, initial_state=initial_state,
                                 chunk_size=q.shape[1])


@vjp_form(SPEC)
def parallel_vjp(q, k, v, a, b, w, do, dht, *, scale, initial_state):
    """Backward of the parallel form (through the T x T solve, gate identity for dw)."""
    return _dplr.chunked_vjp(q, k, v, a, b, w, do=do, dht=dht, scale=scale,
                             initial_state=initial_state, chunk_size=q.shape[1])


@matrix_form(SPEC, names=("q", "k", "a", "b", "w"))
def attention_matrix(q, k, a, b, w, *, scale):
    """M = scale (Wqk + Wqb (I - Wab)^{-1} Wak): [B, H, T, T]; o = M v when S_0 = 0."""
    return _dplr.attention_matrix(q, k, a, b, w, scale=scale)


@forward_form(SPEC, chunked=True)
def chunkwise(q, k, v, a, b, w, *, scale, initial_state, chunk_size):
    """Chunks of C = chunk_size tokens (T need not divide). Memory: O(T/C * K V) per head.

    1. decayed scores Wqk, Wqb (s <= t) and Wak, Wab (s < t) per chunk
    2. the solve A_inv = (I - Wab)^{-1}
    3. WY factors u = A_inv Wak V, W = A_inv (A * e^{G_{t-1}}); P = diag(e^{G_C}) + B_end^T W,
       U = K_end^T V + B_end^T u
    4. carry S_end = P S_in + U, one loop over chunks
    5. low-rank reads X = u + W S_in;  6. O = scale [(Q * e^{G}) S_in + Wqk V + Wqb X]
    """
    return _dplr.chunked_forward(q, k, v, a, b, w, scale=scale, initial_state=initial_state,
                                 chunk_size=chunk_size)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(q, k, v, a, b, w, do, dht, *, scale, initial_state, chunk_size):
    """Backward of the chunkwise form through the solve (``_dplr.chunked_vjp``)."""
    return _dplr.chunked_vjp(q, k, v, a, b, w, do=do, dht=dht, scale=scale,
                             initial_state=initial_state, chunk_size=chunk_size)


chunk_intermediates = _dplr.chunk_intermediates


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs of a stable DPLR recurrence (RWKV-7's structure), as float ``dtype``:

    q, k, v ~ N(0, 1); w from the decay regime (per channel, with partial resets in hard_reset);
    kappa unit norm per token; a = -kappa; b = beta_t * c * kappa with beta_t ~ U(0, 1) per token
    and c ~ U(0.2, 1)^K per (batch, head), fixed over time. Every transition
    diag(e^w) - beta_t diag(c) kappa kappa^T is then a contraction in the norm |diag(c)^{-1/2} x|
    (``linrec_ref._dplr`` docstring), so states stay bounded for any T, also across hard resets
    (the low-rank term keeps reading the state where e^w = 0).
    Grouped heads: q, k have H heads; v, a, b, w have HV = dims.get("HV", H) heads.
    Returns a dict with keys q, k, v, a, b, w.
    """
    B, T, H, K, V = (dims[name] for name in "BTHKV")
    HV = dims.get("HV", H)
    kappa = rng.standard_normal((B, T, HV, K))
    kappa /= np.linalg.norm(kappa, axis=-1, keepdims=True)          # [B, T, HV, K], unit norm
    c = rng.uniform(0.2, 1.0, size=(B, 1, HV, K))                   # fixed over time
    beta = rng.uniform(0.0, 1.0, size=(B, T, HV, 1))
    return {
        "q": _regimes.normal(rng, (B, T, H, K), dtype),
        "k": _regimes.normal(rng, (B, T, H, K), dtype),
        "v": _regimes.normal(rng, (B, T, HV, V), dtype),
        "a": (-kappa).astype(dtype),
        "b": (beta * c * kappa).astype(dtype),
        "w": _regimes.log_decay_per_channel(rng, (B, T, HV, K), regime, dtype),
    }
