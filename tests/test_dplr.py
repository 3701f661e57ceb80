"""dplr: the update order (the low-rank term reads the undecayed state), the identity with KDA
(recurrences.md section 4), chunk-size identities, the per-chunk intermediates, both decay
paths, hard resets, the attention matrix, the default scale and validation.

The generic suite (test_equivalence.py) compares every form and backward with the recurrent loop
and finite differences in every regime; this file covers what is specific to the op.
"""
import importlib.util

import numpy as np
import pytest

from linrec_ref import InputError, _dplr, _regimes, testing
from linrec_ref.ops import dplr as op

FORWARDS = ("recurrent", "parallel", "chunkwise")
VJPS = ("recurrent", "parallel", "chunkwise")
GRADS = ("q", "k", "v", "a", "b", "w", "initial_state")


DIMS = {"B": 2, "H": 2, "HV": 2, "K": 5, "V": 4}   # HV = H: v, a, b, w on the heads of q, k


def _plain_loop(x, *, decayed_read):
    """One batch element/head at a time, plain Python. decayed_read=True is the WRONG order
    (the low-rank term reading diag(e^w) S_{t-1}), used to show the op does not do that."""
    B, T, H, K = x["q"].shape
    scale = x.get("scale") or K ** -0.5
    o = np.zeros(x["v"].shape)
    S_all = np.zeros((B, H, K, x["v"].shape[-1]))
    for bi in range(B):
        for h in range(H):
            S = x["initial_state"][bi, h].copy()
            for t in range(T):
                q, k, v, a, b, w = (x[n][bi, t, h] for n in ("q", "k", "v", "a", "b", "w"))
                S_dec = np.exp(w)[:, None] * S
                read = a @ (S_dec if decayed_read else S)
                S = S_dec + np.outer(b, read) + np.outer(k, v)
                o[bi, t, h] = scale * S.T @ q
            S_all[bi, h] = S
    return o, S_all


# ----------------------------------------------------------------------------- the recurrence
@pytest.mark.parametrize("form", FORWARDS + ("step",))
def test_low_rank_term_reads_the_undecayed_state(form):
    """Every form equals the plain loop with a_t^T S_{t-1}, and differs (by far more than the
    tolerance) from the loop that reads the decayed state a_t^T diag(e^{w_t}) S_{t-1}."""
    x = testing.make_inputs("dplr", "fast_forgetting", T=9, initial_state=True, **DIMS)
    got = testing.run_steps(op, x) if form == "step" else testing.run(op, form, x, chunk_size=4)
    testing.assert_close(got, _plain_loop(x, decayed_read=False))
    wrong = testing.compare(got, _plain_loop(x, decayed_read=True))
    assert not wrong.ok and wrong.max_rel > 1e-2, str(wrong)


def test_default_scale_is_inverse_sqrt_k():
    x = testing.make_inputs("dplr", T=5, initial_state=True, **dict(DIMS, K=9))
    testing.assert_close(testing.run(op, "recurrent", x), testing.run(op, "recurrent", x, scale=9 ** -0.5))
    assert not testing.compare(testing.run(op, "recurrent", x), testing.run(op, "recurrent", x, scale=1.0)).ok


