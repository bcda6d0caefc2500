"""PPO-Lagrangian (Safe RLHF): PPO with a cost model, a cost critic and a learned Lagrange multiplier.

``rl_algorithm: "ppo_lag"`` in ``alignment/ppo/run_ppo.py``. On top of :class:`PPOTrainer`'s data flow
(same R response columns)::

    cost [B]                      cost-model end score (the episode cost; > 0 means unsafe)
    cost_values [B, R]            cost critic
    costs [B, R]                  = add_kl_divergence_to_cost(cost, log_probs, ref_log_probs, ...)
    cost_advantages, cost_returns = get_advantages_and_returns(cost_values, costs, ...)   (own GAE)

and every optimizer update first takes one multiplier step on the mean episode cost of the window
(:class:`~alignment.models.lagrange.LagrangeMultiplier`), then trains, per micro-batch: the reward
critic, the cost critic (both the clipped value loss), and the actor with the PPO-clip loss on
``(A_r - lambda * A_c) / (1 + lambda)``. Trained roles: ``("actor", "reward_critic", "cost_critic")``;
the cost critic is saved as ``cost_value`` next to ``policy`` and ``value``. The multiplier (its
``log_lambda``, its optimizer state and the episode-cost window) is part of every checkpoint.
The math lives in :mod:`alignment.models.lagrange`; this class orchestrates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import paddle
import paddle.distributed as dist

from alignment.models.lagrange import LagrangeMultiplier, add_kl_divergence_to_cost, combine_advantages
from alignment.models.ppo_model_utils import critic_loss_fn, get_advantages_and_returns, make_position_ids, masked_mean
from alignment.ppo.eval_utils import score_sequences
from alignment.ppo.ppo_trainer import PPOTrainer
from alignment.ppo.trainer_utils import StepTrainer, world_info

__all__ = ["PPOLagModelArgument", "PPOLagArguments", "ppo_lag_problems", "gather_in_data_order", "PPOLagTrainer"]


@dataclass
class PPOLagModelArgument:
    """The models PPO-Lag adds (fields of run_ppo's ``ModelArgument``)."""

    cost_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "ppo_lag: cost model checkpoint (frozen; alignment/rm/run_cost.py)."}
    )
    cost_critic_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "ppo_lag: cost critic initialization; defaults to cost_model_name_or_path."}
    )


@dataclass
class PPOLagArguments:
    """The Lagrangian settings of ``rl_algorithm: ppo_lag`` (fields of run_ppo's ``TrainingArguments``);
    defaults are safe-rlhf's."""

    threshold: float = field(default=0.0, metadata={"help": "ppo_lag: bound on the mean episode cost (the constraint)."})
    lambda_init: float = field(default=1.0, metadata={"help": "ppo_lag: initial Lagrange multiplier (> 0)."})
    lambda_lr: float = field(default=0.1, metadata={"help": "ppo_lag: SGD learning rate of log(lambda)."})
    lambda_max: Optional[float] = field(default=None, metadata={"help": "ppo_lag: upper bound of lambda (null: none)."})
    lambda_update_delay_steps: int = field(
        default=0, metadata={"help": "ppo_lag: optimizer steps before lambda starts to move."}
    )
    episode_cost_window_size: int = field(
        default=128, metadata={"help": "ppo_lag: the mean episode cost is over the last N rollout samples (all ranks)."}
    )
    normalize_cost: bool = field(default=False, metadata={"help": "ppo_lag: scale costs with the cost model's saved std."})


def ppo_lag_problems(model_args: Any, args: Any) -> list[tuple[str, str]]:
    """``(argument, message)`` for every bad PPO-Lag setting (checked before any model loads)."""
    problems = []
    if args.rl_algorithm != "ppo_lag":
        for name in ("cost_model_name_or_path", "cost_critic_model_name_or_path"):
            if getattr(model_args, name):
                problems.append((name, f"is a ppo_lag argument, but rl_algorithm is {args.rl_algorithm!r}"))
        return problems
    if not model_args.cost_model_name_or_path:
        problems.append(("cost_model_name_or_path", "is required with rl_algorithm 'ppo_lag' (a cost model from run_cost.py)"))
    if not args.lambda_init > 0:
        problems.append(("lambda_init", f"must be > 0 (lambda = exp(log_lambda)), got {args.lambda_init}"))
    if not args.lambda_lr >= 0:
        problems.append(("lambda_lr", f"must be >= 0, got {args.lambda_lr}"))
    if args.lambda_max is not None:
        if not args.lambda_max > 0:
            problems.append(("lambda_max", f"must be > 0 or null, got {args.lambda_max}"))
        elif args.lambda_init > args.lambda_max:
            problems.append(("lambda_init", f"({args.lambda_init}) must not exceed lambda_max ({args.lambda_max})"))
    if not args.lambda_update_delay_steps >= 0:
        problems.append(("lambda_update_delay_steps", f"must be >= 0, got {args.lambda_update_delay_steps}"))
    if not args.episode_cost_window_size >= 1:
        problems.append(("episode_cost_window_size", f"must be >= 1, got {args.episode_cost_window_size}"))
    return problems


