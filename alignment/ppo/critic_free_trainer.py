"""Critic-free RL (GRPO, RLOO, REINFORCE++ and REINFORCE++ with a group baseline) on the one RL loop.

Same rollout, reference, reward and PPO-clip actor loss as :class:`~alignment.ppo.ppo_trainer.PPOTrainer`,
but no critic: ``MODEL_ROLES = ("actor",)`` (no value model loaded, no critic optimizer, no ``value/``
saved). The advantages come from the registered estimator named by ``rl_algorithm``
(:func:`alignment.models.ppo_model_utils.get_advantage_estimator`), called on the whole rollout of this
rank before it is split into micro-batches::

    reward [B]          reward model score and/or reward_source(prompts, responses, extras)
    rewards [B, R]      add_kl_divergence_regularization(reward, ...)  (kl_coeff: KL in the reward)
    index [B]           prompt position: rows i*n .. i*n+n-1 are the n = num_return_sequences samples of prompt i
    advantages, returns = estimator(rewards=, sequence_mask=, index=, values=None, gamma=, gae_lambda=,
                                    epsilon=advantage_epsilon, norm_by_std=norm_adv_by_std)

A group is whole on one rank by construction: every data-parallel rank gets whole prompts and generates
all their samples; tensor/pipeline ranks of one replica roll out identically; micro-batches are cut
after the estimator ran. REINFORCE++'s whitening uses the statistics of this rank's rollout (as verl).
The actor loss adds ``kl_loss_coeff`` x ``kl_estimator`` (default k3) and ``-entropy_coeff`` x entropy
(:meth:`PPOTrainer.actor_loss`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from alignment.models.ppo_model_utils import (
    add_kl_divergence_regularization,
    get_advantage_estimator,
    make_position_ids,
    make_sequence_mask,
)
from alignment.ppo.ppo_trainer import PPOTrainer
from alignment.ppo.rl_trainer import RolloutSettings
from alignment.ppo.trainer_utils import StepTrainer

__all__ = ["CriticFreeTrainer", "group_reward_statistics"]


def group_reward_statistics(reward: np.ndarray, index: np.ndarray) -> dict[str, float]:
    """Metrics of the groups of one rollout: mean unbiased within-group reward std, and how many groups
    have zero variance (all samples scored alike: no learning signal for GRPO/RLOO).

    Args: ``reward [B]``, ``index [B]`` group ids.
    """
    stds, zero = [], 0
    for group in np.unique(index):
        scores = reward[index == group].astype(np.float64)
        std = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
        stds.append(std)
        zero += int(np.ptp(scores) == 0)
    return {"train/group_reward_std": float(np.mean(stds)), "train/zero_variance_groups": float(zero), "train/groups": float(len(stds))}


class CriticFreeTrainer(PPOTrainer):
    """Actor-only RL whose advantages come from the estimator ``args.rl_algorithm``.

    Args: as :class:`PPOTrainer` without ``critic_trainer``.
    """

    MODEL_ROLES = ("actor",)

    def __init__(
        self,
        args: Any,
        actor_trainer: StepTrainer,
        reference_model: paddle.nn.Layer,
        reward_model: paddle.nn.Layer | None,
        tokenizer: Any,
        reward_tokenizer: Any,
        train_dataset: Any,
        rollout: RolloutSettings,
        eval_dataset: Any = None,
        ptx_dataset: Any = None,
        generate_fn: Any = None,
        reward_source: Any = None,
    ) -> None:
        super().__init__(
            args, actor_trainer, None, reference_model, reward_model, tokenizer, reward_tokenizer, train_dataset,
            rollout, eval_dataset, ptx_dataset, generate_fn, reward_source,
        )  # fmt: skip
        self.estimator = get_advantage_estimator(args.rl_algorithm)

    @paddle.no_grad()
    def make_experience(
        self, prompt_input_ids: paddle.Tensor, sequences: paddle.Tensor, attention_mask: paddle.Tensor, prompt_indices=None
    ) -> dict[str, Any]:
        args = self.args
        prompts = prompt_input_ids.shape[0]
        start = prompt_input_ids.shape[1] - 1
        position_ids = make_position_ids(attention_mask)
        with self.offload.use("freeze_model", self.reference_model):
            ref_log_probs = self.log_probs_of(self.reference_model, sequences, attention_mask, position_ids, start)
        reward, reward_parts = self.sequence_rewards(sequences, attention_mask, prompt_input_ids.shape[1], prompt_indices, self.train_dataset)
        log_probs = self.old_log_probs(sequences, attention_mask, position_ids, start)  # last, as in PPO

        response_mask = make_sequence_mask(attention_mask, start)[:, start:]
        rewards = add_kl_divergence_regularization(
            reward, log_probs, ref_log_probs, response_mask, args.kl_coeff, args.clip_range_score, args.clip_mode
        )
        index = np.repeat(np.arange(prompts), sequences.shape[0] // prompts)
        advantages, returns = self.estimator(
            rewards=rewards, sequence_mask=response_mask, index=index, values=None, gamma=args.gamma,
            gae_lambda=args.gae_lambda, epsilon=args.advantage_epsilon, norm_by_std=args.norm_adv_by_std,
        )  # fmt: skip
        reward_np = reward.numpy()
        metrics = self.experience_metrics(reward, reward_parts, rewards, log_probs, ref_log_probs, advantages, returns, response_mask)
        metrics.update({
            "train/reward": float(reward_np.mean()),  # (NumPy's mean, as before)
            "train/reward_std": float(reward_np.std()),
            **group_reward_statistics(reward_np, index),
        })  # fmt: skip
        return {
            "input_ids": sequences,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "old_log_probs": log_probs,
            "ref_log_probs": ref_log_probs,
            "advantages": advantages,
            "returns": returns,
            "response_mask": response_mask,
            "start": start,
            "metrics": metrics,
            "finite_check": {
                "reward": metrics["train/reward"],
                "kl_divergence": metrics["train/kl_divergence"],
                "advantage": metrics["train/reward_advantage"],
            },
        }

    def rl_step(self, batch: dict[str, Any], loss_weight: float, accumulating: bool, actor_accumulating: bool) -> dict[str, float]:
        actor_loss, metrics = self.backward_on("actor", batch, self.actor_loss, loss_weight, actor_accumulating, self.ACTOR_METRICS)
        return {"train/actor_loss": actor_loss, **metrics}
