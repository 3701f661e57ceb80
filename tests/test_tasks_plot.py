"""The SelectivBench pictures show what they claim (skipped without matplotlib)."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from linrec_ref.tasks import plot, presets  # noqa: E402
from linrec_ref.tasks.grammar import make_grammar  # noqa: E402


def test_transition_matrix_is_the_grammar_in_label_order():
    g = make_grammar(5, 2, 3, seed=1)
    P = plot.transition_matrix(g)
    label = g.state_label
    for src, dst in g.transitions:
        i = list(g.succ[src]).index(dst)
        assert P[label[src], label[dst]] == g.succ_prob[src][i]
    assert np.count_nonzero(P) == len(g.transitions)
    rows = P.sum(axis=1)
    assert rows[label[g.end_state]] == 0                          # '#' has no out-edges
    np.testing.assert_allclose(np.delete(rows, label[g.end_state]), 1.0, rtol=1e-12)


def test_plots_draw_the_matrix_and_the_inputs(tmp_path):
    config = presets.get_preset("t3-small", amb=6)
    g = config.grammar(1)
    sample = presets.make_sample(config, 1, 1, grammar=g)
    ax = plot.plot_grammar(g)
    np.testing.assert_array_equal(ax.images[0].get_array(), plot.transition_matrix(g))
    ax2 = plot.plot_sample(sample, g, max_steps=50)
    np.testing.assert_array_equal(ax2.images[0].get_array(), sample.x[:50].T)
    path = plot.save(ax2.figure, tmp_path / "sample.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))                          # no temporary file left


def test_cli_plot(tmp_path, capsys):
    from linrec_ref import cli
    out = tmp_path / "t1.png"
    assert cli.main(["selectivbench", "plot", "--preset", "t1-small", "--amb", "6", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
