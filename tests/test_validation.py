"""Every validation error names the argument and what was expected (docs/conventions.md)."""
import numpy as np
import pytest

import linrec_ref
from linrec_ref import InputError, registry, testing
from linrec_ref.ops import simple_gla

OPS = registry.available()


# ----------------------------------------------------------------------------- generic, every op
@pytest.mark.parametrize("op", OPS)
def test_every_input_rejects_wrong_rank(op):
    spec = registry.spec(op)
    x = testing.make_inputs(op, T=8)
    for a in spec.inputs:
        if x.get(a.name) is None:
            continue
        bad = dict(x, **{a.name: x[a.name][..., None]})
        with pytest.raises(InputError, match=rf"argument '{a.name}' must have shape \[{', '.join(a.dims)}\]"):
            registry.form(op, "recurrent")(**bad)


@pytest.mark.parametrize("op", OPS)
def test_every_input_rejects_nan(op):
    spec = registry.spec(op)
    x = testing.make_inputs(op, T=8)
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
    x = testing.make_inputs(op, T=8)
    gates = [a for a in spec.inputs if a.log_gate and x.get(a.name) is not None and a.kind == "real"]
    for a in gates:
        arr = x[a.name].copy()
        arr.reshape(-1)[-1] = 0.25
        with pytest.raises(InputError, match=rf"argument '{a.name}' is a log decay and must be <= 0"):
            registry.form(op, "parallel")(**dict(x, **{a.name: arr}))


@pytest.mark.parametrize("op", OPS)
def test_mismatched_time_axis_between_arguments(op):
    spec = registry.spec(op)
    x = testing.make_inputs(op, T=8)
    per_token = [a for a in spec.inputs if a.per_token and x.get(a.name) is not None]
    if len(per_token) < 2:
        pytest.skip("a single per-token input")
    a = per_token[1]
    with pytest.raises(InputError, match=rf"argument '{a.name}' has T=7 at axis 1, but T=8"):
        registry.form(op, "recurrent")(**dict(x, **{a.name: x[a.name][:, :7]}))


@pytest.mark.parametrize("op", OPS)
def test_unsupported_and_mixed_dtypes(op):
    spec = registry.spec(op)
    x = testing.make_inputs(op, T=8)
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
    x = testing.make_inputs(op, T=8, initial_state=True)
    h0 = x["initial_state"]
    first = h0[0] if isinstance(h0, tuple) else h0
    wrong = first[:1] if first.shape[0] > 1 else np.concatenate([first, first])
    bad = (wrong,) + tuple(h0[1:]) if isinstance(h0, tuple) else wrong
    with pytest.raises(InputError, match=r"initial_state.* has [A-Z]=\d+ at axis 0"):
        registry.form(op, "chunkwise")(**dict(x, initial_state=bad))


# ----------------------------------------------------------------------------- specific messages
def test_non_array_input_is_not_converted():
    x = testing.make_inputs("simple_gla", T=8)
    with pytest.raises(TypeError, match=r"argument 'q' must be a numpy.ndarray, got list"):
        simple_gla.recurrent(**dict(x, q=x["q"].tolist()))


def test_wrong_head_count_names_both_arguments():
    x = testing.make_inputs("simple_gla", T=8)
    with pytest.raises(InputError, match=r"argument 'g' has H=3 at axis 2, but H=2 from argument 'q'"):
        simple_gla.parallel(**dict(x, g=np.zeros((2, 8, 3))))


def test_integer_input_is_rejected():
    x = testing.make_inputs("simple_gla", T=8)
    with pytest.raises(InputError, match=r"argument 'v' has dtype int64; expected float32 or float64"):
        simple_gla.recurrent(**dict(x, v=np.ones(x["v"].shape, dtype=np.int64)))


def test_plus_inf_gate_and_inf_input():
    x = testing.make_inputs("simple_gla", T=8)
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
        simple_gla.chunkwise(**testing.make_inputs("simple_gla", T=8), chunk_size=chunk)


