"""softmax_attention specifics: the definition, torch sdpa, the window, the forget gate's exact
reset, the KV cache (split-and-carry, decoding, absent entries, truncation) and option errors."""
import numpy as np
import pytest

from linrec_ref import InputError, testing
from linrec_ref.ops import softmax_attention as sa

FORMS = ("recurrent", "parallel", "chunkwise")


OP = "softmax_attention"
DIMS = dict(B=2, H=2, HV=2, K=4, V=3, L=4)  # sizes of the inputs, and L of the KV cache drawn


def definition(q, k, v, g=None, scale=None, window=None, cache=None):
    """Direct float64 transcription: loops over b, h, t, s; cache entry i sits at position i - L
    with logit bias log a_i + g_1 + .. + g_t."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    g = np.zeros((B, T, H)) if g is None else g
    L = 0 if cache is None else cache[2].shape[-1]
    o = np.zeros(v.shape)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys, vals, logits = [], [], []
                for i in range(L):
                    if window is not None and i - L <= t - window:
                        continue
                    if cache[2][b, h, i] == 0 or np.isneginf(g[b, :t + 1, h].sum()):
                        continue
                    keys.append(i)
                    vals.append(cache[1][b, h, i])
                    logits.append(scale * q[b, t, h] @ cache[0][b, h, i] + np.log(cache[2][b, h, i])
                                  + g[b, :t + 1, h].sum())
                for s in range(t + 1):
                    if window is not None and s <= t - window:
                        continue
                    decay = g[b, s + 1:t + 1, h].sum()
                    if np.isneginf(decay):
                        continue
                    vals.append(v[b, s, h])
                    logits.append(scale * q[b, t, h] @ k[b, s, h] + decay)
                logits = np.array(logits)
                w = np.exp(logits - logits.max())
                o[b, t, h] = (w / w.sum()) @ np.array(vals)
    return o


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("regime", ["typical", "hard_reset"])
def test_forms_match_the_definition(form, window, regime):
    x = testing.make_inputs(OP, regime, variant="forget_gate", T=13, **DIMS)
    cache = testing.random_state(OP, DIMS, rng=np.random.default_rng(1))
    o, _ = testing.run(sa, form, dict(x, initial_state=cache), chunk_size=4, window=window)
    testing.assert_close(o, definition(**x, window=window, cache=cache), "float64", form)
    o, _ = testing.run(sa, form, x, chunk_size=4, window=window)
    testing.assert_close(o, definition(**x, window=window), "float64", form + " no cache")


def test_without_gate_and_window_is_torch_sdpa():
    torch = pytest.importorskip("torch")
    x = testing.make_inputs(OP, T=13, **DIMS)                  # variant "default": no gate
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(np.moveaxis(x[n], 1, 2)) for n in "qkv"), is_causal=True)
    ref = np.moveaxis(ref.numpy(), 2, 1)
    for form in FORMS:
        testing.assert_close(testing.run(sa, form, x, chunk_size=4)[0], ref, "float64", form)


@pytest.mark.parametrize("form", FORMS)
def test_zero_gate_is_plain_attention_and_wide_window_is_no_window(form):
    x = testing.make_inputs(OP, variant="forget_gate", T=13, **DIMS)
    plain = testing.run(sa, form, dict(x, g=None), chunk_size=4)
    testing.assert_close(testing.run(sa, form, dict(x, g=np.zeros_like(x["g"])), chunk_size=4), plain,
                         "float64", "g = 0")
    testing.assert_close(testing.run(sa, form, x, chunk_size=4, window=13), testing.run(sa, form, x, chunk_size=4),
                         "float64", "window = T")
    o1, _ = testing.run(sa, form, x, chunk_size=4, window=1)
    testing.assert_close(o1, x["v"], "float64", "window = 1 reads only the own value")


@pytest.mark.parametrize("form", FORMS)
def test_hard_reset_forgets_everything_before_it_exactly(form):
    x = testing.make_inputs(OP, variant="forget_gate", T=20, **DIMS)
    x["g"][:, 9] = -np.inf
    cache = testing.random_state(OP, DIMS, rng=np.random.default_rng(1))
    o, h = testing.run(sa, form, dict(x, initial_state=cache), chunk_size=4)
    after = {n: a[:, 9:] for n, a in x.items()}
    after["g"] = after["g"].copy()
    after["g"][:, 0] = 0.0                      # token 9 itself is kept; everything before is gone
    o_after, _ = testing.run(sa, form, after, chunk_size=4)
    np.testing.assert_array_equal(np.isfinite(o), True)
    testing.assert_close(o[:, 9:], o_after, "float64", "after the reset")
    assert np.all(h[2][:, :, :4 + 9] == 0.0)    # the cache marks the forgotten keys absent
    do, _ = testing.cotangents(o, seed=3)
    do[:, :9] = 0.0                             # a loss on the outputs after the reset only
    grads = testing.vjp(sa, form, dict(x, initial_state=cache), do, chunk_size=4)
    for name, gr in testing.leaves(grads):
        assert np.isfinite(gr).all(), name
    for part in (grads["initial_state"][0], grads["initial_state"][1], grads["k"][:, :9], grads["v"][:, :9]):
        assert np.all(part == 0.0)              # exactly no gradient reaches the forgotten keys


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("window", [None, 3])
def test_split_and_carry_the_cache_and_decode_with_step(form, window):
    x = testing.make_inputs(OP, variant="forget_gate", T=17, **DIMS)
    ref_o, ref_h = testing.run(sa, form, x, chunk_size=4, window=window)
    first = {n: a[:, :6] for n, a in x.items()}
    o1, h1 = testing.run(sa, form, first, chunk_size=4, window=window)
    assert h1[0].shape == (2, 2, 6, 4)          # the cache grows with T
    o2, h2 = testing.run(sa, form, dict({n: a[:, 6:] for n, a in x.items()}, initial_state=h1), chunk_size=4,
                         window=window)
    testing.assert_close((np.concatenate([o1, o2], 1), h2), (ref_o, ref_h), "float64", "split")
    state, outs = h1, []
    for t in range(6, 17):
        o_t, state = sa.step(*(x[n][:, t] for n in ("q", "k", "v", "g")), state=state, window=window)
        outs.append(o_t)
    testing.assert_close(np.stack(outs, 1), ref_o[:, 6:], "float64", "step decoding")
    if window is not None:                      # older keys are never read again
        o_cut, _ = testing.run(sa, form, dict({n: a[:, 6:] for n, a in x.items()},
                                              initial_state=sa.truncate_cache(h1, window)),
                               chunk_size=4, window=window)
        testing.assert_close(o_cut, ref_o[:, 6:], "float64", "truncated cache")


def test_absent_cache_entries_are_exact_zeros():
    x = testing.make_inputs(OP, variant="forget_gate", T=13, **DIMS)
    cache = testing.random_state(OP, DIMS, rng=np.random.default_rng(1))
    holes = (cache[0], cache[1], cache[2].copy())
    holes[2][:, :, 1] = 0.0
    kept = tuple(c[:, :, [0, 2, 3]] for c in cache)
    for form in FORMS:
        testing.assert_close(testing.run(sa, form, dict(x, initial_state=holes), chunk_size=4)[0],
                             testing.run(sa, form, dict(x, initial_state=kept), chunk_size=4)[0], "float64", form)


def test_attention_matrix_is_the_softmax_weights():
    x = testing.make_inputs(OP, variant="forget_gate", T=11, **DIMS)
    P = sa.attention_matrix(x["q"], x["k"], x["g"], window=4)
    assert P.shape == (2, 2, 11, 11)
    assert np.all(np.triu(P, 1) == 0) and np.all(np.tril(P, -4) == 0)
    testing.assert_close(P.sum(-1), np.ones((2, 2, 11)), "float64", "rows sum to 1")
    o = np.moveaxis(P @ np.moveaxis(x["v"], 1, 2), 2, 1)
    testing.assert_close(o, sa.parallel(**x, window=4)[0], "float64", "P @ v")


@pytest.mark.parametrize("window,error", [(0, InputError), (-2, InputError), (2.5, TypeError),
                                          (True, TypeError), ("4", TypeError)])
@pytest.mark.parametrize("form", FORMS + ("attention_matrix",))
def test_bad_window_is_a_clear_error(form, window, error):
    x = testing.make_inputs(OP, variant="forget_gate", T=5, **DIMS)
    args = (x["q"], x["k"], x["g"]) if form == "attention_matrix" else tuple(x.values())
    with pytest.raises(error, match="softmax_attention: option 'window'"):
        getattr(sa, form)(*args, window=window)


def test_negative_cache_weight_and_wrong_dht_length_are_clear_errors():
    x = testing.make_inputs(OP, variant="forget_gate", T=5, **DIMS)
    cache = testing.random_state(OP, DIMS, rng=np.random.default_rng(1))
    bad = (cache[0], cache[1], -cache[2])
    with pytest.raises(InputError, match="a_cache.*>= 0"):
        sa.recurrent(**x, initial_state=bad)
    do = np.ones_like(x["v"])
    dht = tuple(np.ones_like(c) for c in cache)   # L = 4, but the final cache has L + T = 9
    with pytest.raises(InputError, match="dht.k_cache"):
        sa.parallel_vjp(**x, do=do, initial_state=cache, dht=dht)
