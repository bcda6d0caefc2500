"""The RL training loop shared by PPO and its future variants (PPO-Lag, GRPO, REINFORCE++).

One iteration, for each prompt batch of ``per_device_prompt_batch_size`` prompts::

    (eval_mode) export the training weights into the rollout models
    rollout     actor.generate -> sequences                          (timed: generation)
    experience  make_experience(sequences) -> per-token tensors      (timed: experience)
    update      update_iters x for each micro-batch: rl_step (+ ptx) (timed: update)
    bookkeeping log every `logging_steps`, evaluate every `eval_steps`, save every `save_steps`

A subclass implements :meth:`make_experience` and :meth:`rl_step`; everything else (data order,
gradient accumulation, distributed reductions, numerical guards, evaluation, checkpoints and
exact resume) lives here.

**Trained models are declared, not hard-coded.** A trainer class lists the roles it trains in
``MODEL_ROLES`` (``PPOTrainer``: ``("actor", "reward_critic")``; the critic-free trainers:
``("actor",)``; PPO-Lagrangian: ``("actor", "reward_critic", "cost_critic")``) and receives one
:class:`~alignment.ppo.trainer_utils.StepTrainer` per role in ``trainers`` (``self.trainers``,
in that order). The loop then, for every declared role and nothing else: creates the optimizer and
schedule (``setup``), exports the weights into the ``eval_mode`` rollout model, offloads the weights
and the optimizer (``offload_level``), switches train/eval mode, steps or drops the gradients at the
end of each accumulation window, logs ``train/<role>_lr``, saves the weights
(``checkpoint-N/<dir>``, ``output_dir/<dir>`` with ``<dir> = CHECKPOINT_DIRS[role]``, e.g. ``policy``,
``value``, ``cost_value``) and the per-rank optimizer state (``optimizer/<dir>-rank<r>``), and
restores both on resume. Subclasses write their losses with :meth:`backward_on`, which runs one
micro-batch forward + weighted backward on one role under data parallel (``no_sync``), AMP and
pipeline parallel alike, and hands the loss function the response-column head output (logits
``[B, R, V]`` for the actor, values ``[B, R]`` for a critic). Extra trainer state (e.g. a Lagrange
multiplier) goes into checkpoints through :meth:`extra_state` / :meth:`load_extra_state`.

``prompt_batch["prompt_index"]`` holds the dataset indices of the rollout's prompts (passed to
:meth:`make_experience` as ``prompt_indices``) so that rule-based rewards can read each prompt's raw
sample (``train_dataset.raw_sample(i)``).

``global_step`` counts optimizer updates (all declared models step together), as ``max_steps``
does; one rollout makes ``update_iters * micro_batches / gradient_accumulation_steps`` of them.

Parallelism: data-parallel ranks (and sharding ranks) get different prompts; the ranks of one
tensor/pipeline replica get the same prompts and sampling seed, so they roll out identically. With
``eval_mode`` the rollout and the experience run on separate non-pipeline rollout models
(``StepTrainer.eval_model``) that receive the training weights before every rollout and evaluation.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import paddle
import paddle.distributed as dist

from alignment.data.base import IGNORE_INDEX
from alignment.models.ppo_model_utils import make_rollout_attention_mask, ptx_loss_fn
from alignment.ppo.comm_utils import OffloadManager, model_parallel_broadcast_guard, tensor_parallel_degree
from alignment.ppo.trainer_utils import (
    GlobalBatchSampler,
    IntegrationReporter,
    StepTrainer,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    any_across_ranks,
    is_first_model_replica,
    rollout_seed,
    world_info,
)
from alignment.utils.checkpoint import (
    CheckpointError,
    get_last_checkpoint,
    nonfinite_names,
    load_json,
    load_tensor_state,
    publish_directory,
    rotate_checkpoints,
    save_json,
    save_tensor_state,
    verify_checkpoint,
)
from alignment.utils.env import release_free_memory
from alignment.utils.metrics import MetricsLogger, is_main_process, truncate_metrics

__all__ = ["RLTrainer", "TrainerState", "NonFiniteError", "RolloutSettings", "response_logits"]

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


class NonFiniteError(FloatingPointError):
    """A loss, reward or KL became NaN/inf and ``on_nonfinite`` is ``"stop"``."""


@dataclass
class TrainerState:
    """Counters that make a run resumable at rollout boundaries."""

    global_step: int = 0  # optimizer updates done
    rollouts: int = 0  # prompt batches consumed, all epochs together
    epoch: int = 0
    batch_in_epoch: int = 0  # next prompt batch of `epoch`
    skipped_updates: int = 0
    last_logged_step: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RolloutSettings:
    """Sampling settings of rollout generation (the seed's generation arguments)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    do_sample: bool = True
    backend: str = "auto"


def response_logits(
    model: paddle.nn.Layer, input_ids: paddle.Tensor, attention_mask: paddle.Tensor, position_ids: paddle.Tensor, start: int
) -> paddle.Tensor:
    """``[B, L - 1 - start, V]`` logits at positions ``start .. L-2`` (predicting tokens ``start+1 ..``).

    When the causal LM exposes its backbone and ``lm_head`` (PaddleNLP models do), the vocabulary
    projection runs on those positions only: prompt positions never need logits, and the head is
    the largest matmul of a small model. A wrapped model (``DataParallel``, fleet) runs its usual
    full forward so its gradient hooks fire; the result is the same.
    """
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    head = getattr(model, "lm_head", None)
    if backbone is None or head is None or getattr(model.config, "sequence_parallel", False):
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, return_dict=True).logits
        return logits[:, start:-1]
    hidden = backbone(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, return_dict=True)[0]
    return head(hidden[:, start:-1], tensor_parallel_output=False)


