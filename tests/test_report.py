"""The check report: one self-contained HTML file, rendered in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from graft.check import compare
from graft.report import render_check_report

CHROMIUM = Path("/usr/bin/chromium")


def _result() -> dict:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    old = rng.normal(size=(300, 4)) + 2.5 * np.eye(4)[y]
    new = old + rng.normal(size=(300, 4)) * 1.5
    probs = np.exp(old) / np.exp(old).sum(1, keepdims=True)
    r = compare(old, new, y, label_probs=probs)
    r.update(
        old="old <model>",
        new="new & model",
        data="random",
        fail_on={"gates": ["nfr>0.01"], "failed": [f"nfr={r['metrics']['nfr']:.4g} > 0.01"]},
    )
    return r


def test_report_is_self_contained_and_escaped():
    html = render_check_report(_result())
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"\b(src|href)\s*=", html)  # nothing fetched: no CDN, no files
    assert html.count("<svg") == 4 and "data-expected-figures='4'" in html
    assert "old &lt;model&gt;" in html and "new &amp; model" in html
    assert "--fail-on: nfr=" in html


def _chromium_or_skip() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail("CI must install Debian's chromium (apt-get install -y chromium)")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def _render(chromium: Path, html: str, tmp_path: Path) -> str:
    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")
    profile = tmp_path / "profile"
    cmd = [
        str(chromium),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=2000",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_renders_in_headless_chromium_with_its_figures(tmp_path):
    dom = _render(_chromium_or_skip(), render_check_report(_result()), tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    # set by the page's own script after load: all 4 figures laid out, no script error
    assert 'data-selfcheck="ok"' in body, body
    assert 'data-figures="4"' in body and 'data-errors=""' in body
    assert dom.count("<svg") == 4
    assert len(re.findall(r'<rect class="bar"', dom)) > 10
    assert "[ok]</title>" in dom


def test_the_self_check_catches_a_script_error(tmp_path):
    html = render_check_report(_result()).replace("</body>", "<script>notDefined()</script></body>")
    dom = _render(_chromium_or_skip(), html, tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-selfcheck="failed"' in body and "notDefined" in body
