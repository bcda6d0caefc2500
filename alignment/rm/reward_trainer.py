"""Reward-model training: the pairwise loss on one forward pass of better + worse, and its Trainer.

Batches come from :class:`alignment.data.PreferenceCollator`: ``better_input_ids``,
``better_attention_mask``, ``worse_input_ids``, ``worse_attention_mask``, each ``[B, L]`` (both sides
right-padded to one width). The score model sees the ``2B`` rows ``concat(better, worse)`` in a single
forward pass, so a normalizer update and every batch statistic cover both sides at once.

Notation: ``h_i`` / ``l_i`` are the end rewards of the better ("higher") / worse ("lower") answer
of pair ``i``; the losses themselves are the pure functions of
:mod:`alignment.models.score_model_utils` (:func:`reward_sequence_loss`, :func:`reward_token_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import paddle
import paddle.distributed as dist
from paddlenlp.trainer import Trainer

from alignment.models.score_model_utils import reward_sequence_loss, reward_token_loss
from alignment.utils.config import ConfigError
from alignment.utils.stage import StageTrainingArguments
from alignment.utils.trainer import ReliableTrainerMixin

__all__ = [
    "LOSS_TYPES",
    "RewardTrainingArguments",
    "PairRewards",
    "score_pairs",
    "pairwise_loss",
    "reward_metrics",
    "PairCounter",
    "RewardTrainer",
]

LOSS_TYPES = ("sequence-wise", "token-wise")
"""``loss_type`` values: the loss on end rewards, or on per-token rewards after the answers diverge."""


@dataclass
class RewardTrainingArguments(StageTrainingArguments):
    """PaddleNLP ``TrainingArguments`` plus ``eval_before_training`` and the reward-model loss options."""

    loss_type: str = field(
        default="sequence-wise",
        metadata={
            "help": "sequence-wise: -log sigma(h - l) on end rewards; token-wise: the same per token from the first "
            "token where the two answers differ to the end of the longer one, averaged per pair.",
            "choices": list(LOSS_TYPES),
        },
    )
    regularization: float = field(
        default=0.001,
        metadata={"help": "Weight of the reward-size penalty reg * (mean l^2 + mean h^2) added to the loss (>= 0)."},
    )

    def __post_init__(self) -> None:
        # Checked before PaddleNLP builds the parallel topology, which would fail less clearly.
        problems = []
        if self.pipeline_parallel_degree > 1:
            problems.append(
                "pipeline_parallel_degree: reward-model training supports data, sharding and tensor parallelism, "
                f"not pipeline parallelism (got {self.pipeline_parallel_degree}); set it to 1"
            )
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"loss_type: {self.loss_type!r} is not one of {list(LOSS_TYPES)}")
        if not self.regularization >= 0:
            problems.append(f"regularization: must be >= 0, got {self.regularization}")
        if problems:
            raise ConfigError(problems)
        super().__post_init__()


# --------------------------------------------------------------------------------------------------
# Loss and metrics
# --------------------------------------------------------------------------------------------------


@dataclass
class PairRewards:
    """Rewards of a batch of B preference pairs from one forward pass of 2B rows.

    higher_end_rewards / lower_end_rewards: [B] float32, reward at the last real token of the better /
    worse row. higher_rewards / lower_rewards: [B, L] float32, reward of every prefix.
    """

    higher_end_rewards: paddle.Tensor
    lower_end_rewards: paddle.Tensor
    higher_rewards: paddle.Tensor
    lower_rewards: paddle.Tensor


def score_pairs(
    model: paddle.nn.Layer, inputs: dict[str, paddle.Tensor], higher: str = "better", lower: str = "worse"
) -> PairRewards:
    """Score better and worse rows of a preference batch in one forward pass of ``concat(better, worse)``.

    ``model`` is a score model with ``score_dim`` 1 (possibly wrapped, e.g. in ``paddle.DataParallel``).
    ``higher`` / ``lower`` name the batch's two sides (``{side}_input_ids``, ``{side}_attention_mask``)
    whose scores should be the higher / lower one: ``better``/``worse`` for a reward model,
    ``unsafer``/``safer`` for a cost model (:mod:`alignment.rm.cost_trainer`).
    """
    better_ids, worse_ids = inputs[f"{higher}_input_ids"], inputs[f"{lower}_input_ids"]
    better_mask, worse_mask = inputs[f"{higher}_attention_mask"], inputs[f"{lower}_attention_mask"]
    shapes = [list(t.shape) for t in (better_ids, better_mask, worse_ids, worse_mask)]
    if len(shapes[0]) != 2 or any(shape != shapes[0] for shape in shapes):
        raise ValueError(
            "better/worse input ids and attention masks must all be [batch, seq_len] of one shape (the "
            f"PreferenceCollator pads both sides to one width); got {shapes}"
        )
    batch_size = shapes[0][0]
    outputs = model(
        input_ids=paddle.concat([better_ids, worse_ids], axis=0),
        attention_mask=paddle.concat([better_mask, worse_mask], axis=0),
        return_dict=True,
    )
    scores, end_scores = outputs.scores, outputs.end_scores  # [2B, L, D], [2B, D]
    if scores.shape[-1] != 1:
        raise ValueError(f"a reward model must have score_dim 1, got scores of shape {list(scores.shape)}")
    higher_rewards, lower_rewards = scores.squeeze(-1).split([batch_size, batch_size], axis=0)
    higher_end, lower_end = end_scores.squeeze(-1).split([batch_size, batch_size], axis=0)
    return PairRewards(higher_end, lower_end, higher_rewards, lower_rewards)


def pairwise_loss(
    rewards: PairRewards, inputs: dict[str, paddle.Tensor], loss_type: str, regularization: float
) -> paddle.Tensor:
    """The reward-model loss of a batch (scalar float32): :func:`reward_sequence_loss` on end rewards for
    ``sequence-wise``, :func:`reward_token_loss` on per-token rewards for ``token-wise``."""
    if loss_type == "sequence-wise":
        return reward_sequence_loss(rewards.higher_end_rewards, rewards.lower_end_rewards, regularization)
    if loss_type == "token-wise":
        return reward_token_loss(
            rewards.higher_rewards,
            rewards.lower_rewards,
            inputs["better_input_ids"],
            inputs["worse_input_ids"],
            inputs["better_attention_mask"],
            inputs["worse_attention_mask"],
            regularization,
        )
    raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {list(LOSS_TYPES)}")


def reward_metrics(end_rewards: np.ndarray) -> dict[str, float]:
    """Evaluation metrics of ``end_rewards`` [N, 2] (column 0: better answer, column 1: worse answer).

    ``accuracy``: fraction of pairs with h > l (ties count as wrong); ``rewards_mean`` / ``rewards_std``:
    mean and population standard deviation of all 2N rewards.
    """
    end_rewards = np.asarray(end_rewards, dtype="float64")
    if end_rewards.ndim != 2 or end_rewards.shape[1] != 2 or end_rewards.shape[0] == 0:
        raise ValueError(f"end_rewards must be [N >= 1, 2] (better, worse), got shape {list(end_rewards.shape)}")
    return {
        "accuracy": float(np.mean(end_rewards[:, 0] > end_rewards[:, 1])),  # as reward_accuracy, in float64
        "rewards_mean": float(end_rewards.mean()),
        "rewards_std": float(end_rewards.std()),
    }


class PairCounter:
    """Correctly ranked pairs and pairs seen, kept on the device (no host sync per step).

    ``take()`` sums the counts over every process of the job, returns ``correct / pairs`` (``None``
    when no pair was seen) and starts over. It is a collective call when the job has several processes:
    every rank must call it at the same point. Ranks holding replicas of the same data (tensor
    parallelism) multiply numerator and denominator alike, so the ratio stays exact.
    """

    def __init__(self) -> None:
        self._counts = paddle.zeros([2], dtype="float64")  # [correct, pairs]

    def add(self, higher_end_rewards: paddle.Tensor, lower_end_rewards: paddle.Tensor) -> None:
        correct = (higher_end_rewards > lower_end_rewards).astype("float64").sum()
        pairs = paddle.full([], higher_end_rewards.shape[0], dtype="float64")
        self._counts = self._counts + paddle.stack([correct, pairs]).detach()

    def take(self) -> Optional[float]:
        counts = self._counts
        self._counts = paddle.zeros([2], dtype="float64")
        if dist.is_initialized() and dist.get_world_size() > 1:
            counts = counts.clone()
            dist.all_reduce(counts)
        correct, pairs = counts.tolist()
        return correct / pairs if pairs > 0 else None


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


class RewardTrainer(ReliableTrainerMixin, Trainer):
    """PaddleNLP ``Trainer`` for pairwise reward-model training.

    * ``compute_loss``: one forward pass of ``concat(better, worse)`` and :func:`pairwise_loss` with
      ``args.loss_type`` and ``args.regularization`` (a :class:`RewardTrainingArguments`).
    * Training logs: every interval log (``logging_steps``) carries ``accuracy``, the fraction of
      correctly ranked training pairs since the previous log, over all micro-batches (gradient
      accumulation) and all data-parallel ranks; the final log carries ``train_accuracy`` over the run.
    * Evaluation: ``eval_accuracy``, ``eval_rewards_mean``, ``eval_rewards_std`` (:func:`reward_metrics`)
      over the whole evaluation set gathered from every rank (the sampler's padding repeats are cut),
      and ``eval_loss``, PaddleNLP's batch-size-weighted mean of batch losses (which keeps those repeats).
      ``predict`` returns the end rewards ``[N, 2]``.
    * From :class:`~alignment.utils.trainer.ReliableTrainerMixin`: atomic checkpoints, a stop on a
      non-finite loss, and the same global batches for any number of ranks.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, RewardTrainingArguments):
            raise TypeError(f"RewardTrainer needs RewardTrainingArguments, got {type(self.args).__name__}")
        self._interval_accuracy = PairCounter()
        self._run_accuracy = PairCounter()

    def compute_loss(self, model, inputs, return_outputs=False):  # noqa: D401 - Trainer hook
        rewards = score_pairs(model, inputs)
        loss = pairwise_loss(rewards, inputs, self.args.loss_type, self.args.regularization)
        if model.training:
            for counter in (self._interval_accuracy, self._run_accuracy):
                counter.add(rewards.higher_end_rewards, rewards.lower_end_rewards)
        if return_outputs:
            return loss, {
                "higher_end_rewards": rewards.higher_end_rewards,
                "lower_end_rewards": rewards.lower_end_rewards,
            }
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: D401 - Trainer hook
        """``(loss, end_rewards [B, 2] (better, worse), None)``; the rewards are always returned because the
        evaluation metrics are computed from them."""
        inputs = self._prepare_inputs(inputs)
        with paddle.no_grad(), self.autocast_smart_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        end_rewards = paddle.stack([outputs["higher_end_rewards"], outputs["lower_end_rewards"]], axis=-1)
        return loss.detach(), end_rewards.astype("float32").detach(), None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval", max_eval_iters=-1):  # fmt: skip
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=False,  # the reward metrics need the gathered end rewards
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
            max_eval_iters=max_eval_iters,
        )
        if output.predictions is not None and len(output.predictions) > 0:
            for name, value in self.eval_metrics(output.predictions).items():
                output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    def eval_metrics(self, predictions: np.ndarray) -> dict[str, float]:
        """Evaluation metrics of the gathered ``prediction_step`` outputs (:func:`reward_metrics`)."""
        return reward_metrics(predictions)

    def log(self, logs: dict[str, float], **kwargs: Any) -> None:
        """Adds the training accuracy: ``accuracy`` to interval logs (they carry ``loss``) and
        ``train_accuracy`` to the end-of-training log (it carries ``train_loss``). Called on every rank by
        the training loop; the accuracy is summed over ranks (a collective call)."""
        if "loss" in logs:
            accuracy = self._interval_accuracy.take()
            if accuracy is not None:
                logs["accuracy"] = round(accuracy, 6)
        elif "train_loss" in logs:
            accuracy = self._run_accuracy.take()
            if accuracy is not None:
                logs["train_accuracy"] = round(accuracy, 6)
        super().log(logs, **kwargs)
