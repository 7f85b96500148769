"""Model lineage from weights alone, after MoTHer ("Unsupervised Model Tree Heritage
Recovery", Horwitz, Shul & Hoshen, ICLR 2025).

Steps, on the fixed weight sample the zoo index keeps for every model
(`graft.zoo._weights.plan_sample`; same rows for every model of one signature):

1. **Distance.** Per sampled matrix, ``‖a − b‖ / sqrt((‖a‖² + ‖b‖²) / 2)``, averaged over
   matrices. It is ~0 for a model and its fine-tune and ~√2 for unrelated models
   (independent weights are uncorrelated).
2. **Calibration (related or not).** Each pair gets its own "unrelated" yardstick: the same
   distance between row ``k`` of one model and row ``k + 1`` of the other, i.e. between
   weights with the same distribution but no shared history. A pair is related when
   ``distance / null < related_ratio`` (0.5). On graft's digits models, 60 (pretrained,
   fine-tune) pairs measure 0.05–0.11 (fine-tunes of fine-tunes and siblings up to ~0.15)
   and 29 pairs of independently initialised models 0.99–1.01 (docs/find.md). Related models form a family (connected
   components); models with different signatures are never related.
3. **Direction.** MoTHer observes that weight kurtosis changes monotonically with training.
   graft measures the sign on its own families: the mean excess kurtosis of the sampled
   matrices *rises* from every parent to its child (initialisation → pretrained →
   fine-tune → fine-tune of the fine-tune; `sign = +1`; 59 of 60 trained pairs in
   docs/find.md). An edge that runs against the kurtosis change costs a penalty larger
   than all distances together, so kurtosis orders the tree and distance picks the edges.
   The change must be clear: its t statistic over the sampled matrices beyond ±2
   (`direction`); otherwise the edge is free both ways. Weights that were never trained
   (a "fine-tune" made by adding noise) carry no such signal.
4. **Tree.** A minimum directed spanning tree (Chu–Liu/Edmonds, `min_arborescence`) per
   family, rooted at a virtual node whose edges cost more than any real one, so exactly
   one model becomes the root; between equally cheap trees, the model nearest to all the
   others is the root (a base fine-tuned several times is the centre of its children).

5. **Permuted copies.** Reordering hidden units leaves a network's function unchanged but
   makes its raw distance to the original that of an unrelated model. When a signature
   still has several families after step 2 and its architecture has a permutation spec
   (`graft.align`: GraftDigitsNet, BERT encoders; at most `ALIGN_MAX_PARAMS` parameters),
   each later family's first model is aligned to each earlier family's first model by
   weight matching on the *full* tensors (the sample's rows are a subset, so they cannot
   be matched on their own), the sample is re-read from the aligned tensors, and the
   ratio recomputed. Below ``related_ratio`` the whole family is moved into the earlier
   family's basis (every member permuted the same way) and steps 2-4 run again; an edge
   that joins two such families is marked ``permuted``. Weight matching brings unrelated
   trained models closer but not near the threshold (the lineage tests measure it).

Limits: two siblings whose parent is not in the index are linked as parent and child;
identical weights cannot be ordered; aligning reads two whole models per pair of families
(bounded by `ALIGN_MAX_PARAMS`; ``permutations=False`` turns step 5 off).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from graft.zoo._weights import split_sample

if TYPE_CHECKING:
    from graft.zoo.index import ModelRecord, ZooIndex

RELATED_RATIO = 0.5
ALIGN_MAX_PARAMS = 200_000_000  # step 5 reads whole models; larger ones are not aligned
KURTOSIS_SIGN = +1  # kurtosis rises from parent to child (measured; see module docstring)
DIRECTION_T = 2.0  # |t| of the per-matrix kurtosis change needed to orient an edge


def pairwise_distances(samples: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean normalised distance between models, and the row-shifted "null" distance.

    Args:
        samples: per model, the same list of ``(rows, cols)`` matrices (rows >= 2).

    Returns:
        ``(distance, null)``, both ``(n, n)`` float64 and symmetric, zero diagonal for
        ``distance``.
    """
    n = len(samples)
    dist = torch.zeros(n, n, dtype=torch.float64)
    null = torch.zeros(n, n, dtype=torch.float64)
    count = len(samples[0]) if n else 0
    for t in range(count):
        X = torch.stack([s[t].double().reshape(-1) for s in samples])
        R = torch.stack([s[t].double().roll(1, 0).reshape(-1) for s in samples])
        sq = (X * X).sum(1)
        pair = sq[:, None] + sq[None, :]
        scale = (pair / 2).clamp_min(1e-300).sqrt()
        dist += (pair - 2 * X @ X.T).clamp_min(0).sqrt() / scale
        shifted = (pair - 2 * X @ R.T).clamp_min(0).sqrt() / scale
        null += (shifted + shifted.T) / 2
    if count:
        dist /= count
        null /= count
    dist.fill_diagonal_(0.0)
    return dist, null


