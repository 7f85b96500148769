"""Model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple
fine-tuned models improves accuracy without increasing inference time", ICML).

* Uniform soup: the plain average of every ingredient.
* Greedy soup: sort the ingredients by held-out accuracy; start from the best; add the
  next ingredient to the running *uniform* average only if held-out accuracy strictly
  improves. (The paper's pseudo-code keeps an ingredient on a tie, ``≥``; graft follows
  the strict rule, which keeps the soup smaller.) Because the running soup only ever
  changes when its held-out accuracy rises, it is never worse on the held-out split
  than its best ingredient.

Convention: an ingredient is a backbone *and* its own classification head (the zoo's
soup fine-tunes each train a head), and a soup averages both, with the same uniform
weights. Held-out accuracy is measured on a validation split, never the test split.

The chosen soup is returned as tensors and as a ``linear`` recipe over the chosen
backbone folders, so graft's streaming engine can write the same backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Ingredient:
    """One soup ingredient: a name (its model path), its backbone and its head tensors."""

    name: str
    backbone: State
    head: State


@dataclass
class SoupResult:
    """A greedy soup.

    Attributes:
        chosen: names of the ingredients in the soup, in the order they were added.
        scores: held-out accuracy of every ingredient alone.
        soup_score: held-out accuracy of the soup.
        uniform_score: held-out accuracy of the uniform soup of every ingredient.
        backbone / head: the soup's tensors.
        steps: per candidate tried, (name, accuracy of the soup with it, kept).
    """

    chosen: list[str]
    scores: dict[str, float]
    soup_score: float
    uniform_score: float
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    steps: list[tuple[str, float, bool]] = field(default_factory=list)


def average(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """Uniform average of float tensors; other tensors are taken from the first state."""
    out = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for s in states:
            acc += s[name].double()
        out[name] = (acc / len(states)).to(first.dtype)
    return out


def uniform_soup(ingredients: Sequence[Ingredient]) -> tuple[dict, dict]:
    """The average backbone and the average head of all ingredients."""
    return average([i.backbone for i in ingredients]), average([i.head for i in ingredients])


def greedy_order(
    names: Sequence[str],
    score: Callable[[Sequence[str]], float],
    *,
    keep_ties: bool = False,
) -> tuple[list[str], dict[str, float], float, list[tuple[str, float, bool]]]:
    """The greedy soup recipe over named ingredients (the algorithm, whatever a soup is).

    Args:
        names: the ingredients.
        score: held-out accuracy of the uniform soup of the given ingredients (one name:
            the ingredient alone).
        keep_ties: add an ingredient when the soup's accuracy does not drop (the paper's
            pseudo-code, ``≥``) instead of only when it strictly rises (graft's default).

    Returns:
        ``(chosen in order added, score of each ingredient alone, soup score, steps)``, a
        step being ``(candidate, soup score with it, kept)``.
    """
    if not names:
        raise ValueError("a greedy soup needs at least one ingredient")
    alone = {n: score([n]) for n in names}
    ranked = sorted(names, key=lambda n: alone[n], reverse=True)  # stable: ties keep order
    chosen, best = [ranked[0]], alone[ranked[0]]
    steps = []
    for candidate in ranked[1:]:
        acc = score([*chosen, candidate])
        kept = acc >= best if keep_ties else acc > best
        steps.append((candidate, acc, kept))
        if kept:
            chosen.append(candidate)
            best = acc
    return chosen, alone, best, steps


def greedy_soup(
    ingredients: Sequence[Ingredient], score: Callable[[State, State], float]
) -> SoupResult:
    """Greedy soup of in-memory ingredients by held-out accuracy (`greedy_order`).

    Args:
        ingredients: the candidates.
        score: held-out accuracy of a (backbone, head) pair; higher is better.

    Returns:
        The chosen ingredients, their scores and the soup.
    """
    if not ingredients:
        raise ValueError("greedy_soup needs at least one ingredient")
    by_name = {i.name: i for i in ingredients}

    def soup_score(members: Sequence[str]) -> float:
        return score(*uniform_soup([by_name[m] for m in members]))

    chosen, scores, best, steps = greedy_order(list(by_name), soup_score)
    backbone, head = uniform_soup([by_name[m] for m in chosen])
    uniform_score = score(*uniform_soup(ingredients))
    return SoupResult(chosen, scores, best, uniform_score, backbone, head, steps)


def recipe_yaml(models: Sequence[str], *, comment: str = "") -> str:
    """A ``linear`` recipe (weight 1 each, normalised) over the given backbone folders."""
    recipe: dict[str, Any] = {
        "merge_method": "linear",
        "parameters": {"normalize": True},
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }
    header = f"# {comment}\n" if comment else ""
    return header + yaml.safe_dump(recipe, sort_keys=False)


def soup_zoo(zoo: Any, *, split: str = "val") -> tuple[SoupResult, str]:
    """Greedy soup of a digits zoo's soup family, scored on ``soup_task``'s ``split``.

    Returns:
        The result and a ``linear`` recipe over the chosen ingredient folders (the soup
        backbone; its head is ``result.head``, the average of the chosen heads).
    """
    from graft.eval.evaluate import evaluate
    from graft.eval.stats import _as_zoo
    from graft.io import load_state_dict
    from graft.models.digits_net import load_backbone
    from graft.zoo.tasks import task_data

    zoo = _as_zoo(zoo)
    module, _ = load_backbone(zoo.base)
    X, y = task_data(zoo.soup_task, split, seed=zoo.seed)
    ingredients = [
        Ingredient(str(path), load_state_dict(path), load_state_dict(head))
        for path, head in zip(zoo.soup, zoo.soup_heads, strict=True)
    ]

    def score(backbone: State, head: State) -> float:
        module.load_state_dict(dict(backbone))
        linear = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
        linear.load_state_dict(dict(head))
        return float(evaluate(module, linear, X, y)["accuracy"])

    result = greedy_soup(ingredients, score)
    comment = (
        f"greedy soup of {len(result.chosen)}/{len(ingredients)} ingredients, "
        f"{zoo.soup_task} {split} accuracy {result.soup_score:.4f} "
        f"(best ingredient {max(result.scores.values()):.4f}, uniform {result.uniform_score:.4f})"
    )
    return result, recipe_yaml(result.chosen, comment=comment)
