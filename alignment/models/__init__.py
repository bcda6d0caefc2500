"""Models and model math: score models (reward / cost / critic), normalizers, RM losses, PPO math."""

from alignment.models.ppo_model_utils import (
    actor_loss_fn,
    add_kl_divergence_regularization,
    critic_loss_fn,
    gather_log_probabilities,
    get_advantages_and_returns,
    kl_divergence_per_sequence,
    masked_mean,
    ptx_loss_fn,
)
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
    "gather_log_probabilities",
    "masked_mean",
    "add_kl_divergence_regularization",
    "get_advantages_and_returns",
    "actor_loss_fn",
    "critic_loss_fn",
    "ptx_loss_fn",
    "kl_divergence_per_sequence",
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