def tensor_kurtosis(samples: list[list[torch.Tensor]]) -> torch.Tensor:
    """Excess kurtosis of every sampled matrix of every model, ``(n, matrices)`` float64."""
    out = torch.zeros(len(samples), len(samples[0]) if samples else 0, dtype=torch.float64)
    for i, mats in enumerate(samples):
        for t, m in enumerate(mats):
            x = m.double().reshape(-1)
            x = x - x.mean()
            m2 = (x * x).mean()
            out[i, t] = (x**4).mean() / (m2 * m2) - 3.0 if m2 > 0 else 0.0
    return out


def kurtosis(samples: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per model, the mean excess kurtosis of its sampled matrices, ``(n,)`` float64."""
    k = tensor_kurtosis(samples)
    return k.mean(1) if k.shape[1] else torch.zeros(len(samples), dtype=torch.float64)


def direction(k_parent: torch.Tensor, k_child: torch.Tensor) -> float:
    """How surely kurtosis rises from one model to another: the t statistic of the
    per-matrix differences (positive: rises). With fewer than 3 matrices, the sign of the
    mean difference times infinity."""
    d = k_child - k_parent
    if len(d) < 3:
        mean = float(d.mean()) if len(d) else 0.0
        return math.copysign(math.inf, mean) if mean else 0.0
    sd = float(d.std())
    if sd == 0:
        return math.copysign(math.inf, float(d.mean())) if float(d.mean()) else 0.0
    return float(d.mean()) / (sd / math.sqrt(len(d)))


def min_arborescence(cost: list[list[float]], root: int) -> list[int | None]:
    """Minimum spanning arborescence (directed tree) by Chu–Liu/Edmonds.

    Args:
        cost: ``cost[u][v]`` is the weight of the edge ``u -> v`` (``math.inf``: no edge;
            the diagonal is ignored).
        root: the node with no parent.

    Returns:
        ``parent[v]`` for every node (None for the root). Ties go to the lower index.

    Raises:
        ValueError: some node cannot be reached from the root.
    """
    n = len(cost)
    parent: list[int | None] = [None] * n
    for v in range(n):
        if v == root:
            continue
        best = min((cost[u][v], u) for u in range(n) if u != v)
        if math.isinf(best[0]):
            raise ValueError(f"node {v} has no incoming edge")
        parent[v] = best[1]
    cycle = _find_cycle(parent)
    if cycle is None:
        return parent
    in_cycle = set(cycle)
    others = [v for v in range(n) if v not in in_cycle]
    at = {v: i for i, v in enumerate(others)}
    c = len(others)  # the contracted cycle's index
    sub = [[math.inf] * (c + 1) for _ in range(c + 1)]
    enter, leave = {}, {}
    for u in others:
        for v in others:
            if u != v:
                sub[at[u]][at[v]] = cost[u][v]
        sub[at[u]][c], enter[u] = min((cost[u][v] - cost[parent[v]][v], v) for v in cycle)
        sub[c][at[u]], leave[u] = min((cost[w][u], w) for w in cycle)
    tree = min_arborescence(sub, at[root])
    out = list(parent)
    for u in others:
        p = tree[at[u]]
        out[u] = None if p is None else (leave[u] if p == c else others[p])
    u = others[tree[c]]
    out[enter[u]] = u
    return out


def _find_cycle(parent: list[int | None]) -> list[int] | None:
    seen: dict[int, int] = {}
    for start in range(len(parent)):
        path, v = [], start
        while v is not None and v not in seen:
            seen[v] = start
            path.append(v)
            v = parent[v]
        if v is not None and seen[v] == start:
            return path[path.index(v) :]
    return None


@dataclass
class Lineage:
    """The recovered forest over ``n`` models.

    Attributes:
        parents: ``parents[i]``: index of model i's parent, None for a root.
        family: ``family[i]``: index of model i's family (related models).
        distance, null: `pairwise_distances`.
        kurtosis: `kurtosis`.
    """

    parents: list[int | None]
    family: list[int]
    distance: torch.Tensor
    null: torch.Tensor
    kurtosis: torch.Tensor

    def ratio(self, i: int, j: int) -> float:
        """``distance / null`` of a pair: ~1 unrelated, small related."""
        d, z = float(self.distance[i, j]), float(self.null[i, j])
        return d / z if z > 0 else (0.0 if d == 0 else math.inf)


def infer_lineage(
    samples: list[list[torch.Tensor]],
    *,
    related_ratio: float = RELATED_RATIO,
    sign: int = KURTOSIS_SIGN,
) -> Lineage:
    """Families and family trees of models with the same sampled matrices (module docstring).

    Args:
        samples: per model, the same list of ``(rows, cols)`` matrices.
        related_ratio: pairs with ``distance / null`` below this are related.
        sign: +1 when kurtosis rises from parent to child, -1 for the opposite.
    """
    n = len(samples)
    dist, null = pairwise_distances(samples)
    tkurt = tensor_kurtosis(samples)
    kurt = tkurt.mean(1) if tkurt.shape[1] else torch.zeros(n, dtype=torch.float64)
    lin = Lineage([None] * n, list(range(n)), dist, null, kurt)
    for i in range(n):
        for j in range(i + 1, n):
            if lin.ratio(i, j) < related_ratio:
                _union(lin.family, i, j)
    lin.family = [_root(lin.family, i) for i in range(n)]
    for fam in sorted(set(lin.family)):
        members = [i for i in range(n) if lin.family[i] == fam]
        for child, parent in zip(members, _family_tree(members, dist, tkurt, sign), strict=True):
            lin.parents[child] = None if parent is None else members[parent]
    return lin


def _family_tree(members, dist, tkurt, sign) -> list[int | None]:
    k = len(members)
    if k == 1:
        return [None]
    d = dist[members][:, members]
    penalty = 1.0 + 2.0 * float(d.sum())
    cost = [[math.inf] * (k + 1) for _ in range(k + 1)]
    for u in range(k):
        for v in range(k):
            if u != v:
                t = sign * direction(tkurt[members[u]], tkurt[members[v]])
                cost[u][v] = float(d[u, v]) + (penalty if t < -DIRECTION_T else 0.0)
    # Exactly one root edge; among equally cheap trees (kurtosis undecided) the root is
    # the model nearest to all others: a base fine-tuned several times is their centre.
    spread = d.sum(1) / (1.0 + float(d.sum()))
    for v in range(k):
        cost[k][v] = 2.0 * (k + 1) * penalty + 1e-6 * float(spread[v])
    parents = min_arborescence(cost, k)[:k]
    return [None if p == k else p for p in parents]


def _root(up: list[int], i: int) -> int:
    while up[i] != i:
        up[i] = up[up[i]]
        i = up[i]
    return i


def _union(up: list[int], i: int, j: int) -> None:
    a, b = _root(up, i), _root(up, j)
    if a != b:
        up[max(a, b)] = min(a, b)


# --- the index's view -----------------------------------------------------------------


@dataclass
class Family:
    """One recovered family of indexed models (model ids)."""

    signature: str
    members: list[int]
    parents: dict[int, int | None]
    distance: dict[int, float] = field(default_factory=dict)  # child -> distance to parent
    ratio: dict[int, float] = field(default_factory=dict)  # child -> distance / null
    kurtosis: dict[int, float] = field(default_factory=dict)
    permuted: dict[int, bool] = field(default_factory=dict)  # child -> edge needed alignment


@dataclass
class IndexLineage:
    """Lineage over a whole index: families (2+ related models), singletons, card checks.

    ``card_checks``: per model whose card names a ``base_model``, ``{"declared", "resolved"
    (model id or None), "verdict", "message"}``; verdict is "agrees", "ancestor",
    "disagrees" or "unknown" (base not in the index). ``orientation``: over pairs where the
    card's base is related by the weights, how many have kurtosis rising parent -> child.
    """

    families: list[Family]
    singletons: list[int]
    records: dict[int, ModelRecord]
    card_checks: dict[int, list[dict]]
    orientation: dict


def index_lineage(
    index: ZooIndex,
    *,
    related_ratio: float = RELATED_RATIO,
    sign: int = KURTOSIS_SIGN,
    permutations: bool = True,
) -> IndexLineage:
    """Recover families from the samples stored in ``index`` and check the model cards.

    ``permutations``: also recognise permuted copies (module docstring, step 5).
    """
    records = {r.id: r for r in index.models()}
    by_signature: dict[str, list[int]] = {}
    for r in records.values():
        by_signature.setdefault(r.signature, []).append(r.id)
    families, related = [], {}
    for sig, members in sorted(by_signature.items(), key=lambda kv: min(kv[1])):
        samples = index.samples(members) if len(members) > 1 else {}
        groups: dict[str, list[int]] = {}  # by sample plan (one per graft version)
        for mid, (phash, _, _) in samples.items():
            groups.setdefault(phash, []).append(mid)
        for ids in groups.values():
            ids.sort()
            mats = [split_sample(samples[i][2], samples[i][1]) for i in ids]
            if not mats[0]:
                continue
            lin = infer_lineage(mats, related_ratio=related_ratio, sign=sign)
            raw_family = lin.family
            if permutations and len(set(lin.family)) > 1:
                plan = samples[ids[0]][1]
                mats, moved = align_families(
                    [records[i] for i in ids], mats, lin.family, plan, related_ratio
                )
                if moved:
                    lin = infer_lineage(mats, related_ratio=related_ratio, sign=sign)
            for fam in sorted(set(lin.family)):
                local = [k for k in range(len(ids)) if lin.family[k] == fam]
                if len(local) > 1:
                    families.append(_family(sig, ids, local, lin, raw_family))
            for a, i in enumerate(ids):
                for b, j in enumerate(ids):
                    related[(i, j)] = lin.ratio(a, b)
    in_family = {m for f in families for m in f.members}
    singletons = [i for i in records if i not in in_family]
    checks, orientation = _check_cards(records, families, related)
    return IndexLineage(families, sorted(singletons), records, checks, orientation)


def _family(sig: str, ids: list[int], local: list[int], lin: Lineage, raw: list[int]) -> Family:
    f = Family(sig, [ids[k] for k in local], {})
    for k in local:
        p = lin.parents[k]
        f.parents[ids[k]] = None if p is None else ids[p]
        f.kurtosis[ids[k]] = float(lin.kurtosis[k])
        if p is not None:
            f.distance[ids[k]] = float(lin.distance[p, k])
            f.ratio[ids[k]] = lin.ratio(p, k)
            f.permuted[ids[k]] = raw[k] != raw[p]
    return f


# --- permuted copies (step 5) ---------------------------------------------------------


def align_families(
    records: list[ModelRecord],
    mats: list[list[torch.Tensor]],
    family: list[int],
    plan: list,
    related_ratio: float = RELATED_RATIO,
) -> tuple[list[list[torch.Tensor]], bool]:
    """Samples with every family that is a permuted relative of an earlier one moved into
    that family's basis (module docstring, step 5).

    Returns:
        ``(samples, moved)``; ``moved`` is False when nothing was aligned (unsupported
        architecture, too large, unreadable, or no permuted relatives).
    """
    from graft.align import UnsupportedArchitecture, permutation_spec, permute, weight_matching
    from graft.io import GraftIOError, open_checkpoint
    from graft.plan.engine import all_finite

    if (records[0].num_params or 0) > ALIGN_MAX_PARAMS:
        return mats, False
    states: dict[int, dict[str, torch.Tensor]] = {}

    def state(k: int) -> dict[str, torch.Tensor]:
        if k not in states:
            with open_checkpoint(records[k].path) as ckpt:
                states[k] = {n: ckpt.get(n).float() for n in ckpt.names}
        return states[k]

    try:
        with open_checkpoint(records[0].path) as ckpt:
            config = ckpt.config
        spec = permutation_spec(config, state(0))
    except (UnsupportedArchitecture, GraftIOError, KeyError, TypeError):
        return mats, False
    mats = list(mats)
    comps = [[k for k in range(len(family)) if family[k] == f] for f in sorted(set(family))]
    # comp -> permutations into the basis of the family it joined (None: its own basis)
    basis: dict[int, dict | None] = {0: None}
    moved = False
    finite: dict[int, bool] = {}

    def usable(k: int) -> bool:  # a model with NaN/Inf weights has no permutation to find
        if k not in finite:
            finite[k] = all(all_finite(t) for t in state(k).values())
        return finite[k]

    try:
        for c in range(1, len(comps)):
            basis[c] = None
            rep = comps[c][0]
            if not usable(rep):
                continue
            for e in range(c):
                ref = comps[e][0]
                if not usable(ref):
                    continue
                ref_state = state(ref) if basis[e] is None else permute(state(ref), spec, basis[e])
                perms, _ = weight_matching(spec, ref_state, state(rep))
                aligned = sample_state(permute(state(rep), spec, perms), plan)
                dist, null = pairwise_distances([mats[ref], aligned])
                if float(null[0, 1]) > 0 and float(dist[0, 1] / null[0, 1]) < related_ratio:
                    basis[c] = perms
                    for k in comps[c]:
                        mats[k] = sample_state(permute(state(k), spec, perms), plan)
                    moved = True
                    break
    except GraftIOError:
        return mats, moved
    return mats, moved


def sample_state(state: dict[str, torch.Tensor], plan: list) -> list[torch.Tensor]:
    """The sample `graft.zoo._weights.read_sample` would read, taken from in-memory tensors."""
    out = []
    for s in plan:
        t = state[s.name]
        view = t.reshape(t.shape[0], -1)
        rows = torch.tensor(s.rows, dtype=torch.long)
        out.append(view[rows, s.col_start : s.col_start + s.ncols].float())
    return out


def _check_cards(records, families, related) -> tuple[dict, dict]:
    parent_of, kurt = {}, {}
    for f in families:
        parent_of.update(f.parents)
        kurt.update(f.kurtosis)
    checks, rising, pairs = {}, 0, 0
    for mid, rec in records.items():
        out = []
        for declared in rec.card.get("base_model", []):
            base = _resolve(declared, rec, records)
            out.append(_verdict(declared, base, mid, records, parent_of, related))
            if base is not None and related.get((base, mid), math.inf) < RELATED_RATIO:
                pairs += 1
                rising += kurt.get(mid, 0.0) > kurt.get(base, 0.0)
        if out:
            checks[mid] = out
    return checks, {"declared_related_pairs": pairs, "kurtosis_rises": rising}


def _verdict(declared, base, mid, records, parent_of, related) -> dict:
    out = {"declared": declared, "resolved": base}
    inferred = parent_of.get(mid)
    inferred_name = records[inferred].name if inferred is not None else "none (a root)"
    if base is None:
        return {
            **out,
            "verdict": "unknown",
            "message": f"card base_model {declared} is not in the index",
        }
    if base == inferred:
        return {**out, "verdict": "agrees", "message": "card base_model agrees with the weights"}
    ancestors, p = [], inferred
    while p is not None and p not in ancestors:
        ancestors.append(p)
        p = parent_of.get(p)
    if base in ancestors:
        msg = (
            f"card base_model {declared} is an ancestor; the weights put {inferred_name} in between"
        )
        return {**out, "verdict": "ancestor", "message": msg}
    ratio = related.get((base, mid))
    if ratio is None:
        why = "its tensors differ (another signature)"
    elif ratio >= RELATED_RATIO:
        why = f"the weights are unrelated (distance ratio {ratio:.2f})"
    else:
        why = f"the weights say the parent is {inferred_name}"
    return {**out, "verdict": "disagrees", "message": f"card says base_model {declared}, but {why}"}


def _resolve(declared: str, rec: ModelRecord, records: dict) -> int | None:
    """The indexed model a card's ``base_model`` names: a hub repo id, a path (absolute or
    relative to the model), or a unique path suffix."""
    text = declared.strip().rstrip("/")
    hits = [r for r in records.values() if r.repo_id == text]
    if len(hits) > 1:
        hits = [r for r in hits if "main" in r.refs] or hits[:1]
    if not hits:
        is_file = rec.path.endswith((".safetensors", ".bin", ".pt", ".pth"))
        here = os.path.dirname(rec.path) if is_file else rec.path
        wanted = {os.path.normpath(os.path.join(here, text)), os.path.normpath(text)}
        hits = [r for r in records.values() if r.path in wanted]
    if not hits:
        hits = [r for r in records.values() if r.path.endswith(os.sep + text) and r.id != rec.id]
    return hits[0].id if len(hits) == 1 else None
