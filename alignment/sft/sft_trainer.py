"""Supervised fine-tuning: next-token cross-entropy on answer tokens only, and its Trainer.

Batches come from :class:`alignment.data.SupervisedCollator` with ``shift=True``: ``input_ids``
``[batch, seq_len]`` and ``labels`` ``[batch, seq_len]`` where ``labels[b, t]`` is the token that
should follow position ``t`` and is ``IGNORE_INDEX`` (-100) on prompt tokens, user turns and padding.
The loss is computed here from the model's logits (not by the model's own criterion), so it is the
same for every causal-LM architecture and every precision.
"""

from __future__ import annotations

import math
from typing import Any

import paddle
import paddle.nn.functional as F
from paddlenlp.trainer import Trainer

from alignment.data import IGNORE_INDEX
from alignment.utils.trainer import ReliableTrainerMixin

__all__ = ["token_nll", "causal_lm_loss", "perplexity", "lm_logits", "SFTTrainer"]


def token_nll(logits: paddle.Tensor, labels: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Summed negative log-likelihood of the labelled tokens, and how many there are.

    Args:
        logits: ``[batch, seq_len, vocab]`` scores of the token after each position (any float
            dtype; the softmax is taken in float32).
        labels: ``[batch, seq_len]`` int64 target of each position, ``IGNORE_INDEX`` where there is
            nothing to learn.

    Returns:
        ``(nll_sum, num_tokens)``: float32 scalars; ``nll_sum`` in nats.
    """
    nll = F.cross_entropy(
        logits.astype("float32"), labels.unsqueeze(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )  # [batch, seq_len, 1], 0 where ignored
    num_tokens = (labels != IGNORE_INDEX).astype("float32").sum()
    return nll.sum(), num_tokens


def causal_lm_loss(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """Mean negative log-likelihood per labelled token of the batch (nats), a float32 scalar.

    Shapes as in :func:`token_nll`. A batch without labelled tokens has loss 0 (and no gradient).
    """
    nll_sum, num_tokens = token_nll(logits, labels)
    return nll_sum / paddle.clip(num_tokens, min=1.0)


def perplexity(mean_nll: float) -> float:
    """``exp(mean_nll)``: perplexity from a mean per-token NLL in nats (``inf`` on overflow)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def lm_logits(model: paddle.nn.Layer, inputs: dict[str, paddle.Tensor]) -> paddle.Tensor:
    """``[batch, seq_len, vocab]`` next-token logits of a causal LM for a collated SFT batch.

    No labels are passed, so the model returns full-vocabulary logits and skips its own loss.
    """
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], return_dict=True)
    return outputs.logits


class SFTTrainer(ReliableTrainerMixin, Trainer):
    """PaddleNLP ``Trainer`` whose loss is :func:`causal_lm_loss` on answer tokens.

    Checkpoints are written atomically and a non-finite loss stops training (see
    :class:`~alignment.utils.trainer.ReliableTrainerMixin`).

    Evaluation reports ``eval_loss``, the mean NLL per answer token over the whole evaluation set
    (token-weighted across batches and ranks, unlike the Trainer's mean of per-batch losses), and
    ``eval_ppl`` = ``exp(eval_loss)``. With several data-parallel ranks the sampler repeats up to
    ``world_size - 1`` examples to even out the shards; they are counted as they were evaluated.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._eval_nll_sum = 0.0
        self._eval_num_tokens = 0.0

    def compute_loss(self, model, inputs, return_outputs=False):  # noqa: D401 - Trainer hook
        logits = lm_logits(model, inputs)
        loss = causal_lm_loss(logits, inputs["labels"])
        return (loss, logits) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: D401 - Trainer hook
        if self.args.pipeline_parallel_degree > 1:
            raise NotImplementedError("SFT evaluation does not support pipeline parallelism")
        inputs = self._prepare_inputs(inputs)
        with paddle.no_grad(), self.autocast_smart_context_manager():
            nll_sum, num_tokens = token_nll(lm_logits(model, inputs), inputs["labels"])
        self._eval_nll_sum += float(nll_sum)
        self._eval_num_tokens += float(num_tokens)
        return nll_sum / paddle.clip(num_tokens, min=1.0), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval", max_eval_iters=-1):  # fmt: skip
        self._eval_nll_sum, self._eval_num_tokens = 0.0, 0.0
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
            max_eval_iters=max_eval_iters,
        )
        nll_sum, num_tokens = self._global_eval_totals()
        if num_tokens > 0:
            mean_nll = nll_sum / num_tokens
            output.metrics[f"{metric_key_prefix}_loss"] = mean_nll
            output.metrics[f"{metric_key_prefix}_ppl"] = perplexity(mean_nll)
        return output

    def _global_eval_totals(self) -> tuple[float, float]:
        """Evaluation NLL sum and token count summed over the data-parallel ranks."""
        totals = paddle.to_tensor([self._eval_nll_sum, self._eval_num_tokens], dtype="float64")
        if self.args.world_size > 1 and self.args.dataset_world_size > 1:
            paddle.distributed.all_reduce(totals)
            # Ranks that hold replicas of the same data shard (tensor/pipeline parallel) saw the
            # same examples; count each shard once.
            totals = totals / (self.args.world_size // self.args.dataset_world_size)
        nll_sum, num_tokens = totals.tolist()
        return nll_sum, num_tokens