class RLTrainer(abc.ABC):
    """Base RL loop over the declared trained models (``MODEL_ROLES``) plus frozen models.

    Args:
        args: the PPO ``TrainingArguments`` (see ``alignment/ppo/run_ppo.py``).
        trainers: one ``StepTrainer`` per role of ``MODEL_ROLES`` (``"actor"`` always; critics
            such as ``"reward_critic"``, ``"cost_critic"``), stepped in this order.
        tokenizer: the actor's tokenizer (left padding); ``eos_token_id``/``pad_token_id`` used.
        train_dataset: ``PromptOnlyDataset`` of rollout prompts.
        eval_dataset: optional ``PromptOnlyDataset`` for evaluation.
        ptx_dataset: optional ``SupervisedDataset`` for the ptx (pretraining-mix) loss.
        rollout: generation settings.
    """

    #: The roles this trainer trains (one ``StepTrainer`` each); ``"actor"`` is the policy.
    MODEL_ROLES: tuple[str, ...] = ("actor",)
    #: Sub-directory of a role's weights in checkpoints and ``output_dir`` (default: the role name).
    CHECKPOINT_DIRS: dict[str, str] = {"actor": "policy", "reward_critic": "value", "cost_critic": "cost_value"}
    #: Roles whose model is a policy (head output: logits); the others are critics (head output: scores).
    POLICY_ROLES: tuple[str, ...] = ("actor",)

    def __init__(
        self,
        args: Any,
        trainers: dict[str, StepTrainer],
        tokenizer: Any,
        train_dataset: Any,
        rollout: RolloutSettings,
        eval_dataset: Any = None,
        ptx_dataset: Any = None,
        generate_fn: Callable[..., paddle.Tensor] | None = None,
    ) -> None:
        self.args = args
        if sorted(trainers) != sorted(self.MODEL_ROLES):
            raise ValueError(
                f"{type(self).__name__} trains {list(self.MODEL_ROLES)} but got step trainers for {sorted(trainers)}"
            )
        self.trainers: dict[str, StepTrainer] = dict(trainers)
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.ptx_dataset = ptx_dataset
        self.rollout_settings = rollout
        self._generate_fn = generate_fn
        self.rollout_log_probs: paddle.Tensor | None = None  # see sample_rollout
        # role -> (global step, input_ids, head output) computed with gradients in the experience phase
        # for the first update (first_update_reuses_experience); backward_on takes the output instead of
        # running the forward again, for exactly those rows at that step, and drops it otherwise
        self.reused_outputs: dict[str, tuple[int, paddle.Tensor, paddle.Tensor]] = {}
        self._warned_rollout_log_probs = False
        self.state = TrainerState()
        self.dp_rank, self.dp_world = world_info()
        self.offload = OffloadManager(self._effective_offload_level(getattr(args, "offload_level", "")))

        self.rows_per_rollout = args.per_device_prompt_batch_size * rollout.num_return_sequences
        self.micro_batches_per_rollout = self.rows_per_rollout // args.per_device_train_batch_size
        self.updates_per_rollout = args.update_iters * self.micro_batches_per_rollout // args.gradient_accumulation_steps
        self.prompt_sampler = GlobalBatchSampler(
            len(train_dataset), args.per_device_prompt_batch_size, self.dp_rank, self.dp_world, shuffle=True, seed=args.seed,
            drop_last=args.dataloader_drop_last,
        )  # fmt: skip
        if len(self.prompt_sampler) == 0:
            raise ValueError(
                f"train dataset has {len(train_dataset)} prompts, fewer than one global prompt batch "
                f"({self.prompt_sampler.global_batch_size} = per_device_prompt_batch_size x data-parallel ranks)"
            )
        self.prompt_loader = paddle.io.DataLoader(
            _IndexedDataset(train_dataset), batch_sampler=self.prompt_sampler,
            collate_fn=_IndexedCollator(train_dataset.get_collator()), num_workers=0,
        )  # fmt: skip
        if ptx_dataset is not None:
            self.ptx_sampler = GlobalBatchSampler(
                len(ptx_dataset), self.rows_per_rollout, self.dp_rank, self.dp_world, shuffle=True, seed=args.seed + 1
            )
            if len(self.ptx_sampler) == 0:
                raise ValueError(
                    f"ptx dataset has {len(ptx_dataset)} examples, fewer than one global ptx batch "
                    f"({self.ptx_sampler.global_batch_size})"
                )
            self.ptx_collator = ptx_dataset.get_collator(shift=True)

        rollouts_per_epoch = len(self.prompt_sampler)
        if args.max_steps > 0:
            self.total_steps = args.max_steps
            self.num_epochs = math.ceil(args.max_steps / (self.updates_per_rollout * rollouts_per_epoch))
        else:
            total_rollouts = int(rollouts_per_epoch * args.num_train_epochs)
            self.total_steps = max(total_rollouts * self.updates_per_rollout, 1)
            self.num_epochs = math.ceil(args.num_train_epochs)
        for trainer in self.trainers.values():
            trainer.setup(self.total_steps)

        logging_dir = args.logging_dir if "visualdl" in (args.report_to or []) else None
        self.metrics_logger = MetricsLogger(args.output_dir, visualdl_dir=logging_dir)
        # report_to tensorboard / wandb (flushed at every log; validate_arguments refused them if not installed)
        self.reporter = IntegrationReporter(args.report_to, args.logging_dir, config=args, enabled=is_main_process())
        self._pending: list[dict[str, float]] = []
        self.last_evaluation: tuple[int, dict[str, float]] | None = None

    @property
    def actor_trainer(self) -> StepTrainer:
        """The policy's step trainer."""
        return self.trainers["actor"]

    @property
    def trained_models(self) -> list[paddle.nn.Layer]:
        return [trainer.model for trainer in self.trainers.values()]

    @property
    def optimizers(self) -> list[Any]:
        return [trainer.optimizer for trainer in self.trainers.values()]

    @property
    def uses_eval_models(self) -> bool:
        """True when separate rollout models do the rollout and experience (``eval_mode``)."""
        return self.actor_trainer.eval_model is not None

    def _effective_offload_level(self, offload_level: str) -> str:
        levels = (offload_level or "").split()
        if "train_model" in levels and not self.uses_eval_models:
            logger.warning(
                "offload_level 'train_model' needs eval_mode: without a separate rollout model the training "
                "weights are used in every phase, so they stay in place"
            )
            levels.remove("train_model")
        return " ".join(levels)

    def export_rollout_models(self) -> None:
        """Give the rollout models (``eval_mode``) the current training weights (collective)."""
        for trainer in self.trainers.values():
            trainer.export_evaluate_model()

    # ------------------------------------------------------------------------------ subclass API
    @abc.abstractmethod
    def make_experience(
        self,
        prompt_input_ids: paddle.Tensor,
        sequences: paddle.Tensor,
        attention_mask: paddle.Tensor,
        prompt_indices: list[int] | None = None,
    ) -> dict[str, Any]:
        """Per-token training targets of one rollout (no gradients). Returns a dict of tensors
        with a leading batch axis (split into micro-batches by the loop) and python scalars.

        ``prompt_indices``: dataset indices of the ``[P]`` prompts (rows ``i*n .. i*n+n-1`` of
        ``sequences`` answer prompt ``i``), when known."""

    @abc.abstractmethod
    def rl_step(self, batch: dict[str, Any], loss_weight: float, accumulating: bool, actor_accumulating: bool) -> dict[str, float]:
        """Backward passes of one micro-batch (critics, then actor); returns float metrics.

        ``loss_weight`` scales the micro-batch losses so that the accumulated, data-parallel
        averaged gradient is the global mean (see :meth:`loss_weights`). ``accumulating`` (critics)
        and ``actor_accumulating`` say whether this backward must skip the data-parallel
        gradient all-reduce (see ``StepTrainer.no_sync``).
        """

    def first_update_reuses_experience(self, rows: int) -> bool:
        """Whether the experience forward of the trained policy may also serve as its first update's forward.

        Exactly when the update sees the rollout as it is, with the weights it was scored with: one pass
        (``update_iters`` 1) over one micro-batch holding all ``rows`` (``per_device_train_batch_size``,
        ``per_device_experience_batch_size``), no accumulation, no ptx term, and the training model is the
        rollout model (no ``eval_mode`` copy, no pipeline). Then ``old_log_probs`` are that forward's
        log-probs (the ratio is exactly 1, as it would be) and one forward pass per step is saved.
        """
        args, trainer = self.args, self.actor_trainer
        chunk = args.per_device_experience_batch_size
        return (
            args.update_iters == 1 and args.gradient_accumulation_steps == 1 and args.per_device_train_batch_size >= rows
            and (chunk is None or chunk >= rows) and self.ptx_dataset is None
            and trainer.pipeline is None and trainer.eval_model is None
        )  # fmt: skip

    def _take_reused_output(self, role: str, input_ids: paddle.Tensor) -> paddle.Tensor | None:
        """The kept experience output of ``role`` if it was computed on these rows with the current weights
        (no optimizer step since); None otherwise. Either way it is dropped."""
        reused = self.reused_outputs.pop(role, None)
        if reused is None:
            return None
        step, rows, output = reused
        same_rows = list(rows.shape) == list(input_ids.shape) and bool(paddle.equal_all(rows, input_ids))
        return output if step == self.state.global_step and same_rows else None

    def backward_on(
        self,
        role: str,
        batch: dict[str, Any],
        loss_fn: Callable[[paddle.Tensor, dict[str, Any], dict[str, float]], paddle.Tensor],
        loss_weight: float,
        accumulating: bool,
        metric_keys: tuple[str, ...] = (),
    ) -> tuple[float, dict[str, float]]:
        """Forward, loss and ``loss_weight``-scaled backward of one micro-batch on model ``role``.

        ``loss_fn(output, batch, metrics) -> scalar`` gets the head output on the response columns
        ``start .. L-2``: logits ``[B, R, V]`` for a policy role, values ``[B, R]`` for a critic; it
        may record float metrics in ``metrics`` (the keys of ``metric_keys``). Under pipeline
        parallel the loss runs on the last stage and those metrics are broadcast to every stage.
        Returns ``(unscaled loss, metrics)``.
        """
        trainer = self.trainers[role]
        start = batch["start"]
        policy = role in self.POLICY_ROLES
        metrics: dict[str, float] = {}
        release_free_memory()  # the previous model's freed activations, before this one builds its graph

        def head_loss(output: paddle.Tensor, micro_batch: dict[str, Any]) -> paddle.Tensor:
            output = output[:, start:-1] if policy else output[:, start:-1, 0]
            return loss_fn(output, micro_batch, metrics)

        if trainer.pipeline is not None:  # the last stage's head output: logits [B, L, V] or scores [B, L, 1]
            loss = trainer.pipeline_step(batch, head_loss, loss_weight)
            if metric_keys:
                local = paddle.to_tensor([metrics[k] for k in metric_keys], dtype="float32") if metrics else None
                values = trainer.pipeline._from_last_stage(local).numpy().tolist()
                metrics = dict(zip(metric_keys, values))
            return loss, metrics
        with trainer.no_sync(accumulating), trainer.autocast():
            inputs = (batch["input_ids"], batch["attention_mask"], batch["position_ids"])
            output = self._take_reused_output(role, batch["input_ids"])  # the experience phase's forward
            if output is None and policy:
                output = response_logits(trainer.model_wrapped, *inputs, start)
            elif output is None:
                output = trainer.model_wrapped(inputs[0], attention_mask=inputs[1], position_ids=inputs[2], return_dict=True).scores
                output = output[:, start:-1, 0]
            loss = loss_fn(output, batch, metrics)
            trainer.backward(loss * loss_weight)
        return float(loss.item()), metrics

    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable trainer state saved with every checkpoint (none by default)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def loss_weight_basis(self, batch: dict[str, Any]) -> float:
        """How many loss terms a micro-batch contributes to the global mean (tokens by default)."""
        return float(batch["response_mask"].astype("float32").sum().item())

    # --------------------------------------------------------------------------------- generation
    def generate(
        self,
        input_ids: paddle.Tensor,
        attention_mask: paddle.Tensor,
        do_sample: bool | None = None,
        num_return_sequences: int | None = None,
        return_log_probs: bool = False,
    ):
        """Left-padded prompts ``[B, S]`` -> prompt + response ``[B * n, S + N]`` (pad after EOS).

        ``return_log_probs``: return ``(sequences, log_probs [B * n, N] or None)`` instead, the rollout
        backend's log-prob of every generated token (None when the backend cannot give them)."""
        settings = self.rollout_settings
        do_sample = settings.do_sample if do_sample is None else do_sample
        if num_return_sequences is None:
            num_return_sequences = settings.num_return_sequences
        generate = self._generate_fn
        if generate is None:
            from alignment.ppo.infer_utils import generate_rollout as generate
        model = self.actor_trainer.rollout_model
        # (a custom generate function returns sequences only)
        extra = {"return_log_probs": True} if return_log_probs and self._generate_fn is None else {}
        with model_parallel_broadcast_guard(model):
            result = generate(
                model,
                input_ids,
                attention_mask,
                max_new_tokens=settings.max_new_tokens,
                do_sample=do_sample,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                repetition_penalty=settings.repetition_penalty,
                num_return_sequences=num_return_sequences,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                backend=settings.backend,
                progress=not self.args.disable_tqdm and is_main_process(),
                **extra,
            )
        if return_log_probs and not extra:
            return result, None
        return result

    def sample_rollout(self, prompt_batch: dict[str, Any]) -> paddle.Tensor:
        """The rollout's sequences ``[P * n, S + N]``, with reproducible sampling.

        By default the sampling RNG is seeded from ``(seed, global_step, data-parallel rank)``: all ranks
        of a tensor/pipeline replica sample the same responses. With ``rollout_seed_per_prompt`` each
        prompt's n samples are drawn separately from ``(seed, global_step, its dataset index)``, so the
        responses do not depend on how prompts are spread over ranks (N processes reproduce one) at the
        cost of one generation call per prompt.

        With ``rollout_log_probs`` the backend's log-probs of the generated tokens are kept in
        ``self.rollout_log_probs`` (``[P * n, N]``, 0 after EOS; None when the backend gives none).
        """
        args, step = self.args, self.state.global_step
        indices = prompt_batch.get("prompt_index")
        want_log_probs = bool(getattr(args, "rollout_log_probs", False))
        self.rollout_log_probs = None
        if not getattr(args, "rollout_seed_per_prompt", False) or indices is None:
            paddle.seed(rollout_seed(args.seed, step, self.dp_rank))
            result = self.generate(prompt_batch["input_ids"], prompt_batch["attention_mask"], return_log_probs=want_log_probs)
            sequences, self.rollout_log_probs = result if want_log_probs else (result, None)
        else:
            input_ids, attention_mask = prompt_batch["input_ids"], prompt_batch["attention_mask"]
            prompt_width, pad = input_ids.shape[1], self.tokenizer.pad_token_id
            parts, log_prob_parts = [], []
            for row, index in enumerate(indices):
                paddle.seed(rollout_seed(args.seed, step, 1_000_003 + int(index)))
                real = int(attention_mask[row].astype("int64").sum())  # generate from the unpadded prompt: the
                prompt = input_ids[row : row + 1, prompt_width - real :]  # same input whatever the batch width
                result = self.generate(prompt, paddle.ones_like(prompt, dtype=attention_mask.dtype), return_log_probs=want_log_probs)
                generated, log_probs = result if want_log_probs else (result, None)
                left = paddle.full([generated.shape[0], prompt_width - real], pad, dtype=generated.dtype)
                parts.append(paddle.concat([left, generated], axis=1))
                log_prob_parts.append(log_probs)
            width = max(part.shape[1] for part in parts)
            sequences = paddle.concat([_pad_columns(part, width, pad) for part in parts], axis=0)
            if want_log_probs and all(part is not None for part in log_prob_parts):
                self.rollout_log_probs = paddle.concat(
                    [_pad_columns(part, width - prompt_width, 0.0) for part in log_prob_parts], axis=0
                )
        if want_log_probs and self.rollout_log_probs is None and not self._warned_rollout_log_probs:
            self._warned_rollout_log_probs = True
            logger.warning(
                "rollout_log_probs: this rollout backend gives no log-probs (only the fast CPU decoder does); "
                "old_log_probs come from an actor forward pass as without the option"
            )
        return sequences

    # ---------------------------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: str | None = None) -> TrainerState:
        """Run until ``total_steps`` optimizer updates; returns the final state."""
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint)
        if self.uses_eval_models:  # the rollout models do the rollout; the update reloads the weights
            self.offload.offload_now("train_model", *self.trained_models)
        args = self.args
        progress = _progress(self.total_steps, self.state.global_step, disable=args.disable_tqdm or not is_main_process())
        logger.info(
            "PPO: %d updates (%d per rollout of %d rows x %d update_iters, grad accumulation %d), %d epoch(s), "
            "%d data-parallel rank(s)", self.total_steps, self.updates_per_rollout, self.rows_per_rollout,
            args.update_iters, args.gradient_accumulation_steps, self.num_epochs, self.dp_world,
        )  # fmt: skip
        try:
            while self.state.global_step < self.total_steps and self.state.epoch < self.num_epochs:
                self.prompt_sampler.set_epoch(self.state.epoch, self.state.batch_in_epoch)
                for prompt_batch in self.prompt_loader:
                    if self.state.global_step >= self.total_steps:
                        break
                    before = self.state.global_step
                    self.train_on_rollout(prompt_batch)
                    self.state.rollouts += 1
                    self.state.batch_in_epoch += 1
                    progress.update(self.state.global_step - before)
                    self.maybe_log_evaluate_save(before)
                else:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    continue
                break
        finally:
            progress.close()
        self.flush_logs(force=True)
        return self.state

    def train_on_rollout(self, prompt_batch: dict[str, paddle.Tensor]) -> None:
        """Generate, build experience, and make ``updates_per_rollout`` optimizer updates."""
        self.set_train(False)
        start = time.perf_counter()
        release_free_memory()  # the last update's freed activations: keeps peak RSS near the live memory
        self.export_rollout_models()
        with paddle.no_grad():
            sequences = self.sample_rollout(prompt_batch)
            generated = time.perf_counter()
            attention_mask = make_rollout_attention_mask(prompt_batch["attention_mask"], sequences, self.tokenizer.eos_token_id)
            experience = self.make_experience(
                prompt_batch["input_ids"], sequences, attention_mask, prompt_indices=prompt_batch.get("prompt_index")
            )
        experienced = time.perf_counter()

        metrics: dict[str, float] = dict(experience.get("metrics", {}))
        if self.check_finite(experience.get("finite_check", {}), what="rollout"):
            micro_batches = self.split_micro_batches(experience)
            ptx_batches = self.ptx_micro_batches(self.state.rollouts) if self.ptx_dataset is not None else None
            self.set_train(True)
            release_free_memory()  # the rollout's freed decoder weights and KV cache
            with self.offload.use("train_model", *self.trained_models), self.offload.use("optimizer", *self.optimizers):
                metrics.update(self.update(micro_batches, ptx_batches))
        else:
            self.state.global_step += self.updates_per_rollout  # keep schedules aligned with the plan
            self.state.skipped_updates += self.updates_per_rollout
        self.reused_outputs.clear()  # (a skipped update leaves its graph here)
        updated = time.perf_counter()
        metrics["train/generation_seconds"] = generated - start
        metrics["train/experience_seconds"] = experienced - generated
        metrics["train/update_seconds"] = updated - experienced
        self._pending.append(metrics)

    def split_micro_batches(self, experience: dict[str, Any]) -> list[dict[str, Any]]:
        size = self.args.per_device_train_batch_size
        rows = next(v.shape[0] for v in experience.values() if isinstance(v, paddle.Tensor))
        batches = []
        for begin in range(0, rows, size):
            batches.append(
                {k: (v[begin : begin + size] if isinstance(v, paddle.Tensor) and v.ndim > 0 and v.shape[0] == rows else v)
                 for k, v in experience.items() if k not in ("metrics", "finite_check")}
            )  # fmt: skip
        return batches

    def loss_weights(self, micro_batches: list[dict[str, Any]], passes: int = 1) -> list[float]:
        """Loss multipliers of the ``passes x len(micro_batches)`` micro-steps of :meth:`update`.

        The update visits the micro-batches ``passes`` times (``update_iters``) in the same order and
        steps the optimizers every ``gradient_accumulation_steps`` micro-steps, so an accumulation
        window may straddle two passes: windows are cut from that whole schedule, not from one pass.
        Each micro-batch loss is a mean over its own ``n_i`` terms (tokens). Weighting it by
        ``n_i * world / N`` (``N`` = terms in its window over all data-parallel ranks) makes the
        summed, rank-averaged gradient that of the mean over all ``N`` terms: the result no
        longer depends on how the global batch was split across ranks, micro-batches and passes.
        With one rank and no accumulation every weight is 1 (PaddleNLP's micro-batch mean).
        Returns one weight per micro-step, in schedule order (``weights[position]``).
        """
        accumulation = self.args.gradient_accumulation_steps
        counts = [self.loss_weight_basis(batch) for batch in micro_batches] * passes
        windows = [counts[begin : begin + accumulation] for begin in range(0, len(counts), accumulation)]
        totals = all_reduce_sum([sum(window) for window in windows]) if windows else []  # one collective
        weights = []
        for window, total in zip(windows, totals):
            for count in window:
                weights.append(count * self.dp_world / total if total > 0 else 0.0)
        return weights

    def update(self, micro_batches: list[dict[str, Any]], ptx_batches: list[dict[str, Any]] | None) -> dict[str, float]:
        """``update_iters`` passes over the micro-batches; steps optimizers every accumulation window."""
        args = self.args
        accumulation = args.gradient_accumulation_steps
        weights = self.loss_weights(micro_batches, args.update_iters)  # one per micro-step of all passes
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        position = 0
        window_finite = True
        for _ in range(args.update_iters):
            for index, batch in enumerate(micro_batches):
                accumulating = (position + 1) % accumulation != 0
                # With ptx the actor's last backward of the window is the ptx one: only it may
                # trigger the data-parallel gradient all-reduce.
                metrics = self.rl_step(batch, weights[position], accumulating, actor_accumulating=accumulating or ptx_batches is not None)
                if ptx_batches is not None:
                    metrics.update(self.ptx_step(ptx_batches[index], accumulating))
                window_finite &= all(math.isfinite(v) for k, v in metrics.items() if k.endswith("loss"))
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                position += 1
                if not accumulating:
                    self.finish_update(window_finite, metrics)
                    window_finite = True
                    if self.state.global_step >= self.total_steps:  # max_steps may end mid-rollout
                        break
            else:
                continue
            break
        result = {key: sums[key] / counts[key] for key in sums}
        for role, trainer in self.trainers.items():
            result[f"train/{role}_lr"] = trainer.learning_rate
        return result

    def finish_update(self, finite: bool, last_metrics: dict[str, float]) -> None:
        """Step every declared optimizer, unless a non-finite loss was seen in the window on any rank."""
        if self.check_finite({"loss": 0.0 if finite else float("nan")}, what="update", summary=last_metrics):
            for trainer in self.trainers.values():
                trainer.optimizer_step()
        else:
            for trainer in self.trainers.values():
                trainer.zero_grad()
            self.state.skipped_updates += 1
        self.state.global_step += 1

    def check_finite(self, values: dict[str, float], what: str, summary: dict[str, float] | None = None) -> bool:
        """True if every value is finite on every rank; else skip (False) or raise per ``on_nonfinite``."""
        bad = {key: value for key, value in values.items() if not math.isfinite(value)}
        if not any_across_ranks(bool(bad)):
            return True
        message = (
            f"non-finite {what} at step {self.state.global_step} (rollout {self.state.rollouts}): "
            f"{bad or 'on another rank'}; batch summary: {json.dumps(summary or values, default=str)}"
        )
        if self.args.on_nonfinite == "stop":
            raise NonFiniteError(message + " (on_nonfinite='stop'; the last checkpoint is intact)")
        logger.warning("%s -> skipping this %s (on_nonfinite='skip')", message, what)
        return False

    def ptx_micro_batches(self, rollout_index: int) -> list[dict[str, paddle.Tensor]]:
        """The ptx batch paired with rollout ``rollout_index``, split like the RL micro-batches."""
        epoch, batch = divmod(rollout_index, len(self.ptx_sampler))
        self.ptx_sampler.set_epoch(epoch, batch)
        indices = next(iter(self.ptx_sampler))
        size = self.args.per_device_train_batch_size
        return [self.ptx_collator([self.ptx_dataset[i] for i in indices[b : b + size]]) for b in range(0, len(indices), size)]

    def ptx_step(self, batch: dict[str, paddle.Tensor], accumulating: bool) -> dict[str, float]:
        """``ptx_coeff`` x language-model loss of the actor, accumulated into the same update."""
        trainer = self.actor_trainer
        scale = self.args.ptx_coeff / self.args.gradient_accumulation_steps
        if trainer.pipeline is not None:
            loss = trainer.pipeline_step(
                batch, lambda logits, micro_batch: ptx_loss_fn(logits, micro_batch["labels"], ignore_index=IGNORE_INDEX), scale
            )
            return {"train/ptx_loss": loss}
        with trainer.no_sync(accumulating), trainer.autocast():
            logits = trainer.model_wrapped(
                batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, return_dict=True
            ).logits
            loss = ptx_loss_fn(logits, batch["labels"], ignore_index=IGNORE_INDEX)
            trainer.backward(scale * loss)
        return {"train/ptx_loss": float(loss.item())}

    def set_train(self, mode: bool) -> None:
        for trainer in self.trainers.values():
            trainer.train(mode)

    # ----------------------------------------------------------------------- log / eval / save
    def maybe_log_evaluate_save(self, step_before: int) -> None:
        args, step = self.args, self.state.global_step

        def crossed(interval: int) -> bool:
            return interval > 0 and step // interval > step_before // interval

        if crossed(args.logging_steps) or step >= self.total_steps:
            self.flush_logs()
        if args.do_eval and self.eval_dataset is not None and _strategy(args.evaluation_strategy) == "steps" and crossed(args.eval_steps):
            self.log_metrics(self.evaluate())
        if _strategy(args.save_strategy) == "steps" and crossed(args.save_steps):
            self.save_checkpoint()
        epoch_done = self.state.batch_in_epoch >= len(self.prompt_sampler)
        if epoch_done and args.do_eval and self.eval_dataset is not None and _strategy(args.evaluation_strategy) == "epoch":
            self.log_metrics(self.evaluate())
        if epoch_done and _strategy(args.save_strategy) == "epoch":
            self.save_checkpoint()

    def flush_logs(self, force: bool = False) -> None:
        """Average the pending per-rollout metrics over rollouts and ranks and log them."""
        if not self._pending:
            return
        keys = sorted({k for m in self._pending for k in m})
        local = {k: float(np.mean([m[k] for m in self._pending if k in m])) for k in keys}
        maxima = [k for k in keys if k.startswith("train/max_")]
        means = [k for k in keys if k not in maxima]
        reduced = dict(zip(means, all_reduce_mean([local[k] for k in means])))
        reduced.update(zip(maxima, all_reduce_max([max(m[k] for m in self._pending if k in m) for k in maxima])))
        reduced["train/skipped_updates"] = self.state.skipped_updates
        self._pending = []
        self.log_metrics(reduced)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        metrics = {**metrics, "epoch": self.state.epoch + self.state.batch_in_epoch / max(len(self.prompt_sampler), 1)}
        self.metrics_logger.log(metrics, step=self.state.global_step)
        self.reporter.log(metrics, step=self.state.global_step)
        if is_main_process():
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if not k.endswith("_seconds")}
            logger.info("step %d: %s", self.state.global_step, shown)
        self.state.last_logged_step = self.state.global_step

    def evaluate(self) -> dict[str, float]:
        """Generate for every eval prompt, score with the reward model, write the generations."""
        from alignment.ppo.eval_utils import evaluate_policy

        self.set_train(False)
        self.export_rollout_models()
        metrics = evaluate_policy(self, self.eval_dataset, step=self.state.global_step)
        self.last_evaluation = (self.state.global_step, metrics)
        return metrics

    # ----------------------------------------------------------------------------- checkpoints
    def model_parts(self) -> dict[str, StepTrainer]:
        """Trainable parts saved into checkpoints, by sub-directory name (``CHECKPOINT_DIRS``)."""
        return {self.CHECKPOINT_DIRS.get(role, role): trainer for role, trainer in self.trainers.items()}

    def check_weights_finite(self, what: str) -> None:
        """Raise :class:`NonFiniteError` on every rank if a trained model holds NaN/inf weights, before
        ``what`` is written: a diverged model is never published (whatever ``on_nonfinite`` says)."""
        bad = [f"{name}:{param}" for name, trainer in self.model_parts().items()
               for param in nonfinite_names(trainer.model.named_parameters())]  # fmt: skip
        if any_across_ranks(bool(bad)):
            good = get_last_checkpoint(self.args.output_dir)
            last = f"the last good checkpoint is {good}" if good else "no checkpoint was written"
            raise NonFiniteError(
                f"non-finite weights at step {self.state.global_step} ({', '.join(bad[:3]) or 'on another rank'}"
                f"{', ...' if len(bad) > 3 else ''}): not saving {what}; {last}. Lower the learning rates."
            )

    def save_checkpoint(self) -> str:
        """Write ``output_dir/checkpoint-<step>`` atomically (all ranks must call)."""
        self.check_weights_finite(f"checkpoint-{self.state.global_step}")
        final = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        scratch = final + ".tmp"
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
            os.makedirs(scratch)
        _barrier()
        for name, trainer in self.model_parts().items():
            self.save_model(trainer, os.path.join(scratch, name))
            if self._owns_optimizer_state(trainer):
                os.makedirs(os.path.join(scratch, "optimizer"), exist_ok=True)
                tensors, extras = trainer.optimizer_state()
                prefix = os.path.join(scratch, "optimizer", f"{name}-rank{rank}")
                save_tensor_state(prefix + ".safetensors", tensors)
                save_json(prefix + ".json", extras)
        if rank == 0:
            saved = {"state": self.state.to_dict(), "dp_world": self.dp_world}
            extra = self.extra_state()
            if extra:
                saved["extra_state"] = extra
            save_json(os.path.join(scratch, TRAINER_STATE), saved)
        _barrier()
        if rank == 0:
            publish_directory(scratch, final)
            rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)
            logger.info("saved checkpoint %s", final)
        _barrier()
        return final

    def _owns_optimizer_state(self, trainer: StepTrainer) -> bool:
        """Rank 0 saves replicated optimizer state; with sharding/TP/PP every rank saves its part."""
        args = self.args
        sharded = bool(args.sharding) or args.tensor_parallel_degree > 1 or args.pipeline_parallel_degree > 1
        return sharded or dist.get_rank() == 0

    def save_model(self, trainer: StepTrainer, directory: str) -> None:
        """``save_pretrained`` in the standard TP=1 layout (safetensors) plus the tokenizer (all ranks call).

        Tensor-parallel shards are merged (every model-parallel rank of the first replica takes part, its
        rank 0 writes); a pipeline stage is first gathered into the full rollout model, which is saved.
        """
        model = trainer.model
        if trainer.pipeline is not None:
            trainer.export_evaluate_model()
            model = trainer.eval_model
        if tensor_parallel_degree(model) > 1:
            if is_first_model_replica():
                model.save_pretrained(directory, safe_serialization=True, merge_tensor_parallel=True)
        elif self.args.should_save:
            model.save_pretrained(directory, safe_serialization=True)
        if self.args.should_save:
            self.tokenizer.save_pretrained(directory)

    def save_final_models(self) -> None:
        """``output_dir/<dir>`` for every trained model (``policy``, ``value``...), each replaced atomically."""
        self.check_weights_finite("the final models")
        for name, trainer in self.model_parts().items():
            final = os.path.join(self.args.output_dir, name)
            scratch = final + ".tmp"
            if dist.get_rank() == 0:
                shutil.rmtree(scratch, ignore_errors=True)
            _barrier()
            self.save_model(trainer, scratch)
            _barrier()
            if dist.get_rank() == 0:
                publish_directory(scratch, final)
            _barrier()

    def load_checkpoint(self, checkpoint: str) -> None:
        """Restore weights, optimizers, schedules and counters from ``checkpoint``."""
        verify_checkpoint(checkpoint)
        saved = load_json(os.path.join(checkpoint, TRAINER_STATE))
        if saved.get("dp_world", self.dp_world) != self.dp_world:
            logger.warning(
                "checkpoint was written with %s data-parallel ranks, resuming with %s: data order stays exact "
                "only with the same global batch", saved.get("dp_world"), self.dp_world,
            )  # fmt: skip
        rank = dist.get_rank()
        for name, trainer in self.model_parts().items():
            _load_weights(trainer.model, os.path.join(checkpoint, name))
            owner = rank if self._owns_optimizer_state(trainer) else 0
            prefix = os.path.join(checkpoint, "optimizer", f"{name}-rank{owner}")
            if not os.path.isfile(prefix + ".safetensors"):
                raise CheckpointError(f"{checkpoint}: no optimizer state {prefix}.safetensors for rank {rank}")
            trainer.load_optimizer_state(load_tensor_state(prefix + ".safetensors"), load_json(prefix + ".json"))
        self.state = TrainerState(**saved["state"])
        self.load_extra_state(saved.get("extra_state", {}))
        self.metrics_logger_truncate(self.state.global_step)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, self.state.global_step,
                    self.state.epoch, self.state.batch_in_epoch)  # fmt: skip

    def metrics_logger_truncate(self, step: int) -> None:
        """Drop metric records written after ``step`` by the interrupted run."""
        if self.metrics_logger.enabled:
            truncate_metrics(self.metrics_logger.path, step)