@pytest.mark.parametrize("cu,msg", [
    (np.array([1, 8]), r"'cu_seqlens' must start at 0, got 1"),
    (np.array([0, 3, 7]), r"'cu_seqlens' must end at T=8 \(the packed length\), got 7"),
    (np.array([0, 5, 3, 8]), r"'cu_seqlens' must be non-decreasing; cu_seqlens\[2\]=3 < cu_seqlens\[1\]=5"),
    (np.array([0.0, 8.0]), r"'cu_seqlens' must have an integer dtype, got float64"),
    (np.array([[0, 8]]), r"'cu_seqlens' must be a 1-D array of N\+1 >= 2 offsets"),
    (np.array([0]), r"'cu_seqlens' must be a 1-D array of N\+1 >= 2 offsets"),
])
def test_bad_cu_seqlens(cu, msg):
    x = testing.make_inputs("simple_gla", T=8, B=1)
    with pytest.raises(InputError, match=msg):
        simple_gla.recurrent(**x, cu_seqlens=cu)


def test_cu_seqlens_requires_batch_one():
    with pytest.raises(InputError, match=r"batch size must be 1, got B=2"):
        simple_gla.chunkwise(**testing.make_inputs("simple_gla", T=8, B=2), cu_seqlens=np.array([0, 3, 8]))


def test_cu_seqlens_initial_state_has_one_row_per_segment():
    x = testing.make_inputs("simple_gla", T=8, B=1)
    h0 = np.zeros((3, 2, 8, 6))
    with pytest.raises(InputError, match=r"'initial_state' has N=3 at axis 0, but N=2 from cu_seqlens"):
        simple_gla.recurrent(**x, cu_seqlens=np.array([0, 3, 8]), initial_state=h0)


def test_initial_state_dtype_is_not_cast():
    x = testing.make_inputs("simple_gla", T=8)
    with pytest.raises(InputError, match=r"'initial_state' has dtype float32; expected float64"):
        simple_gla.recurrent(**x, initial_state=np.zeros((2, 2, 8, 6), np.float32))


def test_vjp_cotangent_shapes():
    x = testing.make_inputs("simple_gla", T=8)
    with pytest.raises(InputError, match=r"argument 'do' must have shape \[B, T, H, V\]"):
        simple_gla.recurrent_vjp(**x, do=np.zeros((2, 8, 2)))
    with pytest.raises(InputError, match=r"argument 'dht' has V=5 at axis 3, but V=6"):
        simple_gla.recurrent_vjp(**x, do=np.zeros((2, 8, 2, 6)), dht=np.zeros((2, 2, 8, 5)))


def test_scale_and_unknown_options():
    x = testing.make_inputs("simple_gla", T=8)
    with pytest.raises(TypeError, match=r"'scale' must be a real number or None, got str"):
        simple_gla.recurrent(**x, scale="0.5")
    with pytest.raises(InputError, match=r"'scale' must be finite"):
        simple_gla.recurrent(**x, scale=float("nan"))
    with pytest.raises(TypeError, match=r"simple_gla: got an unexpected keyword argument 'normalize'"):
        simple_gla.recurrent(**x, normalize=True)


def test_step_state_shape():
    x = testing.make_inputs("simple_gla", T=8)
    token = {k: v[:, 0] for k, v in x.items()}
    with pytest.raises(InputError, match=r"argument 'state' must have shape \[N, H, K, V\]"):
        simple_gla.step(**token, state=np.zeros((2, 2, 8)))


def test_unknown_backend_and_form():
    x = testing.make_inputs("simple_gla", T=8)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; available backends: auto, numba, numpy"):
        linrec_ref.simple_gla(**x, backend="cuda")
    with pytest.raises(ValueError, match=r"unknown form 'fused'"):
        linrec_ref.simple_gla(**x, form="fused")
    with pytest.raises(KeyError, match=r"unknown op 'gla2'"):
        registry.spec("gla2")


