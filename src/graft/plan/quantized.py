"""FP8 outputs: which planned tensors are written as float8 with fresh block scales.

A recipe asks with ``out_dtype: float8_e4m3fn``. Conventions that change results:

* When an input is an FP8 checkpoint, exactly the tensors its reference model (the base,
  else the first model) stores as FP8 are re-quantized, so the output has the layout the
  source had (DeepSeek-V3 keeps its MoE router, norms, embeddings and head in bf16).
* Otherwise the 2-D ``.weight`` tensors inside the blocks (the Linear layers of a Llama-
  style model) are, except MoE routers (`NEVER_FP8`); embeddings, head and norms are not.
* Everything else is written in bfloat16, the config's ``torch_dtype``.
* Scales are per ``weight_block_size`` block (the source's, else 128×128), each from its
  block's absolute maximum (`graft.io.quantize_fp8`); the config gets a
  ``quantization_config`` (the source's, else transformers' FineGrainedFP8 defaults).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from graft.io import DEFAULT_FP8_BLOCK, fp8_config
from graft.plan.arch import split_block_name

FP8_OUT = "float8_e4m3fn"
# 2-D block weights that are not Linear layers transformers swaps for FP8Linear.
NEVER_FP8 = (".mlp.gate.weight", ".block_sparse_moe.gate.weight", ".router.weight")


def plan_fp8(jobs: list, checkpoints: Mapping, ref_model, config: dict | None):
    """The jobs and config of an FP8 output (see the module doc).

    Args:
        jobs: the planned `TensorJob`s, their float ``out_dtype`` float8_e4m3fn.
        checkpoints: the opened inputs by model reference.
        ref_model: the model whose config and layout the output follows.
        config: the output config so far, or None.

    Returns:
        ``(jobs, config)``: quantized jobs carry ``fp8_block`` (and float8_e4m3fn), other
        float jobs bfloat16.
    """
    ref = checkpoints[ref_model]
    quant = getattr(ref, "quantization", None)
    fp8_in = quant is not None and quant.method == "fp8"
    block = (quant.block if fp8_in else None) or DEFAULT_FP8_BLOCK
    out = []
    for job in jobs:
        if job.out_dtype != torch.float8_e4m3fn:
            out.append(job)
        elif _quantize(job, checkpoints, fp8_in):
            out.append(dataclasses.replace(job, fp8_block=block))
        else:
            out.append(dataclasses.replace(job, out_dtype=torch.bfloat16))
    if config is not None:
        config = dict(config)
        config["torch_dtype"] = "bfloat16"
        if "dtype" in config:
            config["dtype"] = "bfloat16"
        config["quantization_config"] = fp8_config(quant.config if fp8_in else None, block)
    return out, config


def _quantize(job, checkpoints: Mapping, fp8_in: bool) -> bool:
    if fp8_in:
        src = job.base or job.inputs[0]
        ckpt = checkpoints[src.model]
        stored = ckpt.stored_format(src.name) if hasattr(ckpt, "stored_format") else None
        return stored is not None and stored.startswith("float8")
    return (
        len(job.shape) == 2
        and job.name.endswith(".weight")
        and not job.name.endswith(NEVER_FP8)
        and split_block_name(job.name) is not None
    )
