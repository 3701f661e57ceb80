r"""lru: a linear time-invariant recurrence with a complex diagonal state (LRU, S4D).

Recurrence (one batch element; the state h is complex, one entry per mode s = 1..S):

    h_t = lambda * h_{t-1} + Bm x_t,       lambda = exp(log_lam) in C^S, |lambda| <= 1
    y_t = c * Re(Cm h_t) + Dm x_t,         c = 1 (output="re") or 2 (output="2re")

lambda, Bm, Cm and Dm do not depend on t: the map x -> y is a causal convolution with the kernel

    K_l = c * Re(Cm diag(lambda^l) Bm)   [Q, P],   l = 0, 1, ...,    lambda^l = exp(l * log_lam)

(|lambda^l| = exp(l * Re log_lam) <= 1: no power ever grows with l).

Output conventions (numerics.md, hazard 6). A real SSM with a real state of size 2S has its
complex modes in conjugate pairs; keeping one member of each pair, the pair's contribution is
C h + conj(C h) = 2 Re(C h). ``output="2re"`` is that convention (S4D, S5 with conjugate
symmetry); ``output="re"`` is y = Re(C h), the LRU paper's. The final state is the complex h in
both cases. A mode with lambda = r e^{i theta} equals a real 2 x 2 rotation block
r [[cos theta, -sin theta], [sin theta, cos theta]] acting on (Re h, Im h).

Glossary
    symbol       argument        shape       LRU paper (Orvieto et al.)     S4D (Gu et al.)
    x_t          x               [B, T, P]   u_k                            u
    log lambda   log_lam         [S]         -exp(nu) + i exp(theta)        dt * A  (A_bar = exp(dt A))
    B            Bm              [S, P]      gamma * B (complex)            B_bar = (A_bar - 1) / A * B
    C            Cm              [Q, S]      C (complex)                    C
    D            Dm (optional)   [Q, P]      D (real)                       D
    h_t          state           [B, S]      x_k (complex)                  x
    y_t          (output)        [B, T, Q]   y_k = Re(C x_k) + D u_k        2 Re(...) (output="2re")
The nu/theta/gamma parametrisation of the LRU and the discretisation of S4D happen before the
op: pass log lambda directly. Letters P (inputs), Q (outputs), S (state size); N is the number
of sequences in the state (B, or the number of cu_seqlens segments).

Forms
    recurrent  the loop above (ground truth); O(S) state memory per sequence.
    parallel   y = K * x (causal convolution over the whole sequence, an O(T^2) Toeplitz product)
               + c Re(Cm lambda^{t+1} h_0) + Dm x_t;
               final state h_T = sum_s lambda^{T-1-s} Bm x_s + lambda^T h_0.
    chunkwise  chunks of C tokens: the convolution with K_0..K_{C-1} inside each chunk, the
               recurrence carries h across chunks (a chunk of length L multiplies by lambda^L).
    step       one token of the recurrence (decoding).
    kernel(log_lam, Bm, Cm, T, output=...) -> K [T, Q, P], public. There is no T x T attention
    matrix (has_attention_matrix=False): the map is a convolution of x, not a mixing of v.

Gradients (real loss L; complex convention dL/dRe z + i dL/dIm z, so a cotangent dht of the
complex final state pairs with it as Re(sum(conj(dht) * h)); hand-written vector-Jacobian
products, the adjoint of the recurrence runs backwards in time):
    dh_t = c conj(Cm)^T dy_t + conj(lambda) dh_{t+1},   dh_T starts from dht (plus the read at T)
    dx_t = Re(conj(Bm)^T dh_t) + Dm^T dy_t
    dBm = sum_t dh_t x_t^T,   dCm = c sum_t dy_t conj(h_t)^T,   dDm = sum_t dy_t x_t^T
    dlog_lam = sum_t conj(lambda h_{t-1}) * dh_t,   dh_0 = conj(lambda) dh_1.
The recurrent backward (ground truth) walks t = T-1 .. 0 with ``_scan.reverse_steps``, which
recomputes states from checkpoints instead of keeping all T states. The parallel and chunkwise
backwards differentiate the kernel: dK_l = sum_t dy_t x_{t-l}^T [Q, P], then with W_l = lambda^l,
    dCm[q, s] = c sum_{l,p} dK_l[q, p] conj(W_l[s] Bm[s, p])
    dBm[s, p] = c sum_{l,q} dK_l[q, p] conj(Cm[q, s] W_l[s])
    dW_l[s]   = c sum_{q,p} dK_l[q, p] conj(Cm[q, s] Bm[s, p]),   dlog_lam = sum_l conj(l W_l) dW_l
(the initial-state read lambda^{t+1} h_0 and the chunk-end / final states add to dW the same way).

Peers: ``scipy.signal.lfilter([b], [1, -lambda], x)`` per mode (P = Q = 1, summed over modes); an FFT
convolution of x with ``kernel``; the S4D kernel of state-spaces (``2 * Re(...)``, output="2re").

References: Orvieto et al., "Resurrecting Recurrent Neural Networks for Long Sequences" (LRU),
ICML 2023; Gu, Gupta, Goel & Ré, "On the Parameterization and Initialization of Diagonal State
Space Models" (S4D), NeurIPS 2022; Smith, Warrington & Linderman, "Simplified State Space
Layers for Sequence Modeling" (S5), ICLR 2023.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from .. import _regimes
from .. import _validation as V
from .._forms import forward_form, step_form, vjp_form
from .._scan import from_chunks, num_chunks, reverse_steps, to_chunks
from .._spec import Arg, OpSpec

OUTPUT_CONVENTIONS = {"re": 1, "2re": 2}  # option value -> factor c in y = c Re(Cm h) + Dm x


SPEC = OpSpec(
    name="lru",
    family="linear recurrent unit / diagonal state space model (LRU, S4D)",
    transition="vector state, diagonal (complex)",
    math="h_t = lambda * h_{t-1} + Bm x_t (complex, time-invariant);  y_t = c Re(Cm h_t) + Dm x_t",
    inputs=(Arg("x", "BTP"), Arg("log_lam", "S", kind="complex", log_gate=True),
            Arg("Bm", "SP", kind="complex"), Arg("Cm", "QS", kind="complex"),
            Arg("Dm", "QP", optional=True)),
    output="BTQ",
    quadratic="B T T P",  # the lagged inputs of the Toeplitz product
    state=(Arg("state", "NS", kind="complex"),),
    default_scale=None,
    options={"output": "re"},
    peers=("scipy.signal.lfilter([b], [1, -lambda], x) per mode",
           "FFT convolution of x with lru.kernel (numpy.fft)",
           "state-spaces S4D kernel (output='2re')"),
    # hard_reset does not apply: lambda is constant over time, and the shared validator rejects
    # a complex log_lam with real part -inf (lambda = 0 is not representable here).
    regimes=("slow_decay", "typical", "fast_forgetting"),
    default_dims={"B": 2, "P": 3, "Q": 2, "S": 4},
    has_attention_matrix=False,
    variants={"default": {}, "2re_without_D": {"output": "2re"}},
)


def _output_factor(output) -> int:
    """The factor c of y = c Re(Cm h) for the option ``output``; a clear error otherwise."""
    if not isinstance(output, str) or output not in OUTPUT_CONVENTIONS:
        raise V.InputError(
            f"lru: option 'output' must be 're' (y = Re(Cm h)) or '2re' (y = 2 Re(Cm h), the S4D "
            f"convention over one member of each conjugate pair); got {output!r}"
        )
    return OUTPUT_CONVENTIONS[output]


# ----------------------------------------------------------------------------- recurrent
def _advance(x, log_lam, Bm):
    """One step of the recurrence as a function of (h_{t-1}, t), for loops and reverse walks."""
    lam = np.exp(log_lam)                                           # [S]

    def advance(h, t):
        return lam * h + x[:, t] @ Bm.T                             # [B, S]

    return advance


@forward_form(SPEC)
def recurrent(x, log_lam, Bm, Cm, Dm, *, initial_state, output):
    """The definition: a loop over t. x: [B, T, P]; log_lam: [S]; Bm: [S, P]; Cm: [Q, S];
    Dm: [Q, P] or None; initial_state: [B, S] complex. Returns y: [B, T, Q] (dtype of x)."""
    c = _output_factor(output)
    advance = _advance(x, log_lam, Bm)
    y = _skip(x, Dm, Cm.shape[0])                                   # [B, T, Q]
    h = initial_state                                               # [B, S]
    for t in range(x.shape[1]):
        h = advance(h, t)
        y[:, t] += c * (h @ Cm.T).real                              # [B, Q]
    return y, h


@step_form(SPEC)
def step(x, log_lam, Bm, Cm, Dm, *, state, output):
    """One token: x: [B, P]; state: [B, S] complex. Returns (y_t [B, Q], h_t [B, S])."""
    c = _output_factor(output)
    h = np.exp(log_lam) * state + x @ Bm.T                          # [B, S]
    y = c * (h @ Cm.T).real                                         # [B, Q]
    if Dm is not None:
        y = y + x @ Dm.T
    return y, h


@vjp_form(SPEC)
def recurrent_vjp(x, log_lam, Bm, Cm, Dm, do, dht, *, initial_state, output):
    """Backward of the loop, walking t = T-1 .. 0 with the adjoint state dh (ground truth).

    Memory: states are recomputed from checkpoints (``_scan.reverse_steps``), never all T kept.
    """
    c = _output_factor(output)
    lam = np.exp(log_lam)                                           # [S]
    dx = np.zeros_like(x)
    dBm, dCm, dlam = np.zeros_like(Bm), np.zeros_like(Cm), np.zeros_like(log_lam)
    dh = dht.copy()                                                 # [B, S]
    for t, h_prev, h_t in reverse_steps(_advance(x, log_lam, Bm), initial_state, x.shape[1]):
        dh = dh + c * (do[:, t] @ Cm.conj())                        # read y_t = c Re(Cm h_t)
        dCm = dCm + c * (do[:, t].T @ h_t.conj())                   # [Q, S]
        dx[:, t] = (dh @ Bm.conj()).real                            # h_t = ... + Bm x_t
        dBm = dBm + dh.T @ x[:, t]                                  # [S, P]
        dlam = dlam + np.sum(h_prev.conj() * dh, axis=0)            # d/dlambda of lambda h_{t-1}
        dh = lam.conj() * dh                                        # to h_{t-1}
    grads = {"x": dx, "log_lam": lam.conj() * dlam, "Bm": dBm, "Cm": dCm, "initial_state": dh}
    return _skip_vjp(x, Dm, do, grads)


# ----------------------------------------------------------------------------- convolution
# The closed form y = K * x + ..., shared by the parallel and chunkwise forms (and the skip term
# Dm x of every form).
def _powers(log_lam, n):
    """W[l] = lambda^l = exp(l * log_lam) for l = 0 .. n-1: [S] -> [n, S] (|W| <= 1)."""
    l = np.arange(n, dtype=log_lam.real.dtype)                      # [n]
    return np.exp(l[:, None] * log_lam)                             # [n, S]


def _kernel(W, Bm, Cm, c):
    """K[l] = c Re(Cm diag(W[l]) Bm): W [L, S], Bm [S, P], Cm [Q, S] -> K [L, Q, P]."""
    return c * np.einsum("qs,ls,sp->lqp", Cm, W, Bm, optimize=True).real


def _kernel_vjp(dK, W, Bm, Cm, c):
    """Cotangents of (Cm, Bm, W) from the kernel's cotangent dK [L, Q, P] (complex convention)."""
    Cc, Wc, Bc = Cm.conj(), W.conj(), Bm.conj()
    dCm = c * np.einsum("lqp,ls,sp->qs", dK, Wc, Bc, optimize=True)  # [Q, S]
    dBm = c * np.einsum("lqp,qs,ls->sp", dK, Cc, Wc, optimize=True)  # [S, P]
    dW = c * np.einsum("lqp,qs,sp->ls", dK, Cc, Bc, optimize=True)   # [L, S]
    return dCm, dBm, dW