# ----------------------------------------------------------------------------- dtypes seen
@pytest.mark.parametrize("op", OPS)
def test_mixed_dtypes_blame_the_argument_that_differs_from_the_majority(op):
    x = testing.make_inputs(op, T=8)
    given = [a.name for a in registry.spec(op).inputs if x.get(a.name) is not None]
    if len(given) < 3:
        pytest.skip("two inputs: a tie, covered by test_unsupported_and_mixed_dtypes")
    first = given[0]                                               # q (r, x, u) of the op
    odd = x[first].astype(np.complex64 if np.iscomplexobj(x[first]) else np.float32)
    seen = ", ".join(f"{n}: {(odd if n == first else x[n]).dtype}" for n in given)
    with pytest.raises(InputError, match=rf"argument '{first}' has dtype {odd.dtype}, but the other "
                                         rf"inputs are float64.*dtypes seen: {seen}\)"):
        registry.form(op, "chunkwise")(**dict(x, **{first: odd}))


# ----------------------------------------------------------------------------- array subclasses
def _masked(a):
    mask = np.zeros(a.shape, dtype=bool)
    mask.reshape(-1)[:1] = True
    return np.ma.masked_array(a, mask=mask)


@pytest.mark.parametrize("op", OPS)
def test_masked_arrays_are_rejected_naming_the_argument(op):
    x = testing.make_inputs(op, T=8, initial_state=True)
    for a in registry.spec(op).inputs:
        if x.get(a.name) is None:
            continue
        with pytest.raises(TypeError, match=rf"{op}: argument '{a.name}' is a numpy.ma.MaskedArray "
                                            rf"\(its mask would be ignored\)"):
            registry.form(op, "chunkwise")(**dict(x, **{a.name: _masked(x[a.name])}))
    h0 = x["initial_state"]
    bad = (_masked(h0[0]),) + h0[1:] if isinstance(h0, tuple) else _masked(h0)
    with pytest.raises(TypeError, match=r"argument 'initial_state(\.\w+)?' is a numpy.ma.MaskedArray"):
        registry.form(op, "recurrent")(**dict(x, initial_state=bad))


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself warns
@pytest.mark.parametrize("op", [op for op in OPS
                                if any(len(a.dims) == 2 for a in registry.spec(op).inputs)])
def test_numpy_matrix_is_rejected_naming_the_argument(op):
    x = testing.make_inputs(op, T=8)
    a = next(a for a in registry.spec(op).inputs if len(a.dims) == 2 and x.get(a.name) is not None)
    with pytest.raises(TypeError, match=rf"{op}: argument '{a.name}' is a numpy.matrix"):
        registry.form(op, "recurrent")(**dict(x, **{a.name: np.asmatrix(x[a.name])}))


def _as_memmap(a, path):
    m = np.memmap(path, dtype=a.dtype, mode="w+", shape=a.shape)
    m[...] = a
    return m


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _strided(a):
    """The same values in a non-contiguous view (every other entry of a doubled last axis)."""
    return np.repeat(a, 2, axis=-1)[..., ::2]


@pytest.mark.parametrize("kind", ["view", "memmap", "read_only", "strided"])
@pytest.mark.parametrize("op", OPS)
def test_views_memmaps_read_only_and_strided_inputs_work(op, kind, tmp_path):
    x = testing.make_inputs(op, T=8, initial_state=True)
    counter = iter(range(1000))
    convert = {"view": lambda a: a[...],
               "memmap": lambda a: _as_memmap(a, tmp_path / f"{next(counter)}.dat"),
               "read_only": _read_only, "strided": _strided}[kind]
    arrays = {k: (tuple(convert(p) for p in v) if isinstance(v, tuple) else convert(v))
              for k, v in x.items() if isinstance(v, (np.ndarray, tuple))}
    if kind == "strided":
        assert not all(p.flags.c_contiguous for _, p in testing.leaves(arrays) if p.ndim and p.size > 1)
    y = dict(x, **arrays)
    for form in ("recurrent", "chunkwise"):
        o, ht = testing.run(op, form, y)
        o_ref, ht_ref = testing.run(op, form, x)
        assert type(o) is np.ndarray
        testing.assert_close((o, ht), (o_ref, ht_ref))
        do = np.ones_like(o_ref)
        grads = testing.vjp(op, form, y, do)
        testing.assert_close(grads, testing.vjp(op, form, x, do))


