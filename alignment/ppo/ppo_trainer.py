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

Then for every micro-batch: actor loss first, critic loss second (PaddleNLP has them the other way;
the models are independent). When the update is one pass over one micro-batch, the actor's experience
forward is run with gradients and is the update's forward too (``first_update_reuses_experience``). The math is
in :mod:`alignment.models.ppo_model_utils`; this class only orchestrates. Experience uses the rollout
models (the training models, or their ``eval_mode`` copies); under pipeline parallel the losses run
inside the pipeline, on the last stage's head output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from alignment.models.ppo_model_utils import (
    actor_loss_fn,
    entropy_from_logits,
    kl_penalty,
    masked_loss_mean,
    ratio_clip_fraction,
    rollout_ratio_deviation,
    add_kl_divergence_regularization,
    critic_loss_fn,
    gather_log_probabilities,
    get_advantages_and_returns,
    kl_divergence_per_sequence,
    make_position_ids,
    make_sequence_mask,
    masked_mean,
)
from alignment.ppo.eval_utils import score_sequences, split_prompt_response
from alignment.ppo.rl_trainer import RLTrainer, RolloutSettings, response_logits
from alignment.ppo.trainer_utils import StepTrainer
from alignment.utils.env import release_free_memory

__all__ = ["PPOTrainer", "response_logits"]


