"""The pages of the site that are generated from the code at every build (docs/generated/).

- one page per op, from the registry: its recurrence and glossary (the module's docstring), the
  shapes of its arguments, its forms and what each costs, its peer functions, a picture of its
  implicit attention on typical inputs, and its float32 error against the float64 loop measured
  during the build;
- the API reference: one page per module group, autodoc of every public function and class;
- the command-line reference: the help of ``linrec`` and of every subcommand.

``check_documented`` warns (an error in the CI build) for every public function or class of the
documented modules that has no docstring, so a new undocumented function fails the build.
"""
from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import re
from contextlib import redirect_stdout
from pathlib import Path
from typing import Dict, List

import numpy as np

import linrec_ref
from linrec_ref import registry, testing


def _write(path: Path, text: str) -> None:
    """Write only when the text changed (Sphinx rebuilds the pages whose files changed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------ API modules
def api_groups() -> Dict[str, List[str]]:
    """Page title -> the modules it documents."""
    import linrec_ref.nn
    import linrec_ref.tasks
    tasks = sorted("linrec_ref.tasks." + m.name for m in pkgutil.iter_modules(linrec_ref.tasks.__path__))
    nn = sorted("linrec_ref.nn." + m.name for m in pkgutil.iter_modules(linrec_ref.nn.__path__))
    return {
        "linrec_ref": ["linrec_ref", "linrec_ref.registry"],
        "linrec_ref.testing": ["linrec_ref.testing", "linrec_ref.check"],
        "linrec_ref.backends": ["linrec_ref.backends", "linrec_ref.backends.numba"],
        "linrec_ref.ops": [f"linrec_ref.ops.{op}" for op in registry.OP_NAMES],
        "linrec_ref.tasks (SelectivBench)": tasks,
        "linrec_ref.nn (the training stack)": nn,
    }


def public_objects(module_name: str):
    """(name, object) of the functions and classes a module defines and does not mark private."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name, None)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == module_name:
            yield name, obj


def undocumented() -> List[str]:
    out = []
    for modules in api_groups().values():
        for m in modules:
            for name, obj in public_objects(m):
                if not (obj.__doc__ or "").strip():
                    out.append(f"{m}.{name}")
    return out


def check_documented(app, exception=None) -> None:
    from sphinx.util import logging
    log = logging.getLogger("linrec_ref.docs")
    for name in undocumented():
        log.warning(f"public function or class without a docstring: {name}")


def api_pages(out: Path) -> List[str]:
    pages = []
    for i, (title, modules) in enumerate(api_groups().items()):
        slug = re.sub(r"[^a-z0-9]+", "_", title.split(" ")[0].lower()).strip("_")
        lines = [title, "=" * len(title), ""]
        for m in modules:
            if title == "linrec_ref.ops":
                lines += [f"- :doc:`../ops/{m.rsplit('.', 1)[1]}`: the op's page holds its API"]
                continue
            lines += [m, "-" * len(m), "", f".. automodule:: {m}", "   :members:", ""]
        _write(out / "api" / f"{slug}.rst", "\n".join(lines) + "\n")
        pages.append(f"api/{slug}")
    index = ["API reference", "=============", "",
             "Every public function and class, with its docstring (the build fails on a missing one).",
             "", ".. toctree::", "   :maxdepth: 1", ""] + [f"   {p[4:]}" for p in pages]
    _write(out / "api" / "index.rst", "\n".join(index) + "\n")
    return pages


def docstring_as_text(app, what, name, obj, options, lines) -> None:
    """Docstrings here are plain text with ASCII math in fixed-width layout: keep the summary
    paragraph as text (reST's special characters escaped) and show the rest verbatim."""
    if not lines:
        return
    n = 1                  # the summary: up to a blank line or the first indented line
    while n < len(lines) and lines[n].strip() and not lines[n][:1].isspace():
        n += 1
    head, rest = lines[:n], lines[n:]
    head = [re.sub(r"([*|\\])", r"\\\1", line) for line in head]
    head = [re.sub(r"(\w)_(?!\w)", r"\1\\_", line) for line in head]
    head = [line.replace("`", "``").replace("````", "``") for line in head]
    body = [line for line in rest]
    while body and not body[0].strip():
        body.pop(0)
    while body and not body[-1].strip():
        body.pop()
    lines[:] = head + ([""] + ["::", ""] + ["    " + line for line in body] + [""] if body else [])


# ------------------------------------------------------------------------------ op pages
COST = {
    "none": ("T K V", "T^2 (K + V)", "T C (K + V) + T K V"),
    "scalar decay": ("T K V", "T^2 (K + V)", "T C (K + V) + T K V"),
    "diagonal decay": ("T K V", "T^2 K + T^2 V", "T C (K + V) + T K V, decays per channel"),
    "rank-1 Householder": ("T K V", "T^2 (K + V) + T^3 / 3 (one triangular solve)",
                           "T C (K + V) + T C^2 / 3 (a solve per chunk) + T K V"),
    "diagonal plus low rank": ("T K V", "T^2 (K + V) + a solve", "T C (K + V) + a solve per chunk + T K V"),
}


