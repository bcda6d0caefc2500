"""DPO-family training on preference pairs: response log-probs, reference handling, metrics, Trainer.

Batches come from :class:`alignment.dpo.data.DPOCollator`: ``better_*`` / ``worse_*`` input ids,
attention and response masks, each ``[B, W]``. The policy sees ``concat(better, worse)`` (``2B``
rows) in one forward pass; the frozen reference model does the same without gradients, once per
batch (or its log-probs were precomputed for the whole dataset and arrive in the batch). The loss
itself is a registered pure function of :mod:`alignment.models.dpo_model_utils` chosen by
``loss_type``; this module only orchestrates.

"chosen" is the preferred (better) answer, "rejected" the other one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import paddle
import paddle.distributed as dist
from paddlenlp.trainer import Trainer

from alignment.dpo.data import REFERENCE_KEYS, ReferenceLogProbsDataset
from alignment.models.dpo_model_utils import get_preference_loss, preference_loss_uses_reference, sequence_log_probs
from alignment.models.ppo_model_utils import gather_log_probabilities, make_position_ids
from alignment.ppo.ppo_trainer import response_logits
from alignment.utils.config import ConfigError
from alignment.utils.stage import StageTrainingArguments
from alignment.utils.trainer import ReliableTrainerMixin

__all__ = [
    "DPOTrainingArguments",
    "METRIC_NAMES",
    "PairLogProbs",
    "pair_log_probs",
    "metric_sums",
    "MetricAccumulator",
    "precompute_reference_log_probs",
    "DPOTrainer",
]

logger = logging.getLogger(__name__)

#: Per-pair metrics, logged as ``<name>`` in training and ``eval_<name>`` in evaluation (with ``loss``).
METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class DPOTrainingArguments(StageTrainingArguments):
    """PaddleNLP ``TrainingArguments`` plus ``eval_before_training`` and the preference-loss options."""

    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "Registered preference loss (alignment.models.dpo_model_utils): sigmoid (DPO), hinge, ipo, "
            "simpo, orpo, or one registered by a custom module."
        },
    )
    beta: float = field(default=0.1, metadata={"help": "beta: inverse temperature of the implicit reward (> 0); ORPO's lambda."})
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Assumed label-flip probability in [0, 0.5) (conservative DPO); sigmoid and simpo only."},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin gamma (simpo only)."})
    reference_free: bool = field(
        default=False,
        metadata={"help": "Take the reference log-probs as 0 (no reference model is loaded)."},
    )
    precompute_reference_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs of the whole train/eval sets once before training (split "
            "over data-parallel ranks), then release the reference model."
        },
    )

    def __post_init__(self) -> None:
        # Checked before PaddleNLP builds the parallel topology, which would fail less clearly.
        problems = []
        if self.pipeline_parallel_degree > 1:
            problems.append(
                "pipeline_parallel_degree: DPO supports data, sharding and tensor parallelism, not pipeline "
                f"parallelism (got {self.pipeline_parallel_degree}); set it to 1"
            )
        if not self.beta > 0:
            problems.append(f"beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            problems.append(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if problems:
            raise ConfigError(problems)
        super().__post_init__()

    @property
    def uses_reference_model(self) -> bool:
        """Whether a reference model is needed: a reference-based loss, not run reference-free."""
        return preference_loss_uses_reference(self.loss_type) and not self.reference_free


# --------------------------------------------------------------------------------------------------
# Log-probs and metrics
# --------------------------------------------------------------------------------------------------


@dataclass
class PairLogProbs:
    """Response log-probs of B pairs: ``chosen`` / ``rejected`` ``[B]`` float32 sums over response
    tokens, ``chosen_lengths`` / ``rejected_lengths`` ``[B]`` float32 response token counts."""

    chosen: paddle.Tensor
    rejected: paddle.Tensor
    chosen_lengths: paddle.Tensor
    rejected_lengths: paddle.Tensor


def pair_log_probs(model: paddle.nn.Layer, inputs: dict[str, paddle.Tensor]) -> PairLogProbs:
    """Summed response log-probs of both answers of every pair, from one forward pass of ``2B`` rows.

    ``log pi(y | x) = sum_t log pi(y_t | x, y_<t)`` over the response tokens (EOS included). The
    vocabulary projection runs only from the first response position of the batch on
    (:func:`alignment.ppo.ppo_trainer.response_logits`).
    """
    better_ids, worse_ids = inputs["better_input_ids"], inputs["worse_input_ids"]
    if list(better_ids.shape) != list(worse_ids.shape) or better_ids.ndim != 2:
        raise ValueError(
            f"better/worse input ids must be [batch, width] of one shape (DPOCollator pads both sides to one "
            f"width); got {list(better_ids.shape)} and {list(worse_ids.shape)}"
        )
    batch_size = better_ids.shape[0]
    input_ids = paddle.concat([better_ids, worse_ids], axis=0)
    attention_mask = paddle.concat([inputs["better_attention_mask"], inputs["worse_attention_mask"]], axis=0)
    response_mask = paddle.concat([inputs["better_response_mask"], inputs["worse_response_mask"]], axis=0)
    # Token t is predicted at position t - 1: logits from (first response column - 1) on suffice.
    any_response = response_mask.astype("bool").any(axis=0).numpy()
    if not any_response.any() or not any_response[1:].any():
        raise ValueError("the batch has no response token after the first position (check the response masks)")
    start = int(np.argmax(any_response[1:]))  # first target column t + 1 >= 1 that is a response token, minus 1
    logits = response_logits(model, input_ids, attention_mask, make_position_ids(attention_mask), start)
    token_log_probs = gather_log_probabilities(logits, input_ids[:, start + 1 :])
    sums, counts = sequence_log_probs(token_log_probs, response_mask[:, start + 1 :])
    chosen, rejected = sums.split([batch_size, batch_size])
    chosen_lengths, rejected_lengths = counts.split([batch_size, batch_size])
    return PairLogProbs(chosen, rejected, chosen_lengths, rejected_lengths)


def metric_sums(
    chosen_rewards: paddle.Tensor, rejected_rewards: paddle.Tensor, chosen_logps: paddle.Tensor, rejected_logps: paddle.Tensor
) -> paddle.Tensor:
    """``[len(METRIC_NAMES)]`` float64 sums over the B pairs (divide by B for the means).

    ``rewards/accuracies`` counts pairs whose chosen reward is strictly greater (ties are wrong);
    ``rewards/margins`` is chosen minus rejected reward. Inputs ``[B]``.
    """
    c, r = chosen_rewards.astype("float64").detach(), rejected_rewards.astype("float64").detach()
    values = [c, r, (c > r).astype("float64"), c - r, chosen_logps.astype("float64").detach(), rejected_logps.astype("float64").detach()]
    return paddle.stack([v.sum() for v in values])


class MetricAccumulator:
    """Sums of :data:`METRIC_NAMES` and a pair count, kept on the device (no host sync per step).

    ``take()`` sums over every process of the job (a collective call when there are several: every
    rank calls it at the same point), returns the per-pair means (``None`` when no pair was seen) and
    starts over. Ranks holding replicas of the same data (tensor parallelism) scale sums and count
    alike, so the means stay exact.
    """

    def __init__(self) -> None:
        self._sums = paddle.zeros([len(METRIC_NAMES) + 1], dtype="float64")

    def add(self, sums: paddle.Tensor, pairs: int) -> None:
        self._sums = self._sums + paddle.concat([sums, paddle.full([1], pairs, dtype="float64")])

    def take(self) -> Optional[dict[str, float]]:
        sums = self._sums
        self._sums = paddle.zeros_like(sums)
        if dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.clone()
            dist.all_reduce(sums)
        values = sums.tolist()
        pairs = values[-1]
        return {name: value / pairs for name, value in zip(METRIC_NAMES, values)} if pairs > 0 else None


def precompute_reference_log_probs(
    reference_model: paddle.nn.Layer, dataset: Any, batch_size: int, dataset_rank: int = 0, dataset_world_size: int = 1
) -> ReferenceLogProbsDataset:
    """``dataset`` with the reference log-probs of every pair attached (see :class:`ReferenceLogProbsDataset`).

    Each data-parallel rank computes the pairs ``dataset_rank::dataset_world_size``; the results are
    gathered on every rank (a collective call when the job has several processes). Tensor-parallel
    peers share a data rank and compute the same rows together.
    """
    collator = dataset.get_collator()
    indices = list(range(dataset_rank, len(dataset), dataset_world_size))
    rows = np.full([len(indices), 3], np.nan, dtype=np.float64)  # (index, chosen, rejected)
    reference_model.eval()
    with paddle.no_grad():
        for begin in range(0, len(indices), batch_size):
            chunk = indices[begin : begin + batch_size]
            logps = pair_log_probs(reference_model, collator([dataset[i] for i in chunk]))
            rows[begin : begin + len(chunk)] = np.stack([np.asarray(chunk), logps.chosen.numpy(), logps.rejected.numpy()], 1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        per_rank = -(-len(dataset) // dataset_world_size)
        padded = np.full([per_rank, 3], -1.0)
        padded[: len(rows)] = rows
        gathered: list[paddle.Tensor] = []
        dist.all_gather(gathered, paddle.to_tensor(padded))
        rows = np.concatenate([t.numpy() for t in gathered])
        rows = rows[rows[:, 0] >= 0]
    logps = np.full([len(dataset), 2], np.nan, dtype=np.float32)
    logps[rows[:, 0].astype(np.int64)] = rows[:, 1:]
    if np.isnan(logps).any():
        raise RuntimeError(f"reference log-probs missing for {int(np.isnan(logps[:, 0]).sum())} pairs")
    return ReferenceLogProbsDataset(dataset, logps)


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


class DPOTrainer(ReliableTrainerMixin, Trainer):
    """PaddleNLP ``Trainer`` for the DPO family (``args`` is a :class:`DPOTrainingArguments`).

    * ``compute_loss``: :func:`pair_log_probs` of the policy (with gradients) and of the reference
      model (``reference_model``, no gradients, once per batch; or precomputed log-probs found in
      the batch; or none for reference-free training), then the registered ``args.loss_type`` loss,
      averaged over the pairs of the micro-batch.
    * Training logs: every interval log (``logging_steps``) carries :data:`METRIC_NAMES`, means over
      the pairs since the previous log (all micro-batches and data-parallel ranks); the final log
      carries them over the whole run as ``train_<name>``.
    * Evaluation: ``eval_loss`` and ``eval_<name>`` means over the whole evaluation set gathered from
      every rank (the sampler's padding repeats are cut). ``predict`` returns ``[N, 5]`` per pair:
      loss, chosen reward, rejected reward, chosen log-prob, rejected log-prob.
    * From :class:`~alignment.utils.trainer.ReliableTrainerMixin`: atomic checkpoints, a stop on a
      non-finite loss, and the same global batches for any number of ranks.
    """

    def __init__(self, *args: Any, reference_model: Optional[paddle.nn.Layer] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DPOTrainingArguments):
            raise TypeError(f"DPOTrainer needs DPOTrainingArguments, got {type(self.args).__name__}")
        self.loss_fn = get_preference_loss(self.args.loss_type)
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.eval()
            for parameter in reference_model.parameters():
                parameter.stop_gradient = True
        self._interval_metrics = MetricAccumulator()
        self._run_metrics = MetricAccumulator()

    def reference_log_probs(self, inputs: dict[str, paddle.Tensor]) -> tuple[Optional[paddle.Tensor], Optional[paddle.Tensor]]:
        """``(chosen, rejected)`` ``[B]`` reference log-probs of the batch, or ``(None, None)`` when the
        loss runs without a reference."""
        if not self.args.uses_reference_model:
            return None, None
        if REFERENCE_KEYS[0] in inputs:
            return inputs[REFERENCE_KEYS[0]], inputs[REFERENCE_KEYS[1]]
        if self.reference_model is None:
            raise RuntimeError(
                f"loss_type {self.args.loss_type!r} needs reference log-probs: give the trainer a reference_model "
                "or precomputed log-probs (or set reference_free)"
            )
        with paddle.no_grad():
            logps = pair_log_probs(self.reference_model, inputs)
        return logps.chosen.detach(), logps.rejected.detach()

    def pair_losses(self, model: paddle.nn.Layer, inputs: dict[str, paddle.Tensor]) -> tuple[paddle.Tensor, ...]:
        """``(losses, chosen_rewards, rejected_rewards, policy log-probs)`` of a batch (per pair)."""
        policy = pair_log_probs(model, inputs)
        reference_chosen, reference_rejected = self.reference_log_probs(inputs)
        losses, chosen_rewards, rejected_rewards = self.loss_fn(
            policy_chosen_logps=policy.chosen,
            policy_rejected_logps=policy.rejected,
            reference_chosen_logps=reference_chosen,
            reference_rejected_logps=reference_rejected,
            chosen_lengths=policy.chosen_lengths,
            rejected_lengths=policy.rejected_lengths,
            beta=self.args.beta,
            label_smoothing=self.args.label_smoothing,
            simpo_gamma=self.args.simpo_gamma,
        )
        return losses, chosen_rewards, rejected_rewards, policy

    def compute_loss(self, model, inputs, return_outputs=False):  # noqa: D401 - Trainer hook
        losses, chosen_rewards, rejected_rewards, policy = self.pair_losses(model, inputs)
        loss = losses.mean()
        if model.training:
            sums = metric_sums(chosen_rewards, rejected_rewards, policy.chosen, policy.rejected)
            for accumulator in (self._interval_metrics, self._run_metrics):
                accumulator.add(sums, losses.shape[0])
        if return_outputs:
            per_pair = [losses, chosen_rewards, rejected_rewards, policy.chosen, policy.rejected]
            return loss, paddle.stack([v.astype("float32").detach() for v in per_pair], axis=-1)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: D401 - Trainer hook
        """``(loss, [B, 5] per-pair values, None)``; the values are always returned because the
        evaluation metrics are computed from them."""
        inputs = self._prepare_inputs(inputs)
        with paddle.no_grad(), self.autocast_smart_context_manager():
            loss, per_pair = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), per_pair, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval", max_eval_iters=-1):  # fmt: skip
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=False,  # the metrics need the gathered per-pair values
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
            max_eval_iters=max_eval_iters,
        )
        per_pair = output.predictions
        if per_pair is not None and len(per_pair) > 0:
            per_pair = np.asarray(per_pair, dtype=np.float64)
            sums = metric_sums(*(paddle.to_tensor(per_pair[:, column]) for column in (1, 2, 3, 4))).numpy()
            output.metrics[f"{metric_key_prefix}_loss"] = float(per_pair[:, 0].mean())
            for name, value in zip(METRIC_NAMES, sums):
                output.metrics[f"{metric_key_prefix}_{name}"] = float(value / len(per_pair))
        return output

    def log(self, logs: dict[str, float], **kwargs: Any) -> None:
        """Adds :data:`METRIC_NAMES` to interval logs (they carry ``loss``) and ``train_<name>`` to the
        end-of-training log (it carries ``train_loss``). Called on every rank by the training loop;
        the sums are reduced over ranks (a collective call)."""
        if "loss" in logs:
            metrics = self._interval_metrics.take()
            logs.update({name: round(value, 6) for name, value in (metrics or {}).items()})
        elif "train_loss" in logs:
            metrics = self._run_metrics.take()
            logs.update({f"train_{name}": round(value, 6) for name, value in (metrics or {}).items()})
        super().log(logs, **kwargs)
