"""Sphinx configuration of the linrec_ref documentation site.

    pip install -e ".[docs]" && sphinx-build -W --keep-going -b html docs docs/_build/html

The Markdown pages stay Markdown (myst-parser); the tutorials (tutorials/*.py, percent-cell
scripts) are executed and rendered by sphinx-gallery; the per-op pages, the API reference and
the command-line reference are generated from the code at every build into docs/generated/
(git-ignored), so they cannot go stale. A public function without a docstring is a warning,
and the CI build turns warnings into errors.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS))
sys.path.insert(0, str(ROOT))

import _generate  # noqa: E402  (docs/_generate.py: the generated pages)

import linrec_ref  # noqa: E402

project = "linrec_ref"
author = "the linrec_ref developers"
copyright = "the linrec_ref developers"
release = version = linrec_ref.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",          # numpydoc-style sections (Parameters, Returns, ...)
    "sphinx.ext.mathjax",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]          # pages start at level 2 under their title

napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_default_options = {"members": True, "undoc-members": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"

html_theme = "pydata_sphinx_theme"
html_title = f"linrec_ref {release}"
html_theme_options = {
    "navigation_depth": 2,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}

# Tutorials: every t??_*.py is executed at its full size (each runs in under a minute on 2
# cores); a failing one fails the build, and sphinx-gallery reports the file and the cell.
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "tutorials"),
    "gallery_dirs": "generated/tutorials",
    "filename_pattern": r"t\d\d_",
    "ignore_pattern": r"__init__\.py",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "abort_on_example_error": False,      # report every failing tutorial, then fail the build
    "only_warn_on_example_error": False,
    "remove_config_comments": True,
    "plot_gallery": "True",
}
os.environ.setdefault("MPLBACKEND", "Agg")
try:            # BLAS on one thread while the tutorials run (no oversubscription with Numba's)
    from threadpoolctl import threadpool_limits
    _blas_limit = threadpool_limits(limits=1, user_api="blas")
except ImportError:
    pass


def setup(app):
    _generate.write_all(DOCS / "generated")
    app.connect("autodoc-process-docstring", _generate.docstring_as_text)
    app.connect("build-finished", _generate.check_documented)
