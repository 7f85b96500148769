"""Permutation specs: which tensor axes one hidden-unit permutation acts on, per
architecture, as data (Ainsworth et al. 2023, "Git Re-Basin", §2; PLeaS, Nasery et al.
2025, §3.1).

A spec is a list of `Group`\\ s. Reordering the units of a group — every axis it lists, by
the same permutation — leaves the network's function unchanged (up to the same reordering
of its outputs when the group is the output basis). Conventions:

* A permutation is a LongTensor ``p`` of length ``size``; applying it to an axis selects
  ``t.index_select(axis, p)``: new unit ``j`` is old unit ``p[j]``. Aligning model B to
  model A finds ``p`` with ``B[p[j]] ≈ A[j]``, so a copy made as ``B = A.index_select(p0)``
  is undone by ``p = argsort(p0)``.
* **Residual stream** (``residual``): one permutation shared by everything that reads or
  writes the stream — embeddings, every LayerNorm, every block's input columns and output
  rows, the final norm, and (outside the checkpoint) the heads' input columns.
* **Heads** (``heads > 1``): attention units are permuted as ``p[h·d + k] = σ(h)·d +
  τₕ(k)``: heads as wholes (σ, shared by Q, K, V and O of the layer: ``tied``) and the
  dimensions within each head (τₕ, one for Q and K together, another for V and O).
* **Partial** groups (``partial=True``): the MLP hidden layer / FFN intermediate, whose
  width is a config field (``intermediate_size``), so PLeaS's partial merge may widen
  them and still write a standard checkpoint. Residual and attention groups are always
  merged fully (a wider residual stream would change what LayerNorm averages over; more
  heads would change the head size).

Supported: graft's ``GraftDigitsNet`` and the BERT family (``BertModel`` — MiniLM — with
absolute position embeddings, encoder only). `permutation_spec` raises a one-line error
naming the architecture otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

SUPPORTED = "GraftDigitsNet and BERT encoders (BertModel, e.g. MiniLM)"


class UnsupportedArchitecture(ValueError):
    """No permutation spec for this architecture; the message names what is supported."""


@dataclass(frozen=True)
class Group:
    """One permutation and the axes it acts on.

    Attributes:
        name: e.g. ``residual``, ``blocks.0.mlp``, ``encoder.layer.3.attention.qk``.
        size: number of units.
        axes: ``(tensor name, axis)`` pairs, tensors named as in the state dict.
        heads: > 1 when units come in heads of ``size // heads`` (permuted as described
            in the module docstring).
        tied: the group whose head order this one shares (V/O shares Q/K's), or None.
        partial: PLeaS may widen this group (config field ``intermediate_size``).
    """

    name: str
    size: int
    axes: tuple[tuple[str, int], ...]
    heads: int = 1
    tied: str | None = None
    partial: bool = False


@dataclass(frozen=True)
class PermutationSpec:
    """The groups of one architecture and the Linear layers PLeaS solves, in forward order.

    Attributes:
        architecture: ``"digits"`` or ``"bert"``.
        groups: by name.
        stages: lists of Linear module names (state names without ``.weight``), in forward
            order; the layers of one stage read the same input and are solved together.
        sites: per group, the modules whose activations activation matching correlates:
            ``(module name, "in" | "out")``.
    """

    architecture: str
    groups: dict[str, Group]
    stages: tuple[tuple[str, ...], ...]
    sites: dict[str, tuple[tuple[str, str], ...]]

    def axes_of(self, name: str) -> list[tuple[str, int]]:
        """``(group, axis)`` of every group acting on tensor ``name``."""
        return [(g.name, ax) for g in self.groups.values() for t, ax in g.axes if t == name]


def permute(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` with every group's permutation applied to all its axes (names not in the
    spec are returned as they are)."""
    out = dict(state)
    for name, group in spec.groups.items():
        p = perms[name]
        for tensor, axis in group.axes:
            if tensor in out:
                out[tensor] = out[tensor].index_select(axis, p.to(out[tensor].device))
    return out


def identity(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    return {n: torch.arange(g.size) for n, g in spec.groups.items()}


def random_permutation(spec: PermutationSpec, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random permutation of every group that respects heads and their ties (for tests
    and for checking a spec: a model permuted by it must compute the same function)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    head_order: dict[str, torch.Tensor] = {}
    for name, g in spec.groups.items():
        if g.heads == 1:
            out[name] = torch.randperm(g.size, generator=gen)
            continue
        d = g.size // g.heads
        sigma = head_order.get(g.tied) if g.tied else None
        sigma = torch.randperm(g.heads, generator=gen) if sigma is None else sigma
        head_order[name] = sigma
        out[name] = torch.cat(
            [sigma[h] * d + torch.randperm(d, generator=gen) for h in range(g.heads)]
        )
    return out


# --- architectures ----------------------------------------------------------------------


def permutation_spec(
    config: Mapping | None, names: Iterable[str], *, where: str = "the model"
) -> PermutationSpec:
    """The spec of a model from its config and its state-dict names.

    Raises:
        UnsupportedArchitecture: not a GraftDigitsNet or a BERT encoder (one line, naming
            the architecture and what is supported).
    """
    config = dict(config or {})
    names = list(names)
    archs = config.get("architectures") or []
    if "GraftDigitsNet" in archs:
        return _digits_spec(config)
    if config.get("model_type") == "bert":
        return _bert_spec(config, names, where)
    arch = ", ".join(archs) or config.get("model_type") or "unknown"
    raise UnsupportedArchitecture(
        f"{where} is a {arch}; permutation matching (PLeaS, permuted lineage) supports {SUPPORTED}"
    )


def _digits_spec(config: Mapping) -> PermutationSpec:
    d, h, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    res = [("embed.weight", 0), ("embed.bias", 0), ("norm.weight", 0), ("norm.bias", 0)]
    groups, stages, sites = {}, [("embed",)], {"residual": [("embed", "out")]}
    for i in range(n):
        b = f"blocks.{i}"
        res += [(f"{b}.norm.weight", 0), (f"{b}.norm.bias", 0), (f"{b}.fc1.weight", 1)]
        res += [(f"{b}.fc2.weight", 0), (f"{b}.fc2.bias", 0)]
        mlp = ((f"{b}.fc1.weight", 0), (f"{b}.fc1.bias", 0), (f"{b}.fc2.weight", 1))
        groups[f"{b}.mlp"] = Group(f"{b}.mlp", h, mlp, partial=True)
        stages += [(f"{b}.fc1",), (f"{b}.fc2",)]
        sites["residual"].append((b, "out"))
        sites[f"{b}.mlp"] = ((f"{b}.fc2", "in"),)
    groups = {"residual": Group("residual", d, tuple(res)), **groups}
    sites["residual"] = tuple(sites["residual"])
    return PermutationSpec("digits", groups, tuple(stages), sites)


def _bert_spec(config: Mapping, names: list[str], where: str) -> PermutationSpec:
    if config.get("position_embedding_type", "absolute") != "absolute" or config.get("is_decoder"):
        raise UnsupportedArchitecture(
            f"{where} is a BERT with {config.get('position_embedding_type')} positions or a "
            f"decoder; permutation matching supports {SUPPORTED} with absolute positions"
        )
    anchor = next((n for n in names if n.endswith("embeddings.word_embeddings.weight")), None)
    if anchor is None:
        raise UnsupportedArchitecture(f"{where} has no embeddings.word_embeddings.weight")
    pre = anchor[: -len("embeddings.word_embeddings.weight")]
    have = set(names)
    d, heads = config["hidden_size"], config["num_attention_heads"]
    ff, n = config["intermediate_size"], config["num_hidden_layers"]
    emb = f"{pre}embeddings."
    res = [(f"{emb}{k}_embeddings.weight", 1) for k in ("word", "position", "token_type")]
    res += [(f"{emb}LayerNorm.weight", 0), (f"{emb}LayerNorm.bias", 0)]
    groups: dict[str, Group] = {}
    stages: list[tuple[str, ...]] = []
    sites: dict[str, list[tuple[str, str]]] = {"residual": [(f"{pre}embeddings", "out")]}
    for i in range(n):
        L = f"{pre}encoder.layer.{i}."
        a, q, k, v = (
            f"{L}attention.",
            f"{L}attention.self.query",
            f"{L}attention.self.key",
            f"{L}attention.self.value",
        )
        o, inter, out = f"{a}output.dense", f"{L}intermediate.dense", f"{L}output.dense"
        res += [(f"{q}.weight", 1), (f"{k}.weight", 1), (f"{v}.weight", 1)]
        res += [(f"{o}.weight", 0), (f"{o}.bias", 0), (f"{a}output.LayerNorm.weight", 0)]
        res += [(f"{a}output.LayerNorm.bias", 0), (f"{inter}.weight", 1), (f"{out}.weight", 0)]
        res += [
            (f"{out}.bias", 0),
            (f"{L}output.LayerNorm.weight", 0),
            (f"{L}output.LayerNorm.bias", 0),
        ]
        qk = tuple((f"{m}.{p}", 0) for m in (q, k) for p in ("weight", "bias"))
        vo = ((f"{v}.weight", 0), (f"{v}.bias", 0), (f"{o}.weight", 1))
        ffn = ((f"{inter}.weight", 0), (f"{inter}.bias", 0), (f"{out}.weight", 1))
        name = f"{L}".rstrip(".")
        groups[f"{name}.qk"] = Group(f"{name}.qk", d, qk, heads=heads)
        groups[f"{name}.vo"] = Group(f"{name}.vo", d, vo, heads=heads, tied=f"{name}.qk")
        groups[f"{name}.ffn"] = Group(f"{name}.ffn", ff, ffn, partial=True)
        stages += [(q, k, v), (o,), (inter,), (out,)]
        sites["residual"] += [(f"{a}output", "out"), (f"{L}output", "out")]
        sites[f"{name}.qk"] = ((q, "out"), (k, "out"))
        sites[f"{name}.vo"] = ((v, "out"),)
        sites[f"{name}.ffn"] = ((out, "in"),)
    if f"{pre}pooler.dense.weight" in have:
        p = f"{pre}pooler.dense"
        res.append((f"{p}.weight", 1))
        pooled = [(f"{p}.weight", 0), (f"{p}.bias", 0)]
        if "classifier.weight" in have:  # a sequence classifier reads the pooler's output
            pooled.append(("classifier.weight", 1))
        groups["pooler"] = Group("pooler", d, tuple(pooled))
        stages.append((p,))
        sites["pooler"] = ((p, "out"),)
    groups = {"residual": Group("residual", d, tuple(res)), **groups}
    missing = sorted({t for g in groups.values() for t, _ in g.axes} - have)
    if missing:
        raise UnsupportedArchitecture(
            f"{where} lacks {missing[0]} (and {len(missing) - 1} more) that a BertModel has; "
            f"permutation matching supports {SUPPORTED}"
        )
    extra = [t for t in have if t.endswith(".weight") and not spec_covers(groups, t)]
    extra = [t for t in extra if not re.search(r"(classifier|head|position_ids)", t)]
    if extra:
        raise UnsupportedArchitecture(
            f"{where} has tensors a BertModel encoder does not ({sorted(extra)[0]}); "
            f"permutation matching supports {SUPPORTED}"
        )
    return PermutationSpec("bert", groups, tuple(stages), {g: tuple(s) for g, s in sites.items()})


def spec_covers(groups: Mapping[str, Group], tensor: str) -> bool:
    return any(t == tensor for g in groups.values() for t, _ in g.axes)
