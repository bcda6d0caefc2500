"""Reward-model training: :class:`RewardTrainer` and its arguments (entry point: ``alignment/rm/run_reward.py``)."""

from alignment.rm.reward_trainer import (
    LOSS_TYPES,
    PairRewards,
    RewardTrainer,
    RewardTrainingArguments,
    pairwise_loss,
    reward_metrics,
    score_pairs,
)

__all__ = [
    "LOSS_TYPES",
    "PairRewards",
    "RewardTrainer",
    "RewardTrainingArguments",
    "pairwise_loss",
    "reward_metrics",
    "score_pairs",
]
