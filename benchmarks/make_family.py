"""Build a Llama-shaped model family for merge benchmarks: a base and N fine-tunes.

The weights are generated directly as tensors (no ``LlamaForCausalLM`` instantiation) and
written as Hugging Face folders: ``config.json`` + safetensors (sharded with an index when
larger than ``--shard-size``). Names and shapes are checked against what
``LlamaForCausalLM`` expects, on the meta device, so the folders load in transformers,
mergekit and graft alike.

A fine-tune is ``base + delta`` with, per 2-D tensor, a rank-``r`` product plus dense
noise, and for 1-D tensors (norms) small noise only. Everything is deterministic from
``--seed``: each tensor draws from its own generator keyed by (seed, model, tensor name),
so the base tensor can be regenerated for every fine-tune instead of being read back.

The default shape (hidden 1024, intermediate 2816, 18 layers, 16 heads, vocab 32000) has
~297M parameters, ~0.6 GB per model in bfloat16. ``--double-layers`` gives 36 layers.

A finished family folder holds ``family.json``; a second run with the same parameters
does nothing.

    python benchmarks/make_family.py --workdir bench-work            # 4 x ~0.6 GB
    python benchmarks/make_family.py --workdir bench-work --double-layers
    python benchmarks/make_family.py --workdir bench-work --quick    # tiny, for smoke tests
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMAT_VERSION = 1  # bump when the generator changes, to invalidate cached families


@dataclass(frozen=True)
class FamilySpec:
    hidden: int = 1024
    intermediate: int = 2816
    layers: int = 18
    heads: int = 16
    kv_heads: int = 16
    vocab: int = 32000
    fine_tunes: int = 3
    seed: int = 0
    dtype: str = "bfloat16"
    rank: int = 8  # rank of the low-rank part of each fine-tune delta
    delta_scale: float = 0.1  # delta std relative to the base tensor's std
    shard_size: int = 2_000_000_000  # bytes per safetensors shard
    version: int = FORMAT_VERSION

    @property
    def name(self) -> str:
        return (
            f"llama-h{self.hidden}-i{self.intermediate}-L{self.layers}-v{self.vocab}"
            f"-{self.dtype}-s{self.seed}"
        )

    @property
    def model_names(self) -> list[str]:
        return ["base"] + [f"ft{i + 1}" for i in range(self.fine_tunes)]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The state dict of LlamaForCausalLM (untied head), in a stable order."""
        h, i, v = self.hidden, self.intermediate, self.vocab
        head_dim = h // self.heads
        kv = self.kv_heads * head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            shapes[p + "self_attn.q_proj.weight"] = (h, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, h)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (v, h)
        return shapes

    def num_params(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def hf_config(self) -> dict:
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
        cfg.architectures = ["LlamaForCausalLM"]
        d = cfg.to_dict()
        d["torch_dtype"] = self.dtype  # transformers<5 and mergekit read this key
        d["dtype"] = self.dtype
        d["tie_word_embeddings"] = False
        return d


QUICK = FamilySpec(hidden=64, intermediate=176, layers=4, heads=4, kv_heads=4, vocab=512)


def _gen(seed: int, model: str, name: str, device: str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(f"{model}/{name}".encode())) % (2**63))
    return g


def base_tensor(
    spec: FamilySpec, name: str, shape: tuple[int, ...], device: str = "cpu"
) -> torch.Tensor:
    """The base model's tensor, float32; norms near 1, matrices ~N(0, 0.02)."""
    g = _gen(spec.seed, "base", name, device)
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g, device=device)
    return 0.02 * torch.randn(shape, generator=g, device=device)


def fine_tune_delta(
    spec: FamilySpec, model: str, name: str, shape: tuple[int, ...], device: str = "cpu"
) -> torch.Tensor:
    """Low-rank + noise delta, std about ``delta_scale`` x the base's."""
    g = _gen(spec.seed, model, name, device)
    if len(shape) == 1:
        return (0.05 * spec.delta_scale) * torch.randn(shape, generator=g, device=device)
    rows, cols = shape
    r = min(spec.rank, rows, cols)
    std = 0.02 * spec.delta_scale
    u = torch.randn(rows, r, generator=g, device=device)
    w = torch.randn(r, cols, generator=g, device=device)
    low_rank = (u @ w) * (std * 0.8 / r**0.5)
    noise = torch.randn(shape, generator=g, device=device) * (std * 0.6)
    return low_rank.add_(noise)


