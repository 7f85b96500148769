"""Planning and the streaming engine: recipe + headers -> one job per output tensor -> run."""

from graft.plan.engine import (
    NonFiniteInputError,
    RunStats,
    default_threads,
    merge_in_memory,
    output_entries,
    resolve_device,
    run_pass,
    run_plan,
    write_shards,
)
from graft.plan.plan import MergePlan, PlanError, Source, TensorJob, plan_merge, tensor_seed

__all__ = [
    "MergePlan",
    "NonFiniteInputError",
    "PlanError",
    "RunStats",
    "Source",
    "TensorJob",
    "default_threads",
    "merge_in_memory",
    "output_entries",
    "plan_merge",
    "resolve_device",
    "run_pass",
    "run_plan",
    "tensor_seed",
    "write_shards",
]