def _load_weights(model: paddle.nn.Layer, directory: str) -> None:
    """Load a ``save_pretrained`` safetensors checkpoint (merged TP) into an existing model.

    ``model`` may be a tensor-parallel shard (its slices are cut) and/or a pipeline stage (its layers are
    taken); checkpoint weights it does not own are ignored.
    """
    from safetensors.numpy import load_file

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no .safetensors weights")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(directory, name)))
    if tensor_parallel_degree(model) > 1:
        model_class = getattr(model, "model_class", type(model))  # a PipelineStage names its model's class
        actions = model_class.get_tensor_parallel_convert_actions(model.config, loaded_state_dict_keys=list(state), is_split=True)
        for key, action in actions.items():
            if key in state:
                state[key] = action(state[key])
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise CheckpointError(f"{directory}: weights missing for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    model.set_state_dict({k: paddle.to_tensor(state[k]).astype(own[k].dtype) for k in own})


class _IndexedDataset(paddle.io.Dataset):
    """``dataset[i]`` plus its index (``"prompt_index"``), so a rollout knows its prompts' raw samples."""

    def __init__(self, dataset: Any) -> None:
        super().__init__()
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "prompt_index": int(index)}


class _IndexedCollator:
    """The dataset's collator, plus ``"prompt_index"``: the list of the batch's dataset indices."""

    def __init__(self, collator: Callable) -> None:
        self.collator = collator

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator([{k: v for k, v in sample.items() if k != "prompt_index"} for sample in samples])
        batch["prompt_index"] = [sample["prompt_index"] for sample in samples]
        return batch


def _pad_columns(tensor: paddle.Tensor, width: int, value) -> paddle.Tensor:
    """``[R, C]`` -> ``[R, width]``, right-padded with ``value`` (``width >= C``)."""
    if tensor.shape[1] >= width:
        return tensor
    return paddle.concat([tensor, paddle.full([tensor.shape[0], width - tensor.shape[1]], value, dtype=tensor.dtype)], axis=1)


def _barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value)).lower()


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, disable: bool):
    if disable:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="PPO steps", dynamic_ncols=True)
