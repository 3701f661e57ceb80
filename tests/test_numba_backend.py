"""The numba backend's contract: dispatch, "auto", threads, errors, cache, edge sizes.

Numerical agreement with the loop is tests/test_backends.py; this file checks how the backend
behaves around the numbers. Tests that need Numba skip without it; the ones that simulate a
missing Numba run everywhere.
"""
import subprocess
import sys
import warnings

import numpy as np
import pytest

import linrec_ref
from linrec_ref import backends, registry, testing
from linrec_ref.backends import numba as numba_backend

needs_numba = pytest.mark.skipif(not backends.numba_installed(), reason="Numba is not installed")


def _run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_linrec_ref_does_not_import_numba():
    code = ("import sys, linrec_ref; linrec_ref.registry.catalogue(); "
            "linrec_ref.backends.resolved_name(); print('numba' in sys.modules)")
    assert _run_python(code) == "False"


@needs_numba
def test_the_accelerated_table_is_what_the_kernel_modules_provide():
    cores = numba_backend.cores()
    assert {op: tuple(sorted(forms)) for op, forms in cores.items()} == \
        {op: tuple(sorted(forms)) for op, forms in numba_backend.ACCELERATED.items()}
    for op, forms in cores.items():
        assert op in registry.available()
        for form in forms:
            registry.form(op, form)                     # every kernel replaces an existing form


@needs_numba
def test_auto_is_the_default_and_picks_numba():
    assert backends.get_backend() == "auto" and backends.resolved_name() == "numba"
    fn = backends.get(None).resolve("gla", "recurrent")
    assert fn.__qualname__ == "gla.recurrent" and fn is not registry.form("gla", "recurrent")
    x = testing.make_inputs("gla", initial_state=True)
    testing.assert_close(linrec_ref.gla(**x, form="recurrent", output_final_state=True),
                         linrec_ref.gla(**x, form="recurrent", backend="numpy", output_final_state=True))


def test_set_backend_changes_what_none_means_and_validates():
    previous = linrec_ref.set_backend("numpy")
    try:
        assert linrec_ref.get_backend() == "numpy"
        assert backends.get(None).resolve("gla", "recurrent") is registry.form("gla", "recurrent")
        with pytest.raises(ValueError, match="unknown backend 'fast'; available backends: auto, numba, numpy"):
            linrec_ref.set_backend("fast")
        assert linrec_ref.get_backend() == "numpy"      # a rejected name changes nothing
    finally:
        linrec_ref.set_backend(previous)
    assert linrec_ref.get_backend() == previous


@needs_numba
def test_forms_without_a_kernel_run_the_numpy_form():
    x = testing.make_inputs("gla")
    assert "parallel" not in numba_backend.accelerated("gla")
    o_numba = linrec_ref.gla(**x, form="parallel", backend="numba", num_threads=1)
    np.testing.assert_array_equal(o_numba[0], registry.form("gla", "parallel")(**x)[0])
    assert "chunkwise_vjp" not in numba_backend.accelerated("dplr")
    x = testing.make_inputs("dplr")
    o = registry.form("dplr", "recurrent")(**x)[0]
    np.testing.assert_array_equal(linrec_ref.dplr.vjp(**x, do=o, form="chunkwise", backend="numba")["v"],
                                  linrec_ref.dplr.vjp(**x, do=o, form="chunkwise", backend="numpy")["v"])


@needs_numba
def test_same_validation_errors_as_the_reference():
    x = testing.make_inputs("gated_delta_rule")
    bad = dict(x, k=x["k"][:, :, :, :-1])
    for backend in ("numpy", "numba"):
        with pytest.raises(linrec_ref.InputError) as e:
            linrec_ref.gated_delta_rule(**bad, form="recurrent", backend=backend)
        assert "argument 'k'" in str(e.value)
    with pytest.raises(TypeError, match="output_final_state"):
        linrec_ref.gla(**testing.make_inputs("gla"), form="recurrent", backend="numba", output_final_state="no")


