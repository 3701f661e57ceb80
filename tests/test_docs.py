"""The documentation stands alone and stays true.

- every citation of a page section or numbered hazard ("recurrences.md section 4",
  "numerics.md, hazard 1 and 2", "selectivbench.md sections 6-7") in the code and the docs names a
  page of docs/ with a heading of that number, and every Markdown file named exists;
- nothing cites a path outside the project;
- every Python block of README.md runs as written, in order, in one namespace;
- docs/ops.md is exactly what `linrec ops --markdown` prints;
- the tolerance table and the input regimes of docs/numerics.md are the ones in the code;
- the site's toctree (docs/index.md) lists every page of docs/, and local links resolve.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CODE_DIRS = ("linrec_ref", "backends", "bench", "tests", "tutorials", "docs")
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((ROOT / "bench").glob("*.md"))]


def project_files() -> List[Path]:
    """The files whose text may cite the docs: Python sources and Markdown pages of the project
    (not this file, whose checks of the checker cite pages that do not exist on purpose)."""
    files = list(MARKDOWN)
    for d in CODE_DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*.py")
                        if not {"__pycache__", "generated", "_build"} & set(p.parts))
    return [p for p in files if p != Path(__file__).resolve()]


def text_of(path: Path) -> str:
    """The file's text with Python comment markers of wrapped lines removed, so that a citation
    broken over two comment lines ("recurrences.md\n# section 4") still reads as one."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        text = re.sub(r"\n[ \t]*#+[ \t]*", "\n", text)
    return text


# ------------------------------------------------------------------ citations of numbered headings
# "<page>.md section N", "<page>.md, sections 2-3", "<page>.md hazard 1 and 2",
# "[docs/numerics.md](docs/numerics.md) hazard 6", "<page>.md §4"; and "section N of <page>.md".
PAGE = r"(?P<page>[\w./-]*\w)\.md"
KIND = r"(?P<kind>sections?|hazards?|§)"
NUMBERS = r"(?P<numbers>\d+(?:\s*(?:,|/|-|–|and|or|to)\s*\d+)*)"
CITATION = re.compile(PAGE + r"(?:\]\([^)\s]*\))?\)?[\s,:(]*" + KIND + r"\s*" + NUMBERS, re.IGNORECASE)
CITATION_REVERSED = re.compile(r"\b" + KIND + r"\s*" + NUMBERS + r"\s+(?:of|in)\s+(?:\[)?" + PAGE,
                               re.IGNORECASE)


def cited_numbers(numbers: str) -> List[int]:
    """'4' -> [4]; '1 and 2' -> [1, 2]; '1/2' -> [1, 2]; '6-7' -> [6, 7]; '4, 6-7' -> [4, 6, 7]."""
    out: List[int] = []
    for part in re.split(r"\s*(?:,|/|and|or)\s*", numbers):
        bounds = [int(x) for x in re.split(r"\s*(?:-|–|to)\s*", part) if x]
        out += list(range(bounds[0], bounds[-1] + 1))
    return out


def citations(text: str) -> Iterator[Tuple[str, str, int, str]]:
    """(page, 'section' | 'hazard', number, the citation as written) for every citation in text."""
    for pattern in (CITATION, CITATION_REVERSED):
        for m in pattern.finditer(text):
            kind = m["kind"].lower()
            kind = "section" if kind.startswith("section") or kind == "§" else "hazard"
            for n in cited_numbers(m["numbers"]):
                yield m["page"] + ".md", kind, n, " ".join(m.group(0).split())


def headings(page: Path) -> List[str]:
    """The Markdown headings of a page, outside fenced code blocks."""
    out, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6}\s", line):
            out.append(line.lstrip("#").strip())
    return out


def resolve_page(name: str, cited_from: Path = ROOT) -> Path:
    """A cited Markdown file: as a path from the repository root, from the citing file's folder,
    or a page of docs/ by its name. Returns a path that may not exist."""
    for base in (ROOT, cited_from.parent, DOCS):
        if (base / name).is_file():
            return base / name
    return DOCS / Path(name).name


def has_numbered_heading(page: Path, kind: str, n: int) -> bool:
    """'## 4. Identities ...' or '## Section 4: ...' for a section; '## Hazard 2: ...' for a hazard."""
    if kind == "section":
        pattern = re.compile(rf"(?:section\s+)?{n}[.:)](?:\s|$)", re.IGNORECASE)
    else:
        pattern = re.compile(rf"hazard\s+{n}[.:)](?:\s|$)", re.IGNORECASE)
    return any(pattern.match(h) for h in headings(page))


