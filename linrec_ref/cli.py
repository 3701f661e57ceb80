"""The ``linrec`` command line.

    linrec ops [-v] [--markdown]       the catalogue: family, transition class, forms (-v: math,
                                       inputs, state, options, peers); fits 100 columns
    linrec check [--op NAME ...] [--dtype float32|float64|all] [--full] [--full-table] [-v]
                 [--backend numpy|numba|auto]
                                       the equivalence matrix: a summary per op, dtype and kind of
                                       comparison (--full-table: per value, with tolerances and the
                                       worst case), the total on the last line; exits 1 on any failure
    linrec selectivbench ...           SelectivBench (linrec_ref.tasks.cli)

Output piped into a reader that stops early (``linrec check | head -1``) ends quietly.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from typing import List, Optional, Sequence

import numpy as np

from . import __version__, check, registry


def _progress_bar(stream=sys.stderr):
    """A dependency-free progress bar for long runs (only drawn on a terminal)."""
    start = time.perf_counter()
    interactive = stream.isatty()

    def update(i: int, n: int, label: str) -> None:
        if not interactive:
            return
        width = 30
        filled = int(width * i / max(n, 1))
        elapsed = time.perf_counter() - start
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {i}/{n} {elapsed:6.1f}s {label[:50]:<50}")
        if i >= n:
            stream.write("\n")
        stream.flush()

    return update


def _wrap(text: str, width: int) -> List[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False) or [""]


def _table(rows: Sequence[Sequence[str]], header: Sequence[str], wrap: Optional[dict] = None) -> str:
    """A plain-text table; ``wrap`` = {column index: width} wraps those columns' cells at words."""
    wrap = wrap or {}
    cells = [[_wrap(str(c), wrap[i]) if i in wrap else [str(c)] for i, c in enumerate(r)]
             for r in rows]                                    # [row][column] -> lines of the cell
    widths = [max([len(h)] + [len(line) for r in cells for line in r[i]]) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    lines = [fmt(header), fmt(["-" * w for w in widths])]
    for r in cells:
        height = max(len(c) for c in r)
        lines += [fmt([c[k] if k < len(c) else "" for c in r]) for k in range(height)]
    return "\n".join(lines)


def _markdown(rows) -> str:
    lines = ["# Ops", "", "Written by `linrec ops --markdown` from the registry.", ""]
    for r in rows:
        lines += [f"## {r['name']}", "", f"*{r['family']}*; transition: {r['transition']}", "",
                  f"    {r['math']}", "",
                  f"- inputs: {', '.join(f'`{i}`' for i in r['inputs'])}",
                  f"- state: {r['state']}",
                  f"- options: {', '.join(f'`{k}={v!r}`' for k, v in r['options'].items()) or 'none'}",
                  f"- forms: {', '.join(r['forms'])}",
                  f"- compiled by the numba backend: {', '.join(r['numba']) or 'none (NumPy forms)'}",
                  f"- peers: {'; '.join(r['peers'])}", ""]
    return "\n".join(lines)


def cmd_ops(args) -> int:
    rows = registry.catalogue()
    if args.markdown:
        print(_markdown(rows))
        return 0
    if args.verbose:
        for r in rows:
            print(f"{r['name']}  ({r['family']}; {r['transition']})")
            print(f"    math:    {r['math']}")
            print(f"    inputs:  {', '.join(r['inputs'])}")
            print(f"    state:   {r['state']}")
            print(f"    options: {r['options'] or '-'}")
            print(f"    forms:   {', '.join(r['forms'])}")
            print(f"    numba:   {', '.join(r['numba']) or '- (NumPy forms)'}")
            print(f"    peers:   {'; '.join(r['peers'])}")
        return 0
    # the forms most ops have are named once under the table; a row lists only how it differs,
    # so that the table fits 100 columns (the peers are long: linrec ops -v)
    common = [f for f in dict.fromkeys(f for r in rows for f in r["forms"])
              if sum(f in r["forms"] for r in rows) * 2 > len(rows)]

    def forms_cell(forms) -> str:
        missing = [f for f in common if f not in forms]
        extra = [f for f in forms if f not in common]
        return ", ".join([f"no {f}" for f in missing] + [f"+{f}" for f in extra]) or "all"

    def numba_cell(forms) -> str:   # forward forms whose kernel exists (with their vjps)
        return ", ".join(f for f in dict.fromkeys(f[:-4] if f.endswith("_vjp") else f for f in forms)) or "-"

    table = [(r["name"], r["family"], r["transition"], forms_cell(r["forms"]), numba_cell(r["numba"]))
             for r in rows]
    print(_table(table, ("op", "family", "transition", "forms", "numba"),
                 wrap={1: 26, 2: 16, 3: 13, 4: 15}))
    print(f"\nforms: all = {', '.join(common)}")
    print("numba: the forms (and their vjps) compiled by backend='numba'; the rest run the NumPy form")
    print("linrec ops -v: the math, inputs, state, options, forms and peer implementations of each op")
    missing = sorted(set(registry.OP_NAMES) - set(registry.available()))
    if missing:
        print(f"not yet implemented: {', '.join(missing)}")
    return 0


def cmd_check(args) -> int:
    ops = args.op or list(registry.available())
    for name in ops:
        registry.spec(name)  # unknown names fail here with the list of known ops
    dtypes = {"float64": [np.float64], "float32": [np.float32], "all": [np.float64, np.float32]}[args.dtype]
    t0 = time.perf_counter()
    if args.backend != "numpy":
        from . import backends
        if backends.resolved_name(args.backend) == "numba":
            from .backends import numba as numba_backend
            numba_backend.import_numba("linrec check --backend numba")
        own = [op for op in ops if any(check.compiled(op, f, args.backend) for f in ("recurrent", "chunkwise", "step"))]
        print(f"backend {args.backend!r}: the forms, steps and vjps it computes itself, against the "
              f"NumPy float64 loop", file=sys.stderr)
        rest = [op for op in ops if op not in own]
        if rest:
            print(f"run as NumPy forms there (checked by plain `linrec check`): {', '.join(rest)}",
                  file=sys.stderr)
        ops = own
    rows = check.run(ops, dtypes, full=args.full, progress=_progress_bar(), backend=args.backend)
    elapsed = time.perf_counter() - t0
    if args.full_table or args.verbose:
        _print_detailed(rows)
    else:
        table = [(s["op"], s["dtype"], s["check"], str(s["n"]), f"{s['max_rel']:.2e}",
                  "ok" if s["failed"] == 0 else f"FAIL ({s['failed']})") for s in check.summarize_compact(rows)]
        print(_table(table, ("op", "dtype", "comparison", "cases", "max rel err", "status")))
    failed = [r for r in rows if not r.ok]
    shown = failed if args.verbose else failed[:50]
    if failed:
        print()
    for r in shown:
        print(f"FAIL {r.op}/{r.variant} {r.regime} {r.dtype} T={r.T} C={r.chunk}: {r.check}: {r.result}")
    if len(shown) < len(failed):
        print(f"... {len(failed) - len(shown)} more failures (linrec check -v lists all)")
    # the last two lines carry the verdict (CI shows `linrec check | tail -n 3`)
    print("\nmax rel err = max|a-ref|/max|ref|; pass: |a-ref| <= rtol|ref| + atol max|ref|"
          + ("" if args.full_table or args.verbose else "; per value: --full-table"))
    print(f"{len(rows)} comparisons, {len(failed)} failed, {elapsed:.1f}s: {'FAILED' if failed else 'all passed'}")
    return 1 if failed else 0


def _print_detailed(rows) -> None:
    summary = check.summarize(rows)
    table = [(s["op"], s["dtype"], s["what"], s["check"], str(s["n"]), f"{s['max_rel']:.2e}",
              f"{s['max_elem_rel']:.2e}", f"{s['rtol']:g} / {s['atol']:g}",
              "ok" if s["failed"] == 0 else f"FAIL ({s['failed']})", s["worst"]) for s in summary]
    print(_table(table, ("op", "dtype", "value", "comparison", "cases", "max rel err",
                         "max elem rel", "rtol / atol*max|ref|", "status", "worst case")))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linrec", description="linrec_ref: a float64 reference of linear recurrences")
    p.add_argument("--version", action="version", version=f"linrec_ref {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    ops = sub.add_parser("ops", help="print the catalogue of ops")
    ops.add_argument("-v", "--verbose", action="store_true", help="one block per op with math, inputs, state")
    ops.add_argument("--markdown", action="store_true", help="the catalogue as a Markdown page (docs/ops.md)")
    ops.set_defaults(func=cmd_ops)
    chk = sub.add_parser("check", help="run the equivalence matrix (forms, steps, gradients)")
    chk.add_argument("--op", action="append", help="op name (repeatable); default: every op")
    chk.add_argument("--dtype", choices=("float64", "float32", "all"), default="float64")
    chk.add_argument("--full", action="store_true", help="the full sweep of numerics.md (T up to 257)")
    chk.add_argument("--full-table", action="store_true",
                     help="one row per op, dtype, value and comparison, with tolerances and the worst case "
                          "(default: one row per op, dtype and kind of comparison)")
    chk.add_argument("--compact", action="store_true", help="the default summary table (kept as an alias)")
    from . import backends
    chk.add_argument("--backend", default="numpy", choices=backends.available(),
                     help="check this backend's forms (numba, auto, ...) against the NumPy float64 "
                          "loop (default: numpy, the reference against itself)")
    chk.add_argument("-v", "--verbose", action="store_true", help="--full-table, and every failure")
    chk.set_defaults(func=cmd_check)
    _register_tasks(sub)
    return p


def _register_tasks(sub) -> None:
    """``linrec selectivbench ...`` lives in linrec_ref.tasks.cli (``register(subparsers)``)."""
    import importlib.util
    if importlib.util.find_spec("linrec_ref.tasks.cli") is not None:
        from .tasks import cli as tasks_cli
        tasks_cli.register(sub)


EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE: what a shell reports for a writer its reader left


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()                # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        # the reader stopped early (`linrec check | head -1`): end quietly. stdout goes to devnull so
        # that the interpreter's final flush does not raise again (Python docs, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyError as e:
        print(f"linrec: {e.args[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlinrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
