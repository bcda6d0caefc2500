"""PPO on top of :class:`RLTrainer`: experience with KL-shaped rewards and GAE, clipped losses.

Data flow of one rollout (B rows, prompt width S, total width L; "response columns" are the
R = L - S positions t = start .. L-2 with start = S - 1, where column t holds token t + 1)::

    sequences [B, L], attention_mask [B, L]      prompt mask + response up to its first EOS
    log_probs, ref_log_probs [B, R]              log-prob of token t+1 under actor / reference
    reward [B]                                   reward-model end score
    values [B, R]                                critic value of the prefix ending at token t
    response_mask [B, R]                         generated tokens (EOS included, padding not)
    rewards [B, R]       = add_kl_divergence_regularization(reward, log_probs, ref_log_probs, ...)
    advantages, returns [B, R] = get_advantages_and_returns(values, rewards, response_mask, 0, ...)

Then for every micro-batch: critic loss first, actor loss second (PaddleNLP's order). The math is
in :mod:`alignment.models.ppo_model_utils`; this class only orchestrates. Experience uses the rollout
models (the training models, or their ``eval_mode`` copies); under pipeline parallel the losses run
inside the pipeline, on the last stage's head output.
"""

from __future__ import annotations

from typing import Any

import paddle

from alignment.models.ppo_model_utils import (
    actor_loss_fn,
    add_kl_divergence_regularization,
    critic_loss_fn,
    gather_log_probabilities,
    get_advantages_and_returns,
    kl_divergence_per_sequence,
    make_position_ids,
    make_sequence_mask,
    masked_mean,
)
from alignment.ppo.eval_utils import score_sequences
from alignment.ppo.rl_trainer import RLTrainer, RolloutSettings, response_logits
from alignment.ppo.trainer_utils import StepTrainer

__all__ = ["PPOTrainer", "response_logits"]


