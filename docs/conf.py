"""Sphinx configuration of the jsoftmax documentation.

Sphinx, as jax, optax, flax and chex use: autodoc reads the Google-style
docstrings (napoleon), MyST lets the teaching pages be markdown, and
``sphinx.ext.doctest`` runs the code on the pages. Build with warnings as
errors: ``sphinx-build -W -b html docs docs/_build/html`` and
``sphinx-build -W -b doctest docs docs/_build/doctest``.
"""

import pathlib
import runpy

import jsoftmax

project = "jsoftmax"
author = "the jsoftmax authors"
copyright = "2026, the jsoftmax authors"
release = jsoftmax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from the site itself
    "sphinx.ext.napoleon",
]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated", "README.md"]

autodoc_member_order = "bysource"
# The docstrings say what each argument takes; the expanded ArrayLike union
# would only repeat it at length.
autodoc_typehints = "none"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"jsoftmax {release}"

doctest_global_setup = """
import jax
import jax.numpy as jnp
import jsoftmax
"""

_here = pathlib.Path(__file__).parent
_tables = _here / "_generated" / "semantics_tables.md"


def _generate_semantics(app):
    """Writes the semantics tables from what the installed jax.nn, optax and
    jsoftmax do: on every HTML build, and for other builders when missing."""
    if app.builder.name == "html" or not _tables.exists():
        runpy.run_path(str(_here / "semantics.py"), run_name="semantics")["main"]([])


def setup(app):
    app.connect("builder-inited", _generate_semantics)
