"""Top-level entry points, backend dispatch, the registry and the command line."""
import subprocess
import sys

import numpy as np

import linrec_ref
from linrec_ref import backends, cli, registry, testing


def test_entry_point_dispatches_to_the_module_forms():
    x = testing.make_inputs("simple_gla", "typical", T=9, initial_state=True)
    for form in linrec_ref.FORMS:
        o, h = linrec_ref.simple_gla(**x, form=form, output_final_state=True, backend="numpy")
        o_ref, h_ref = registry.form("simple_gla", form)(**x, output_final_state=True)
        assert np.array_equal(o, o_ref) and np.array_equal(h, h_ref)
    o, h = linrec_ref.simple_gla(**x)           # defaults: chunkwise, no final state
    assert h is None and o.shape == x["v"].shape and o.dtype == x["v"].dtype
    do = np.ones_like(o)
    g = linrec_ref.simple_gla.vjp(**x, do=do, form="parallel")
    assert set(g) == {"q", "k", "v", "g", "initial_state"}
    assert g["g"].shape == x["g"].shape


def test_backends_registry_accepts_new_backends():
    calls = []

    def resolve(op, form):
        calls.append((op, form))
        return registry.form(op, form)

    backends.register(backends.Backend("spy", resolve))
    try:
        x = testing.make_inputs("simple_gla", "typical", T=4)
        linrec_ref.simple_gla(**x, backend="spy", form="parallel")
        assert calls == [("simple_gla", "parallel")]
        assert "spy" in backends.available()
    finally:
        backends._BACKENDS.pop("spy")


def test_signatures_are_introspectable():
    import inspect
    from linrec_ref.ops import simple_gla
    sig = inspect.signature(simple_gla.chunkwise)
    assert list(sig.parameters)[:4] == ["q", "k", "v", "g"]
    assert sig.parameters["chunk_size"].default == 64
    assert sig.parameters["scale"].kind is inspect.Parameter.KEYWORD_ONLY


def test_catalogue_lists_every_available_op():
    rows = registry.catalogue()
    assert [r["name"] for r in rows] == list(registry.available())
    for r in rows:
        assert r["peers"] and r["transition"] and "recurrent" in r["forms"] and "step" in r["forms"]


def test_cli_ops_and_check(capsys):
    assert cli.main(["ops"]) == 0
    out = capsys.readouterr().out
    assert "simple_gla" in out and "scalar decay" in out
    assert cli.main(["check", "--op", "simple_gla", "--dtype", "float32", "--full-table"]) == 0
    out = capsys.readouterr().out
    assert "chunkwise vs recurrent(f64)" in out and "0 failed" in out
    assert cli.main(["check", "--op", "nonexistent"]) == 2


def test_cli_check_fails_on_a_broken_form(monkeypatch, capsys):
    """`linrec check` must exit non-zero when a form is wrong."""
    from linrec_ref.ops import simple_gla
    real = simple_gla.parallel

    def broken(*args, **kwargs):
        o, h = real(*args, **kwargs)
        return o * (1 + 1e-6), h

    monkeypatch.setattr(simple_gla, "parallel", broken)
    assert cli.main(["check", "--op", "simple_gla"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "linrec_ref.cli", "ops"], capture_output=True, text=True)
    assert r.returncode == 0 and "simple_gla" in r.stdout