class PPOTrainer(RLTrainer):
    MODEL_ROLES = ("actor", "reward_critic")

    """PPO with an actor, a frozen reference, a critic and a frozen reward model.

    Trains ``MODEL_ROLES = ("actor", "reward_critic")``; ``critic_trainer`` is the ``"reward_critic"``.

    Args (besides :class:`RLTrainer`'s):
        reference_model: frozen copy of the SFT policy (KL anchor).
        reward_model: frozen score model (``end_scores`` = reward).
        reward_tokenizer: the reward model's tokenizer; when it differs from the actor's, rollouts
            are decoded and re-encoded for it (with its own mask).
    """

    def __init__(
        self,
        args: Any,
        actor_trainer: StepTrainer,
        critic_trainer: StepTrainer,
        reference_model: paddle.nn.Layer,
        reward_model: paddle.nn.Layer,
        tokenizer: Any,
        reward_tokenizer: Any,
        train_dataset: Any,
        rollout: RolloutSettings,
        eval_dataset: Any = None,
        ptx_dataset: Any = None,
        generate_fn: Any = None,
        extra_trainers: dict[str, StepTrainer] | None = None,
    ) -> None:
        # extra_trainers: the step trainers of a subclass's further MODEL_ROLES (e.g. PPO-Lag's cost critic).
        trainers = {"actor": actor_trainer, "reward_critic": critic_trainer, **(extra_trainers or {})}
        super().__init__(args, trainers, tokenizer, train_dataset, rollout, eval_dataset, ptx_dataset, generate_fn)
        self.reference_model = reference_model
        self.reward_model = reward_model
        self.reward_tokenizer = reward_tokenizer
        for model in (reference_model, reward_model):
            model.eval()
            for parameter in model.parameters():
                parameter.stop_gradient = True
        self.offload.offload_now("freeze_model", reference_model, reward_model)

    @property
    def critic_trainer(self) -> StepTrainer:
        """The reward critic's step trainer."""
        return self.trainers["reward_critic"]

    # ------------------------------------------------------------------------------- experience
    def forward_chunks(self, fn, rows: int):
        """Run ``fn(begin, end)`` over row chunks of ``per_device_experience_batch_size``; concat."""
        size = self.args.per_device_experience_batch_size or rows
        outputs = [fn(begin, min(begin + size, rows)) for begin in range(0, rows, size)]
        return outputs[0] if len(outputs) == 1 else paddle.concat(outputs, axis=0)

    def log_probs_of(self, model: paddle.nn.Layer, input_ids, attention_mask, position_ids, start: int = 0) -> paddle.Tensor:
        """``[B, T - start]`` log-prob of tokens ``start+1 ..`` under ``model`` (no grad)."""

        def run(begin: int, end: int) -> paddle.Tensor:
            rows = slice(begin, end)
            logits = response_logits(model, input_ids[rows], attention_mask[rows], position_ids[rows], start)
            return gather_log_probabilities(logits, input_ids[rows, start + 1 :])

        return self.forward_chunks(run, input_ids.shape[0])

    def reward_score(self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor) -> paddle.Tensor:
        """``[B]`` reward-model score of each sequence (re-tokenized if the RM's tokenizer differs)."""
        with self.offload.use("freeze_model", self.reward_model):
            return score_sequences(
                self.reward_model, input_ids, attention_mask, self.tokenizer, self.reward_tokenizer,
                batch_size=self.args.per_device_experience_batch_size,
            )  # fmt: skip

    def values_of(self, model: paddle.nn.Layer, input_ids, attention_mask, position_ids, start: int = 0) -> paddle.Tensor:
        """``[B, T - start]`` critic values ``V(prefix ending at t)`` for ``t = start .. T-1``."""

        def run(begin: int, end: int) -> paddle.Tensor:
            scores = model(
                input_ids[begin:end],
                attention_mask=attention_mask[begin:end],
                position_ids=position_ids[begin:end],
                return_dict=True,
            ).scores
            return scores[:, start:-1, 0].astype("float32")

        return self.forward_chunks(run, input_ids.shape[0])

    @paddle.no_grad()
    def make_experience(
        self, prompt_input_ids: paddle.Tensor, sequences: paddle.Tensor, attention_mask: paddle.Tensor, prompt_indices=None
    ) -> dict[str, Any]:
        args = self.args
        start = prompt_input_ids.shape[1] - 1  # log_probs[:, start] is the first generated token
        position_ids = make_position_ids(attention_mask)
        log_probs = self.log_probs_of(self.actor_trainer.rollout_model, sequences, attention_mask, position_ids, start)
        with self.offload.use("freeze_model", self.reference_model):
            ref_log_probs = self.log_probs_of(self.reference_model, sequences, attention_mask, position_ids, start)
        reward = self.reward_score(sequences, attention_mask)
        values = self.values_of(self.critic_trainer.rollout_model, sequences, attention_mask, position_ids, start)

        # Everything below lives on the response columns t = start .. L-2 only ([B, L-1-start]).
        response_mask = make_sequence_mask(attention_mask, start)[:, start:]
        rewards = add_kl_divergence_regularization(
            reward, log_probs, ref_log_probs, response_mask, args.kl_coeff, args.clip_range_score, args.clip_mode
        )
        advantages, returns = get_advantages_and_returns(
            values, rewards, response_mask, 0, gamma=args.gamma, gae_lambda=args.gae_lambda
        )
        kl = kl_divergence_per_sequence(log_probs, ref_log_probs, response_mask)
        lengths = response_mask.astype("float32").sum(axis=-1)
        metrics = {
            "train/reward": float(reward.mean().item()),
            "train/kl_divergence": float(kl.mean().item()),
            "train/reward_with_kl_penalty": float((rewards * response_mask.astype("float32")).sum(axis=-1).mean().item()),
            "train/reward_advantage": float(masked_mean(advantages, response_mask).item()),
            "train/reward_return": float(masked_mean(returns, response_mask).item()),
            "train/reward_value": float(masked_mean(values, response_mask).item()),
            "train/mean_generated_length": float(lengths.mean().item()),
            "train/max_generated_length": float(lengths.max().item()),
        }
        return {
            "input_ids": sequences,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "old_log_probs": log_probs,
            "ref_log_probs": ref_log_probs,
            "old_values": values,
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

    # ---------------------------------------------------------------------------------- update
    def loss_weight_basis(self, batch: dict[str, Any]) -> float:
        mask = batch["response_mask"]
        if self.args.loss_mean_type == "sequence":
            return float(mask.any(axis=-1).astype("float32").sum().item())
        return float(mask.astype("float32").sum().item())

    def critic_loss(self, values: paddle.Tensor, batch: dict[str, Any]) -> paddle.Tensor:
        """Clipped value loss of ``values [B, R]`` (critic values at the response columns)."""
        args = self.args
        return critic_loss_fn(
            values, batch["old_values"], batch["returns"], batch["response_mask"], args.clip_range_value, args.loss_mean_type
        )

    def actor_loss(self, logits: paddle.Tensor, batch: dict[str, Any]) -> paddle.Tensor:
        """PPO-clip loss from ``logits [B, R, V]`` at the response columns (predicting tokens ``start+1 ..``)."""
        args = self.args
        log_probs = gather_log_probabilities(logits, batch["input_ids"][:, batch["start"] + 1 :])
        return actor_loss_fn(
            log_probs, batch["old_log_probs"], batch["advantages"], batch["response_mask"],
            args.clip_range_ratio, args.loss_mean_type,
        )  # fmt: skip

    def rl_step(self, batch: dict[str, Any], loss_weight: float, accumulating: bool, actor_accumulating: bool) -> dict[str, float]:
        critic_loss, _ = self.backward_on("reward_critic", batch, lambda values, b, _: self.critic_loss(values, b), loss_weight, accumulating)
        actor_loss, _ = self.backward_on("actor", batch, lambda logits, b, _: self.actor_loss(logits, b), loss_weight, actor_accumulating)
        return {"train/actor_loss": actor_loss, "train/reward_critic_loss": critic_loss}
