"""Tiny runnable architectures for graft's offline real-data zoo (plain PyTorch)."""