def _log_lam_grad(W, dW):
    """From dW[l] (cotangent of lambda^l = exp(l log_lam)) to d log_lam = sum_l conj(l W_l) dW_l."""
    l = np.arange(W.shape[0], dtype=W.real.dtype)                  # [L]
    return np.sum(np.conj(l[:, None] * W) * dW, axis=0)             # [S]


def _lagged(x):
    """x: [B, T, P] -> [B, T, T, P] with out[b, t, l] = x[b, t - l] for l <= t, else 0."""
    T = x.shape[1]
    src = np.arange(T)[:, None] - np.arange(T)[None, :]            # [T, T]: t - l
    out = np.take(x, np.clip(src, 0, None), axis=1)                 # [B, T, T, P]
    return np.where((src >= 0)[:, :, None], out, 0)


def _leading(z):
    """z: [B, T, Q] -> [B, T, T, Q] with out[b, s, l] = z[b, s + l] for s + l < T, else 0."""
    return np.flip(_lagged(np.flip(z, axis=1)), axis=1)


def _conv(x, K):
    """Causal convolution y_t = sum_{l<=t} K_l x_{t-l}: x [B, T, P], K [>=T, Q, P] -> [B, T, Q]."""
    T = x.shape[1]
    return np.einsum("btlp,lqp->btq", _lagged(x), K[:T], optimize=True)


