"""PPO-Lagrangian (Safe RLHF) math: the cost channel, the combined advantage and the Lagrange multiplier.

Safe RLHF maximises the reward subject to ``E[cost] <= threshold`` by the Lagrangian
``min_lambda>=0 max_pi  E[r] - lambda * (E[c] - threshold)``. The policy step is PPO on the combined
advantage ``(A_r - lambda * A_c) / (1 + lambda)``; the multiplier step is gradient *descent* on
``-(C - threshold) * lambda`` over ``log lambda`` (so lambda grows while the mean episode cost C is
above the threshold and shrinks once it is below).

Shapes: ``B`` rows, ``T`` response columns (the layout of :mod:`alignment.models.ppo_model_utils`).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable, Optional

import paddle

from alignment.models.ppo_model_utils import ClipMode, add_kl_divergence_regularization

__all__ = [
    "add_kl_divergence_to_cost",
    "combine_advantages",
    "lagrangian_loss",
    "LagrangeMultiplier",
]


def add_kl_divergence_to_cost(
    cost: paddle.Tensor,
    log_probs: paddle.Tensor,
    ref_log_probs: paddle.Tensor,
    sequence_mask: paddle.Tensor,
    kl_coeff: float,
    clip_range_score: float,
    clip_mode: ClipMode = "score",
) -> paddle.Tensor:
    """Per-token costs: the KL penalty *added* to the cost channel, the cost-model score at the end.

    ``c_t = +beta * (logp - logp_ref)_t`` at every t, plus ``cost_b`` at the last valid position
    ``e_b`` (safe-rlhf since PR #173: the full beta in both channels). Clipping to ``[-c, c]`` as
    :func:`~alignment.models.ppo_model_utils.add_kl_divergence_regularization` with the same
    ``clip_mode`` (``"score"``: the cost only; ``"total"``: every per-token cost). It is exactly
    ``-add_kl_divergence_regularization(-cost, ...)``, so the two channels share one implementation.

    Args: cost ``[B]``; log_probs, ref_log_probs, sequence_mask ``[B, T]``. Returns ``[B, T]`` float32.
    """
    return -add_kl_divergence_regularization(
        -cost.astype("float32"), log_probs, ref_log_probs, sequence_mask, kl_coeff, clip_range_score, clip_mode
    )


def combine_advantages(
    reward_advantages: paddle.Tensor, cost_advantages: paddle.Tensor, lambda_value: float
) -> paddle.Tensor:
    """``(A_r - lambda * A_c) / (1 + lambda)``: ``[B, T]`` each -> ``[B, T]`` float32 (lambda >= 0, a float)."""
    if reward_advantages.shape != cost_advantages.shape:
        raise ValueError(
            f"reward and cost advantages must have one shape, got {list(reward_advantages.shape)} and "
            f"{list(cost_advantages.shape)}"
        )
    lambda_value = float(lambda_value)
    if not lambda_value >= 0:
        raise ValueError(f"lambda must be >= 0, got {lambda_value}")
    reward_advantages = reward_advantages.astype("float32")
    cost_advantages = cost_advantages.astype("float32")
    return (reward_advantages - lambda_value * cost_advantages) / (1.0 + lambda_value)


def lagrangian_loss(mean_episode_cost: float, threshold: float, log_lambda: float) -> float:
    """``-(C - threshold) * exp(log_lambda)``; its derivative in ``log_lambda`` is the same value."""
    return -(float(mean_episode_cost) - float(threshold)) * math.exp(float(log_lambda))


class LagrangeMultiplier:
    """The Safe RLHF multiplier: ``log lambda`` trained by plain SGD on :func:`lagrangian_loss`.

    * ``add_episode_costs(costs)`` appends episode costs (the cost-model score of each rollout
      sample) to a window of the last ``window_size`` of them. The trainer passes the costs of every
      data-parallel rank, gathered in rank order, so every rank holds the same window.
    * ``step(global_step)``: if ``global_step >= update_delay_steps`` and the window is not empty,
      one SGD step ``log_lambda <- log_lambda - lr * d/dlog_lambda[-(C - threshold) * lambda]``
      ``= log_lambda + lr * (C - threshold) * lambda`` with ``C`` the window mean, then
      ``log_lambda <- min(log_lambda, log(lambda_max))`` when ``lambda_max`` is set. Float64 Python
      arithmetic: identical on every rank given the same window, no broadcast needed.
    * ``state_dict()`` / ``load_state_dict()``: ``log_lambda``, the optimizer state (plain SGD
      has no moments: the number of steps taken) and the window, as JSON-serialisable values.

    Defaults follow safe-rlhf: ``lambda_init`` 1.0, ``lambda_lr`` 0.1, ``lambda_max`` None, threshold
    0.0, no delay, window 128 (upstream keeps a window per rank; here it is the global one).
    """

    def __init__(
        self,
        lambda_init: float = 1.0,
        lambda_lr: float = 0.1,
        lambda_max: Optional[float] = None,
        threshold: float = 0.0,
        update_delay_steps: int = 0,
        window_size: int = 128,
    ) -> None:
        problems = []
        if not lambda_init > 0:
            problems.append(f"lambda_init must be > 0 (lambda is exp(log_lambda)), got {lambda_init}")
        if not lambda_lr >= 0:
            problems.append(f"lambda_lr must be >= 0, got {lambda_lr}")
        if lambda_max is not None and not lambda_max > 0:
            problems.append(f"lambda_max must be > 0 or None, got {lambda_max}")
        if lambda_max is not None and lambda_init > lambda_max:
            problems.append(f"lambda_init ({lambda_init}) must not exceed lambda_max ({lambda_max})")
        if not update_delay_steps >= 0:
            problems.append(f"update_delay_steps must be >= 0, got {update_delay_steps}")
        if not window_size >= 1:
            problems.append(f"window_size must be >= 1, got {window_size}")
        if problems:
            raise ValueError("; ".join(problems))
        self.lambda_lr = float(lambda_lr)
        self.lambda_max = None if lambda_max is None else float(lambda_max)
        self.threshold = float(threshold)
        self.update_delay_steps = int(update_delay_steps)
        self.window_size = int(window_size)
        self.log_lambda = math.log(lambda_init)
        self.num_updates = 0
        self.episode_costs: deque[float] = deque(maxlen=self.window_size)

    @property
    def lambda_value(self) -> float:
        """``lambda = exp(log_lambda)``."""
        return math.exp(self.log_lambda)

    @property
    def max_log_lambda(self) -> Optional[float]:
        return None if self.lambda_max is None else math.log(self.lambda_max)

    def add_episode_costs(self, costs: Iterable[float]) -> bool:
        """Append episode costs (oldest drop out beyond ``window_size``). A batch holding a NaN/inf cost is
        left out whole (the loop skips or stops on that rollout; one NaN would stick in lambda for good):
        returns whether the costs were added."""
        costs = [float(c) for c in costs]
        if not all(math.isfinite(c) for c in costs):
            return False
        self.episode_costs.extend(costs)
        return True

    def mean_episode_cost(self) -> float:
        """Mean of the window (NaN when empty)."""
        return sum(self.episode_costs) / len(self.episode_costs) if self.episode_costs else float("nan")

    def step(self, global_step: int) -> dict[str, float]:
        """One multiplier update (see the class docstring); returns ``train/lambda``, ``train/episode_cost``
        and ``train/lambda_loss`` (the Lagrangian before the step; 0 when no step is taken)."""
        mean_cost = self.mean_episode_cost()
        loss = 0.0
        if global_step >= self.update_delay_steps and self.episode_costs:
            loss = lagrangian_loss(mean_cost, self.threshold, self.log_lambda)
            self.log_lambda -= self.lambda_lr * loss  # d loss / d log_lambda = loss
            if self.max_log_lambda is not None:
                self.log_lambda = min(self.log_lambda, self.max_log_lambda)
            self.num_updates += 1
        return {"train/lambda": self.lambda_value, "train/episode_cost": mean_cost, "train/lambda_loss": loss}

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_lambda": self.log_lambda,
            "optimizer": {"type": "SGD", "lr": self.lambda_lr, "num_updates": self.num_updates},
            "episode_costs": list(self.episode_costs),
            "window_size": self.window_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["window_size"]) != self.window_size:
            raise ValueError(
                f"the checkpoint's episode_cost_window_size is {state['window_size']}, this run's is {self.window_size}"
            )
        self.log_lambda = float(state["log_lambda"])
        self.num_updates = int(state["optimizer"]["num_updates"])
        self.episode_costs = deque((float(c) for c in state["episode_costs"]), maxlen=self.window_size)
