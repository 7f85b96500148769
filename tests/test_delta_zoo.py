"""Transfer on the real-data zoo: base v2 is a continuation of v1, built beside the zoo
without changing it; transfer onto v1 itself gives the fine-tune back."""

from __future__ import annotations

import hashlib

import torch

from graft.delta import passes
from graft.eval.evaluate import evaluate_task
from graft.io import load_state_dict
from graft.zoo import build_zoo
from graft.zoo.versions import V2Config, build_base_v2, finetune


def _sha(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_base_v2_and_transfer_on_the_quick_zoo(tmp_path_factory, tmp_path):
    # the same path as test_zoo's quick zoo, so a session builds it once
    zoo = build_zoo(
        tmp_path_factory.getbasetemp() / "quick-zoo-0", seed=0, quick=True, log=lambda m: None
    )
    before = _sha(zoo.base)
    cfg = V2Config(epochs=1, lr=1e-3)
    v2 = build_base_v2(zoo, tmp_path / "v2", config=cfg)
    again = build_base_v2(zoo, tmp_path / "v2b", config=cfg)
    assert _sha(zoo.base) == before  # the zoo is untouched
    assert _sha(v2) == _sha(again)  # deterministic from the zoo's seed
    a, b = load_state_dict(zoo.base), load_state_dict(v2)
    assert all(a[k].shape == b[k].shape for k in a) and not torch.equal(
        a["embed.weight"], b["embed.weight"]
    )

    task = "rot180-digit"
    ft = zoo.finetuned[task]
    passes.transfer(zoo.base, ft, zoo.base, tmp_path / "same")
    assert evaluate_task(tmp_path / "same", task, zoo) == evaluate_task(ft, task, zoo)
    passes.transfer(zoo.base, ft, v2, tmp_path / "moved")
    moved = load_state_dict(tmp_path / "moved")
    delta = load_state_dict(ft)["blocks.0.fc1.weight"] - a["blocks.0.fc1.weight"]
    assert torch.allclose(moved["blocks.0.fc1.weight"], b["blocks.0.fc1.weight"] + delta, atol=1e-6)
    backbone, head, probe = finetune(v2, zoo, task)
    assert head.out_features == probe.out_features == 10
