"""The ``graft check --report`` page."""

from __future__ import annotations

from html import escape

from graft import __version__
from graft.report import _svg

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
figure{margin:0}figcaption{font-size:12px;color:#555;max-width:320px}
.bad{color:#d62728;font-weight:bold}.note{font-size:12px;color:#555}
"""

# Runs after the page has loaded: every figure must be there and have a laid-out size.
_SELF_CHECK = """
window.addEventListener('load', function () {
  var figs = Array.prototype.slice.call(document.querySelectorAll('figure svg.figure'));
  var expected = parseInt(document.body.getAttribute('data-expected-figures'), 10);
  var drawn = figs.filter(function (s) { var b = s.getBBox(); return b.width > 0 && b.height > 0; });
  var ok = drawn.length === expected && window.__graftErrors.length === 0;
  document.body.setAttribute('data-figures', String(drawn.length));
  document.body.setAttribute('data-errors', window.__graftErrors.join(' | '));
  document.body.setAttribute('data-selfcheck', ok ? 'ok' : 'failed');
  document.title = document.title + (ok ? ' [ok]' : ' [failed]');
});
"""
_ERRORS = (
    "window.__graftErrors = [];"
    "window.addEventListener('error', function (e) { window.__graftErrors.push(String(e.message)); });"
)


def render_check_report(result: dict) -> str:
    """The HTML page (one string, self-contained) for a `graft.check.compare` result."""
    o, n, f = result["models"]["old"], result["models"]["new"], result["flips"]
    figures = [
        (
            _svg.reliability(o["bins"], title=f"old: ECE {o['ece']:.3f}", color=_svg.OLD),
            "Reliability of the old model (equal-width bins): bars are accuracy, red is the "
            "gap to mean confidence, dashed is perfect calibration.",
        ),
        (
            _svg.reliability(n["bins"], title=f"new: ECE {n['ece']:.3f}", color=_svg.NEW),
            "Reliability of the new model.",
        ),
        (
            _svg.flip_matrix(f["matrix"]),
            f"Flip matrix: red = negative flips (NFR {f['nfr']:.2%}), green = positive flips "
            f"(PFR {f['pfr']:.2%}).",
        ),
        (
            _svg.per_class(f["per_class"]),
            "Per true class: accuracy of each model and the rate of negative flips.",
        ),
    ]
    figs_html = "".join(
        f"<figure>{svg}<figcaption>{escape(cap)}</figcaption></figure>" for svg, cap in figures
    )
    title = f"graft check: {result['old']} -> {result['new']}"  # escaped where used
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><script>{_ERRORS}</script><style>{_CSS}</style></head>"
        f"<body data-expected-figures='{len(figures)}'>"
        f"<h1>{escape(title)}</h1>"
        f"<p class='note'>data: {escape(str(result['data']))}; n = {escape(str(result['n']))}; "
        f"{escape(str(result['num_classes']))} classes; {escape(str(result['n_bins']))} "
        f"confidence bins; temperature fitted on {escape(str(result['temperature_fit']))}; "
        f"graft {__version__}</p>"
        + _gates(result)
        + "<h2>Metrics</h2>"
        + _metric_table(o, n)
        + "<h2>Flips</h2>"
        + _flip_table(f)
        + f"<div class='figs'>{figs_html}</div>"
        + _label_issues(result)
        + f"<script>{_SELF_CHECK}</script></body></html>\n"
    )


def _metric_table(o: dict, n: dict) -> str:
    rows = []
    for key in ("accuracy", "nll", "brier", "ece", "ece_mass", "mce"):
        cells = [o[key], n[key], o["scaled"][key], n["scaled"][key]]
        rows.append(f"<tr><td>{key}</td>" + "".join(f"<td>{v:.4f}</td>" for v in cells) + "</tr>")
    rows.append(
        f"<tr><td>temperature</td><td></td><td></td><td>{o['temperature']:.3f}</td>"
        f"<td>{n['temperature']:.3f}</td></tr>"
    )
    return (
        "<table><tr><th>metric</th><th>old</th><th>new</th><th>old, T-scaled</th>"
        "<th>new, T-scaled</th></tr>" + "".join(rows) + "</table>"
    )


def _flip_table(f: dict) -> str:
    cells = [
        ("NFR (old right, new wrong)", f["nfr"]),
        ("NFI (NFR / new error rate)", f["nfi"]),
        ("PFR (old wrong, new right)", f["pfr"]),
        ("multi-class NFR (new wrong, differs from old)", f["multiclass_nfr"]),
        ("predictions changed", f["changed"] / max(f["n"], 1)),
    ]
    return (
        "<table><tr><th>flip metric</th><th>value</th></tr>"
        + "".join(f"<tr><td>{escape(k)}</td><td>{v:.2%}</td></tr>" for k, v in cells)
        + "</table>"
    )


def _gates(result: dict) -> str:
    gates = result.get("fail_on") or {}
    if not gates.get("gates"):
        return ""
    if gates["failed"]:
        return "<p class='bad'>--fail-on: " + escape("; ".join(map(str, gates["failed"]))) + "</p>"
    return "<p>--fail-on: " + escape(", ".join(map(str, gates["gates"]))) + ": all pass</p>"


def _label_issues(result: dict) -> str:
    li = result.get("label_issues")
    source = escape(str(result.get("label_issue_source", "")))
    if not li:
        return f"<h2>Label issues</h2><p class='note'>{source}</p>"
    shown = escape(", ".join(map(str, li["flagged"][:500])))
    more = f" ... ({li['n_flagged'] - 500} more in --json)" if li["n_flagged"] > 500 else ""
    return (
        f"<h2>Label issues</h2><p class='note'>confident learning on {source}</p>"
        f"<p>{escape(str(li['n_flagged']))} examples flagged ({li['rate']:.1%}). Accuracy on all labels / "
        f"without the flagged ones: old {li['old']['accuracy_all']:.2%} / "
        f"{li['old']['accuracy_unflagged']:.2%}, new {li['new']['accuracy_all']:.2%} / "
        f"{li['new']['accuracy_unflagged']:.2%}.</p><p class='note'>flagged indices: "
        f"{shown}{more}</p>"
    )
