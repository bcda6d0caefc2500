"""RLHF with PPO: the RL loop, the PPO trainer and rollout generation (entry point: ``alignment/ppo/run_ppo.py``)."""

from alignment.ppo.infer_utils import generate_rollout
from alignment.ppo.ppo_trainer import PPOTrainer
from alignment.ppo.rl_trainer import NonFiniteError, RLTrainer, RolloutSettings, TrainerState
from alignment.ppo.trainer_utils import StepTrainer

__all__ = ["PPOTrainer", "RLTrainer", "RolloutSettings", "TrainerState", "NonFiniteError", "StepTrainer", "generate_rollout"]
