"""Permutation alignment of hidden units: per-architecture specs (`spec`) and weight /
activation matching (`matching`). Used by PLeaS (`graft.merge.pleas`) and by the zoo's
lineage to recognise permuted copies."""

from graft.align.matching import activation_matching, correlations, weight_matching
from graft.align.spec import (
    SUPPORTED,
    Group,
    PermutationSpec,
    UnsupportedArchitecture,
    identity,
    permutation_spec,
    permute,
    random_permutation,
)

__all__ = [
    "SUPPORTED",
    "Group",
    "PermutationSpec",
    "UnsupportedArchitecture",
    "activation_matching",
    "correlations",
    "identity",
    "permutation_spec",
    "permute",
    "random_permutation",
    "weight_matching",
]