class PPOTrainer(RLTrainer):
    """PPO with an actor, a frozen reference, a critic and a frozen reward model.

    Trains ``MODEL_ROLES = ("actor", "reward_critic")``; ``critic_trainer`` is the ``"reward_critic"``.

    Args (besides :class:`RLTrainer`'s):
        reference_model: frozen copy of the SFT policy (KL anchor).
        reward_model: frozen score model (``end_scores`` = reward), or None when ``reward_source``
            gives the whole reward.
        reward_tokenizer: the reward model's tokenizer; when it differs from the actor's, rollouts
            are decoded and re-encoded for it (with its own mask).
        reward_source: an :class:`alignment.rewards.RewardSource` scoring the decoded
            (prompt, response, extras) texts (rule functions, a remote service); added to the
            reward model's score when both are given.
    """

    MODEL_ROLES = ("actor", "reward_critic")

    def __init__(
        self,
        args: Any,
        actor_trainer: StepTrainer,
        critic_trainer: StepTrainer | None,
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
        extra_trainers: dict[str, StepTrainer] | None = None,
    ) -> None:
        trainers = {"actor": actor_trainer}
        if critic_trainer is not None:
            trainers["reward_critic"] = critic_trainer
        trainers.update(extra_trainers or {})  # a subclass's further MODEL_ROLES (e.g. PPO-Lag's cost critic)
        super().__init__(args, trainers, tokenizer, train_dataset, rollout, eval_dataset, ptx_dataset, generate_fn)
        if reward_model is None and reward_source is None:
            raise ValueError("PPOTrainer needs a reward: a reward model and/or a reward source")
        self.reference_model = reference_model
        self.reward_model = reward_model
        self.reward_tokenizer = reward_tokenizer
        self.reward_source = reward_source
        frozen = [model for model in (reference_model, reward_model) if model is not None]
        for model in frozen:
            model.eval()
            for parameter in model.parameters():
                parameter.stop_gradient = True
        self.offload.offload_now("freeze_model", *frozen)

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

    def old_log_probs(self, sequences, attention_mask, position_ids, start: int) -> paddle.Tensor:
        """``[B, R]`` actor log-probs of the rollout tokens (``R = L - 1 - start``): with
        ``rollout_log_probs`` the rollout backend's own (``self.rollout_log_probs``, no forward pass),
        else an actor forward pass.

        The rollout's values come from the KV-cached decoder's logits, equal to the training forward's up
        to float rounding; the first actor loss after them records that difference as
        ``train/rollout_ratio_deviation`` (``max |exp(log_probs - old_log_probs) - 1|`` before any update).
        """
        rollout = self.rollout_log_probs if getattr(self.args, "rollout_log_probs", False) else None
        self._check_rollout_ratio = rollout is not None and list(rollout.shape) == [sequences.shape[0], sequences.shape[1] - 1 - start]
        if self._check_rollout_ratio:
            return rollout.astype("float32")
        if self.first_update_reuses_experience(sequences.shape[0]):
            # This forward is also the update's: same weights, same rows, one micro-batch (see the method).
            release_free_memory()  # the other experience forwards' freed buffers, before the kept graph
            trainer = self.actor_trainer
            self.set_train(True)
            try:
                with paddle.enable_grad(), trainer.autocast():
                    logits = response_logits(trainer.model_wrapped, sequences, attention_mask, position_ids, start)
            finally:
                self.set_train(False)
            self.reused_outputs["actor"] = (self.state.global_step, sequences, logits)
            return gather_log_probabilities(logits.detach(), sequences[:, start + 1 :])
        return self.log_probs_of(self.actor_trainer.rollout_model, sequences, attention_mask, position_ids, start)

    def reward_score(self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor) -> paddle.Tensor:
        """``[B]`` reward-model score of each sequence (re-tokenized if the RM's tokenizer differs)."""
        with self.offload.use("freeze_model", self.reward_model):
            return score_sequences(
                self.reward_model, input_ids, attention_mask, self.tokenizer, self.reward_tokenizer,
                batch_size=self.args.per_device_experience_batch_size,
            )  # fmt: skip

    def sequence_rewards(
        self,
        sequences: paddle.Tensor,
        attention_mask: paddle.Tensor,
        prompt_width: int,
        prompt_indices: list[int] | None = None,
        dataset: Any = None,
    ) -> tuple[paddle.Tensor, dict[str, np.ndarray]]:
        """``([B] float32 reward, {part name: [B] values})`` of rollout rows.

        The reward is the reward model's score (if any) plus ``reward_source`` on the decoded texts (if
        any). ``prompt_indices`` (``[P]``, rows ``i*n .. i*n+n-1`` answer prompt ``i``) with ``dataset``
        give each row's raw sample: its ``input`` is the prompt text and its other fields the extras;
        without them the prompt is decoded from the tokens.
        """
        parts: dict[str, np.ndarray] = {}
        total = None
        if self.reward_model is not None:
            total = self.reward_score(sequences, attention_mask)
            if self.reward_source is not None:
                parts["reward_model"] = total.numpy()
        if self.reward_source is not None:
            prompts, responses, extras = self.decode_rollout(sequences, attention_mask, prompt_width, prompt_indices, dataset)
            values = self.reward_source.score(prompts, responses, extras)
            parts.update(self.reward_source.parts() or {self.reward_source.name: values})
            text_reward = paddle.to_tensor(values)
            total = text_reward if total is None else total + text_reward
        return total, parts

    def decode_rollout(
        self, sequences: paddle.Tensor, attention_mask: paddle.Tensor, prompt_width: int, prompt_indices=None, dataset=None
    ) -> tuple[list[str], list[str], list[dict]]:
        """``(prompts, responses, extras)`` texts of rollout rows (see :meth:`sequence_rewards`)."""
        ids, mask = sequences.numpy(), attention_mask.numpy().astype(bool)
        rows = ids.shape[0]
        responses = [
            self.tokenizer.decode(ids[row, prompt_width:][mask[row, prompt_width:]].tolist(), skip_special_tokens=True).strip()
            for row in range(rows)
        ]
        if prompt_indices is not None and dataset is not None and hasattr(dataset, "raw_sample"):
            repeats = rows // len(prompt_indices)
            samples = [dataset.raw_sample(i) for i in prompt_indices for _ in range(repeats)]
            prompts = [_prompt_text(sample.get("input")) for sample in samples]
            extras = [{k: v for k, v in sample.items() if k != "input"} for sample in samples]
            return prompts, responses, extras
        prompts = []
        for row in range(rows):
            prompt_text = self.tokenizer.decode(ids[row, :prompt_width][mask[row, :prompt_width]].tolist(), skip_special_tokens=True)
            prompts.append(split_prompt_response(prompt_text, prompt_text)[0])
        return prompts, responses, [{} for _ in range(rows)]

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

    @staticmethod
    def experience_metrics(
        reward: paddle.Tensor,
        reward_parts: dict[str, Any],
        rewards: paddle.Tensor,
        log_probs: paddle.Tensor,
        ref_log_probs: paddle.Tensor,
        advantages: paddle.Tensor,
        returns: paddle.Tensor,
        response_mask: paddle.Tensor,
    ) -> dict[str, float]:
        """The rollout metrics every trainer of this family logs: ``reward [B]`` (sequence score),
        ``reward_parts`` (per-source scores), and ``rewards``/``log_probs``/``ref_log_probs``/
        ``advantages``/``returns``/``response_mask`` on the response columns ``[B, R]``."""
        kl = kl_divergence_per_sequence(log_probs, ref_log_probs, response_mask)
        lengths = response_mask.astype("float32").sum(axis=-1)
        return {
            "train/reward": float(reward.mean().item()),
            "train/kl_divergence": float(kl.mean().item()),
            "train/reward_with_kl_penalty": float((rewards * response_mask.astype("float32")).sum(axis=-1).mean().item()),
            "train/reward_advantage": float(masked_mean(advantages, response_mask).item()),
            "train/reward_return": float(masked_mean(returns, response_mask).item()),
            "train/mean_generated_length": float(lengths.mean().item()),
            "train/max_generated_length": float(lengths.max().item()),
            **{f"train/reward_{name}": float(np.mean(part)) for name, part in reward_parts.items()},
        }

    @paddle.no_grad()
    def make_experience(
        self, prompt_input_ids: paddle.Tensor, sequences: paddle.Tensor, attention_mask: paddle.Tensor, prompt_indices=None
    ) -> dict[str, Any]:
        args = self.args
        start = prompt_input_ids.shape[1] - 1  # log_probs[:, start] is the first generated token
        position_ids = make_position_ids(attention_mask)
        with self.offload.use("freeze_model", self.reference_model):
            ref_log_probs = self.log_probs_of(self.reference_model, sequences, attention_mask, position_ids, start)
        reward, reward_parts = self.sequence_rewards(sequences, attention_mask, prompt_input_ids.shape[1], prompt_indices, self.train_dataset)
        values = self.values_of(self.critic_trainer.rollout_model, sequences, attention_mask, position_ids, start)
        # The actor last: a forward kept for its update holds its graph through no other model's forward.
        log_probs = self.old_log_probs(sequences, attention_mask, position_ids, start)

        # Everything below lives on the response columns t = start .. L-2 only ([B, L-1-start]).
        response_mask = make_sequence_mask(attention_mask, start)[:, start:]
        rewards = add_kl_divergence_regularization(
            reward, log_probs, ref_log_probs, response_mask, args.kl_coeff, args.clip_range_score, args.clip_mode
        )
        advantages, returns = get_advantages_and_returns(
            values, rewards, response_mask, 0, gamma=args.gamma, gae_lambda=args.gae_lambda
        )
        metrics = self.experience_metrics(reward, reward_parts, rewards, log_probs, ref_log_probs, advantages, returns, response_mask)
        metrics["train/reward_value"] = float(masked_mean(values, response_mask).item())
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

    #: Metrics recorded by :meth:`actor_loss` (broadcast from the last pipeline stage).
    ACTOR_METRICS = ("train/entropy", "train/clip_fraction", "train/kl_loss")

    def actor_loss(self, logits: paddle.Tensor, batch: dict[str, Any], metrics: dict[str, float] | None = None) -> paddle.Tensor:
        """Policy loss from ``logits [B, R, V]`` at the response columns (predicting tokens ``start+1 ..``).

        PPO-clip with ``(1 - clip_range_ratio_low, 1 + clip_range_ratio_high)`` (both default to
        ``clip_range_ratio``), plus ``kl_loss_coeff`` x the ``kl_estimator`` KL to the reference, minus
        ``entropy_coeff`` x the entropy; each term reduced with ``loss_mean_type``. Records entropy, clip
        fraction and the KL term in ``metrics``.
        """
        args = self.args
        mask, mean_type = batch["response_mask"], args.loss_mean_type
        clip = dict(clip_range_ratio_low=args.clip_range_ratio_low, clip_range_ratio_high=args.clip_range_ratio_high)
        labels = batch["input_ids"][:, batch["start"] + 1 :]
        if args.entropy_coeff > 0:
            log_probs = gather_log_probabilities(logits, labels)
        else:  # the entropy is a metric only: from the same softmax pass
            log_probs, token_entropy = gather_log_probabilities(logits, labels, with_entropy=True)
        loss = actor_loss_fn(log_probs, batch["old_log_probs"], batch["advantages"], mask, args.clip_range_ratio, mean_type, **clip)
        kl_loss = paddle.zeros([])
        if args.kl_loss_coeff > 0:
            kl_loss = masked_loss_mean(kl_penalty(log_probs, batch["ref_log_probs"], args.kl_estimator or "k3"), mask, mean_type)
            loss = loss + args.kl_loss_coeff * kl_loss
        if args.entropy_coeff > 0:
            entropy = masked_loss_mean(entropy_from_logits(logits), mask, mean_type)
            loss = loss - args.entropy_coeff * entropy
        else:
            with paddle.no_grad():
                entropy = masked_loss_mean(token_entropy, mask, mean_type)
        if metrics is not None and getattr(self, "_check_rollout_ratio", False):  # (set by old_log_probs)
            self._check_rollout_ratio = False  # the first micro-batch, before any optimizer step
            metrics["train/rollout_ratio_deviation"] = float(
                rollout_ratio_deviation(log_probs.detach(), batch["old_log_probs"], mask).item()
            )
        if metrics is not None:
            fraction = ratio_clip_fraction(log_probs, batch["old_log_probs"], batch["advantages"], mask, args.clip_range_ratio, **clip)
            metrics.update({
                "train/entropy": float(entropy.item()),
                "train/clip_fraction": float(fraction.item()),
                "train/kl_loss": float(kl_loss.item()),
            })  # fmt: skip
        return loss

    def rl_step(self, batch: dict[str, Any], loss_weight: float, accumulating: bool, actor_accumulating: bool) -> dict[str, float]:
        # Actor first (the models are independent; PaddleNLP steps the critic first): an actor graph kept
        # from the experience phase is released before the critic builds its own.
        actor_loss, metrics = self.backward_on("actor", batch, self.actor_loss, loss_weight, actor_accumulating, self.ACTOR_METRICS)
        critic_loss, _ = self.backward_on("reward_critic", batch, lambda values, b, _: self.critic_loss(values, b), loss_weight, accumulating)
        return {"train/actor_loss": actor_loss, "train/reward_critic_loss": critic_loss, **metrics}


def _prompt_text(value: Any) -> str:
    """The user's prompt of a raw sample's ``input`` (a dialogue's last user turn)."""
    if isinstance(value, (list, tuple)):
        return str(value[-1]) if value else ""
    return "" if value is None else str(value)
