"""DPO and its family (sigmoid, hinge, ipo, simpo, orpo): :class:`DPOTrainer`, its arguments and data
(entry point: ``alignment/dpo/run_dpo.py``; losses in :mod:`alignment.models.dpo_model_utils`)."""

from alignment.dpo.data import DPOCollator, DPODataset, ReferenceLogProbsDataset
from alignment.dpo.dpo_trainer import (
    METRIC_NAMES,
    DPOTrainer,
    DPOTrainingArguments,
    MetricAccumulator,
    PairLogProbs,
    metric_sums,
    pair_log_probs,
    precompute_reference_log_probs,
)

__all__ = [
    "DPOCollator",
    "DPODataset",
    "ReferenceLogProbsDataset",
    "METRIC_NAMES",
    "DPOTrainer",
    "DPOTrainingArguments",
    "MetricAccumulator",
    "PairLogProbs",
    "metric_sums",
    "pair_log_probs",
    "precompute_reference_log_probs",
]
