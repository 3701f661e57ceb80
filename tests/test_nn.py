"""Every layer and mixer of linrec_ref.nn against central finite differences, in float64."""
import numpy as np
import pytest

from linrec_ref import testing
from linrec_ref.nn import functional as F
from linrec_ref.nn import layers, mixers, optim
from linrec_ref.nn.layers import Context
from linrec_ref.tasks import metrics

B, T, D = 2, 9, 8


def check_module(module, x, ctx=layers.EVAL, seed=0):
    """<dy, module(x)> against the module's backward: dx and every parameter's gradient."""
    rng = np.random.default_rng(seed)
    params = {k: v.copy() for k, v in module.parameters().items()}
    y, cache = module.forward(x, ctx)
    dy = (rng.standard_normal(y.shape) if not isinstance(y, tuple) else None)
    dx, grads = module.backward(cache, dy)
    assert set(grads) == set(params), (sorted(grads), sorted(params))

    def loss(d):
        module.load({k: d[k] for k in params})
        out, _ = module.forward(d["x"], ctx)
        return testing.inner(dy, out)

    names = ["x"] + sorted(params)
    result = testing.fd_check(loss, {"x": x, **params}, {"x": dx, **grads}, names)
    module.load(params)
    for name, comparison in result.items():
        assert comparison.ok, f"{type(module).__name__} d{name}: {comparison}"
    return result


