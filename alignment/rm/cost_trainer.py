"""Cost-model training (Safe RLHF): the reward-model trainer on safety pairs with the cost loss.

Batches come from :class:`alignment.data.SafetyPreferenceCollator`: ``safer_*`` / ``unsafer_*`` input
ids and attention masks ``[B, L]`` plus ``safer_safety_sign`` / ``unsafer_safety_sign`` ``[B]`` (+1 safe,
-1 unsafe). A cost is *higher* for the unsafer answer, so the unsafer side plays the reward model's
"better" role (:func:`~alignment.rm.reward_trainer.score_pairs` with ``higher="unsafer"``), and each
answer's *cost sign* is minus its safety sign (a safe answer should cost < 0). The losses are the
pure functions :func:`~alignment.models.score_model_utils.cost_sequence_loss` and
:func:`~alignment.models.score_model_utils.cost_token_loss`; everything else (one forward pass of
``2B`` rows, on-device accuracy counters summed over ranks, gathered evaluation, atomic checkpoints)
is :class:`~alignment.rm.reward_trainer.RewardTrainer`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from alignment.models.score_model_utils import cost_sequence_loss, cost_token_loss
from alignment.rm.reward_trainer import LOSS_TYPES, PairCounter, PairRewards, RewardTrainer, score_pairs

__all__ = ["cost_signs", "cost_pair_loss", "cost_metrics", "CostTrainer"]


def cost_signs(inputs: dict[str, paddle.Tensor]) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(higher, lower)`` cost signs ``[B]`` int64 of the unsafer / safer answers: minus their safety signs."""
    return -inputs["unsafer_safety_sign"], -inputs["safer_safety_sign"]


def cost_pair_loss(
    costs: PairRewards, inputs: dict[str, paddle.Tensor], loss_type: str, regularization: float
) -> paddle.Tensor:
    """The cost-model loss of a batch (scalar float32) for ``loss_type`` ``sequence-wise`` / ``token-wise``."""
    higher_signs, lower_signs = cost_signs(inputs)
    if loss_type == "sequence-wise":
        return cost_sequence_loss(
            costs.higher_end_rewards, costs.lower_end_rewards, higher_signs, lower_signs, regularization
        )
    if loss_type == "token-wise":
        return cost_token_loss(
            costs.higher_rewards, costs.lower_rewards, higher_signs, lower_signs,
            inputs["unsafer_input_ids"], inputs["safer_input_ids"],
            inputs["unsafer_attention_mask"], inputs["safer_attention_mask"], regularization,
        )  # fmt: skip
    raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {list(LOSS_TYPES)}")


def cost_metrics(predictions: np.ndarray) -> dict[str, float]:
    """Evaluation metrics of ``predictions`` [N, 4]: (unsafer cost, safer cost, unsafer sign, safer sign).

    ``accuracy``: fraction of pairs with unsafer cost > safer cost (ties wrong); ``accuracy_sign``:
    fraction of the 2N answers with ``cost_sign * cost > 0``; ``costs_mean`` / ``costs_std``: mean and
    population std of the 2N costs.
    """
    predictions = np.asarray(predictions, dtype="float64")
    if predictions.ndim != 2 or predictions.shape[1] != 4 or predictions.shape[0] == 0:
        raise ValueError(f"predictions must be [N >= 1, 4], got shape {list(predictions.shape)}")
    costs, signs = predictions[:, :2], predictions[:, 2:]
    return {
        "accuracy": float(np.mean(costs[:, 0] > costs[:, 1])),
        "accuracy_sign": float(np.mean(signs * costs > 0)),
        "costs_mean": float(costs.mean()),
        "costs_std": float(costs.std()),
    }


class CostTrainer(RewardTrainer):
    """:class:`RewardTrainer` with the cost loss and metrics (same arguments: ``loss_type``, ``regularization``).

    Training logs carry ``accuracy`` and ``accuracy_sign`` (interval) and ``train_accuracy`` /
    ``train_accuracy_sign`` (whole run); evaluation gives ``eval_accuracy``, ``eval_accuracy_sign``,
    ``eval_costs_mean``, ``eval_costs_std`` (:func:`cost_metrics`) and ``eval_loss``. ``predict`` returns
    ``[N, 4]`` (unsafer cost, safer cost, unsafer cost sign, safer cost sign).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._interval_sign_accuracy = PairCounter()
        self._run_sign_accuracy = PairCounter()

    def compute_loss(self, model, inputs, return_outputs=False):  # noqa: D401 - Trainer hook
        costs = score_pairs(model, inputs, higher="unsafer", lower="safer")
        loss = cost_pair_loss(costs, inputs, self.args.loss_type, self.args.regularization)
        higher_signs, lower_signs = cost_signs(inputs)
        if model.training:
            signed = paddle.concat(
                [higher_signs.astype("float32") * costs.higher_end_rewards, lower_signs.astype("float32") * costs.lower_end_rewards]
            )
            for counter in (self._interval_accuracy, self._run_accuracy):
                counter.add(costs.higher_end_rewards, costs.lower_end_rewards)
            for counter in (self._interval_sign_accuracy, self._run_sign_accuracy):
                counter.add(signed, paddle.zeros_like(signed))  # "correct" = c * cost > 0
        if return_outputs:
            return loss, {
                "higher_end_costs": costs.higher_end_rewards,
                "lower_end_costs": costs.lower_end_rewards,
                "higher_cost_signs": higher_signs,
                "lower_cost_signs": lower_signs,
            }
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: D401 - Trainer hook
        """``(loss, [B, 4] (unsafer cost, safer cost, unsafer sign, safer sign), None)``."""
        inputs = self._prepare_inputs(inputs)
        with paddle.no_grad(), self.autocast_smart_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        columns = ("higher_end_costs", "lower_end_costs", "higher_cost_signs", "lower_cost_signs")
        predictions = paddle.stack([outputs[name].astype("float32") for name in columns], axis=-1)
        return loss.detach(), predictions.detach(), None

    def eval_metrics(self, predictions: np.ndarray) -> dict[str, float]:
        return cost_metrics(predictions)

    def log(self, logs: dict[str, float], **kwargs: Any) -> None:
        """Adds ``accuracy_sign`` / ``train_accuracy_sign`` next to the pair accuracy (a collective call)."""
        if "loss" in logs:
            accuracy = self._interval_sign_accuracy.take()
            if accuracy is not None:
                logs["accuracy_sign"] = round(accuracy, 6)
        elif "train_loss" in logs:
            accuracy = self._run_sign_accuracy.take()
            if accuracy is not None:
                logs["train_accuracy_sign"] = round(accuracy, 6)
        super().log(logs, **kwargs)
