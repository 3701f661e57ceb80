"""The tutorials (tutorials/*.py) run top to bottom, cell by cell, at their reduced sizes.

Each tutorial is a percent-cell script (``# %%`` starts a cell). It is executed here one cell at
a time in one namespace, with LINREC_TUTORIAL_QUICK=1 (smaller inputs) and matplotlib drawing to
memory; a failure names the tutorial, the cell's number, its first line and the error.
"""
import re
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("t[0-9][0-9]_*.py"))
CELL = re.compile(r"^# %%.*$", re.MULTILINE)


class TutorialError(AssertionError):
    pass


def cells(path: Path):
    """(number, first line number, source) of each cell; cell 0 is the header before the first
    ``# %%`` (the page's title docstring)."""
    text = path.read_text(encoding="utf-8")
    starts = [0] + [m.start() for m in CELL.finditer(text)]
    for n, (a, b) in enumerate(zip(starts, starts[1:] + [len(text)])):
        yield n, text.count("\n", 0, a) + 1, text[a:b]


def run_tutorial(path: Path) -> dict:
    namespace = {"__name__": "__main__", "__file__": str(path)}
    for n, line, source in cells(path):
        code = compile("\n" * (line - 1) + source, str(path), "exec")   # tracebacks keep file lines
        try:
            exec(code, namespace)
        except Exception as err:
            first = next((s for s in source.splitlines()[1:] if s.strip()), "").strip("# ")
            raise TutorialError(f"{path.name}: cell {n} (line {line}: {first!r}) failed: "
                                f"{type(err).__name__}: {err}") from err
    return namespace


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 3, TUTORIALS


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    monkeypatch.setenv("LINREC_TUTORIAL_QUICK", "1")
    monkeypatch.chdir(path.parent)
    try:
        run_tutorial(path)
    finally:
        plt.close("all")


def test_a_failing_cell_is_named(tmp_path):
    bad = tmp_path / "t99_bad.py"
    bad.write_text('"""\nBad\n===\n"""\n# %%\nx = 1\n\n# %%\n# The broken step\nassert x == 2, "x is 1"\n')
    with pytest.raises(TutorialError, match=r"t99_bad.py: cell 2 \(line 8: 'The broken step'\) failed: "
                                            r"AssertionError: x is 1"):
        run_tutorial(bad)


def test_tutorials_state_their_goal_and_check_their_claims():
    """Each page says what the reader can do at the end, and asserts what it shows."""
    for path in TUTORIALS:
        text = path.read_text(encoding="utf-8")
        assert "At the end of this page you can" in text, path.name
        assert text.count("\nassert ") + text.count("    assert ") >= 3, path.name
