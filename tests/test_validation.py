"""Every validation error names the argument and what was expected (docs/conventions.md)."""
import numpy as np
import pytest

import linrec_ref
from linrec_ref import InputError, registry, testing
from linrec_ref.ops import simple_gla

OPS = registry.available()


def _inputs(op="simple_gla", **kw):
    return testing.make_inputs(op, "typical", T=8, **kw)


# ----------------------------------------------------------------------------- generic, every op
@pytest.mark.parametrize("op", OPS)
def test_every_input_rejects_wrong_rank(op):
    spec = registry.spec(op)
    x = _inputs(op)
    for a in spec.inputs:
        if x.get(a.name) is None:
            continue
        bad = dict(x, **{a.name: x[a.name][..., None]})
        with pytest.raises(InputError, match=rf"argument '{a.name}' must have shape \[{', '.join(a.dims)}\]"):
            registry.form(op, "recurrent")(**bad)


@pytest.mark.parametrize("op", OPS)
def test_every_input_rejects_nan(op):
    spec = registry.spec(op)
    x = _inputs(op)
    for a in spec.inputs:
        if x.get(a.name) is None or x[a.name].size == 0:
            continue
        arr = x[a.name].copy()
        arr.reshape(-1)[0] = np.nan
        with pytest.raises(InputError, match=rf"argument '{a.name}' contains NaN"):
            registry.form(op, "chunkwise")(**dict(x, **{a.name: arr}))


@pytest.mark.parametrize("op", OPS)
def test_log_gates_reject_positive_values(op):
    spec = registry.spec(op)
    x = _inputs(op)
    gates = [a for a in spec.inputs if a.log_gate and x.get(a.name) is not None and a.kind == "real"]
    for a in gates:
        arr = x[a.name].copy()
        arr.reshape(-1)[-1] = 0.25
        with pytest.raises(InputError, match=rf"argument '{a.name}' is a log decay and must be <= 0"):
            registry.form(op, "parallel")(**dict(x, **{a.name: arr}))


@pytest.mark.parametrize("op", OPS)
def test_mismatched_time_axis_between_arguments(op):
    spec = registry.spec(op)
    x = _inputs(op)
    per_token = [a for a in spec.inputs if a.per_token and x.get(a.name) is not None]
    if len(per_token) < 2:
        pytest.skip("a single per-token input")
    a = per_token[1]
    with pytest.raises(InputError, match=rf"argument '{a.name}' has T=7 at axis 1, but T=8"):
        registry.form(op, "recurrent")(**dict(x, **{a.name: x[a.name][:, :7]}))


@pytest.mark.parametrize("op", OPS)
def test_unsupported_and_mixed_dtypes(op):
    spec = registry.spec(op)
    x = _inputs(op)
    a = next(a for a in spec.inputs if a.kind == "real" and x.get(a.name) is not None)
    with pytest.raises(InputError, match=rf"argument '{a.name}' has dtype float16; expected float32 or float64"):
        registry.form(op, "recurrent")(**dict(x, **{a.name: x[a.name].astype(np.float16)}))
    others = [b for b in spec.inputs if b.kind == "real" and x.get(b.name) is not None and b is not a]
    if others:
        b = others[0]
        with pytest.raises(InputError, match=rf"argument '{b.name}' has dtype float32, but the other inputs are float64"):
            registry.form(op, "recurrent")(**dict(x, **{b.name: x[b.name].astype(np.float32)}))


@pytest.mark.parametrize("op", OPS)
def test_initial_state_shape_and_dtype(op):
    x = _inputs(op, initial_state=True)
    h0 = x["initial_state"]
    first = h0[0] if isinstance(h0, tuple) else h0
    wrong = first[:1] if first.shape[0] > 1 else np.concatenate([first, first])
    bad = (wrong,) + tuple(h0[1:]) if isinstance(h0, tuple) else wrong
    with pytest.raises(InputError, match=r"initial_state.* has [A-Z]=\d+ at axis 0"):
        registry.form(op, "chunkwise")(**dict(x, initial_state=bad))


# ----------------------------------------------------------------------------- specific messages
def test_non_array_input_is_not_converted():
    x = _inputs()
    with pytest.raises(TypeError, match=r"argument 'q' must be a numpy.ndarray, got list"):
        simple_gla.recurrent(**dict(x, q=x["q"].tolist()))


def test_wrong_head_count_names_both_arguments():
    x = _inputs()
    with pytest.raises(InputError, match=r"argument 'g' has H=3 at axis 2, but H=2 from argument 'q'"):
        simple_gla.parallel(**dict(x, g=np.zeros((2, 8, 3))))


def test_integer_input_is_rejected():
    x = _inputs()
    with pytest.raises(InputError, match=r"argument 'v' has dtype int64; expected float32 or float64"):
        simple_gla.recurrent(**dict(x, v=np.ones(x["v"].shape, dtype=np.int64)))


