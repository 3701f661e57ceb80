"""Pictures of a SelectivBench task. Needs matplotlib (``pip install "linrec_ref[plot]"``); the
rest of the package never imports it.

    plot_grammar(grammar)   the transition structure: a [state, next state] matrix of transition
                            probabilities, states in hidden-state-id order so that the copies of an
                            ambiguous letter sit next to each other; start states marked.
    plot_sample(sample)     one expanded sample over time: the input steps (one-hot letters; blank
                            steps empty; distractor steps marked), and the label every step carries.
    save(fig, path)         write a figure atomically (temp file + os.replace); the format follows
                            the extension, PNG when there is none (``image_format``).

``linrec selectivbench plot --preset NAME --out FILE.png`` draws both for one sample.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from .expand import Sample
from .grammar import Grammar


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError('plotting needs matplotlib: pip install "linrec_ref[plot]"') from err
    if not os.environ.get("DISPLAY") and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
        matplotlib.use("Agg")  # no screen: draw to files
    import matplotlib.pyplot as plt
    return plt


def transition_matrix(grammar: Grammar) -> np.ndarray:
    """P[i, j] = probability of moving from state i to state j, states in hidden-state-id order
    (label 0 is '#'): [n_states, n_states]."""
    order = np.argsort(grammar.state_label, kind="stable")          # state index by label
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    P = np.zeros((len(order), len(order)))
    for i, (succ, prob) in enumerate(zip(grammar.succ, grammar.succ_prob)):
        P[position[i], position[succ]] = prob
    return P


def plot_grammar(grammar: Grammar, ax=None):
    """Draw ``transition_matrix(grammar)`` on ``ax`` (a new figure if None); returns the axes."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5.5))
    P = transition_matrix(grammar)
    image = ax.imshow(P, cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    starts = np.sort(grammar.state_label[grammar.start_states])
    ax.scatter(np.zeros_like(starts) - 0.5, starts, marker=">", color="red", s=18, clip_on=False,
               label="start states")
    ax.set_xlabel("next hidden state (id)")
    ax.set_ylabel("hidden state (id)")
    ax.set_title(f"{grammar.n_letters} letters, {grammar.n_amb} ambiguous x depth {grammar.depth}: "
                 f"{len(grammar.states)} states, {len(grammar.transitions)} edges", fontsize=9)
    ax.figure.colorbar(image, ax=ax, label="transition probability", shrink=0.8)
    ax.legend(loc="upper right", fontsize=7)
    return ax


def plot_sample(sample: Sample, grammar: Optional[Grammar] = None, ax=None, max_steps: Optional[int] = 120):
    """Draw the first ``max_steps`` steps of an expanded sample: inputs [input class, step] as an
    image (with noise, the noisy values), distractor steps marked, labels on a twin axis."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3.5))
    n = sample.n_steps if max_steps is None else min(max_steps, sample.n_steps)
    ax.imshow(sample.x[:n].T, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1,
              origin="lower")
    dis = np.flatnonzero(sample.is_distractor[:n])
    ax.scatter(dis, np.full(len(dis), sample.x.shape[1] - 0.5), marker="v", color="tab:orange", s=14,
               clip_on=False, label="distractor step")
    ax.set_xlabel("time step (token steps, then inserted blank / distractor steps)")
    ax.set_ylabel("input class ('#' = 0)")
    twin = ax.twinx()
    twin.step(np.arange(n), sample.y[:n], where="mid", color="tab:blue", lw=1, label="label (hidden state)")
    twin.set_ylabel("label (hidden-state id)", color="tab:blue")
    title = f"{sample.n_elements} elements, {sample.n_steps} steps"
    if grammar is not None:
        title += f"; {grammar.n_classes} classes"
    ax.set_title(title, fontsize=9)
    if len(dis):
        ax.legend(loc="upper left", fontsize=7)
    return ax


def image_format(path) -> str:
    """The image format for ``path``: its extension (one matplotlib can write), or "png" when it has
    none. ValueError, before anything is drawn or created, for an unknown extension, a folder, or a
    parent path that is a file."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"plot: the output must be an image file, but {path} is a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"plot: cannot write {path}: {parent} is a file")
            break
    if not path.suffix:
        return "png"
    supported = sorted(FigureCanvasBase.get_supported_filetypes())
    fmt = path.suffix[1:].lower()
    if fmt not in supported:
        raise ValueError(f"plot: unknown image format {path.suffix!r} of {path}; matplotlib writes "
                         f"{', '.join('.' + f for f in supported)} (no extension: PNG)")
    return fmt


def save(fig, path) -> Path:
    """Save a figure atomically; the format follows the file's extension (PNG when it has none)."""
    path = Path(path)
    fmt = image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary file's name ends in ".tmp": the format is passed, never guessed from the name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
