"""Prompts in, per-layer vectors out: the data side of the prompt-based gate modes.

Prompts are tokenized as mergekit does: the base tokenizer's BOS token text prepended,
``add_special_tokens=False``. Each prompt runs on its own (no padding), which gives what
mergekit's left-padded batch gives: padding is masked out, and rotary position encodings
depend only on the distance between tokens, so shifting a prompt right changes nothing.
The base model runs in float32 (mergekit: bfloat16), through graft's own runner
(`graft.data.load_runner`), on the device asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from graft.data import DataError, load_runner
from graft.data._loading import _load_tokenizer
from graft.moe import gates as G
from graft.recipe.moe import Expert

Tick = Callable[[int], None]


def load_tokenizer(folder: Path):
    """The base model's tokenizer.

    Raises:
        DataError: the folder has no tokenizer files.
    """
    tok = _load_tokenizer([folder])
    if tok is None:
        raise DataError(
            f"base_model {folder} has no tokenizer files (tokenizer.json, tokenizer.model...); "
            "prompt gate modes tokenize with the base tokenizer; add it, or use gate_mode: random"
        )
    return tok


def tokenize(tokenizer, prompt: str, where: str) -> torch.Tensor:
    """One prompt's token ids, 1-D, BOS text first as mergekit does.

    Raises:
        DataError: the prompt gives no tokens.
    """
    ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"{where}: the prompt gives no tokens; write some text")
    return torch.tensor(ids, dtype=torch.long)


def expert_prompts(experts: Sequence[tuple[str, Expert]], tokenizer):
    """``[(positive ids, negative ids)]`` per expert; ``where`` names it in errors."""
    out = []
    for where, e in experts:
        pos = [
            tokenize(tokenizer, p, f"{where}.positive_prompts[{i}]")
            for i, p in enumerate(e.positive_prompts)
        ]
        neg = [
            tokenize(tokenizer, p, f"{where}.negative_prompts[{i}]")
            for i, p in enumerate(e.negative_prompts)
        ]
        out.append((pos, neg))
    return out


def cheap_embed_gates(embed: torch.Tensor, prompts, num_layers: int) -> torch.Tensor:
    """``(layers, experts, hidden)`` gate rows from token embeddings (`gates` module doc)."""
    rows = []
    for pos, neg in prompts:
        p = G.cheap_embed_vector(embed, pos)
        n = G.cheap_embed_vector(embed, neg) if neg else None
        rows.append(G.gate_rows(p, n))
    return torch.stack(rows).unsqueeze(0).expand(num_layers, -1, -1).contiguous()


class HiddenStates:
    """The base model, run prompt by prompt for the hidden state entering each layer."""

    def __init__(self, base: Path, *, device: torch.device):
        runner = load_runner(base)
        self.model = runner.module.encoder.to(device).eval()
        self.device = device

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """``(layers, tokens, hidden)``: entry ``i`` is the input of decoder layer ``i``."""
        with torch.no_grad():
            out = self.model(
                input_ids=ids.unsqueeze(0).to(self.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                output_hidden_states=True,
                return_dict=True,
            )
        return torch.stack(out.hidden_states[:-1])[:, 0].float().cpu()


def hidden_gates(run: HiddenStates, prompts, *, average: bool, tick: Tick) -> torch.Tensor:
    """``(layers, experts, hidden)`` gate rows from the base's hidden states."""

    def side(ids_list):
        vecs = []
        for ids in ids_list:
            vecs.append(G.reduce_hidden(run(ids), average=average))
            tick(1)
        return G.mean_over_prompts(vecs)

    rows = [G.gate_rows(side(pos), side(neg) if neg else None) for pos, neg in prompts]
    return torch.stack(rows, dim=1)
