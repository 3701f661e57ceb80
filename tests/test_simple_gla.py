"""simple_gla specifics: the SSD mapping, the attention matrix, exact resets, dtypes."""
import numpy as np
import pytest

from linrec_ref import testing
from linrec_ref._scan import from_chunks, reverse_steps, segsum, to_chunks
from linrec_ref.ops import simple_gla


def ssd_quadratic(x, dt, A, Bm, Cm):
    """Mamba-2's SSD in its quadratic ("attention") form, transcribed from the paper's math:
    Y = (L * (C B^T)) (x * dt) with L[t, s] = exp(sum_{j=s+1..t} A dt_j), per head; B and C are
    shared by all heads (one group). x: [b, T, h, p], dt: [b, T, h], A: [h], B, C: [b, T, n]."""
    b, T, h, p = x.shape
    y = np.zeros_like(x)
    for bi in range(b):
        for hi in range(h):
            a = A[hi] * dt[bi, :, hi]
            L = np.zeros((T, T))
            for t in range(T):
                for s in range(t + 1):
                    L[t, s] = np.exp(a[s + 1:t + 1].sum())
            y[bi, :, hi] = (L * (Cm[bi] @ Bm[bi].T)) @ (x[bi, :, hi] * dt[bi, :, hi, None])
    return y


def test_simple_gla_is_the_ssd_core():
    rng = np.random.default_rng(0)
    b, T, h, p, n = 2, 11, 3, 4, 5
    x = rng.standard_normal((b, T, h, p))
    dt = rng.uniform(0.05, 0.5, (b, T, h))
    A = -rng.uniform(0.5, 2.0, h)
    Bm, Cm = rng.standard_normal((b, T, n)), rng.standard_normal((b, T, n))
    ref = ssd_quadratic(x, dt, A, Bm, Cm)
    q = np.repeat(Cm[:, :, None], h, axis=2)
    k = np.repeat(Bm[:, :, None], h, axis=2)
    for form in (simple_gla.recurrent, simple_gla.parallel):
        o, _ = form(q, k, x * dt[..., None], A * dt, scale=1.0)
        testing.assert_close(o, ref, "float64", form.__name__)
    o, _ = simple_gla.chunkwise(q, k, x * dt[..., None], A * dt, scale=1.0, chunk_size=4)
    testing.assert_close(o, ref, "float64", "chunkwise")


def test_attention_matrix_maps_v_to_o():
    x = testing.make_inputs("simple_gla", "typical", T=13)
    M = simple_gla.attention_matrix(x["q"], x["k"], x["g"])
    assert M.shape == (2, 2, 13, 13)
    assert np.all(np.triu(M, 1) == 0)
    o = np.moveaxis(M @ np.moveaxis(x["v"], 1, 2), 2, 1)
    testing.assert_close(o, simple_gla.parallel(**x)[0], "float64", "M @ v")


@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunkwise"])
def test_hard_reset_forgets_everything_before_it_exactly(form):
    x = testing.make_inputs("simple_gla", "typical", T=20, initial_state=True)
    x["g"][:, 9] = -np.inf                       # every head resets at t = 9
    o, h = testing.run(simple_gla, form, x)
    y = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in x.items()}
    for name in ("q", "k", "v"):
        y[name][:, :9] = np.random.default_rng(1).standard_normal(y[name][:, :9].shape)
    y["initial_state"] = 100 * x["initial_state"]
    o2, h2 = testing.run(simple_gla, form, y)
    assert np.array_equal(o[:, 9:], o2[:, 9:]) and np.array_equal(h, h2)
    # backward: with cotangents only after the reset, nothing before it gets a gradient
    do = np.ones_like(o)
    do[:, :9] = 0
    grads = testing.vjp(simple_gla, form, x, do, np.ones_like(h))
    assert all(np.isfinite(v).all() for v in grads.values())
    assert np.all(grads["initial_state"] == 0)
    for name in ("q", "k", "v"):
        assert np.all(grads[name][:, :9] == 0), name
    assert np.abs(grads["g"][:, :9]).max() <= 1e-12 * np.abs(grads["g"]).max()


def test_float32_stays_float32_and_step_starts_from_zeros():
    x = testing.make_inputs("simple_gla", "typical", T=5, dtype=np.float32)
    o, h = testing.run(simple_gla, "chunkwise", x, chunk_size=2)
    assert o.dtype == np.float32 and h.dtype == np.float32
    token = {k: v[:, 0] for k, v in x.items()}
    o0, s0 = simple_gla.step(**token)
    o1, s1 = simple_gla.step(**token, state=np.zeros_like(h))
    assert np.array_equal(o0, o1) and np.array_equal(s0, s1) and o0.dtype == np.float32


def test_default_scale_is_inverse_sqrt_k():
    x = testing.make_inputs("simple_gla", "typical", T=6)
    K = x["q"].shape[-1]
    testing.assert_close(simple_gla.recurrent(**x)[0], simple_gla.recurrent(**x, scale=K ** -0.5)[0])
    o2 = simple_gla.recurrent(**x, scale=2 * K ** -0.5)[0]
    testing.assert_close(o2, 2 * simple_gla.recurrent(**x)[0])


# ------------------------------------------------------------------------------ _scan helpers
def test_segsum_matches_the_definition_and_survives_minus_inf():
    rng = np.random.default_rng(0)
    g = -rng.uniform(0, 1, (3, 9))
    g[1, 4] = -np.inf
    S = segsum(g)
    for b in range(3):
        for t in range(9):
            for s in range(9):
                want = g[b, s + 1:t + 1].sum() if s <= t else -np.inf
                assert S[b, t, s] == pytest.approx(want, rel=1e-14, abs=1e-14) or (np.isneginf(want) and np.isneginf(S[b, t, s]))
    assert not np.isnan(S).any()


def test_chunking_round_trip_with_padding():
    x = np.arange(2 * 7 * 3 * 2, dtype=float).reshape(2, 7, 3, 2)
    c = to_chunks(x, 3)
    assert c.shape == (2, 3, 3, 3, 2)           # [B, H, N, C, D]
    assert np.all(c[:, :, -1, 1:] == 0)         # zero padding of the last chunk
    assert np.array_equal(from_chunks(c, 7), x)


@pytest.mark.parametrize("block", [1, 3, 64])
@pytest.mark.parametrize("T", [0, 1, 10])
def test_reverse_steps_yields_every_step_backwards_with_the_right_states(block, T):
    states = [1.0]
    for t in range(T):
        states.append(states[-1] * 2 + t)
    walked = list(reverse_steps(lambda S, t: S * 2 + t, 1.0, T, block=block))
    assert walked == [(t, states[t], states[t + 1]) for t in reversed(range(T))]