def test_plus_inf_gate_and_inf_input():
    x = _inputs()
    g = x["g"].copy(); g[0, 1, 0] = np.inf
    with pytest.raises(InputError, match=r"argument 'g' is a log decay and must be <= 0.*index \(0, 1, 0\)"):
        simple_gla.recurrent(**dict(x, g=g))
    q = x["q"].copy(); q[1, 2, 0, 3] = -np.inf
    with pytest.raises(InputError, match=r"argument 'q' contains Inf at index \(1, 2, 0, 3\)"):
        simple_gla.recurrent(**dict(x, q=q))


@pytest.mark.parametrize("chunk,exc,msg", [
    (0, InputError, r"'chunk_size' must be a positive integer, got 0"),
    (-4, InputError, r"'chunk_size' must be a positive integer, got -4"),
    (2.0, TypeError, r"'chunk_size' must be a positive integer, got float"),
    (True, TypeError, r"'chunk_size' must be a positive integer, got bool"),
])
def test_bad_chunk_size(chunk, exc, msg):
    with pytest.raises(exc, match=msg):
        simple_gla.chunkwise(**_inputs(), chunk_size=chunk)


@pytest.mark.parametrize("cu,msg", [
    (np.array([1, 8]), r"'cu_seqlens' must start at 0, got 1"),
    (np.array([0, 3, 7]), r"'cu_seqlens' must end at T=8 \(the packed length\), got 7"),
    (np.array([0, 5, 3, 8]), r"'cu_seqlens' must be non-decreasing; cu_seqlens\[2\]=3 < cu_seqlens\[1\]=5"),
    (np.array([0.0, 8.0]), r"'cu_seqlens' must have an integer dtype, got float64"),
    (np.array([[0, 8]]), r"'cu_seqlens' must be a 1-D array of N\+1 >= 2 offsets"),
    (np.array([0]), r"'cu_seqlens' must be a 1-D array of N\+1 >= 2 offsets"),
])
def test_bad_cu_seqlens(cu, msg):
    x = _inputs(B=1)
    with pytest.raises(InputError, match=msg):
        simple_gla.recurrent(**x, cu_seqlens=cu)


def test_cu_seqlens_requires_batch_one():
    with pytest.raises(InputError, match=r"batch size must be 1, got B=2"):
        simple_gla.chunkwise(**_inputs(B=2), cu_seqlens=np.array([0, 3, 8]))


def test_cu_seqlens_initial_state_has_one_row_per_segment():
    x = _inputs(B=1)
    h0 = np.zeros((3, 2, 8, 6))
    with pytest.raises(InputError, match=r"'initial_state' has N=3 at axis 0, but N=2 from cu_seqlens"):
        simple_gla.recurrent(**x, cu_seqlens=np.array([0, 3, 8]), initial_state=h0)


def test_initial_state_dtype_is_not_cast():
    x = _inputs()
    with pytest.raises(InputError, match=r"'initial_state' has dtype float32; expected float64"):
        simple_gla.recurrent(**x, initial_state=np.zeros((2, 2, 8, 6), np.float32))


def test_vjp_cotangent_shapes():
    x = _inputs()
    with pytest.raises(InputError, match=r"argument 'do' must have shape \[B, T, H, V\]"):
        simple_gla.recurrent_vjp(**x, do=np.zeros((2, 8, 2)))
    with pytest.raises(InputError, match=r"argument 'dht' has V=5 at axis 3, but V=6"):
        simple_gla.recurrent_vjp(**x, do=np.zeros((2, 8, 2, 6)), dht=np.zeros((2, 2, 8, 5)))


def test_scale_and_unknown_options():
    x = _inputs()
    with pytest.raises(TypeError, match=r"'scale' must be a real number or None, got str"):
        simple_gla.recurrent(**x, scale="0.5")
    with pytest.raises(InputError, match=r"'scale' must be finite"):
        simple_gla.recurrent(**x, scale=float("nan"))
    with pytest.raises(TypeError, match=r"simple_gla: got an unexpected keyword argument 'normalize'"):
        simple_gla.recurrent(**x, normalize=True)


def test_step_state_shape():
    x = _inputs()
    token = {k: v[:, 0] for k, v in x.items()}
    with pytest.raises(InputError, match=r"argument 'state' must have shape \[N, H, K, V\]"):
        simple_gla.step(**token, state=np.zeros((2, 2, 8)))


def test_unknown_backend_and_form():
    x = _inputs()
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; available backends: numpy"):
        linrec_ref.simple_gla(**x, backend="cuda")
    with pytest.raises(ValueError, match=r"unknown form 'fused'"):
        linrec_ref.simple_gla(**x, form="fused")
    with pytest.raises(KeyError, match=r"unknown op 'gla2'"):
        registry.spec("gla2")