# ----------------------------------------------------------------------------- identity with KDA
def _kda_mapping(seed=0, T=11, B=2, H=2, K=5, V=4, regime="hard_reset"):
    """KDA inputs (unit keys, beta in [0, 2], per-channel g) and the dplr inputs they map to:
    a = -exp(g) * k, b = beta * k, v <- beta * v, w = g."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    kda_x = {"q": rng.standard_normal((B, T, H, K)), "k": k, "v": rng.standard_normal((B, T, H, V)),
             "g": _regimes.log_decay_per_channel(rng, (B, T, H, K), regime, np.float64),
             "beta": rng.choice([0.0, 0.3, 1.0, 1.9], size=(B, T, H)),
             "initial_state": rng.standard_normal((B, H, K, V))}
    beta = kda_x["beta"][..., None]
    dplr_x = {"q": kda_x["q"], "k": k, "v": beta * kda_x["v"], "a": -np.exp(kda_x["g"]) * k,
              "b": beta * k, "w": kda_x["g"], "initial_state": kda_x["initial_state"]}
    return kda_x, dplr_x


def _kda_loop(x):
    """Direct float64 loop of KDA: S' = diag(e^g) S;  S = S' + beta k (v - S'^T k)^T."""
    B, T, H, K = x["q"].shape
    o = np.zeros(x["v"].shape)
    S_all = np.zeros(x["initial_state"].shape)
    for bi in range(B):
        for h in range(H):
            S = x["initial_state"][bi, h].copy()
            for t in range(T):
                q, k, v, g, beta = (x[n][bi, t, h] for n in ("q", "k", "v", "g", "beta"))
                S = np.exp(g)[:, None] * S
                S = S + beta * np.outer(k, v - S.T @ k)
                o[bi, t, h] = K ** -0.5 * S.T @ q
            S_all[bi, h] = S
    return o, S_all


@pytest.mark.parametrize("form", FORWARDS + ("step",))
@pytest.mark.parametrize("regime", ["typical", "hard_reset"])
def test_kda_mapping_equals_kda_loop(form, regime):
    kda_x, dplr_x = _kda_mapping(regime=regime)
    got = testing.run_steps(op, dplr_x) if form == "step" else testing.run(op, form, dplr_x, chunk_size=3)
    testing.assert_close(got, _kda_loop(kda_x))


@pytest.mark.skipif(importlib.util.find_spec("linrec_ref.ops.kda") is None, reason="kda not present")
@pytest.mark.parametrize("form", FORWARDS)
def test_kda_mapping_equals_kda_op(form):
    from linrec_ref.ops import kda
    kda_x, dplr_x = _kda_mapping(regime="hard_reset")
    ref = testing.run(kda, form, kda_x, chunk_size=4)
    testing.assert_close(testing.run(op, form, dplr_x, chunk_size=4), ref)


# ----------------------------------------------------------------------------- chunk identities
@pytest.mark.parametrize("regime", ["typical", "hard_reset"])
def test_chunk_size_one_is_recurrent_and_chunk_ge_T_is_parallel(regime):
    x = testing.make_inputs("dplr", regime, T=10, initial_state=True, **DIMS)
    testing.assert_close(testing.run(op, "chunkwise", x, chunk_size=1), testing.run(op, "recurrent", x))
    testing.assert_close(testing.run(op, "chunkwise", x, chunk_size=10), testing.run(op, "parallel", x))
    testing.assert_close(testing.run(op, "chunkwise", x, chunk_size=50), testing.run(op, "parallel", x))
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x), seed=3)
    testing.assert_close(testing.vjp(op, "chunkwise", x, do, dht, chunk_size=1),
                         testing.vjp(op, "recurrent", x, do, dht))
    testing.assert_close(testing.vjp(op, "chunkwise", x, do, dht, chunk_size=10),
                         testing.vjp(op, "parallel", x, do, dht))


def test_chunk_intermediates_match_the_recurrence():
    """S_in are the states at chunk starts; X the low-rank reads a_t^T S_{t-1}; A_inv inverts
    I - Wab; P S_in + U is the next chunk's S_in."""
    x = testing.make_inputs("dplr", T=11, initial_state=True, **dict(DIMS, B=1))
    C = 4
    names = ("q", "k", "v", "a", "b", "w")
    scale = 5 ** -0.5
    inter = _dplr.chunk_intermediates(*(x[n] for n in names), x["initial_state"], C)
    states = [x["initial_state"]]
    for t in range(11):                                           # states S_0 .. S_T
        _, S = _dplr.recurrent(*(x[n][:, t:t + 1] for n in names), scale=scale,
                               initial_state=states[-1])
        states.append(S)
    for n in range(3):
        testing.assert_close(inter["S_in"][:, :, n], states[n * C])
    reads = np.stack([np.einsum("bhk,bhkv->bhv", x["a"][:, t], states[t]) for t in range(11)], 2)
    X = inter["X"].reshape(1, 2, 12, 4)[:, :, :11]                # [B, H, T, V]
    testing.assert_close(X, reads)
    eye = np.eye(C)
    testing.assert_close(inter["A_inv"] @ (eye - inter["Wab"]), np.broadcast_to(eye, inter["A_inv"].shape))
    nxt = inter["P"] @ inter["S_in"] + inter["U"]                 # [B, H, N, K, V]
    testing.assert_close(nxt[:, :, :-1], inter["S_in"][:, :, 1:])
    testing.assert_close(nxt[:, :, -1], inter["final_state"])
    assert np.all(np.triu(inter["Wab"]) == 0) and np.all(np.triu(inter["Wak"]) == 0)