def _conv_vjp(x, K, dy):
    """Cotangents of ``_conv``: dx_s = sum_l K_l^T dy_{s+l} and dK_l = sum_t dy_t x_{t-l}^T."""
    T = x.shape[1]
    dx = np.einsum("bslq,lqp->bsp", _leading(dy), K[:T], optimize=True)   # [B, T, P]
    dK = np.einsum("btlp,btq->lqp", _lagged(x), dy, optimize=True)        # [T, Q, P]
    return dx, dK


def _skip(x, Dm, Q):
    """Dm x_t, or zeros when Dm is None: [B, T, P] -> [B, T, Q] (the dtype of x)."""
    if Dm is None:
        return np.zeros(x.shape[:-1] + (Q,), dtype=x.dtype)
    return x @ Dm.T


def _skip_vjp(x, Dm, dy, grads):
    """Add the Dm x term's cotangents to grads (dx in place, dDm as a new entry)."""
    if Dm is not None:
        grads["x"] += dy @ Dm                                       # [B, T, P]
        grads["Dm"] = np.einsum("btq,btp->qp", dy, x, optimize=True)  # [Q, P]
    return grads


def kernel(log_lam, Bm, Cm, T, *, output="re"):
    """The convolution kernel K_l = c Re(Cm diag(lambda^l) Bm), l = 0 .. T-1.

    log_lam: [S] complex (real part <= 0); Bm: [S, P] complex; Cm: [Q, S] complex; T: int >= 0;
    output: "re" (c = 1) or "2re" (c = 2). Returns K: [T, Q, P] real. Without an initial state,
    y_t = sum_{l<=t} K_l x_{t-l} + Dm x_t equals every form of ``lru``.
    """
    values = {"log_lam": log_lam, "Bm": Bm, "Cm": Cm}
    V.check_arrays(SPEC.name, [SPEC.arg(n) for n in values], values, V.Binder(SPEC.name))
    if isinstance(T, (bool, np.bool_)) or not isinstance(T, numbers.Integral) or T < 0:
        raise V.InputError(f"lru: argument 'T' of kernel must be a non-negative integer, got {T!r}")
    return _kernel(_powers(log_lam, int(T)), Bm, Cm, _output_factor(output))


