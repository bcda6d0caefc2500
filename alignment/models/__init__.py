"""Models and model math: score models (reward / cost / critic), normalizers and RM losses."""

from alignment.models.score_model import (
    MODEL_FOR_SCORE_MAPPING,
    AutoModelForScore,
    LlamaModelForScore,
    QWenModelForScore,
)
from alignment.models.score_model_utils import (
    ExponentialMovingAverage,
    IdentityNormalizer,
    Normalizer,
    RunningMeanStd,
    ScoreModelMixin,
    ScoreModelOutput,
    get_normalizer,
    reward_accuracy,
    reward_sequence_loss,
    reward_token_loss,
)

__all__ = [
    "MODEL_FOR_SCORE_MAPPING",
    "AutoModelForScore",
    "LlamaModelForScore",
    "QWenModelForScore",
    "ScoreModelMixin",
    "ScoreModelOutput",
    "Normalizer",
    "RunningMeanStd",
    "ExponentialMovingAverage",
    "IdentityNormalizer",
    "get_normalizer",
    "reward_sequence_loss",
    "reward_token_loss",
    "reward_accuracy",
]