def x_input(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


RNG = np.random.default_rng


@pytest.mark.parametrize("make", [
    lambda: layers.Linear(D, 5, RNG(0), dtype=np.float64),
    lambda: layers.Linear(D, 5, RNG(0), bias=False, dtype=np.float64),
    lambda: layers.LayerNorm(D, dtype=np.float64),
    lambda: layers.RMSNorm(D, dtype=np.float64),
    lambda: layers.ShortConv(D, RNG(0), dtype=np.float64),
    lambda: layers.ShortConv(D, RNG(0), bias=True, activation=None, dtype=np.float64),
    lambda: layers.SwiGLU(D, 3 * D, RNG(0), dtype=np.float64),
], ids=["linear", "linear_nobias", "layer_norm", "rms_norm", "short_conv", "conv_bias_noact", "swiglu"])
def test_layer_gradients(make):
    m = make()
    for k, p in m.parameters().items():           # move the norms' weights off 1 and 0
        p += 0.3 * RNG(5).standard_normal(p.shape)
    check_module(m, x_input(B, T, D))


def test_gated_rms_norm_gradients():
    m = layers.GatedRMSNorm(4, dtype=np.float64)
    m.params["w"] += 0.2
    o, z = x_input(B, T, 2, 4), x_input(B, T, 2, 4, seed=2)
    y, cache = m.forward((o, z))
    dy = RNG(3).standard_normal(y.shape)
    (do, dz), g = m.backward(cache, dy)

    def loss(d):
        m.params["w"] = d["w"]
        return testing.inner(dy, m.forward((d["o"], d["z"]))[0])

    res = testing.fd_check(loss, {"o": o, "z": z, "w": m.params["w"].copy()},
                           {"o": do, "z": dz, "w": g["w"]}, ["o", "z", "w"])
    assert all(c.ok for c in res.values()), res


@pytest.mark.parametrize("fn", ["silu", "sigmoid_", "softplus_", "logsigmoid", "l2_norm", "rope"])
def test_elementwise_gradients(fn):
    x = 3 * x_input(B, T, 2, 6)
    f, f_vjp = getattr(F, fn), getattr(F, fn.rstrip("_") + "_vjp")
    y, cache = f(x)
    dy = RNG(2).standard_normal(y.shape)
    res = testing.fd_check(lambda d: testing.inner(dy, f(d["x"])[0]), {"x": x},
                           {"x": f_vjp(cache, dy)["x"]}, ["x"])
    assert res["x"].ok, res


def test_dropout_scales_and_masks_and_is_identity_in_eval():
    x = np.ones((1000,))
    m = layers.Dropout(0.25)
    y, keep = m.forward(x, Context(True, RNG(0)))
    assert set(np.unique(y)) <= {0.0, 1 / 0.75}
    assert abs(y.mean() - 1) < 0.1
    dx, _ = m.backward(keep, np.ones_like(x))
    np.testing.assert_array_equal(dx, y)                      # the same mask and scale
    assert m.forward(x, layers.EVAL)[0] is x
    with pytest.raises(ValueError, match="p must lie in"):
        layers.Dropout(1.0)


def test_rope_rotates_pairs_by_position():
    x = x_input(1, 5, 1, 4)
    y, _ = F.rope(x, base=1000.0)
    # position 0 is unrotated; every (i, i + D/2) pair keeps its norm
    np.testing.assert_allclose(y[:, 0], x[:, 0])
    n = lambda a: a[..., :2] ** 2 + a[..., 2:] ** 2   # noqa: E731
    np.testing.assert_allclose(n(y), n(x))


def test_cross_entropy_matches_metrics_and_fd():
    rng = RNG(0)
    logits = rng.standard_normal((2, 7, 5))
    y = rng.integers(0, 5, (2, 7))
    mask = rng.random((2, 7)) < 0.7
    ce = F.cross_entropy(logits, y, mask)
    np.testing.assert_allclose(ce.loss, metrics.cross_entropy(logits, y, mask), rtol=1e-14)
    res = testing.fd_check(lambda d: F.cross_entropy(d["z"], y, mask).loss, {"z": logits},
                           {"z": ce.dlogits}, ["z"])
    assert res["z"].ok, res
    with pytest.raises(ValueError, match="selects no step"):
        F.cross_entropy(logits, y, np.zeros_like(mask))


MIXERS = {
    "linear_attention": lambda: mixers.LinearMixer("linear_attention", D, 2, RNG(0), dtype=np.float64),
    "retnet": lambda: mixers.LinearMixer("retnet", D, 2, RNG(0), dtype=np.float64),
    "gla": lambda: mixers.LinearMixer("gla", D, 2, RNG(0), gate_rank=4, dtype=np.float64),
    "delta_net": lambda: mixers.LinearMixer("delta_net", D, 2, RNG(0), output_gate=False, dtype=np.float64),
    "gated_delta_net": lambda: mixers.LinearMixer("gated_delta_net", D, 2, RNG(0), dtype=np.float64),
    "gdn_floor": lambda: mixers.LinearMixer("gated_delta_net", D, 2, RNG(0), decay_floor=0.9, dtype=np.float64),
    "gdn_alpha1": lambda: mixers.LinearMixer("gated_delta_net", D, 2, RNG(0), gate=False, dtype=np.float64),
    "gated_delta_product": lambda: mixers.LinearMixer("gated_delta_product", D, 2, RNG(0), n_householder=2,
                                                      allow_neg_eigval=True, dtype=np.float64),
    "mamba": lambda: _larger_steps(mixers.Mamba(D, RNG(0), d_state=4, dtype=np.float64)),
    "mamba2": lambda: mixers.Mamba2(D, 2, RNG(0), d_state=4, dtype=np.float64),
    "transformer": lambda: mixers.TransformerBlock(D, 2, RNG(0), dtype=np.float64),
}


def _larger_steps(m):
    """Steps dt ~ 0.5 instead of Mamba's 1e-3..1e-1 initialisation: with dt ~ 1e-3 the gradient
    of A_log is ~1e-5 and central differences cannot resolve it to the fd tier."""
    m.params["dt_bias"][...] = np.log(np.expm1(0.5))
    return m


@pytest.mark.parametrize("backend", ["numpy", "auto"])
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixer_gradients(name, backend):
    m = MIXERS[name]()
    for call in _calls(m):
        call.backend = backend
        call.form = mixers.op_form(call.op.name, backend) if call.form != "parallel" else "parallel"
    check_module(m, 0.5 * x_input(B, T, D))


def _calls(m):
    out = [m.call] if hasattr(m, "call") else []
    for c in m.children.values():
        out += _calls(c)
    return out


def test_mixer_rejects_bad_configuration():
    with pytest.raises(ValueError, match="kind must be one of"):
        mixers.LinearMixer("lstm", D, 2, RNG(0))
    with pytest.raises(ValueError, match="multiples of n_heads"):
        mixers.LinearMixer("gla", 10, 4, RNG(0))
    with pytest.raises(ValueError, match="decay_floor"):
        mixers.LinearMixer("gated_delta_net", D, 2, RNG(0), decay_floor=1.0)


def test_adam_matches_the_formula_and_clipping():
    p = {"w": np.array([1.0, -2.0])}
    opt = optim.Adam(p)
    g = {"w": np.array([0.5, 0.1])}
    opt.step(g, lr=0.1)
    # first step: m/(1-b1) = g, v/(1-b2) = g^2, so the update is lr * g / (|g| + eps)
    np.testing.assert_allclose(p["w"], [1.0 - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 - 0.1 * 0.1 / (0.1 + 1e-8)])
    grads = {"a": np.array([3.0]), "b": np.array([4.0])}
    assert optim.clip_by_global_norm(grads, 1.0) == pytest.approx(5.0)
    assert optim.global_norm(grads) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="missing"):
        opt.step({}, 0.1)
    assert optim.warmup_cosine(5, 100, 1.0, 10) == pytest.approx(0.5)
    assert optim.warmup_cosine(100, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert optim.warmup_cosine(55, 100, 1.0, 10) == pytest.approx(0.5)