def _attention_picture(op: str, path: Path) -> bool:
    module = registry.module(op)
    if not hasattr(module, "attention_matrix"):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims = {"T": 48, "B": 1, **({"H": 1} if "H" in testing.default_dims(op) else {})}
    x = testing.make_inputs(op, "typical", **dims)
    accepted = inspect.signature(module.attention_matrix).parameters
    M = getattr(linrec_ref, op).attention_matrix(**{k: v for k, v in x.items() if k in accepted})[0, 0]
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    lim = float(np.abs(M).max()) or 1.0
    im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set(title=f"{op}: implicit attention", xlabel="key s", ylabel="query t")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _float32_errors(op: str) -> List[str]:
    """Rows 'form | max_rel | rms_ratio' of float32 forms against the float64 recurrent loop."""
    spec = registry.spec(op)
    x64 = testing.make_inputs(op, "typical", T=256)
    ref = testing.run(op, "recurrent", x64)[0]
    x32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64 else
               v.astype(np.complex64) if isinstance(v, np.ndarray) and v.dtype == np.complex128 else v)
           for k, v in x64.items()}
    rows = []
    for form in ("recurrent", "parallel", "chunkwise"):
        if form not in spec.forms:
            continue
        o = testing.run(op, form, x32, backend="numpy")[0]
        c = testing.compare(np.asarray(o).astype(ref.dtype), ref, "float32")
        rows.append(f"| {form} | {c.max_rel:.1e} | {c.rms_ratio:.1e} | {'ok' if c.ok else 'FAIL'} |")
    return rows


def op_page(op: str, out: Path) -> str:
    spec = registry.spec(op)
    module = registry.module(op)
    doc = inspect.getdoc(module) or ""
    title_line, _, body = doc.partition("\n")
    lines = [f"# {op}", "", f"{title_line.split(':', 1)[-1].strip()}", "",
             f"*Family*: {spec.family}. *Transition*: {spec.transition}.", "",
             "```text", spec.math, "```", ""]
    lines += ["## Arguments and shapes", "", "| argument | shape | kind |", "|---|---|---|"]
    for a in spec.inputs:
        kind = "log gate (<= 0)" if a.log_gate else a.kind
        lines.append(f"| `{a.name}`{' (optional)' if a.optional else ''} | [{', '.join(a.dims)}] | {kind} |")
    lines.append(f"| output `o` | [{', '.join(spec.output)}] | |")
    for a in spec.state:
        lines.append(f"| state `{a.name}` | [{', '.join(a.dims)}] | |")
    if spec.options:
        lines += ["", "Options: " + ", ".join(f"`{k}={v!r}`" for k, v in spec.options.items()) + "."]
    cost = COST.get(spec.transition)
    lines += ["", "## Forms", "", "| form | work (per batch element and head) | memory |", "|---|---|---|"]
    for form in spec.forms:
        if cost and form in ("recurrent", "parallel", "chunkwise"):
            work = cost[("recurrent", "parallel", "chunkwise").index(form)]
            memory = {"recurrent": "K V", "parallel": "T^2", "chunkwise": "T / C K V"}[form]
        else:
            work, memory = "see the module docstring", ""
        lines.append(f"| `{form}` | {work} | {memory} |")
    lines += ["", "Every form has its backward (`linrec_ref.{0}.vjp(..., form=...)`) and the op has "
              "`step` for decoding.".format(op), ""]
    if spec.peers:
        lines += ["## Peer functions", ""] + [f"- `{p}`" for p in spec.peers] + [""]
    if _attention_picture(op, out / "ops" / "img" / f"{op}.png"):
        lines += ["## Implicit attention", "",
                  "`attention_matrix` on typical inputs (T = 48, batch 0, head 0); o = M v when the "
                  "initial state is zero (up to the op's skip and normaliser terms).", "",
                  f"![implicit attention of {op}](img/{op}.png)", ""]
    lines += ["## float32 error against the float64 loop", "",
              "Measured while this page was built: the NumPy forms in float32 on typical inputs "
              "(T = 256, the op's default sizes) against the float64 recurrent loop, with the "
              "float32 tier's verdict.", "", "| form | max rel | rms ratio | float32 tier |",
              "|---|---|---|---|"] + _float32_errors(op) + [""]
    lines += ["## The module: recurrence, glossary, forms", "", "```text", body.strip("\n"), "```", "",
              "## API", "", "```{eval-rst}", f".. automodule:: linrec_ref.ops.{op}", "   :members:",
              "```", ""]
    _write(out / "ops" / f"{op}.md", "\n".join(lines))
    return f"ops/{op}"


# ------------------------------------------------------------------------------ CLI page
def cli_page(out: Path) -> None:
    import argparse

    from linrec_ref.cli import build_parser
    lines = ["# Command line", "", "`linrec` is installed with the package. Every command and "
             "subcommand, with its `--help`:", ""]

    def walk(parser: argparse.ArgumentParser, prog: str, depth: int):
        lines.extend([f"{'#' * min(depth, 4)} `{prog}`", "", "```text", parser.format_help().rstrip(), "```", ""])
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prog} {name}", depth + 1)

    walk(build_parser(), "linrec", 2)
    _write(out / "cli.md", "\n".join(lines))


def write_all(out: Path) -> None:
    with redirect_stdout(io.StringIO()):
        pages = [op_page(op, out) for op in registry.OP_NAMES]
    index = ["# The ops", "", "One page per op, generated from the registry at build time.", "",
             "```{toctree}", ":maxdepth: 1", ""] + [p[4:] for p in pages] + ["```", ""]
    _write(out / "ops" / "index.md", "\n".join(index))
    api_pages(out)
    cli_page(out)
