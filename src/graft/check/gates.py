"""``--fail-on`` gates: ``"nfr>0.02, new.ece>=0.05"`` parsed without ``eval``.

A gate is a metric name, a comparison (``>``, ``>=``, ``<``, ``<=``, ``==``, ``!=``) and a
number; several are separated by commas and any one that holds fails the check. The
names are the keys of `graft.check.compare.flat_metrics` (``graft check --json`` prints
them under ``"metrics"``).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from graft.recipe import RecipeError

_OPS = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_GATE = re.compile(
    r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(>=|<=|==|!=|>|<)\s*"
    r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(%?)\s*"
)


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_gates(expr: str) -> list[Gate]:
    """Gates from ``"name op number[, ...]"``; a trailing ``%`` divides the number by 100.

    Raises:
        RecipeError: a part is not ``name op number``.
    """
    gates = []
    for part in expr.split(","):
        m = _GATE.fullmatch(part)
        if not m:
            raise RecipeError(
                f"cannot parse --fail-on part {part.strip()!r}; write METRIC OP NUMBER, e.g. "
                "'nfr>0.02' or 'nfr>0.02,new.ece>0.05' (ops: > >= < <= == !=)"
            )
        value = float(m.group(3)) / (100 if m.group(4) else 1)
        gates.append(Gate(m.group(1).lower(), m.group(2), value))
    return gates


def check_gates(gates: list[Gate], metrics: dict[str, float]) -> list[str]:
    """The gates that hold, each as ``"nfr=0.031 > 0.02"``; [] when the check passes.

    A metric that is not a number here (NaN, e.g. a rate over no examples) fails no gate.

    Raises:
        RecipeError: a gate names a metric that is not reported; the message lists them.
    """
    failed = []
    for g in gates:
        if g.metric not in metrics:
            raise RecipeError(f"--fail-on names unknown metric {g.metric!r}; {_hint(g, metrics)}")
        v = metrics[g.metric]
        if v is not None and not math.isnan(v) and _OPS[g.op](v, g.value):
            failed.append(f"{g.metric}={v:.4g} {g.op} {g.value:g}")
    return failed


def _hint(gate: Gate, metrics: dict[str, float]) -> str:
    close = [k for k in metrics if k.split(".")[-1] == gate.metric.split(".")[-1]]
    if close:
        return f"did you mean {' or '.join(close)}?"
    return f"reported metrics: {', '.join(sorted(metrics))}"
