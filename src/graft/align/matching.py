"""Finding the permutation that aligns model B's hidden units to model A's.

Two ways, as in Git Re-Basin (Ainsworth et al. 2023, §3) and PLeaS (Nasery et al. 2025,
§3.1); both end in linear assignment problems solved exactly by
``scipy.optimize.linear_sum_assignment`` (maximising similarity):

* **Activation matching** (`activation_matching`): run both models on the same inputs;
  per group, the Pearson correlation of every unit of A with every unit of B over all
  (non-padding) token rows, summed over the group's sites (e.g. every point of the
  residual stream), is the similarity. One assignment per group; no iteration.
* **Weight matching** (`weight_matching`): maximise ``Σ_t ⟨W_A,t, P(W_B,t)⟩`` over all
  tensors by coordinate descent: for one group at a time, with the other groups'
  permutations held fixed, the similarity of unit ``i`` of A and unit ``j`` of B is the
  inner product of every slice they own (rows, columns, bias and LayerNorm entries);
  groups visited in a seeded random order until no assignment improves (at most
  ``max_iter`` sweeps). Computed in float64.

Heads (`graft.align.spec`): for a Q/K group and its tied V/O group, every pair of heads
``(a, b)`` gets the value of the best within-head assignment of each group (an LSA on a
``d × d`` block); the head order σ is the LSA over those summed values, and each group's
within-head permutation is the block solution of the chosen pair.

``scores``: per group, the similarity of each matched pair (correlation for activation
matching, cosine of the units' concatenated weights for weight matching) — how PLeaS's
partial merge picks which units to merge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from graft.align._hooks import capture, rows, run
from graft.align.spec import PermutationSpec, identity

Perms = dict[str, torch.Tensor]


def assign(similarity: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The permutation ``p`` maximising ``Σ_j S[j, p[j]]`` and that maximum."""
    from scipy.optimize import linear_sum_assignment

    s = similarity.double().cpu().numpy()
    r, c = linear_sum_assignment(s, maximize=True)
    return torch.from_numpy(c.astype(np.int64)), float(s[r, c].sum())


def assign_heads(sims: list[torch.Tensor], heads: int) -> list[torch.Tensor]:
    """Head-respecting assignment shared by tied groups (module docstring)."""
    n = sims[0].shape[0]
    d = n // heads
    inner: dict[tuple[int, int, int], torch.Tensor] = {}
    value = torch.zeros(heads, heads, dtype=torch.float64)
    for g, s in enumerate(sims):
        blocks = s.reshape(heads, d, heads, d).permute(0, 2, 1, 3)
        for a in range(heads):
            for b in range(heads):
                inner[g, a, b], v = assign(blocks[a, b])
                value[a, b] += v
    sigma, _ = assign(value)
    return [
        torch.cat([int(sigma[a]) * d + inner[g, a, int(sigma[a])] for a in range(heads)])
        for g in range(len(sims))
    ]


def _units(spec: PermutationSpec) -> list[list[str]]:
    """Groups solved together: each alone, except a head group with the ones tied to it."""
    out, seen = [], set()
    for name in spec.groups:
        if name in seen:
            continue
        unit = [name] + [t.name for t in spec.groups.values() if t.tied == name]
        seen.update(unit)
        out.append(unit)
    return out


def _solve(spec: PermutationSpec, unit: list[str], sims: list[torch.Tensor]) -> list[torch.Tensor]:
    g = spec.groups[unit[0]]
    if g.heads > 1:
        return assign_heads(sims, g.heads)
    return [assign(s)[0] for s in sims]


# --- weight matching --------------------------------------------------------------------