def dangling_citations(text: str, cited_from: Path = ROOT) -> List[str]:
    """Every citation in text that does not resolve to a numbered heading of an existing page."""
    bad = []
    for name, kind, n, written in citations(text):
        page = resolve_page(name, cited_from)
        if not page.is_file():
            bad.append(f"{written!r}: no page {name} in docs/")
        elif not has_numbered_heading(page, kind, n):
            bad.append(f"{written!r}: {page.relative_to(ROOT)} has no heading for {kind} {n}")
    return bad


def test_the_citation_checker_catches_dangling_citations():
    fake = ("see numerics.md hazard 12, recurrences.md section 9, nosuchpage.md section 1,\n"
            "selectivbench.md sections 7-9 and section 5 of forms.md")
    bad = dangling_citations(fake)
    for expected in ("hazard 12", "section 9", "nosuchpage.md", "section 9", "section 5"):
        assert any(expected in b for b in bad), (expected, bad)
    assert len(bad) == 5, bad       # selectivbench.md 7 and 8 exist, 9 does not
    good = {"numerics.md hazard 2": {("hazard", 2)},
            "numerics.md, hazard 1 and 2": {("hazard", 1), ("hazard", 2)},
            "hazard 1/2 in docs/numerics.md": {("hazard", 1), ("hazard", 2)},
            "[docs/numerics.md](docs/numerics.md) hazard 6": {("hazard", 6)},
            "recurrences.md sections 1 and 4": {("section", 1), ("section", 4)},
            "recurrences.md (section 3)": {("section", 3)},
            "recurrences.md\n    section 2": {("section", 2)},
            "recurrences.md §4": {("section", 4)},
            "selectivbench.md sections 6-7": {("section", 6), ("section", 7)}}
    for text, expected in good.items():
        assert {(kind, n) for _, kind, n, _ in citations(text)} == expected, text
        assert dangling_citations(text) == [], text


def test_every_cited_section_and_hazard_exists():
    files = project_files()
    found, bad = 0, []
    for path in files:
        text = text_of(path)
        found += len(list(citations(text)))
        bad += [f"{path.relative_to(ROOT)}: {b}" for b in dangling_citations(text, path)]
    assert found > 20, f"only {found} citations found: is the pattern still matching?"
    assert not bad, "dangling citations:\n" + "\n".join(bad)


# ------------------------------------------------------------------ files named and paths cited
MD_NAME = re.compile(r"(?<![\w/:.-])([\w][\w./-]*\.md)\b")


def test_every_markdown_file_named_exists():
    bad = []
    for path in project_files():
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name in MD_NAME.findall(line):
                if "://" in line and name in line.split("://", 1)[1]:
                    continue                            # a URL, not a file of the project
                target = resolve_page(name, path)
                if not target.is_file() and not _generated(name):
                    bad.append(f"{path.relative_to(ROOT)}:{line_no}: {name}")
    assert not bad, "Markdown files named but not in the project:\n" + "\n".join(bad)


# Reports that `python -m bench cpu` writes into bench/results/ (git-ignored) and the report page: named by the docs
# before any run has made them.
GENERATED_REPORTS = {"cpu.md", "results.md", "cli.md"}   # and the report page, the docs build's CLI page


def _generated(name: str) -> bool:
    return Path(name).name in GENERATED_REPORTS and (name.startswith(("results/", "bench/results/")) or "/" not in name)


def test_nothing_cites_a_path_outside_the_project():
    shared = re.compile(r"\b" + "shared" + "/")                  # split so this file does not match itself
    relative = re.compile(r"(?:\.\./)+[\w.-][\w./-]*")

    def outside(path, line):
        if shared.search(line):
            return True
        return any(ROOT not in (path.parent / m).resolve().parents for m in relative.findall(line))

    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
           for p in project_files() + [Path(__file__).resolve(), ROOT / "pyproject.toml"]
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if outside(p, line)]
    assert not bad, "paths outside the project (they do not exist in a clone or a wheel):\n" + "\n".join(bad)


LOCAL_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


