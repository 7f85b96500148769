"""LoRA in and out: extracted adapters load in PEFT and equal the rank-r reconstruction;
``model+adapter`` recipe inputs equal merging the pre-merged model; adapter merging."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from graft.delta import passes
from graft.delta.lora import extract_lora, lora_targets, merge_adapters, open_adapted
from graft.io import load_state_dict, open_checkpoint
from graft.plan import plan_merge, run_plan
from graft.recipe import parse_recipe

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _load(kind, path):
    return getattr(transformers, CLASSES[kind]).from_pretrained(path).eval()


def _rank_r(delta: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_extracted_adapter_in_peft_equals_rank_r_reconstruction(hf_family, tmp_path, kind):
    fam, _ = hf_family
    base, ft, _ = fam[kind]
    rank = 3
    report = extract_lora(ft, base, tmp_path / "adapter", rank=rank)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == rank
    assert config["fan_in_fan_out"] is (kind == "gpt2")

    b_sd, f_sd = load_state_dict(base), load_state_dict(ft)
    with open_checkpoint(ft) as ckpt:
        targets = lora_targets(ckpt)
    assert report.stats.tensors == len(targets) > 0
    expected = {}
    for name in targets:
        delta = f_sd[name] - b_sd[name]
        if kind == "gpt2":  # Conv1D stores in x out: the SVD is of the out x in matrix
            expected[name] = b_sd[name] + _rank_r(delta.T, rank).T
        else:
            expected[name] = b_sd[name] + _rank_r(delta, rank)
    reference = _load(kind, base)
    reference.load_state_dict({**reference.state_dict(), **expected})
    lora = peft.PeftModel.from_pretrained(_load(kind, base), tmp_path / "adapter").eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, lora(ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # and the adapter really changed the model
    with torch.no_grad():
        assert not torch.allclose(_load(kind, base)(ids).logits, got, atol=1e-4)


def test_adapter_input_in_a_recipe_equals_merging_the_premerged_model(hf_family, tmp_path):
    fam, _ = hf_family
    base, ft1, ft2 = fam["llama"]
    extract_lora(ft1, base, tmp_path / "adapter", rank=4)
    peft_model = peft.PeftModel.from_pretrained(_load("llama", base), tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "premerged")

    def merge(first, out):
        doc = {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": first, "parameters": {"weight": 0.5}},
                {"model": str(ft2), "parameters": {"weight": 0.5}},
            ],
        }
        plan = plan_merge(parse_recipe(yaml.safe_dump(doc)))
        try:
            run_plan(plan, out, threads=2)
        finally:
            plan.close()
        return load_state_dict(out)

    a = merge(f"{base}+{tmp_path / 'adapter'}", tmp_path / "with-adapter")
    b = merge(str(tmp_path / "premerged"), tmp_path / "with-premerged")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # graft's own reading of the adapter is exactly what `graft apply` writes
    passes.apply(base, [tmp_path / "adapter"], tmp_path / "applied")
    applied = load_state_dict(tmp_path / "applied")
    with open_adapted(base, tmp_path / "adapter") as ckpt:
        assert all(torch.equal(ckpt.get(k), applied[k]) for k in applied)
        premerged_fp = open_checkpoint(tmp_path / "applied").fingerprint()
        assert ckpt.fingerprint() == premerged_fp


def test_merging_adapters_by_concatenation_and_by_svd(hf_family, tmp_path):
    fam, _ = hf_family
    base, ft1, ft2 = fam["llama"]
    extract_lora(ft1, base, tmp_path / "a1", rank=2)
    extract_lora(ft2, base, tmp_path / "a2", rank=3)
    merge_adapters([tmp_path / "a1", tmp_path / "a2"], tmp_path / "cat", weights=[1.0, 0.5])
    merge_adapters([tmp_path / "a1", tmp_path / "a2"], tmp_path / "svd", weights=[1.0, 0.5], rank=2)
    assert json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["r"] == 5
    with (
        open_adapted(base, tmp_path / "a1") as m1,
        open_adapted(base, tmp_path / "a2") as m2,
        open_adapted(base, tmp_path / "cat") as cat,
        open_adapted(base, tmp_path / "svd") as svd,
    ):
        name = "model.layers.1.self_attn.q_proj.weight"
        w0 = m1.base.get(name)
        want = (m1.get(name) - w0) + 0.5 * (m2.get(name) - w0)
        assert torch.allclose(cat.get(name) - w0, want, atol=1e-6)
        assert torch.allclose(svd.get(name) - w0, _rank_r(want, 2), atol=1e-5)
    # PEFT loads the concatenated adapter with the same result
    lora = peft.PeftModel.from_pretrained(_load("llama", base), tmp_path / "cat").eval()
    merged = lora.merge_and_unload().state_dict()
    with open_adapted(base, tmp_path / "cat") as cat:
        assert torch.allclose(merged[name], cat.get(name), atol=1e-6)


def test_bad_adapter_inputs(hf_family, tmp_path):
    from conftest import run_cli

    fam, _ = hf_family
    base, ft1, _ = fam["llama"]
    from graft.delta.patch import DeltaError

    # The largest smaller side (32): each delta stored exactly; above it, nothing to gain
    with pytest.raises(DeltaError, match="--rank 64 is larger than every target tensor"):
        extract_lora(ft1, base, tmp_path / "big", rank=64)
    assert not (tmp_path / "big").exists()
    extract_lora(ft1, base, tmp_path / "big", rank=32)
    with open_adapted(base, tmp_path / "big") as adapted, open_checkpoint(ft1) as tuned:
        name = "model.layers.0.self_attn.q_proj.weight"
        torch.testing.assert_close(adapted.get(name), tuned.get(name), rtol=1e-4, atol=1e-5)
    extract_lora(ft1, base, tmp_path / "a", rank=2)
    gpt2_base = fam["gpt2"][0]
    with pytest.raises(DeltaError, match="does not have"):
        open_adapted(gpt2_base, tmp_path / "a")
    doc = {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'nope'}"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    code, _, err = run_cli("merge", tmp_path / "r.yaml", tmp_path / "out", "-q")
    assert code == 2 and "adapter" in err and "not found" in err
