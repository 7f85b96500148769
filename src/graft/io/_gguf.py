"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints, tensor by tensor.

The ``gguf`` package (``pip install 'graft[gguf]'``) parses the header; graft reads each
tensor's bytes with ``pread`` and dequantizes them with ``gguf.quants.dequantize`` (F32,
F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K are tested against references; the other types
gguf dequantizes read too). Names and config follow transformers' Llama layout:

* tensor names map by `GLOBAL_NAMES` / `BLOCK_NAMES` (``blk.N.attn_q.weight`` ->
  ``model.layers.N.self_attn.q_proj.weight``); a name outside them is an error.
* llama.cpp's converter permutes the rows of Q and K of ``llama`` models (its rotary
  embedding pairs adjacent rows, transformers' pairs the two halves of each head); that is
  undone here, per head, as transformers' GGUF loader does. ``qwen2`` files are not
  permuted. ``rope_freqs.weight`` (Llama 3.1's precomputed rope factors) has no
  Hugging Face tensor and is left out, with a note.
* quantized tensors read as float32 (the exact dequantized values); F16 / BF16 / F32 ones
  in their own dtype. Set a recipe's ``out_dtype`` to write something smaller.
* config.json is built from the ``<arch>.*`` metadata (`CONFIG_KEYS`); the head is tied
  when the file has no ``output.weight``. The tokenizer, when an output is written, is
  rebuilt by transformers from the file (``AutoTokenizer.from_pretrained(gguf_file=)``).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graft.io._errors import GraftIOError
from graft.io._format import TensorInfo
from graft.io._quant import DecodedCheckpoint, Decoder, Quantization

_INSTALL = "reading GGUF files needs the gguf package: pip install 'graft[gguf]'"


@dataclass(frozen=True)
class _Arch:
    model_type: str
    architecture: str
    permute_qk: bool  # llama.cpp permuted Q/K rows for its rotary layout


ARCHS = {
    "llama": _Arch("llama", "LlamaForCausalLM", True),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", False),
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LEFT_OUT = {"rope_freqs.weight": "Llama 3.1 rope factors have no Hugging Face tensor"}
# <arch>.KEY -> config.json key.
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
_TOKEN_IDS = {
    "bos_token_id": "bos",
    "eos_token_id": "eos",
    "pad_token_id": "padding",
    "unk_token_id": "unknown",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_PLAIN |= {"I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise GraftIOError(_INSTALL) from e
    return gguf


def hf_name(name: str) -> str | None:
    """The Hugging Face name of GGUF tensor ``name``; None for tensors left out."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    if name in LEFT_OUT:
        return None
    m = _BLOCK.fullmatch(name)
    if m is None or m.group(2) not in BLOCK_NAMES:
        raise GraftIOError(
            f"GGUF tensor {name!r} has no Hugging Face name in graft's Llama table; graft "
            "reads token_embd, output_norm, output and blk.N.{attn_norm, attn_q, attn_k, "
            "attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}"
        )
    return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: within each head, its rows were reordered
    from (half, pair) to (pair, half); this puts them back."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
        .contiguous()
    )


class GGUFCheckpoint(DecodedCheckpoint):
    """A ``.gguf`` file seen as a Hugging Face checkpoint (see the module doc)."""

    def write_sidecars(self, dst: Path, warn) -> list[str]:
        """Write the tokenizer transformers rebuilds from this file into ``dst``.

        Returns:
            The files written; none (with a warning) when transformers cannot build it.
        """
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
            return list(tok.save_pretrained(dst))
        except Exception as e:  # missing transformers, or a tokenizer it cannot convert
            warn(f"no tokenizer written: transformers could not build one from {self.path} ({e})")
            return []


def open_gguf(path: Path) -> GGUFCheckpoint:
    """Open a GGUF file: its header now, each tensor when it is read.

    Raises:
        GraftIOError: gguf is not installed; the file is not valid GGUF; its architecture
            or a tensor name is not one graft maps.
    """
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
        # gguf's reader fails on short reads with numpy's words ("index 0 is out of bounds")
        why = "truncated or malformed" if isinstance(e, IndexError) else str(e)[:200]
        raise GraftIOError(
            f"cannot read GGUF file {path}: {why}; re-download or re-convert it"
        ) from None
    if reader.byte_order == "S":  # swapped: the file is big-endian
        raise GraftIOError(f"{path} is a big-endian GGUF file; convert it to little-endian")
    fields = {k: f.contents() for k, f in reader.fields.items() if not _is_big(f)}
    tensors = list(reader.tensors)
    arch_name = fields.get("general.architecture")
    arch = ARCHS.get(arch_name)
    if arch is None:
        raise GraftIOError(
            f"{path}: GGUF architecture {arch_name!r} is not one graft maps to Hugging Face "
            f"names; graft reads {', '.join(ARCHS)}"
        )
    config = _config(arch, arch_name, fields, tensors)
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    stored, decoders, formats, notes = {}, {}, Counter(), []
    for t in tensors:
        name = hf_name(t.name)
        if name is None:
            notes.append(f"{t.name} left out: {LEFT_OUT[t.name]}")
            continue
        qtype = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        raw = TensorInfo(t.name, torch.uint8, (int(t.n_bytes),), int(t.n_bytes), path)
        stored[t.name] = (raw, int(t.data_offset))
        dtype = _PLAIN.get(qtype, torch.float32)
        info = TensorInfo(name, dtype, shape, int(np.prod(shape)) * dtype.itemsize, path)
        n_head = None
        if arch.permute_qk and ".self_attn.q_proj." in name:
            n_head = heads
        elif arch.permute_qk and ".self_attn.k_proj." in name:
            n_head = kv_heads
        decode = _decoder(gguf, t.tensor_type, shape, dtype, n_head)
        decoders[name] = Decoder(info, (t.name,), decode, qtype)
        formats[qtype] += 1
    infos = sorted((d.info for d in decoders.values()), key=_hf_order)
    config["torch_dtype"] = _config_dtype(infos)
    metadata = {k: v for k, v in fields.items() if k.startswith("general.") and isinstance(v, str)}
    return GGUFCheckpoint(
        path,
        None,
        infos,
        stored=stored,
        decoders=decoders,
        file_sizes={path: os.stat(path).st_size},
        metadata=metadata,
        quantization=Quantization("gguf", dict(formats), notes=tuple(notes)),
        config=config,
    )


def _is_big(field) -> bool:
    """Token lists and merges: large arrays the config does not need."""
    return len(field.data) > 64


def _decoder(gguf, qtype, shape: tuple[int, ...], dtype: torch.dtype, n_head: int | None):
    plain = _PLAIN.get(qtype.name)

    def decode(raw: torch.Tensor) -> torch.Tensor:
        if plain is not None:
            t = raw.view(plain).reshape(shape)
        else:
            data = raw.numpy().reshape(gguf.quant_shape_to_byte_shape(shape, qtype))
            t = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(shape)
        if n_head is not None:
            t = unpermute_rows(t, n_head)
        return t.to(dtype)

    return decode


def _config(arch: _Arch, prefix: str, fields: dict, tensors) -> dict:
    """A transformers config dict from the file's metadata."""

    def need(key: str):
        value = fields.get(f"{prefix}.{key}")
        if value is None:
            raise GraftIOError(f"GGUF metadata has no {prefix}.{key}; the file is incomplete")
        return value

    config: dict = {"architectures": [arch.architecture], "model_type": arch.model_type}
    for key, hf_key in CONFIG_KEYS.items():
        value = fields.get(f"{prefix}.{key}")
        if value is not None:
            config[hf_key] = value
    for key in ("embedding_length", "block_count", "attention.head_count"):
        need(key)
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    rotary = fields.get(f"{prefix}.rope.dimension_count")
    if arch.model_type == "llama" and rotary is not None:
        config.setdefault("head_dim", rotary)  # Llama rotates whole heads
    names = {t.name: t for t in tensors}
    if "vocab_size" not in config and "token_embd.weight" in names:
        config["vocab_size"] = int(names["token_embd.weight"].shape[-1])
    config["tie_word_embeddings"] = "output.weight" not in names
    config["hidden_act"] = "silu"
    if arch.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = False
    for hf_key, gg in _TOKEN_IDS.items():
        value = fields.get(f"tokenizer.ggml.{gg}_token_id")
        if value is not None:
            config[hf_key] = value
    scaling = fields.get(f"{prefix}.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": need("rope.scaling.factor")}
        original = fields.get(f"{prefix}.rope.scaling.original_context_length")
        if original is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


def _config_dtype(infos: list[TensorInfo]) -> str:
    floats = {i.dtype for i in infos if i.dtype.is_floating_point}
    if len(floats) == 1:
        return str(floats.pop()).removeprefix("torch.")
    return "float32"


def _hf_order(info: TensorInfo):
    """Embeddings, then blocks in order, then norm and head, as transformers saves them."""
    m = re.match(r"model\.layers\.(\d+)\.", info.name)
    if m is not None:
        return (1, int(m.group(1)), info.name)
    return (0 if "embed" in info.name else 2, 0, info.name)
