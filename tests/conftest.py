"""Shared fixtures: tiny Hugging Face models generated in the test (no download)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``graft ARGS`` in-process; returns (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from graft.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["graft", *map(str, args)]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def _tiny_config(kind: str):
    transformers = pytest.importorskip("transformers")
    if kind == "llama":
        return transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ), transformers.LlamaForCausalLM
    if kind == "gpt2":
        return transformers.GPT2Config(
            n_layer=3, n_embd=32, n_head=4, vocab_size=128, n_positions=64
        ), transformers.GPT2LMHeadModel
    if kind == "bert":
        return transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=128,
            max_position_embeddings=64,
        ), transformers.BertModel
    raise ValueError(kind)


def tiny_bert_config(vocab_size: int, labels: tuple[str, ...] | None = None, **extra):
    """The small BERT the data-side tests run: 2 layers, hidden size 32, 2 heads, 64
    positions; ``labels`` adds a classifier's id2label / label2id."""
    transformers = pytest.importorskip("transformers")
    if labels is not None:
        extra.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
        )
    return transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **extra,
    )


def make_hf_model(
    kind: str,
    path: Path,
    *,
    seed: int = 0,
    shard: str | None = None,
    like: Path | None = None,
    noise: float = 0.02,
) -> Path:
    """Save a random tiny transformers model; ``like`` = perturb that model (a fine-tune)."""
    config, cls = _tiny_config(kind)
    torch.manual_seed(seed)
    model = cls.from_pretrained(like) if like is not None else cls(config)
    if like is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def hf_family(tmp_path_factory):
    """Per architecture: a base and two fine-tunes; the Llama base is also sharded."""
    root = tmp_path_factory.mktemp("family")
    fam = {}
    for kind in ("llama", "gpt2", "bert"):
        base = make_hf_model(kind, root / f"{kind}-base", seed=1)
        ft1 = make_hf_model(kind, root / f"{kind}-ft1", seed=2, like=base)
        ft2 = make_hf_model(kind, root / f"{kind}-ft2", seed=3, like=base)
        fam[kind] = (base, ft1, ft2)
    make_hf_model("llama", root / "llama-base-sharded", seed=1, shard="20KB")
    return fam, root


def make_llava(path: Path, seed: int) -> Path:
    """A tiny LLaVA (CLIP vision tower, Llama text) with random weights, at mergekit's own
    test sizes (tests/common.py make_picoLlaVa): 2 text blocks, 2 vision blocks."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(
        image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
        hidden_size=64, intermediate_size=128,
    )  # fmt: skip
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16,
        num_hidden_layers=2,
    )  # fmt: skip
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(path)
    return path
