"""graft's HTML reports: one self-contained file each (inline CSS and SVG, no network).

`render_check_report` turns a `graft check` result into a page with the metric table,
a reliability diagram per model, the flip matrix and per-class bars. A small inline
script checks the page once it has loaded (figures present and laid out, no script
error) and records the outcome in ``<body data-selfcheck="ok|failed">`` and the title,
which is what the headless-browser test reads.
"""

from graft.report.check_report import render_check_report

__all__ = ["render_check_report"]