# ----------------------------------------------------------------------------- parallel
def _parallel_parts(x, log_lam, Bm, Cm, c, initial_state):
    """Shared by the parallel forward and backward: powers, kernel, the initial-state read."""
    T = x.shape[1]
    W = _powers(log_lam, T + 1)                                     # [T+1, S]: lambda^0..lambda^T
    K = _kernel(W[:T], Bm, Cm, c)                                   # [T, Q, P]
    h0_read = W[1:] * initial_state[:, None]                        # [B, T, S]: lambda^{t+1} h_0
    u = x @ Bm.T                                                    # [B, T, S]: Bm x_s
    to_end = W[:T][::-1]                                            # [T, S]: lambda^{T-1-s}
    return W, K, h0_read, u, to_end


@forward_form(SPEC)
def parallel(x, log_lam, Bm, Cm, Dm, *, initial_state, output):
    """y = K * x + c Re(Cm lambda^{t+1} h_0) + Dm x_t (a Toeplitz product). Shapes as ``recurrent``."""
    c = _output_factor(output)
    W, K, h0_read, u, to_end = _parallel_parts(x, log_lam, Bm, Cm, c, initial_state)
    y = _conv(x, K) + c * (h0_read @ Cm.T).real + _skip(x, Dm, Cm.shape[0])   # [B, T, Q]
    hT = np.sum(to_end * u, axis=1) + W[-1] * initial_state         # [B, S]
    return y, hT


