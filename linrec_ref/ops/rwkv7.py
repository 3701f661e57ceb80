r"""rwkv7: RWKV-7 "Goose" time mixing, the dplr recurrence under RWKV-7's argument names.

Recurrence (one batch element, one head; the low-rank term reads the UNDECAYED S_{t-1}):

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = scale * S_t^T r_t                                         (inclusive read, scale 1)

This is ``dplr`` with q = r; every form calls dplr's cores (``linrec_ref._dplr``). In RWKV-7's
own terms (state stored K x V here, the transpose of the paper's wkv matrix):

    S_t = (diag(w_t) - (a_coef_t * kappa_hat_t) kappa_hat_t^T) S_{t-1} + k_t v_t^T,
    i.e.  a = -kappa_hat,  b = kappa_hat * a_coef   (recurrences.md: a = -kappa, b = kappa * a_coef)
with kappa_hat the l2-normalised "removal key" and a_coef in [0, 1]^K the in-context learning rate.

Glossary
    symbol        argument  shape          paper (RWKV-7)                     fla (chunk_rwkv7 / fused_recurrent_rwkv7)
    r_t           r         [B, T, H, K]   r_t (receptance)                   r
    w_t           w         [B, T, HV, K]  log of the decay w_t:              log_w, or -exp(w) of fla's
                                           w = -exp(-0.5) sigmoid(..) <= 0    raw w (fla applies -exp)
    k_t           k         [B, T, H, K]   k~_t (the replacement key)         k
    v_t           v         [B, T, HV, V]  v_t                                v
    a_t           a         [B, T, HV, K]  -kappa_hat_t                       a  (= -kk in fla's layer)
    b_t           b         [B, T, HV, K]  kappa_hat_t * a_t (a_t: ICL rate)  b  (= kk * a in fla's layer)
    S_t           state     [N, HV, K, V]  wkv_t^T                            initial_state / final_state
    scale         scale     float          1                                  scale (default 1.0)
Grouped heads as in dplr: r and k have H heads shared by HV / H value heads (HV = H is RWKV-7's
own layout).

    ``scale=None`` means 1.0 here (RWKV-7's convention and fla's default), not K^-1/2.
    ``w`` is the LOG decay (<= 0, -inf a hard reset of the diagonal part). fla's signature has
    changed across versions: chunk_rwkv7(r, w, k, v, a, b, scale=1.0, ...) with w the log decay
    (the order used here), and later chunk_rwkv7(r, k, v, a, b, w=None, log_w=None, ...) where
    ``w`` is the raw parameter (log decay = -exp(w)) and ``log_w`` the log decay. Pass arguments
    by keyword when cross-checking, and pass this op's w as fla's log decay. (Read from fla's
    source, not run here.)

Forms, gradients, numerics and stability: exactly those of ``dplr`` (see ``linrec_ref.ops.dplr``
and ``linrec_ref._dplr``): recurrent (ground truth), parallel (one chunk of length T through
the UT/WY solve), chunkwise (one triangular solve per chunk, ``chunk_intermediates``), step,
attention_matrix(r, w, k, a, b); recurrent_vjp is the checkpointed direct adjoint, parallel_vjp
and chunkwise_vjp go through the solve and the gate identity. The gradient of r is dplr's dq.

Peers: fla ``chunk_rwkv7`` / ``fused_recurrent_rwkv7`` (r, w as log decay, k, v, a, b; scale 1).

References: Peng et al., "RWKV-7 'Goose' with Expressive Dynamic State Evolution", 2025.
"""
from __future__ import annotations

from .. import _dplr, _regimes
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._spec import Arg, OpSpec
from . import dplr



SPEC = OpSpec(
    name="rwkv7",
    family="RWKV-7 (diagonal plus low rank)",
    transition="diagonal plus low rank",
    math="S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T;  o_t = scale S_t^T r_t "
         "(a = -kappa_hat, b = kappa_hat * a_coef)",
    # grouped heads as dplr: r, k shared by HV / H value heads; w, v, a, b and the state per
    # value head (HV = H is RWKV-7's own layout)
    inputs=(Arg("r", "B T H K"), Arg("w", "B T HV K", log_gate=True), Arg("k", "B T H K"),
            Arg("v", "B T HV V"), Arg("a", "B T HV K"), Arg("b", "B T HV K")),
    output="B T HV V",
    state=(Arg("state", "N HV K V"),),
    default_scale=lambda dims: 1.0,
    peers=("fla.ops.rwkv7.chunk_rwkv7 (r, w as log decay, k, v, a, b; scale 1.0)",
           "fla.ops.rwkv7.fused_recurrent_rwkv7 (same)"),
    regimes=tuple(_regimes.DECAY_REGIMES),
    default_dims={"B": 2, "H": 1, "HV": 2, "K": 8, "V": 6},
)


