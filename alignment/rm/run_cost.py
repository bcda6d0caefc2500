"""Cost-model training on safety preferences (Safe RLHF): the harm side of safe-rlhf's two models.

    python alignment/rm/run_cost.py config/tiny/cm_argument.json [--field value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 alignment/rm/run_cost.py config/tiny/cm_argument.json
    python -m paddle.distributed.launch alignment/rm/run_cost.py config/llama/cm_argument.json

The reward-model stage (:mod:`alignment.rm.run_reward`) run with :data:`COST_STAGE`: the same
arguments (``ModelArgument``, ``DataArgument``, ``RewardTrainingArguments``: ``loss_type``,
``regularization``, the normalizers), the same checks, checkpoints and outputs, but trained on
:class:`~alignment.data.SafetyPreferenceDataset` (samples need ``safer``, ``is_safe``,
``is_other_safe``) by :class:`~alignment.rm.cost_trainer.CostTrainer` with safe-rlhf's cost loss
(Bradley-Terry on the unsafer/safer pair plus sign terms pushing safe answers' costs below 0 and unsafe
ones above 0). Metrics: ``accuracy``, ``accuracy_sign``, ``costs_mean``, ``costs_std``. The model is
saved with ``score_type: cost`` (normalize function ``scale``); it initialises the PPO-Lag cost model
and cost critic. See docs/safe_rlhf.md.
"""

from __future__ import annotations

from typing import Optional, Sequence

from alignment.data import SafetyPreferenceDataset
from alignment.rm.cost_trainer import CostTrainer
from alignment.rm.run_reward import ScoreStage
from alignment.rm.run_reward import main as run_score_stage
from alignment.utils.config import run_entry_point
from alignment.utils.signals import exit_after_distributed_run

__all__ = ["COST_STAGE", "main"]

COST_STAGE = ScoreStage(
    "cost model", "cost", SafetyPreferenceDataset, CostTrainer, ("accuracy", "accuracy_sign", "costs_mean", "costs_std", "loss")
)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Train and/or evaluate a cost model with ``argv`` (default ``sys.argv[1:]``); returns the final
    metrics (``train_*``, ``eval_accuracy``, ``eval_accuracy_sign``, ``eval_costs_mean``, ... and with
    ``eval_before_training`` the same prefixed ``initial_``)."""
    return run_score_stage(argv, stage=COST_STAGE)


if __name__ == "__main__":
    run_entry_point(main)
    exit_after_distributed_run()