@vjp_form(SPEC)
def parallel_vjp(x, log_lam, Bm, Cm, Dm, do, dht, *, initial_state, output):
    """Backward of the parallel form: the convolution's transpose, then the kernel's chain rule.

    1. convolution: dx = K^T-correlation of dy, dK_l = sum_t dy_t x_{t-l}^T
    2. kernel -> (dCm, dBm, dW), W_l = lambda^l
    3. the initial-state read c Re(Cm lambda^{t+1} h_0), and the final state
       h_T = sum_s lambda^{T-1-s} u_s + lambda^T h_0 (u_s = Bm x_s)
    4. dlog_lam = sum_l conj(l W_l) dW_l
    """
    c = _output_factor(output)
    T = x.shape[1]
    W, K, h0_read, u, to_end = _parallel_parts(x, log_lam, Bm, Cm, c, initial_state)
    # 1-2. the convolution and its kernel
    dx, dK = _conv_vjp(x, K, do)                                    # [B, T, P], [T, Q, P]
    dCm, dBm, dWk = _kernel_vjp(dK, W[:T], Bm, Cm, c)
    dW = np.zeros_like(W)                                           # [T+1, S]
    dW[:T] += dWk
    # 3a. initial-state read
    d_read = c * (do @ Cm.conj())                                   # [B, T, S]
    dCm += c * np.einsum("btq,bts->qs", do, h0_read.conj(), optimize=True)
    dh0 = np.sum(W[1:].conj() * d_read, axis=1)                     # [B, S]
    dW[1:] += np.sum(initial_state[:, None].conj() * d_read, axis=0)
    # 3b. final state
    du = to_end.conj() * dht[:, None]                               # [B, T, S]
    dx += (du @ Bm.conj()).real
    dBm += np.einsum("bts,btp->sp", du, x, optimize=True)
    dW[:T] += np.flip(np.sum(u.conj() * dht[:, None], axis=0), axis=0)   # index T-1-s
    dW[T] += np.sum(initial_state.conj() * dht, axis=0)
    dh0 += W[T].conj() * dht
    # 4. from the powers to log_lam
    grads = {"x": dx, "log_lam": _log_lam_grad(W, dW), "Bm": dBm, "Cm": dCm, "initial_state": dh0}
    return _skip_vjp(x, Dm, do, grads)


# ----------------------------------------------------------------------------- chunkwise
def _to_chunks(x, C):
    """[B, T, F] -> [B, N, C, F], zero-padded (N = ceil(T / C))."""
    return to_chunks(x[:, :, None], C)[:, 0]


def _from_chunks(y, T):
    """[B, N, C, F] -> [B, T, F] (drops the padding)."""
    return from_chunks(y[:, None], T)[:, :, 0]


def _chunk_lengths(T, C):
    """Lengths of the N = ceil(T / C) chunks: C, ..., C, then the remainder."""
    N = num_chunks(T, C)
    lengths = np.full(N, C)                                         # [N]
    if N:
        lengths[-1] = T - (N - 1) * C
    return lengths


class ChunkParts(NamedTuple):
    """Steps 1-3 of the chunkwise form, shared by forward and backward (N chunks of C tokens)."""

    W: np.ndarray               # [C+1, S]        lambda^0 .. lambda^C
    K: np.ndarray               # [C, Q, P]       the kernel K_0 .. K_{C-1}
    xc: np.ndarray              # [B, N, C, P]    chunked inputs
    u: np.ndarray               # [B, N, C, S]    Bm x_s
    lengths: np.ndarray         # [N]             the chunks' real lengths L_n
    to_end_power: np.ndarray    # [N, C]          L_n - 1 - s
    valid: np.ndarray           # [N, C]          s < L_n (not padding)
    to_end: np.ndarray          # [N, C, S]       lambda^{L_n-1-s}, 0 at padding
    h_in: np.ndarray            # [B, N, S]       the state entering each chunk
    h_read: np.ndarray          # [B, N, C, S]    lambda^{t+1} h_in
    final_state: np.ndarray     # [B, S]


