"""Mixture-of-experts models from dense ones (mergekit-moe recipes).

* `plan_moe` — a `graft.recipe.moe.MoERecipe` + headers -> one job per output tensor.
* `compute_gates` — the routers: random, token embeddings or hidden states of prompts.
* `run_moe` — stream the plan into a Mixtral or Qwen2-MoE model folder.

Router math is in `graft.moe.gates` (pure tensor functions), names in `graft.moe.arch`.
"""

from graft.moe.build import Gates, MoEJob, MoEPlan, compute_gates, plan_moe, prompt_count, run_moe

__all__ = ["Gates", "MoEJob", "MoEPlan", "compute_gates", "plan_moe", "prompt_count", "run_moe"]
