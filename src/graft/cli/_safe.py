"""`safe`: untrusted text made fit for the terminal.

Tensor names, model names and paths, model-card text and file names come from files
anyone can write. Printed as they are, ``[/]`` or ``[bold red]`` is read as rich markup
(a tensor named ``[/]`` crashed ``graft inspect --tensors`` with a ``MarkupError``) and
an ESC byte starts an ANSI sequence that can recolour, move the cursor or retitle the
terminal. Every command prints such text through `safe`.
"""

from __future__ import annotations

import re

from rich.markup import escape

# C0 controls (tab and newline included: a name is one line), DEL, C1 controls (ESC and
# CSI included), and the Unicode controls that reorder or break what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


def _visible(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: object, *, markup: bool = True) -> str:
    """``str(text)`` with control characters shown as ``\\x..`` (``\\u....``) escapes and,
    for rich output, markup escaped (`rich.markup.escape`).

    Args:
        text: anything; it is converted with ``str``.
        markup: False for text printed without rich (``typer.echo``), where brackets are
            plain characters and escaping them would show the backslashes.
    """
    shown = _CONTROL.sub(_visible, str(text))
    return escape(shown) if markup else shown


def echo_json(doc: object, *, default=None) -> None:
    """Print ``doc`` as strict JSON (RFC 8259) for scripts: a NaN or infinite number (a
    diverged loss, an undefined score) becomes ``null`` instead of the ``NaN`` token strict
    parsers reject, or a crash after the command's work is done."""
    import json

    import typer

    from graft.check.compare import jsonable

    typer.echo(json.dumps(jsonable(doc), indent=2, allow_nan=False, default=default))
