"""Sphinx extension: an "Open in Colab" entry in the launch menu of every chapter page.

Colab opens ``.ipynb`` files from GitHub, and the chapters are MyST Markdown, so sphinx-book-theme
shows no Colab button for them (its ``colab_url`` would point at the ``.md``, on the branch Binder
uses). The publish workflow writes an executed notebook for every chapter (``tests/colab.py``) and
pushes them to their own branch, named by ``colab_branch`` in ``_config.yml``; this extension adds,
next to the Binder entry, a link to the chapter's notebook on that branch. The repository comes
from ``repository.url`` in ``_config.yml`` (the theme's ``repository_url``), like every other button.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

COLAB = "https://colab.research.google.com"
#: The pages that get a notebook and a button: every page in a chapter's folder, the chapter
#: (``notebooks/NN-slug/NN-slug``) and its further pages (``notebooks/NN-slug/other-page``).
CHAPTER_PAGE = re.compile(r"^notebooks/\d\d-[a-z0-9-]+/[a-z0-9][a-z0-9-]*$")


def is_chapter(docname: str) -> bool:
    return CHAPTER_PAGE.match(docname) is not None


def colab_url(repository_url: str, branch: str, docname: str) -> str:
    """Where Colab opens ``docname``'s notebook on ``branch`` of the GitHub repository."""
    parts = urlsplit(repository_url)
    if parts.netloc != "github.com":
        raise ValueError(f"Colab opens notebooks from GitHub only, not from {repository_url}")
    org, repo = parts.path.strip("/").removesuffix(".git").split("/")[:2]
    return f"{COLAB}/github/{org}/{repo}/blob/{branch}/{docname}.ipynb"


def add_colab_button(app, pagename, templatename, context, doctree):
    if not is_chapter(pagename) or app.builder.format != "html":
        return
    url = colab_url(app.config.html_theme_options["repository_url"], app.config.colab_branch, pagename)
    button = {"type": "link", "text": "Colab", "tooltip": "Open in Colab (the executed notebook)",
              "icon": "_static/images/logo_colab.png", "url": url, "label": "colab-button"}
    for group in context.get("header_buttons", []):
        if group.get("label") == "launch-buttons":
            group["buttons"].append(button)
            return
    context.setdefault("header_buttons", []).append(
        {"type": "group", "tooltip": "Launch interactive content", "icon": "fas fa-rocket",
         "buttons": [button], "label": "launch-buttons"})


def setup(app):
    app.add_config_value("colab_branch", "colab", "html", [str])
    # sphinx-book-theme builds its launch menu at priority 501; add to it afterwards.
    app.connect("html-page-context", add_colab_button, priority=502)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