@pytest.mark.parametrize("regime", ["slow_decay", "fast_forgetting"])
def test_factored_and_exact_decay_paths_agree(regime):
    """fast_bound=inf factors every chunk (no -inf here), fast_bound=0 takes the exact segment
    sums everywhere; forward and backward agree."""
    x = testing.make_inputs("dplr", regime, T=16, initial_state=True, **DIMS)
    arrays = [x[n] for n in ("q", "k", "v", "a", "b", "w")]
    kw = dict(scale=0.4, initial_state=x["initial_state"], chunk_size=8)
    fast = _dplr.chunked_forward(*arrays, fast_bound=np.inf, **kw)
    exact = _dplr.chunked_forward(*arrays, fast_bound=0.0, **kw)
    testing.assert_close(fast, exact)
    do, dht = testing.cotangents(*fast, seed=5)
    testing.assert_close(_dplr.chunked_vjp(*arrays, do=do, dht=dht, fast_bound=np.inf, **kw),
                         _dplr.chunked_vjp(*arrays, do=do, dht=dht, fast_bound=0.0, **kw))


# ----------------------------------------------------------------------------- hard resets
@pytest.mark.parametrize("form", VJPS)
def test_hard_reset_gradient_is_exactly_zero(form):
    """dw = exp(w) * (...) is exactly 0 where w = -inf, in every backward; no NaN anywhere."""
    x = testing.make_inputs("dplr", "hard_reset", T=12, initial_state=True, **DIMS)
    assert np.isneginf(x["w"]).any()
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x), seed=2)
    g = testing.vjp(op, form, x, do, dht, chunk_size=5)
    assert all(np.isfinite(g[n]).all() for n in GRADS)
    assert np.all(g["w"][np.isneginf(x["w"])] == 0)


@pytest.mark.parametrize("form", FORWARDS)
def test_low_rank_term_crosses_a_full_reset(form):
    """w = -inf on every channel at step r clears the diagonal part only: S_r = b_r (a_r^T S_{r-1})
    + k_r v_r^T, so with a_r = 0 the state restarts exactly and with a_r != 0 it does not."""
    x = testing.make_inputs("dplr", "typical", T=8, initial_state=True, **DIMS)
    x["w"][:, 4] = -np.inf
    ref = _plain_loop(x, decayed_read=False)
    testing.assert_close(testing.run(op, form, x, chunk_size=3), ref)
    cleared = {n: (v.copy() if isinstance(v, np.ndarray) else v) for n, v in x.items()}
    cleared["a"][:, 4] = 0
    later = dict(cleared, **{n: cleared[n][:, 4:] for n in ("q", "k", "v", "a", "b", "w")})
    later["initial_state"] = np.zeros_like(x["initial_state"])
    o_full, ht_full = testing.run(op, form, cleared, chunk_size=3)
    o_later, ht_later = testing.run(op, form, later, chunk_size=3)                   # the state before step 4 is gone
    testing.assert_close((o_full[:, 4:], ht_full), (o_later, ht_later))
    assert not testing.compare(ref[0][:, 4:], o_later).ok


# ----------------------------------------------------------------------------- attention matrix
def test_attention_matrix_maps_v_to_o():
    x = testing.make_inputs("dplr", "hard_reset", T=9, initial_state=True, **DIMS)
    x0 = dict(x, initial_state=None)
    M = op.attention_matrix(x["q"], x["k"], x["a"], x["b"], x["w"])   # [B, H, T, T]
    o, _ = op.parallel(**x0)
    testing.assert_close(np.einsum("bhts,bshv->bthv", M, x["v"]), o)
    assert np.all(np.triu(M, 1) == 0)


# ----------------------------------------------------------------------------- validation
def test_positive_log_decay_is_rejected():
    x = testing.make_inputs("dplr", T=4, initial_state=True, **DIMS)
    x["w"][0, 1, 0, 2] = 0.1
    with pytest.raises(InputError, match="'w'"):
        op.recurrent(**x)


def test_shape_mismatch_of_a_is_rejected():
    x = testing.make_inputs("dplr", T=4, initial_state=True, **DIMS)
    x["a"] = x["a"][..., :3]
    with pytest.raises(InputError, match="'a'"):
        op.chunkwise(**x)


def test_value_heads_must_match():
    """No grouped heads in dplr: v must have the H heads of q, k, a, b, w."""
    x = testing.make_inputs("dplr", T=4, initial_state=True, **DIMS)
    x["v"] = np.concatenate([x["v"], x["v"]], axis=2)
    with pytest.raises(InputError, match="'v'"):
        op.parallel(**x)


def test_nan_in_b_is_rejected():
    x = testing.make_inputs("dplr", T=4, initial_state=True, **DIMS)
    x["b"][0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="'b'"):
        op.recurrent_vjp(**x, do=np.zeros(x["v"].shape))