def _chunk_parts(x, log_lam, Bm, Cm, c, initial_state, C) -> ChunkParts:
    """Steps 1-3 of the chunkwise form, shared by forward and backward.

    Padding (zero x) would still decay the state if it were counted, so every chunk uses its real
    length L_n: the chunk-end state is sum_{s < L_n} lambda^{L_n-1-s} u_s + lambda^{L_n} h_in.
    """
    T = x.shape[1]
    W = _powers(log_lam, C + 1)                                     # [C+1, S]: lambda^0..lambda^C
    K = _kernel(W[:C], Bm, Cm, c)                                   # [C, Q, P]
    xc = _to_chunks(x, C)                                           # [B, N, C, P]
    u = xc @ Bm.T                                                   # [B, N, C, S]
    lengths = _chunk_lengths(T, C)                                  # [N]
    # 1. decay from each token to its chunk's end, and over a whole chunk
    to_end_power = lengths[:, None] - 1 - np.arange(C)[None, :]      # [N, C]: L_n - 1 - s
    valid = to_end_power >= 0                                       # [N, C]: s < L_n
    to_end = np.where(valid[..., None], W[np.clip(to_end_power, 0, None)], 0)   # [N, C, S]
    a_chunk = W[lengths]                                            # [N, S]: lambda^{L_n}
    # 2. each chunk's own contribution to the state at its end
    U = np.sum(to_end * u, axis=2)                                  # [B, N, S]
    # 3. carry across chunks: h_n = lambda^{L_n} h_{n-1} + U_n; keep the state entering each chunk
    h_in = np.empty_like(U)                                         # [B, N, S]
    h = initial_state                                               # [B, S]
    for n in range(U.shape[1]):
        h_in[:, n] = h
        h = a_chunk[n] * h + U[:, n]
    h_read = W[1:] * h_in[:, :, None]                               # [B, N, C, S]: lambda^{t+1} h_in
    return ChunkParts(W=W, K=K, xc=xc, u=u, lengths=lengths, to_end_power=to_end_power,
                      valid=valid, to_end=to_end, h_in=h_in, h_read=h_read, final_state=h)


