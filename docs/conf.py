"""Sphinx configuration of handgrad's documentation site.

    python -m sphinx -W --keep-going -b html docs docs/_build/html

(`pip install handgrad[docs]`, i.e. sphinx and myst-parser; handgrad must be
importable: the API reference is generated from its docstrings.) CI builds it
with warnings as errors.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import handgrad  # noqa: E402

project = "handgrad"
author = "the handgrad authors"
copyright = "2026, the handgrad authors (BSD-3-Clause)"
release = handgrad.__version__
version = release.split("+")[0]

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# The drop-in modules subclass torch.nn modules: document what handgrad adds,
# not torch's inherited docstrings.
autodoc_inherit_docstrings = False
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False

html_theme = "alabaster"
html_static_path = ["_static"]
html_title = "handgrad %s" % version