def _grads(grads):
    """dplr's gradient dict -> rwkv7's names (dq is dr)."""
    out = dict(grads)
    out["r"] = out.pop("q")
    return out


@forward_form(SPEC)
def recurrent(r, w, k, v, a, b, *, scale, initial_state):
    """The definition: a loop over t. r, w, k, a, b: [B, T, H, K]; v: [B, T, H, V] (H = HV here:
    the wrappers have repeated r and k over the value heads)."""
    return _dplr.recurrent(r, k, v, a, b, w, scale=scale, initial_state=initial_state)


@step_form(SPEC)
def step(r, w, k, v, a, b, *, state, scale):
    """One token: r, w, k, a, b: [B, H, K]; v: [B, H, V]; state: [B, H, K, V]."""
    return _dplr.step(r, k, v, a, b, w, state=state, scale=scale)


@vjp_form(SPEC)
def recurrent_vjp(r, w, k, v, a, b, do, dht, *, scale, initial_state):
    """Direct adjoint of the loop (ground truth), checkpointed reverse walk."""
    return _grads(_dplr.recurrent_vjp(r, k, v, a, b, w, do=do, dht=dht, scale=scale,
                                      initial_state=initial_state))


@forward_form(SPEC)
def parallel(r, w, k, v, a, b, *, scale, initial_state):
    """dplr's parallel form: the chunkwise form with one chunk of length T."""
    return _dplr.chunked_forward(r, k, v, a, b, w, scale=scale, initial_state=initial_state,
                                 chunk_size=r.shape[1])


@vjp_form(SPEC)
def parallel_vjp(r, w, k, v, a, b, do, dht, *, scale, initial_state):
    """Backward of the parallel form (through the T x T solve)."""
    return _grads(_dplr.chunked_vjp(r, k, v, a, b, w, do=do, dht=dht, scale=scale,
                                    initial_state=initial_state, chunk_size=r.shape[1]))


@matrix_form(SPEC, names=("r", "w", "k", "a", "b"))
def attention_matrix(r, w, k, a, b, *, scale):
    """M [B, H, T, T] with o = M v when S_0 = 0 (dplr's attention matrix with q = r)."""
    return _dplr.attention_matrix(r, k, a, b, w, scale=scale)


@forward_form(SPEC, chunked=True)
def chunkwise(r, w, k, v, a, b, *, scale, initial_state, chunk_size):
    """dplr's chunkwise form (one triangular solve per chunk, state carried across chunks)."""
    return _dplr.chunked_forward(r, k, v, a, b, w, scale=scale, initial_state=initial_state,
                                 chunk_size=chunk_size)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(r, w, k, v, a, b, do, dht, *, scale, initial_state, chunk_size):
    """Backward of the chunkwise form through the solve."""
    return _grads(_dplr.chunked_vjp(r, k, v, a, b, w, do=do, dht=dht, scale=scale,
                                    initial_state=initial_state, chunk_size=chunk_size))


def chunk_intermediates(r, w, k, v, a, b, initial_state, chunk_size):
    """dplr's per-chunk intermediates (``linrec_ref._dplr.chunk_intermediates``) with q = r."""
    return _dplr.chunk_intermediates(r, k, v, a, b, w, initial_state, chunk_size)


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs with RWKV-7's structure: r, k, v ~ N(0, 1); w from the decay regime;
    a = -kappa_hat, b = kappa_hat * a_coef with a_coef = beta_t c in [0, 1]^K, c fixed per head
    (stable for any T; see ``dplr.make_inputs``)."""
    x = dplr.make_inputs(rng, regime, dims, dtype)
    return {"r": x["q"], "w": x["w"], "k": x["k"], "v": x["v"], "a": x["a"], "b": x["b"]}