@forward_form(SPEC, chunked=True)
def chunkwise(x, log_lam, Bm, Cm, Dm, *, initial_state, output, chunk_size):
    """Chunks of C = chunk_size tokens (T need not divide). Memory: O(T/C * S) states.

    1. decays: lambda^{L_n - 1 - s} from token s to its chunk's end, lambda^{L_n} over chunk n
    2. chunk states: U_n = sum_s lambda^{L_n-1-s} Bm x_s
    3. carry: h_n = lambda^{L_n} h_{n-1} + U_n, one loop over chunks
    4. output: the convolution with K_0..K_{C-1} inside each chunk
       + c Re(Cm lambda^{t+1} h_{n-1}) + Dm x_t
    """
    T, C = x.shape[1], chunk_size
    c = _output_factor(output)
    p = _chunk_parts(x, log_lam, Bm, Cm, c, initial_state, C)
    xc = p.xc
    B, N = xc.shape[:2]
    Q = Cm.shape[0]
    intra = _conv(xc.reshape((B * N,) + xc.shape[2:]), p.K).reshape((B, N, C, Q))   # [B, N, C, Q]
    yc = intra + c * (p.h_read @ Cm.T).real                         # 4. [B, N, C, Q]
    return _from_chunks(yc, T) + _skip(x, Dm, Cm.shape[0]), p.final_state


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(x, log_lam, Bm, Cm, Dm, do, dht, *, initial_state, output, chunk_size):
    """Backward of the chunkwise form. Keeps only the per-chunk states (O(T/C * S)).

    1. recompute the chunk states h_in (forward steps 1-3)
    2. carry the state cotangent backwards:
       dh_end[n-1] = conj(lambda^{L_n}) dh_end[n] + sum_t conj(lambda^{t+1}) c conj(Cm)^T dy_t
    3. intra-chunk convolution: dx and dK, then the kernel's chain rule (dCm, dBm, dW)
    4. the reads of h_in (dCm, dW) and the chunk ends (dx, dBm, dW)
    5. dlog_lam = sum_l conj(l W_l) dW_l
    """
    T, C = x.shape[1], chunk_size
    c = _output_factor(output)
    p = _chunk_parts(x, log_lam, Bm, Cm, c, initial_state, C)
    W, K, xc, u, lengths, h_in, h_read = p.W, p.K, p.xc, p.u, p.lengths, p.h_in, p.h_read
    to_end_power, valid, to_end = p.to_end_power, p.valid, p.to_end
    B, N = xc.shape[:2]
    doc = _to_chunks(do, C)                                         # [B, N, C, Q]
    # 2. dh_end[n]: cotangent of the state at the end of chunk n (from the later chunks)
    d_read = c * (doc @ Cm.conj())                                  # [B, N, C, S]
    local = np.sum(W[1:].conj() * d_read, axis=2)                   # [B, N, S]
    a_chunk = W[lengths]                                            # [N, S]
    dh_end = np.empty_like(h_in)                                    # [B, N, S]
    dh = dht                                                        # [B, S]
    for n in reversed(range(N)):
        dh_end[:, n] = dh
        dh = a_chunk[n].conj() * dh + local[:, n]
    # 3. intra-chunk convolution and its kernel
    flat = lambda z: z.reshape((B * N,) + z.shape[2:])             # [B, N, C, F] -> [B*N, C, F]
    dxc, dK = _conv_vjp(flat(xc), K, flat(doc))                     # [B*N, C, P], [C, Q, P]
    dxc = dxc.reshape(xc.shape)                                     # [B, N, C, P]
    dCm, dBm, dWk = _kernel_vjp(dK, W[:C], Bm, Cm, c)
    dW = np.zeros_like(W)                                           # [C+1, S]
    dW[:C] += dWk
    # 4a. reads of the carried state: c Re(Cm lambda^{t+1} h_in)
    dCm += c * np.einsum("bntq,bnts->qs", doc, h_read.conj(), optimize=True)
    dW[1:] += np.sum(h_in[:, :, None].conj() * d_read, axis=(0, 1))
    # 4b. chunk ends: h_end = sum_s to_end_s u_s + lambda^{L_n} h_in
    du = to_end.conj() * dh_end[:, :, None]                         # [B, N, C, S]
    dxc += (du @ Bm.conj()).real
    dBm += np.einsum("bncs,bncp->sp", du, xc, optimize=True)
    d_to_end = np.sum(u.conj() * dh_end[:, :, None], axis=0)        # [N, C, S]
    np.add.at(dW, to_end_power[valid], d_to_end[valid])
    np.add.at(dW, lengths, np.sum(h_in.conj() * dh_end, axis=0))    # lambda^{L_n} h_in
    # 5. from the powers to log_lam
    grads = {"x": _from_chunks(dxc, T), "log_lam": _log_lam_grad(W, dW), "Bm": dBm, "Cm": dCm,
             "initial_state": dh}
    return _skip_vjp(x, Dm, do, grads)


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs: |lambda| from the decay regime (constant over time), phases theta in
    [0, pi), complex N(0, 1) Bm and Cm, real N(0, 1) x and Dm (no Dm in variant "2re_without_D")."""
    B, T, P, Q, S = (dims[name] for name in "BTPQS")
    cdtype = V.COMPLEX_OF[np.dtype(dtype)]
    log_mag = _regimes.log_decay(rng, (S,), regime, np.float64, time_axis=0)   # [S], <= 0
    theta = rng.uniform(0.0, np.pi, size=S)                                     # [S]

    def complex_normal(shape):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)

    inputs = {
        "x": _regimes.normal(rng, (B, T, P), dtype),
        "log_lam": (log_mag + 1j * theta).astype(cdtype),
        "Bm": complex_normal((S, P)).astype(cdtype),
        "Cm": complex_normal((Q, S)).astype(cdtype),
    }
    if variant != "2re_without_D":
        inputs["Dm"] = _regimes.normal(rng, (Q, P), dtype)
    return inputs
