"""Merge methods: pure functions over tensors, and the registry the engine reads.

Each method lives in its own module and exports its :class:`MethodSpec`; this module lists
them explicitly (no registration by import side effect). ``get_method(name)`` is the one
lookup, and its error names every valid method.
"""

from __future__ import annotations

from graft.merge import (
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    emr,
    fisher,
    iso,
    karcher,
    linear,
    lines,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    opcm,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv,
    wudi,
)
from graft.merge._spec import REQUIRED, MethodSpec, Param

METHODS: dict[str, MethodSpec] = {
    "linear": linear.SPEC,
    "task_arithmetic": task_arithmetic.SPEC,
    "ties": ties.SPEC,
    "dare_linear": dare.DARE_LINEAR_SPEC,
    "dare_ties": dare.DARE_TIES_SPEC,
    "breadcrumbs": breadcrumbs.BREADCRUMBS_SPEC,
    "breadcrumbs_ties": breadcrumbs.BREADCRUMBS_TIES_SPEC,
    "della": della.DELLA_SPEC,
    "della_linear": della.DELLA_LINEAR_SPEC,
    "model_stock": model_stock.SPEC,
    "slerp": slerp.SPEC,
    "nuslerp": nuslerp.SPEC,
    "multislerp": multislerp.SPEC,
    "passthrough": passthrough.SPEC,
    "karcher": karcher.SPEC,
    "sce": sce.SPEC,
    "ram": ram.RAM_SPEC,
    "ramplus_tl": ram.RAMPLUS_TL_SPEC,
    "nearswap": nearswap.SPEC,
    "arcee_fusion": arcee_fusion.SPEC,
    "lines": lines.SPEC,
    "tsv_m": tsv.SPEC,
    "iso_c": iso.ISO_C_SPEC,
    "iso_cts": iso.ISO_CTS_SPEC,
    "wudi": wudi.SPEC,
    "emr": emr.SPEC,
    "opcm": opcm.SPEC,
    "fisher": fisher.SPEC,
    "regmean": regmean.SPEC,
}


class UnknownMethodError(KeyError, ValueError):
    """A merge method name that is not registered; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``.

    Raises:
        UnknownMethodError: no such method; the message lists the valid names.
    """
    try:
        return METHODS[name]
    except KeyError:
        valid = ", ".join(sorted(METHODS))
        raise UnknownMethodError(f"unknown merge method {name!r}; valid: {valid}") from None


__all__ = ["METHODS", "REQUIRED", "MethodSpec", "Param", "UnknownMethodError", "get_method"]
