"""rwkv7: equals dplr under its mapping (q = r, same a, b, w) in every form and backward, the
default scale is 1, RWKV-7's own update written with kappa_hat and a_coef, and validation.

The generic suite (test_equivalence.py) covers the forms against the recurrent loop and finite
differences in every regime.
"""
import numpy as np
import pytest

from linrec_ref import InputError, testing
from linrec_ref.ops import dplr
from linrec_ref.ops import rwkv7 as op

FORMS = ("recurrent", "parallel", "chunkwise")


DIMS = {"B": 2, "H": 2, "HV": 2, "K": 5, "V": 4}   # HV = H: v, a, b, w on the heads of r, k


def _as_dplr(x):
    y = {n: v for n, v in x.items() if n != "r"}
    y["q"] = x["r"]
    return y


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("regime", ["typical", "hard_reset"])
def test_rwkv7_is_dplr_with_q_r_and_scale_one(form, regime):
    x = testing.make_inputs("rwkv7", regime, T=10, initial_state=True, **DIMS)
    got = testing.run(op, form, x, chunk_size=3)
    ref = testing.run(dplr, form, _as_dplr(x), chunk_size=3, scale=1.0)
    testing.assert_close(got, ref)
    do, dht = testing.cotangents(*got, seed=1)
    g = testing.vjp(op, form, x, do, dht, chunk_size=3)
    g_ref = testing.vjp(dplr, form, _as_dplr(x), do, dht, chunk_size=3, scale=1.0)
    g_ref["r"] = g_ref.pop("q")
    testing.assert_close({n: g[n] for n in sorted(g)}, {n: g_ref[n] for n in sorted(g)})


def test_step_is_dplr_step():
    x = testing.make_inputs("rwkv7", T=1, initial_state=True, **DIMS)
    token = {n: x[n][:, 0] for n in ("r", "w", "k", "v", "a", "b")}
    got = op.step(**token, state=x["initial_state"])
    q = token.pop("r")
    testing.assert_close(got, dplr.step(q=q, **token, state=x["initial_state"], scale=1.0))


def test_default_scale_is_one():
    x = testing.make_inputs("rwkv7", T=6, initial_state=True, **DIMS)
    testing.assert_close(op.recurrent(**x), op.recurrent(**x, scale=1.0))
    assert not testing.compare(op.recurrent(**x)[0], op.recurrent(**x, scale=5 ** -0.5)[0]).ok


def test_paper_update_with_kappa_hat_and_a_coef():
    """RWKV-7's update on the wkv matrix (V x K, the transpose of the state here):
    wkv_t = wkv_{t-1} (diag(e^{w_t}) - kappa_hat^T (a_coef * kappa_hat)) + v_t^T k_t,
    o_t = wkv_t r_t, equals rwkv7 with a = -kappa_hat, b = kappa_hat * a_coef."""
    rng = np.random.default_rng(4)
    B, T, H, K, V = 1, 9, 2, 5, 4
    kappa = rng.standard_normal((B, T, H, K))
    kappa /= np.linalg.norm(kappa, axis=-1, keepdims=True)
    a_coef = rng.uniform(0, 1, (B, T, H, K))
    r, k = rng.standard_normal((2, B, T, H, K))
    v = rng.standard_normal((B, T, H, V))
    w = np.log(rng.uniform(0.3, 0.99, (B, T, H, K)))
    wkv0 = rng.standard_normal((B, H, V, K))
    o_ref = np.zeros((B, T, H, V))
    wkv_T = np.zeros_like(wkv0)
    for h in range(H):
        wkv = wkv0[0, h].copy()
        for t in range(T):
            kh, ac = kappa[0, t, h], a_coef[0, t, h]
            wkv = wkv @ (np.diag(np.exp(w[0, t, h])) - np.outer(kh, ac * kh)) + np.outer(v[0, t, h], k[0, t, h])
            o_ref[0, t, h] = wkv @ r[0, t, h]
        wkv_T[0, h] = wkv
    x = dict(r=r, w=w, k=k, v=v, a=-kappa, b=kappa * a_coef, initial_state=wkv0.swapaxes(-1, -2))
    for form in FORMS:
        got = testing.run(op, form, x, chunk_size=3)
        testing.assert_close(got, (o_ref, wkv_T.swapaxes(-1, -2)))


def test_attention_matrix_maps_v_to_o():
    x = testing.make_inputs("rwkv7", "hard_reset", T=7, initial_state=True, **DIMS)
    M = op.attention_matrix(x["r"], x["w"], x["k"], x["a"], x["b"])
    o, _ = op.parallel(**dict(x, initial_state=None))
    testing.assert_close(np.einsum("bhts,bshv->bthv", M, x["v"]), o)


def test_registry_style_argument_order():
    """Positional order is (r, w, k, v, a, b), as fla's chunk_rwkv7(r, w, k, v, a, b)."""
    x = testing.make_inputs("rwkv7", T=5, initial_state=True, **DIMS)
    pos = op.recurrent(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], initial_state=x["initial_state"])
    testing.assert_close(pos, op.recurrent(**x))


def test_positive_log_decay_is_rejected():
    x = testing.make_inputs("rwkv7", T=4, initial_state=True, **DIMS)
    x["w"][0, 2, 1, 0] = 0.5
    with pytest.raises(InputError, match="rwkv7: .*'w'"):
        op.chunkwise(**x)


def test_state_shape_is_checked():
    x = testing.make_inputs("rwkv7", T=4, initial_state=True, **DIMS)
    x["initial_state"] = x["initial_state"][:, :, :, :2]
    with pytest.raises(InputError, match="initial_state"):
        op.recurrent(**x)