def test_local_links_in_markdown_resolve():
    bad = []
    for page in MARKDOWN:
        for target in LOCAL_LINK.findall(page.read_text(encoding="utf-8")):
            built = page.parent == DOCS and target.startswith("generated/")   # made by the docs build
            if "://" not in target and not target.startswith("mailto:") and not built \
                    and not (page.parent / target).exists():
                bad.append(f"{page.relative_to(ROOT)}: ({target})")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_site_lists_every_page_of_docs():
    """index.md's toctree (the Sphinx site's navigation) names every Markdown page of docs/."""
    text = (DOCS / "index.md").read_text(encoding="utf-8")
    block = re.search(r"```\{toctree\}(.*?)```", text, re.DOTALL)
    assert block, "docs/index.md has no toctree"
    listed = {line.strip() for line in block.group(1).splitlines()
              if line.strip() and not line.strip().startswith(":")}
    pages = {str(p.relative_to(DOCS).with_suffix("")) for p in DOCS.rglob("*.md")
             if "generated" not in p.parts and "_build" not in p.parts and p.name != "index.md"}
    assert pages <= listed, f"pages missing from the toctree of docs/index.md: {sorted(pages - listed)}"
    generated = {"generated/ops/index", "generated/tutorials/index", "generated/api/index", "generated/cli"}
    assert listed - pages == generated, sorted(listed - pages)


# ------------------------------------------------------------------ README code runs as written
def readme_python_blocks() -> List[Tuple[int, str]]:
    """(line number, source) of every ```python block of README.md, in order."""
    blocks, lines = [], (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = None
    for i, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = i
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines[start:i - 1]) + "\n"))
            start = None
    return blocks


def test_readme_has_python_blocks():
    assert len(readme_python_blocks()) >= 3


def test_every_readme_python_block_runs_verbatim(tmp_path, monkeypatch):
    """In order, in one namespace, from an empty working directory, the repository importable
    (blocks may write files: they land in the temporary directory)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace = {"__name__": "__readme__"}
    for line_no, source in readme_python_blocks():
        code = compile(source, f"README.md (python block at line {line_no})", "exec")
        exec(code, namespace)


def test_readme_vjp_comment_names_what_the_call_returns():
    """The Example block says the vjp returns a dict keyed by input name plus "initial_state";
    check that against the call itself."""
    example = next(src for _, src in readme_python_blocks() if ".vjp(" in src)
    namespace: dict = {}
    exec(compile(example, "README.md example", "exec"), namespace)
    grads = namespace["grads"]
    assert isinstance(grads, dict)
    assert set(grads) == {"q", "k", "v", "g", "gv", "initial_state"}
    for name in ("q", "k", "v", "g"):
        assert grads[name].shape == namespace[name].shape
        assert f'grads["{name}"]' in example
    assert grads["gv"] is None and grads["initial_state"] is None
    assert 'grads["gv"]' in example and 'grads["initial_state"]' in example


def test_readme_says_where_the_test_command_runs():
    """The set-up is two commands; the second needs the first one's environment."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme[readme.index("## Set-up"):readme.index("## Example")]
    assert "python3 -m venv .venv" in setup and "python -m pytest" in setup
    assert ". .venv/bin/activate" in setup.split("```")[2], "say how to enter the environment in a new shell"


# ------------------------------------------------------------------ generated and mirrored docs
def test_ops_page_is_what_linrec_ops_markdown_prints():
    from linrec_ref import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["ops", "--markdown"])
    assert rc == 0
    generated, page = out.getvalue(), (DOCS / "ops.md").read_text(encoding="utf-8")
    if generated != page:
        diff = "".join(list(difflib.unified_diff(page.splitlines(True), generated.splitlines(True),
                                                 "docs/ops.md", "linrec ops --markdown"))[:40])
        pytest.fail("docs/ops.md is out of date with the registry; regenerate it from the repository "
                    f"root with\n    linrec ops --markdown > docs/ops.md\n{diff}")


def _section(page: str, heading: str) -> str:
    text = (DOCS / page).read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_numerics_tolerance_table_is_the_code_table():
    from linrec_ref import testing

    rows = re.findall(r"^\|\s*`(\w+)`\s*\|\s*([\d.e+-]+)\s*\|\s*([\d.e+-]+)\s*\|",
                      _section("numerics.md", "Tolerance tiers"), re.MULTILINE)
    documented = {name: (float(rtol), float(atol)) for name, rtol, atol in rows}
    in_code = {name: (t.rtol, t.atol) for name, t in testing.TOLERANCES.items()}
    assert documented == in_code


def test_numerics_regimes_are_the_regimes_the_ops_declare():
    from linrec_ref import registry

    documented = set(re.findall(r"^\|\s*`(\w+)`\s*\|", _section("numerics.md", "Input regimes"), re.MULTILINE))
    declared = {r for op in registry.available() for r in registry.spec(op).regimes}
    assert declared <= documented, f"regimes used by ops but not documented: {sorted(declared - documented)}"
    assert documented <= declared, f"regimes documented but used by no op: {sorted(documented - declared)}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([os.path.abspath(__file__), "-q"]))