def check_names_against_transformers(spec: FamilySpec) -> None:
    """Instantiate LlamaForCausalLM on the meta device and compare its state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in spec.hf_config().items() if k not in ("dtype",)})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = spec.tensor_shapes()
    if expected != ours:
        missing = sorted(set(expected) - set(ours))[:5]
        extra = sorted(set(ours) - set(expected))[:5]
        bad = [k for k in ours if k in expected and expected[k] != ours[k]][:5]
        raise SystemExit(
            f"generated names/shapes differ from LlamaForCausalLM: missing {missing}, "
            f"extra {extra}, shape mismatch {bad}"
        )


def write_model(spec: FamilySpec, model: str, out: Path, device: str = "cpu") -> int:
    """Write one model of the family to ``out``; returns bytes of tensor data. ``device``
    is where the random tensors are drawn (a GPU draws other, equally seeded, values)."""
    dtype = getattr(torch, spec.dtype)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shapes = spec.tensor_shapes()
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    total = 0
    for name, shape in shapes.items():
        t = base_tensor(spec, name, shape, device)
        if model != "base":
            t.add_(fine_tune_delta(spec, model, name, shape, device))
        t = t.to(dtype).cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > spec.shard_size:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes
        total += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        n = len(shards)
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata=meta)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(spec.hf_config(), indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return total


def build_family(spec: FamilySpec, workdir: Path, *, device: str = "cpu", log=print) -> Path:
    """Build (or reuse) the family under ``workdir/families/<name>`` (``<name>-g<device>``
    when drawn on another device than the CPU); returns its folder."""
    name = spec.name if device == "cpu" else f"{spec.name}-g{device.split(':')[0]}"
    root = Path(workdir) / "families" / name
    stamp = root / "family.json"
    want = asdict(spec)
    if stamp.exists():
        try:
            have = json.loads(stamp.read_text()).get("spec")
        except json.JSONDecodeError:
            have = None
        if have == want and all((root / m / "config.json").exists() for m in spec.model_names):
            log(f"family {spec.name}: cached at {root}")
            return root
    check_names_against_transformers(spec)
    root.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    total = 0
    for model in spec.model_names:
        total += write_model(spec, model, root / model, device)
        log(f"  wrote {root / model}")
    info = {
        "spec": want,
        "params_per_model": spec.num_params(),
        "bytes_per_model": total // len(spec.model_names),
        "models": spec.model_names,
    }
    stamp.write_text(json.dumps(info, indent=2))
    log(
        f"family {spec.name}: {spec.num_params() / 1e6:.1f}M params/model, "
        f"{total / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s"
    )
    return root


def spec_from_args(args: argparse.Namespace) -> FamilySpec:
    base = QUICK if args.quick else FamilySpec()
    layers = args.layers or base.layers
    if args.double_layers:
        layers *= 2
    kwargs = dict(asdict(base))
    kwargs.update(layers=layers, seed=args.seed)
    if args.shard_size:
        kwargs["shard_size"] = args.shard_size
    return FamilySpec(**kwargs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workdir", type=Path, default=Path(__file__).resolve().parents[1] / "bench-work"
    )
    ap.add_argument("--quick", action="store_true", help="tiny family for smoke tests")
    ap.add_argument("--layers", type=int, default=0, help="layer count (default 18, quick 4)")
    ap.add_argument("--double-layers", action="store_true", help="twice the layer count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=0, help="bytes per shard (default 2e9)")
    ap.add_argument("--print-path", action="store_true", help="print only the family folder")
    args = ap.parse_args(argv)
    spec = spec_from_args(args)
    log = (lambda m: print(m, file=sys.stderr)) if args.print_path else print
    root = build_family(spec, args.workdir, log=log)
    if args.print_path:
        print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