# ----------------------------------------------------------------------------- boolean options
def test_output_final_state_takes_bool_only():
    x = testing.make_inputs("simple_gla", T=8)
    with pytest.raises(TypeError, match=r"simple_gla: argument 'output_final_state' must be True or "
                                        r"False, got 'no' \(str\)"):
        simple_gla.recurrent(**x, output_final_state="no")
    with pytest.raises(TypeError, match=r"'output_final_state' must be True or False, got 1 \(int\)"):
        simple_gla.chunkwise(**x, output_final_state=1)
    assert simple_gla.recurrent(**x, output_final_state=np.bool_(False))[1] is None
    assert simple_gla.recurrent(**x, output_final_state=np.bool_(True))[1] is not None


@pytest.mark.parametrize("op", [op for op in OPS
                                if any(isinstance(d, bool) for d in registry.spec(op).options.values())])
def test_boolean_op_options_take_bool_only(op):
    spec = registry.spec(op)
    x = testing.make_inputs(op, T=8)
    for name, default in spec.options.items():
        if not isinstance(default, bool):
            continue
        with pytest.raises(TypeError, match=rf"{op}: option '{name}' must be True or False, "
                                            rf"got 'yes' \(str\)"):
            registry.form(op, "recurrent")(**dict(x, **{name: "yes"}))
        o, _ = testing.run(op, "recurrent", dict(x, **{name: np.bool_(x.get(name, default))}))
        o_ref, _ = testing.run(op, "recurrent", x)
        testing.assert_close(o, o_ref)


# ----------------------------------------------------------------------------- tuple states
def test_tuple_state_of_the_wrong_length_says_the_lengths():
    x = testing.make_inputs("mlstm", T=8, initial_state=True)
    C, n, m = x["initial_state"]
    with pytest.raises(TypeError, match=r"mlstm: argument 'initial_state' must be a tuple of 3 arrays "
                                        r"\(C: \[N, H, K, V\], n: \[N, H, K\], m: \[N, H\]\), got a "
                                        r"tuple of 2"):
        linrec_ref.mlstm(**dict(x, initial_state=(C, n)))
    with pytest.raises(TypeError, match=r"must be a tuple of 3 arrays .*, got a ndarray"):
        linrec_ref.mlstm(**dict(x, initial_state=C))
    o, ht = linrec_ref.mlstm(**x, output_final_state=True)
    with pytest.raises(TypeError, match=r"argument 'dht' must be a tuple of 3 arrays .*, got a tuple of 4"):
        linrec_ref.mlstm.vjp(**x, do=o, dht=ht + (m,))


# ----------------------------------------------------------------------------- top-level API
def test_backend_none_is_the_default_backend():
    x = testing.make_inputs("simple_gla", T=8)
    o, ht = linrec_ref.simple_gla(**x, backend=None, output_final_state=True)
    testing.assert_close((o, ht), linrec_ref.simple_gla(**x, backend="numpy", output_final_state=True))
    grads = linrec_ref.simple_gla.vjp(**x, do=o, backend=None)
    testing.assert_close(grads, linrec_ref.simple_gla.vjp(**x, do=o))
    token = {k: v[:, 0] for k, v in x.items()}
    testing.assert_close(linrec_ref.simple_gla.step(**token, backend=None),
                         linrec_ref.simple_gla.step(**token, backend="numpy"))
    M = linrec_ref.simple_gla.attention_matrix(x["q"], x["k"], x["g"], backend=None)
    testing.assert_close(M, linrec_ref.simple_gla.attention_matrix(x["q"], x["k"], x["g"]))


def test_import_makes_every_op_module_reachable():
    import subprocess
    import sys
    code = ("import linrec_ref; "
            "print(all(callable(getattr(linrec_ref.ops, n).recurrent) for n in linrec_ref.registry.OP_NAMES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