@needs_numba
@pytest.mark.parametrize("op", sorted(numba_backend.ACCELERATED))
def test_edge_sizes(op):
    """T = 0 passes the state through (and dht back); T = 1; the state of a long call is K x V."""
    for T in (0, 1):
        x = testing.make_inputs(op, T=T, initial_state=True)
        o, ht = testing.run(op, "recurrent", x, backend="numba")
        ref = testing.run(op, "recurrent", x)
        testing.assert_close((o, ht), ref)
        do, dht = testing.cotangents(o, ht)
        testing.assert_close(testing.vjp(op, "recurrent", x, do, dht, backend="numba"),
                             testing.vjp(op, "recurrent", x, do, dht))


@needs_numba
def test_num_threads_is_honoured_and_checked():
    import numba
    x = testing.make_inputs("simple_gla", B=1, T=40)
    before = numba.get_num_threads()
    seen = []
    real = numba_backend._gla.gated_forward

    def spy(*args):
        seen.append(numba.get_num_threads())
        return real(*args)

    numba_backend._gla.gated_forward = spy
    try:
        one = linrec_ref.simple_gla(**x, form="recurrent", backend="numba", num_threads=1)
        all_ = linrec_ref.simple_gla(**x, form="recurrent", backend="numba")
    finally:
        numba_backend._gla.gated_forward = real
    assert seen == [1, before] and numba.get_num_threads() == before
    np.testing.assert_allclose(one[0], all_[0], rtol=1e-12)
    for bad in (0, -1, 2.0, True, numba.config.NUMBA_NUM_THREADS + 1):
        with pytest.raises(ValueError, match="num_threads must be an integer in"):
            linrec_ref.simple_gla(**x, form="recurrent", backend="numba", num_threads=bad)


def test_missing_numba_names_the_install_and_auto_falls_back_once(monkeypatch):
    def no_numba(what="the numba backend"):
        raise ImportError(f"{what} needs Numba, which is not installed: {numba_backend.INSTALL_HINT} "
                          "(or pass backend='numpy')")

    monkeypatch.setattr(numba_backend, "import_numba", no_numba)
    monkeypatch.setattr(numba_backend, "_CORES", None)
    monkeypatch.setattr(numba_backend, "_FELL_BACK", {})
    monkeypatch.setattr(backends, "numba_installed", lambda: True)
    x = testing.make_inputs("gla")
    with pytest.raises(ImportError, match=r"pip install 'linrec_ref\[numba\]'.*backend='numpy'"):
        linrec_ref.gla(**x, form="recurrent", backend="numba")
    with pytest.warns(RuntimeWarning, match="Numba could not be imported"):
        o = linrec_ref.gla(**x, form="recurrent")      # auto: NumPy, with one warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # ... and only once
        o2 = linrec_ref.gla(**x, form="recurrent")
    np.testing.assert_array_equal(o[0], registry.form("gla", "recurrent")(**x)[0])
    np.testing.assert_array_equal(o2[0], o[0])


@needs_numba
def test_a_compile_failure_names_the_form_and_the_way_out(monkeypatch):
    from numba.core.errors import TypingError

    def broken(*args, **kwargs):
        raise TypingError("no implementation for this signature")

    monkeypatch.setitem(numba_backend.cores()["retnet"], "recurrent", broken)
    monkeypatch.setattr(numba_backend, "_PUBLIC", {})
    monkeypatch.setattr(numba_backend, "_FELL_BACK", {})
    x = testing.make_inputs("retnet")
    with pytest.raises(RuntimeError, match=r"compiling retnet\.recurrent failed .*backend='numpy'"):
        linrec_ref.retnet(**x, form="recurrent", backend="numba")
    with pytest.warns(RuntimeWarning, match=r"retnet\.recurrent failed to compile"):
        o = linrec_ref.retnet(**x, form="recurrent", backend="auto")
    np.testing.assert_array_equal(o[0], registry.form("retnet", "recurrent")(**x)[0])


def test_the_cache_goes_outside_the_source_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert numba_backend.cache_dir() == tmp_path / "linrec_ref" / "numba"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert numba_backend.cache_dir() == tmp_path / "mine"


@needs_numba
def test_compiled_kernels_leave_no_cache_files_next_to_the_sources():
    from pathlib import Path
    numba_backend.cores()
    linrec_ref.gla(**testing.make_inputs("gla"), form="recurrent", backend="numba")
    folder = Path(numba_backend.__file__).parent
    assert not [p for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")]
