"""Evaluation on graft's real-data zoo: accuracy and loss of (merged) models per task."""

from graft.eval.evaluate import evaluate, evaluate_task, logits

__all__ = ["evaluate", "evaluate_task", "logits"]
