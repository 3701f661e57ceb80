"""The ``linrec`` command line.

    linrec ops                         the catalogue: family, transition class, forms, peers
    linrec check [--op NAME ...] [--dtype float32|float64|all] [--full] [--verbose]
                                       the equivalence matrix; exits 1 on any failure
"""
from __future__ import annotations

import argparse
import sys
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


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in list(rows) + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _markdown(rows) -> str:
    lines = ["# Ops", "", "Written by `linrec ops --markdown` from the registry.", ""]
    for r in rows:
        lines += [f"## {r['name']}", "", f"*{r['family']}*; transition: {r['transition']}", "",
                  f"    {r['math']}", "",
                  f"- inputs: {', '.join(f'`{i}`' for i in r['inputs'])}",
                  f"- state: {r['state']}",
                  f"- options: {', '.join(f'`{k}={v!r}`' for k, v in r['options'].items()) or 'none'}",
                  f"- forms: {', '.join(r['forms'])}",
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
            print(f"    peers:   {'; '.join(r['peers'])}")
        return 0
    table = [(r["name"], r["family"][:44], r["transition"], ", ".join(r["forms"]),
              r["peers"][0] + (f" (+{len(r['peers']) - 1})" if len(r["peers"]) > 1 else ""))
             for r in rows]
    print(_table(table, ("op", "family", "transition", "forms", "peers (linrec ops -v lists all)")))
    missing = sorted(set(registry.OP_NAMES) - set(registry.available()))
    if missing:
        print(f"\nnot yet implemented: {', '.join(missing)}")
    return 0


def cmd_check(args) -> int:
    ops = args.op or list(registry.available())
    for name in ops:
        registry.spec(name)  # unknown names fail here with the list of known ops
    dtypes = {"float64": [np.float64], "float32": [np.float32], "all": [np.float64, np.float32]}[args.dtype]
    t0 = time.perf_counter()
    rows = check.run(ops, dtypes, full=args.full, progress=_progress_bar())
    elapsed = time.perf_counter() - t0
    if args.compact:
        table = [(s["op"], s["dtype"], s["check"], str(s["n"]), f"{s['max_rel']:.2e}",
                  "ok" if s["failed"] == 0 else f"FAIL ({s['failed']})") for s in check.summarize_compact(rows)]
        print(_table(table, ("op", "dtype", "comparison", "cases", "max rel err", "status")))
    else:
        _print_detailed(rows)
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows)} comparisons, {len(failed)} failed, {elapsed:.1f}s "
          f"(max rel err = max|a-ref| / max|ref|; pass rule |a-ref| <= rtol|ref| + atol max|ref|)")
    if args.verbose or failed:
        for r in failed[:50]:
            print(f"FAIL {r.op}/{r.variant} {r.regime} {r.dtype} T={r.T} C={r.chunk}: {r.check}: {r.result}")
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
    chk.add_argument("--compact", action="store_true", help="one row per op, dtype and kind of comparison")
    chk.add_argument("-v", "--verbose", action="store_true")
    chk.set_defaults(func=cmd_check)
    _register_tasks(sub)
    return p


def _register_tasks(sub) -> None:
    """``linrec selectivbench ...`` lives in linrec_ref.tasks.cli (``register(subparsers)``)."""
    import importlib.util
    if importlib.util.find_spec("linrec_ref.tasks.cli") is not None:
        from .tasks import cli as tasks_cli
        tasks_cli.register(sub)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyError as e:
        print(f"linrec: {e.args[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlinrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