def gather_in_data_order(values: paddle.Tensor) -> paddle.Tensor:
    """``[N]`` per-rank values -> ``[N * data-parallel ranks]`` in data-parallel rank order, the same on
    every rank (tensor/pipeline peers hold the same rollout: one copy is kept). Every rank must call it
    with the same N."""
    if not dist.is_initialized() or dist.get_world_size() <= 1:
        return values
    chunks: list = []
    dist.all_gather(chunks, values)
    ranks: list = []
    dist.all_gather(ranks, paddle.to_tensor([world_info()[0]], dtype="int64"))
    by_rank: dict[int, paddle.Tensor] = {}
    for chunk, rank in zip(chunks, ranks):
        by_rank.setdefault(int(rank.item()), chunk)
    return paddle.concat([by_rank[rank] for rank in sorted(by_rank)])


class PPOLagTrainer(PPOTrainer):
    """Safe RLHF's PPO-Lagrangian over :class:`PPOTrainer` (see the module docstring).

    Args (besides :class:`PPOTrainer`'s):
        cost_critic_trainer: step trainer of the cost critic (role ``"cost_critic"``).
        cost_model: frozen cost score model (``end_scores`` = cost; ``score_type`` cost).
        cost_tokenizer: its tokenizer (rollouts are re-tokenized when it differs from the actor's).
    """

    MODEL_ROLES = ("actor", "reward_critic", "cost_critic")

    def __init__(
        self,
        args: Any,
        actor_trainer: StepTrainer,
        critic_trainer: StepTrainer,
        cost_critic_trainer: StepTrainer,
        cost_model: paddle.nn.Layer,
        cost_tokenizer: Any,
        **ppo_kwargs: Any,
    ) -> None:
        """``ppo_kwargs``: :class:`PPOTrainer`'s keyword arguments (``reference_model``, ``reward_model``,
        ``tokenizer``, ``reward_tokenizer``, ``train_dataset``, ``rollout``, ...)."""
        super().__init__(args, actor_trainer, critic_trainer, extra_trainers={"cost_critic": cost_critic_trainer}, **ppo_kwargs)
        self.cost_model = cost_model
        self.cost_tokenizer = cost_tokenizer
        cost_model.eval()
        for parameter in cost_model.parameters():
            parameter.stop_gradient = True
        self.offload.offload_now("freeze_model", cost_model)
        self.lagrange = LagrangeMultiplier(
            lambda_init=args.lambda_init,
            lambda_lr=args.lambda_lr,
            lambda_max=args.lambda_max,
            threshold=args.threshold,
            update_delay_steps=args.lambda_update_delay_steps,
            window_size=args.episode_cost_window_size,
        )
        self._lambda_step_taken_at = -1  # global_step of the last multiplier step
        self._lambda_metrics: dict[str, float] = {}

    @property
    def cost_critic_trainer(self) -> StepTrainer:
        return self.trainers["cost_critic"]

    # ------------------------------------------------------------------------------- experience
    def cost_score(self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor) -> paddle.Tensor:
        """``[B]`` cost-model score of each sequence (re-tokenized if the CM's tokenizer differs)."""
        with self.offload.use("freeze_model", self.cost_model):
            return score_sequences(
                self.cost_model, input_ids, attention_mask, self.tokenizer, self.cost_tokenizer,
                batch_size=self.args.per_device_experience_batch_size,
            )  # fmt: skip

    @paddle.no_grad()
    def make_experience(self, prompt_input_ids, sequences, attention_mask, prompt_indices=None) -> dict[str, Any]:
        args = self.args
        # The cost forwards first: PPO's experience runs the actor last (see PPOTrainer.make_experience).
        cost = self.cost_score(sequences, attention_mask)
        start, position_ids = prompt_input_ids.shape[1] - 1, make_position_ids(attention_mask)  # as PPO's
        cost_values = self.values_of(self.cost_critic_trainer.rollout_model, sequences, attention_mask, position_ids, start)
        experience = super().make_experience(prompt_input_ids, sequences, attention_mask, prompt_indices)
        mask = experience["response_mask"]
        costs = add_kl_divergence_to_cost(
            cost, experience["old_log_probs"], experience["ref_log_probs"], mask, args.kl_coeff, args.clip_range_score,
            args.clip_mode,
        )  # fmt: skip
        cost_advantages, cost_returns = get_advantages_and_returns(
            cost_values, costs, mask, 0, gamma=args.gamma, gae_lambda=args.gae_lambda
        )
        # The window holds every data-parallel rank's episode costs in one order: the same on all ranks.
        self.lagrange.add_episode_costs(gather_in_data_order(cost.astype("float32")).numpy().tolist())
        metrics = {
            "train/cost": float(cost.mean().item()),
            "train/cost_with_kl_penalty": float((costs * mask.astype("float32")).sum(axis=-1).mean().item()),
            "train/cost_advantage": float(masked_mean(cost_advantages, mask).item()),
            "train/cost_return": float(masked_mean(cost_returns, mask).item()),
            "train/cost_value": float(masked_mean(cost_values, mask).item()),
        }
        experience["metrics"].update(metrics)
        experience["finite_check"].update({"cost": metrics["train/cost"], "cost_advantage": metrics["train/cost_advantage"]})
        experience.update(old_cost_values=cost_values, cost_advantages=cost_advantages, cost_returns=cost_returns)
        return experience

    # ---------------------------------------------------------------------------------- update
    def update_lambda(self) -> dict[str, float]:
        """One multiplier step per optimizer update (at its first micro-batch); returns its metrics."""
        if self._lambda_step_taken_at != self.state.global_step:
            self._lambda_step_taken_at = self.state.global_step
            self._lambda_metrics = self.lagrange.step(self.state.global_step)
        return self._lambda_metrics

    def cost_critic_loss(self, values: paddle.Tensor, batch: dict[str, Any]) -> paddle.Tensor:
        """Clipped value loss of the cost critic's ``values [B, R]``."""
        args = self.args
        return critic_loss_fn(
            values, batch["old_cost_values"], batch["cost_returns"], batch["response_mask"], args.clip_range_value,
            args.loss_mean_type,
        )  # fmt: skip

    def update(self, micro_batches: list[dict[str, Any]], ptx_batches: Any) -> dict[str, float]:
        """The loop's update phase, plus the multiplier's metrics after the rollout's last step:
        ``train/lambda`` (lambda after it), ``train/episode_cost`` (the window mean it used) and
        ``train/lambda_loss``."""
        result = super().update(micro_batches, ptx_batches)
        result.update(self._lambda_metrics)
        return result

    def rl_step(self, batch: dict[str, Any], loss_weight: float, accumulating: bool, actor_accumulating: bool) -> dict[str, float]:
        self.update_lambda()
        reward_critic_loss, _ = self.backward_on(
            "reward_critic", batch, lambda values, b, _: self.critic_loss(values, b), loss_weight, accumulating
        )
        cost_critic_loss, _ = self.backward_on(
            "cost_critic", batch, lambda values, b, _: self.cost_critic_loss(values, b), loss_weight, accumulating
        )
        lambda_value = self.lagrange.lambda_value
        actor_batch = {**batch, "advantages": combine_advantages(batch["advantages"], batch["cost_advantages"], lambda_value)}
        actor_loss, actor_metrics = self.backward_on(
            "actor", actor_batch, self.actor_loss, loss_weight, actor_accumulating, self.ACTOR_METRICS
        )
        return {
            "train/actor_loss": actor_loss,
            "train/reward_critic_loss": reward_critic_loss,
            "train/cost_critic_loss": cost_critic_loss,
            **actor_metrics,
        }

    # ----------------------------------------------------------------------------- checkpoints
    def extra_state(self) -> dict[str, Any]:
        return {"lagrange": self.lagrange.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.lagrange.load_state_dict(state["lagrange"])
