"""Sphinx configuration of the mppools documentation.

Build (offline, warnings are errors)::

    pip install sphinx furo myst-parser
    sphinx-build -W -b html docs docs/_build/html

Intersphinx without the internet
--------------------------------
Links to Python, kombu and celery point to their real documentation sites, but the
inventories (``objects.inv``) are read from small local files in ``docs/_inventories/``:
the second item of each ``intersphinx_mapping`` entry is a path, relative to this folder,
so no build ever downloads anything. Each file lists only the objects these pages reference;
``docs/_inventories/make_inventories.py`` writes them (add an entry there when you reference
something new, then run it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from sphinx.application import Sphinx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document the checkout, not whatever is installed

import mppools  # noqa: E402

# -- Project ------------------------------------------------------------------------------
project = "mppools"
author = "the mppools authors"
copyright = "2026, the mppools authors"
release = mppools.__version__
version = ".".join(release.split(".")[:2])

# -- General ------------------------------------------------------------------------------
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_inventories", "img/README*", "Thumbs.db", ".DS_Store"]
# every cross-reference must resolve: a typo in a role is an error under -W
nitpicky = True
nitpick_ignore = [
    # kombu's undocumented, untyped internals that mppools' classes subclass
    ("py:class", "kombu.connection.PooledConnection"),
    ("py:class", "kombu.pools.Connections"),
    ("py:class", "kombu.pools.Producers"),
]
# code blocks: furo's own choices (a light grey and a dark background, colours picked for
# contrast); Sphinx's "sphinx" style would paint every block lime green. a11y-light comes
# with accessible-pygments (a dependency of recent furo); without it, "friendly", close to it.
try:
    from pygments.styles import get_style_by_name

    get_style_by_name("a11y-light")
    pygments_style = "a11y-light"
except Exception:  # pragma: no cover - accessible-pygments is missing
    pygments_style = "friendly"
pygments_dark_style = "native"

# -- MyST ---------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "fieldlist", "substitution"]
myst_heading_anchors = 3
myst_substitutions = {"release": release}

# -- autodoc / napoleon -------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- intersphinx (offline: see the module docstring) ----------------------------------------
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", "_inventories/python.inv"),
    "kombu": ("https://docs.celeryq.dev/projects/kombu/en/stable", "_inventories/kombu.inv"),
    "celery": ("https://docs.celeryq.dev/en/stable", "_inventories/celery.inv"),
}
intersphinx_timeout = 1
intersphinx_disabled_reftypes = ["std:doc"]

# -- HTML ---------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"mppools {release}"
html_static_path: list[str] = []
html_theme_options = {"navigation_with_keys": True}


def setup(app: Sphinx) -> None:
    # the cross-reference types celery's documentation declares (through sphinx_celery),
    # so that :setting:`broker_pool_limit` and :signal:`worker_init` resolve via intersphinx
    app.add_crossref_type("setting", "setting", "pair: %s; setting")
    app.add_crossref_type("signal", "signal", "pair: %s; signal")
