"""Sphinx extension: each page loads every script once.

Sphinx 7.4 adds an inline script twice when an extension registers it after the HTML builder has
started (sphinx-thebe on ``env-before-read-docs``, sphinx-togglebutton on ``builder-inited``):
``app.add_js_file(None, body=...)`` reaches the builder as filename ``None``, and
``prepare_writing`` adds the registry's copy again as filename ``''``, which does not compare
equal. Two copies of ``const THEBE_JS_URL = ...`` are a ``SyntaxError`` on every page. This keeps
the first copy of each script (same file or same inline body, same attributes) on each page.
"""

from __future__ import annotations


def script_key(js) -> tuple:
    attributes = getattr(js, "attributes", {}) or {}
    return (getattr(js, "filename", js) or "", tuple(sorted((k, str(v)) for k, v in attributes.items())))


def dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        key = script_key(js)
        if key not in seen:
            seen.add(key)
            kept.append(js)
    scripts[:] = kept


def setup(app):
    # Late priority: after every extension that adds page scripts on this event (myst-nb does).
    app.connect("html-page-context", dedupe_scripts, priority=900)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
