"""Hand-written inline SVG figures (no plotting library, nothing fetched by the page)."""

from __future__ import annotations

import math
from html import escape

OLD, NEW, BAD, GOOD, GRID = "#4c78a8", "#f58518", "#d62728", "#2ca02c", "#ccc"


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (
        f'<svg class="figure" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(label)}">' + "".join(body) + "</svg>"
    )


def _text(x: float, y: float, s: str, *, size: int = 11, anchor: str = "middle", **attrs) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{escape(str(v))}"' for k, v in attrs.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
        f"{escape(s)}</text>"
    )


def reliability(bins: list[dict], *, title: str, color: str = OLD) -> str:
    """Reliability diagram: per equal-width bin, accuracy (bar) against the bin's mean
    confidence (red gap) and the diagonal of perfect calibration."""
    size, pad = 260, 40
    body = [_text(pad + size / 2, 16, title, size=12, font_weight="bold")]

    def sx(v: float) -> float:
        return pad + v * size

    def sy(v: float) -> float:
        return 24 + (1 - v) * size

    for t in (0, 0.25, 0.5, 0.75, 1):
        body.append(f'<line x1="{sx(0)}" y1="{sy(t)}" x2="{sx(1)}" y2="{sy(t)}" stroke="{GRID}"/>')
        body.append(_text(sx(0) - 4, sy(t) + 4, f"{t:g}", size=9, anchor="end"))
        body.append(_text(sx(t), sy(0) + 12, f"{t:g}", size=9))
    for b in bins:
        if not b["n"]:
            continue
        x, w = sx(b["lo"]), (b["hi"] - b["lo"]) * size
        acc, conf = b["accuracy"], b["confidence"]
        body.append(
            f'<rect class="bar" x="{x:.1f}" y="{sy(acc):.1f}" width="{w:.1f}" '
            f'height="{sy(0) - sy(acc):.1f}" fill="{color}" stroke="#fff">'
            f"<title>{b['lo']:.2f}-{b['hi']:.2f}: n={escape(str(b['n']))}, accuracy {acc:.3f}, "
            f"confidence {conf:.3f}</title></rect>"
        )
        top, bottom = sorted((sy(acc), sy(conf)))
        body.append(
            f'<rect x="{x:.1f}" y="{top:.1f}" width="{w:.1f}" height="{bottom - top:.1f}" '
            f'fill="{BAD}" fill-opacity="0.35"/>'
        )
    body.append(
        f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(1)}" y2="{sy(1)}" stroke="#333" '
        'stroke-dasharray="4 3"/>'
    )
    body.append(
        f'<rect x="{sx(0)}" y="{sy(1)}" width="{size}" height="{size}" fill="none" stroke="#333"/>'
    )
    body.append(_text(sx(0.5), sy(0) + 28, "confidence"))
    body.append(_text(12, sy(0.5), "accuracy", transform=f"rotate(-90 12 {sy(0.5):.1f})"))
    return _svg(size + pad + 10, size + 64, body, title)


def flip_matrix(matrix: list[list[int]]) -> str:
    """2x2 counts: rows old right / wrong, columns new right / wrong."""
    cell, left, top = 110, 90, 40
    total = max(1, sum(map(sum, matrix)))
    colors = [["#e8f0e8", BAD], [GOOD, "#eee"]]
    body = [
        _text(left + cell, 14, "new model", size=12, font_weight="bold"),
        _text(left + cell / 2, 32, "right"),
        _text(left + 1.5 * cell, 32, "wrong"),
    ]
    for i, row in enumerate(matrix):
        y = top + i * cell
        body.append(_text(left - 8, y + cell / 2, ("old right", "old wrong")[i], anchor="end"))
        for j, count in enumerate(row):
            x = left + j * cell
            opacity = 0.25 + 0.75 * math.sqrt(count / total) if (i, j) in ((0, 1), (1, 0)) else 1
            body.append(
                f'<rect class="cell" x="{x}" y="{y}" width="{cell}" height="{cell}" '
                f'fill="{colors[i][j]}" fill-opacity="{opacity:.2f}" stroke="#fff"/>'
            )
            body.append(_text(x + cell / 2, y + cell / 2, str(count), size=16, font_weight="bold"))
            body.append(_text(x + cell / 2, y + cell / 2 + 18, f"{count / total:.1%}", size=10))
    return _svg(left + 2 * cell + 10, top + 2 * cell + 10, body, "flip matrix")


def per_class(rows: list[dict]) -> str:
    """Per class: old and new accuracy (bars) and the negative flip rate (red tick)."""
    k = len(rows)
    group = max(18, min(60, 700 // max(k, 1)))
    left, height, top = 40, 180, 24
    width = left + group * k + 20

    def sy(v: float) -> float:
        return top + (1 - v) * height

    body = [
        _text(left + 40, 14, "accuracy per class: old", size=11, anchor="start", fill=OLD),
        _text(left + 175, 14, "new", size=11, anchor="start", fill=NEW),
        _text(left + 205, 14, "negative flip rate", size=11, anchor="start", fill=BAD),
    ]
    for t in (0, 0.5, 1):
        body.append(
            f'<line x1="{left}" y1="{sy(t)}" x2="{width - 20}" y2="{sy(t)}" stroke="{GRID}"/>'
        )
        body.append(_text(left - 4, sy(t) + 4, f"{t:g}", size=9, anchor="end"))
    bar = (group - 6) / 2
    for c, r in enumerate(rows):
        x = left + c * group + 3
        for j, (key, color) in enumerate((("old_accuracy", OLD), ("new_accuracy", NEW))):
            v = r[key] if r[key] == r[key] else 0.0  # NaN: class absent from the data
            body.append(
                f'<rect class="bar" x="{x + j * bar:.1f}" y="{sy(v):.1f}" width="{bar:.1f}" '
                f'height="{sy(0) - sy(v):.1f}" fill="{color}"><title>class '
                f"{escape(str(r['class']))}: {key.replace('_', ' ')} {v:.3f} (n={escape(str(r['n']))})"
                "</title></rect>"
            )
        nfr = r["nfr"] if r["nfr"] == r["nfr"] else 0.0
        body.append(
            f'<line x1="{x:.1f}" y1="{sy(nfr):.1f}" x2="{x + 2 * bar:.1f}" '
            f'y2="{sy(nfr):.1f}" stroke="{BAD}" stroke-width="3"/>'
        )
        body.append(_text(x + bar, sy(0) + 13, str(r["class"]), size=9))
    return _svg(width, top + height + 20, body, "per-class accuracy and flips")