def _slices(spec, group, state_a, state_b, perms) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit of ``group``: A's and B's weights it owns, one row each (B with the other
    groups' permutations applied), concatenated over the group's axes."""
    ra, rb = [], []
    for tensor, axis in spec.groups[group].axes:
        if tensor not in state_a:
            continue
        a, b = state_a[tensor].double(), state_b[tensor].double()
        for other, ax in spec.axes_of(tensor):
            if other != group:
                b = b.index_select(ax, perms[other])
        n = spec.groups[group].size
        ra.append(a.movedim(axis, 0).reshape(n, -1))
        rb.append(b.movedim(axis, 0).reshape(n, -1))
    return torch.cat(ra, 1), torch.cat(rb, 1)


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[Perms, dict[str, torch.Tensor]]:
    """Permutations aligning ``state_b`` to ``state_a`` by weights (module docstring).

    Returns:
        ``(perms, scores)``: per group, the permutation and each matched pair's cosine.
    """
    perms = identity(spec)
    units = _units(spec)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        improved = False
        for k in torch.randperm(len(units), generator=gen).tolist():
            unit = units[k]
            sims = []
            for g in unit:
                a, b = _slices(spec, g, state_a, state_b, perms)
                sims.append(a @ b.T)
            new = _solve(spec, unit, sims)
            old_v = sum(
                float(s[torch.arange(len(p)), perms[g]].sum())
                for g, s, p in zip(unit, sims, new, strict=True)
            )
            new_v = sum(
                float(s[torch.arange(len(p)), p].sum()) for s, p in zip(sims, new, strict=True)
            )
            if new_v > old_v + 1e-12 * max(1.0, abs(old_v)):
                improved = True
                perms.update(zip(unit, new, strict=True))
        if not improved:
            break
    scores = {}
    for g in spec.groups:
        a, b = _slices(spec, g, state_a, state_b, perms)
        b = b[perms[g]]
        scores[g] = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return perms, scores


# --- activation matching ----------------------------------------------------------------


class _Moments:
    """Running sums for the cross-correlation of two sets of features."""

    def __init__(self, n: int, m: int):
        f64 = torch.float64
        self.count = 0
        self.sa, self.sb = torch.zeros(n, dtype=f64), torch.zeros(m, dtype=f64)
        self.qa, self.qb = torch.zeros(n, dtype=f64), torch.zeros(m, dtype=f64)
        self.ab = torch.zeros(n, m, dtype=f64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.qa += (a * a).sum(0)
        self.qb += (b * b).sum(0)
        self.ab += a.T @ b

    def correlation(self) -> torch.Tensor:
        n = max(self.count, 1)
        ma, mb = self.sa / n, self.sb / n
        cov = self.ab / n - ma[:, None] * mb[None, :]
        sa = (self.qa / n - ma * ma).clamp_min(0).sqrt()
        sb = (self.qb / n - mb * mb).clamp_min(0).sqrt()
        return cov / (sa[:, None] * sb[None, :]).clamp_min(1e-12)


def correlations(
    spec: PermutationSpec,
    module_a: nn.Module,
    module_b: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Per group, the unit-by-unit correlation of A and B summed over the group's sites."""
    sites = sorted({s for ss in spec.sites.values() for s in ss})
    moments: dict[tuple[str, str], _Moments] = {}
    with capture(module_a, sites) as got_a, capture(module_b, sites) as got_b:
        for inputs in batches:
            run(module_a, inputs)
            run(module_b, inputs)
            mask = inputs.get("attention_mask")
            for site in sites:
                a, b = rows(got_a[site], mask), rows(got_b[site], mask)
                moments.setdefault(site, _Moments(a.shape[1], b.shape[1])).add(a, b)
    return {g: sum(moments[s].correlation() for s in ss) / len(ss) for g, ss in spec.sites.items()}


def activation_matching(
    spec: PermutationSpec, corr: Mapping[str, torch.Tensor]
) -> tuple[Perms, dict[str, torch.Tensor]]:
    """Permutations aligning B to A from `correlations` (module docstring).

    Returns:
        ``(perms, scores)``: per group, the permutation and each matched pair's correlation.
    """
    perms: Perms = {}
    for unit in _units(spec):
        perms.update(zip(unit, _solve(spec, unit, [corr[g] for g in unit]), strict=True))
    scores = {g: corr[g][torch.arange(len(p)), p] for g, p in perms.items()}
    return perms, scores
