"""Evaluation of trained policies: the Safe RLHF arena (two policies, one reward and one cost model)."""

from alignment.evaluate.arena import arena_summary, ground_truth_safety, win_rate_table

__all__ = ["arena_summary", "win_rate_table", "ground_truth_safety"]
