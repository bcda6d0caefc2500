"""Building blocks of the RL loop: one-step trainers, the prompt sampler, distributed reductions.

``StepTrainer`` reuses PaddleNLP's ``Trainer`` for what it already does well (AdamW with the
usual weight-decay exclusions, gradient clipping, LR schedules, AMP, and wrapping the model for
data/sharding/tensor parallelism through ``fleet``) and replaces its epoch loop with an explicit
``backward`` / ``optimizer_step`` pair, so the RL loop decides when each model steps. It relies on
``Trainer._wrap_model`` and ``create_optimizer_and_scheduler`` of paddlenlp 2.8.1.

Under pipeline parallel a ``StepTrainer`` holds one ``alignment.parallel.PipelineStage`` and its
``PipelineEngine`` (the loss runs inside the pipeline, see :meth:`StepTrainer.pipeline_step`); its optimizer
is wrapped by fleet's ``HybridParallelOptimizer`` so gradient clipping uses the norm over all stages.
With ``eval_mode`` it also holds the separate non-pipeline rollout model (``eval_model``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
from typing import Any, Iterator, Sequence

import numpy as np
import paddle
import paddle.distributed as dist

from alignment.utils.checkpoint import load_optimizer_state_dict, optimizer_state_dict

__all__ = [
    "StepTrainer",
    "GlobalBatchSampler",
    "world_info",
    "all_reduce_mean",
    "all_reduce_max",
    "all_reduce_sum",
    "any_across_ranks",
    "derive_args",
    "rollout_seed",
    "is_first_model_replica",
    "IntegrationReporter",
    "REPORT_INTEGRATIONS",
    "integration_available",
]

logger = logging.getLogger(__name__)


def _trainer_base():
    from paddlenlp.trainer import Trainer

    return Trainer


# ---------------------------------------------------------------------------------- distributed
def _hybrid_group():
    """fleet's hybrid communicate group, or None outside hybrid parallel."""
    if dist.get_world_size() <= 1:
        return None
    from paddle.distributed import fleet

    if getattr(fleet.fleet, "_hcg", None) is None:  # fleet.init was not called: plain data parallel
        return None
    return fleet.get_hybrid_communicate_group()  # any other failure is a real error


def is_first_model_replica() -> bool:
    """True on the ranks of data-parallel (and sharding) replica 0 and pipeline stage 0.

    Exactly these ranks write a checkpoint: every model-parallel rank among them takes part in merging the
    tensor-parallel shards, and model-parallel rank 0 writes the files.
    """
    hcg = _hybrid_group()
    if hcg is None:
        return dist.get_rank() == 0
    return world_info()[0] == 0 and hcg.get_stage_id() == 0


def world_info() -> tuple[int, int]:
    """``(data-parallel rank, data-parallel world size)`` of this process.

    With hybrid parallelism (fleet), ranks of one tensor/pipeline replica share data, so the
    data-parallel coordinates are those of the dp x sharding group.
    """
    hcg = _hybrid_group()
    if hcg is None:
        return dist.get_rank(), dist.get_world_size()
    dp_rank, dp_size = hcg.get_data_parallel_rank(), hcg.get_data_parallel_world_size()
    sharding_rank, sharding_size = hcg.get_sharding_parallel_rank(), hcg.get_sharding_parallel_world_size()
    return sharding_rank * dp_size + dp_rank, dp_size * sharding_size


def _data_groups() -> list:
    """Groups whose successive all-reduces combine exactly the data-parallel (x sharding) replicas.

    ``[None]`` (the global group) when every rank is its own replica; otherwise the sharding and the
    data-parallel group of this rank (those of size > 1), so model-parallel ranks are never summed.
    """
    hcg = _hybrid_group()
    if hcg is None or (hcg.get_model_parallel_world_size() == 1 and hcg.get_pipe_parallel_world_size() == 1):
        return [None]
    candidates = (
        (hcg.get_sharding_parallel_group(), hcg.get_sharding_parallel_world_size()),
        (hcg.get_data_parallel_group(), hcg.get_data_parallel_world_size()),
    )
    return [group for group, size in candidates if size > 1]


def _reduce(values: Sequence[float], op) -> list[float]:
    if dist.get_world_size() <= 1:
        return [float(v) for v in values]
    tensor = paddle.to_tensor(np.asarray(values, dtype=np.float64))
    for group in _data_groups():  # SUM and MAX compose exactly over the nested groups
        dist.all_reduce(tensor, op=op, group=group)
    return tensor.numpy().tolist()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum of each value over data-parallel ranks (plain floats in, plain floats out)."""
    return _reduce(values, dist.ReduceOp.SUM)


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """Mean of each value over data-parallel ranks."""
    world = world_info()[1]
    return [v / world for v in all_reduce_sum(values)]


def all_reduce_max(values: Sequence[float]) -> list[float]:
    return _reduce(values, dist.ReduceOp.MAX)


def any_across_ranks(flag: bool) -> bool:
    """True if ``flag`` is true on any rank (all ranks must call it)."""
    if dist.get_world_size() <= 1:
        return bool(flag)
    tensor = paddle.to_tensor([1 if flag else 0], dtype="int64")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def rollout_seed(seed: int, global_step: int, rank: int) -> int:
    """Seed of the sampling RNG for the rollout starting at ``global_step`` on ``rank``.

    Re-seeding per rollout from (seed, step, rank) makes a resumed run draw exactly what an
    uninterrupted one would, with no RNG state to save.
    """
    return int(np.random.SeedSequence([seed, global_step, rank]).generate_state(1)[0] % (2**31 - 1))


# ------------------------------------------------------------------------------------ reporting
#: ``report_to`` values the PPO loop honours -> how to install them. ``visualdl`` is written by
#: ``MetricsLogger``; the others by :class:`IntegrationReporter`.
REPORT_INTEGRATIONS = {
    "visualdl": "pip install visualdl",
    "tensorboard": "pip install tensorboardX",
    "wandb": "pip install wandb",
}


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def integration_available(name: str) -> bool:
    """True if the library behind the ``report_to`` integration ``name`` can be imported."""
    if name == "tensorboard":
        # torch's SummaryWriter needs the ``tensorboard`` package besides torch itself
        return _module_available("tensorboardX") or (_module_available("torch") and _module_available("tensorboard"))
    return _module_available(name)


class IntegrationReporter:
    """Sends every logged metric dict to the ``tensorboard`` / ``wandb`` entries of ``report_to``.

    TensorBoard: a ``SummaryWriter`` (tensorboardX, else torch's) writing into ``logging_dir``; wandb:
    ``wandb.init(project=$WANDB_PROJECT or "paddle-rlhf", dir=logging_dir, config=<arguments>)``. Metric
    names are kept as logged (``train/reward``, ``eval/reward``); only numbers are sent. Main process only.
    """

    def __init__(self, report_to: Sequence[str] | None, logging_dir: str, config: Any = None, enabled: bool = True):
        """``config``: the run's arguments for wandb (a dict or ``TrainingArguments``)."""
        self.writers: list[Any] = []
        self.wandb = None
        if not enabled:
            return
        names = set(report_to or [])
        if "tensorboard" in names:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                from torch.utils.tensorboard import SummaryWriter
            self.writers.append(SummaryWriter(log_dir=logging_dir))
        if "wandb" in names:
            import os

            import wandb

            if wandb.run is None:
                config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
                wandb.init(project=os.environ.get("WANDB_PROJECT", "paddle-rlhf"), dir=logging_dir, config=config)
            self.wandb = wandb

    def log(self, metrics: dict[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for writer in self.writers:
            for key, value in numbers.items():
                writer.add_scalar(key, value, step)
            writer.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# ------------------------------------------------------------------------------------- sampler
class GlobalBatchSampler(paddle.io.Sampler):
    """Yields each rank's slice of consecutive *global* batches of a per-epoch permutation.

    The global batch is ``batch_size * world_size`` indices; rank r takes the r-th slice. So a
    run with 2 ranks x batch b sees exactly the same global batches as 1 rank x batch 2b (what
    makes multi-process runs comparable), and the order depends only on ``(seed, epoch)``, which
    makes resuming at a batch index exact.

    The last incomplete global batch is dropped with ``drop_last`` (``dataloader_drop_last: true``);
    otherwise it is completed with the first indices of the same epoch's order (as
    ``DistributedSampler`` pads), so every batch has the full shape and every example is seen each
    epoch (a dataset smaller than one global batch is repeated to fill it).
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 42,
        drop_last: bool = True,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        if self.drop_last:
            return self.dataset_size // self.global_batch_size
        return -(-self.dataset_size // self.global_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.arange(self.dataset_size)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.dataset_size)
        if len(order):
            order = np.resize(order, len(self) * self.global_batch_size)  # repeats from the start to fill the tail
        for batch in range(self.start_batch, len(self)):
            begin = batch * self.global_batch_size + self.rank * self.batch_size
            yield order[begin : begin + self.batch_size].tolist()


# --------------------------------------------------------------------------------- step trainer
@contextlib.contextmanager
def _quiet_paddlenlp():
    from paddlenlp.utils.log import logger as paddlenlp_logger

    level = paddlenlp_logger.logger.level
    paddlenlp_logger.logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        paddlenlp_logger.logger.setLevel(level)


def derive_args(args: Any, **overrides: Any) -> Any:
    """A copy of ``TrainingArguments`` with some fields replaced (None values are ignored)."""
    derived = copy.copy(args)
    for key, value in overrides.items():
        if value is not None:
            setattr(derived, key, value)
    return derived


class InPlaceClipGradByGlobalNorm(paddle.nn.ClipGradByGlobalNorm):
    """``ClipGradByGlobalNorm`` that scales the gradients in place, and only when the norm exceeds the limit.

    Paddle's version multiplies every gradient by ``clip_norm / max(norm, clip_norm)`` into new
    tensors on every step, also when the factor is 1: on CPU that is about half of its ~19 ms per
    step for a 7.3M-parameter model. Same result (bitwise when not clipping; the same multiply when
    clipping or when the norm is not finite). Dense float32 gradients of one process only; anything
    else (selected rows, other dtypes, distributed meshes) takes Paddle's own path.
    """

    @paddle.no_grad()
    def _dygraph_clip(self, params_grads):
        grads = [g for p, g in params_grads if g is not None and getattr(p, "need_clip", True) is not False]
        if not grads or any(g.dtype != paddle.float32 or g.is_selected_rows() or g.is_dist() for g in grads):
            return super()._dygraph_clip(params_grads)
        from paddle.nn.clip import _squared_l2_norm

        norm = float(paddle.sqrt(paddle.stack([_squared_l2_norm(g) for g in grads]).sum()))
        if not math.isfinite(norm) or norm > self.clip_norm:
            factor = self.clip_norm / max(norm, self.clip_norm)  # inf -> 0, nan -> nan: as Paddle's multiply
            for g in grads:
                g.scale_(factor)
        return params_grads


class StepTrainer(_trainer_base()):
    """One trainable model of the RL loop (actor or critic) stepped explicitly by the loop.

    Usage per optimizer step: ``with trainer.autocast(): loss = ...``; ``trainer.backward(loss)``
    for each micro-batch; then ``trainer.optimizer_step()``.
    """

    def __init__(
        self,
        model: paddle.nn.Layer,
        args: Any,
        name: str,
        tokenizer: Any = None,
        pipeline: Any = None,
        eval_model: paddle.nn.Layer | None = None,
    ) -> None:
        """``pipeline``: the ``PipelineEngine`` running ``model`` (a ``PipelineStage``) under pipeline parallel.
        ``eval_model``: the separate rollout model fed by :meth:`export_evaluate_model` (``eval_mode``)."""
        if pipeline is not None:
            # paddlenlp's Trainer only accepts its own PipelineLayer under pipeline parallel; the stage runs
            # on our engine instead, so the Trainer sees a plain model.
            args = derive_args(args, pipeline_parallel_degree=1)
        with _quiet_paddlenlp():  # Trainer.__init__ prints every argument; the RL loop already did
            super().__init__(model=model, args=args, tokenizer=tokenizer, callbacks=None)
        # The RL loop logs, saves and evaluates; the Trainer's own callbacks must stay silent.
        self.callback_handler.callbacks = []
        self.name = name
        self.num_optimizer_steps = 0
        self.pipeline = pipeline
        self.eval_model = eval_model
        if eval_model is not None:
            eval_model.eval()
            for parameter in eval_model.parameters():
                parameter.stop_gradient = True

    def setup(self, num_training_steps: int) -> None:
        """Create the optimizer and LR schedule and wrap the model for distributed training."""
        self.create_optimizer_and_scheduler(num_training_steps=num_training_steps)
        if type(getattr(self.optimizer, "_grad_clip", None)) is paddle.nn.ClipGradByGlobalNorm:
            self.optimizer._grad_clip = InPlaceClipGradByGlobalNorm(self.optimizer._grad_clip.clip_norm)
        if self.pipeline is None:
            self.model_wrapped = self._wrap_model(self.model_wrapped)
        elif dist.get_world_size() > 1:
            from paddle.distributed import fleet

            # HybridParallelOptimizer: global-norm clipping over all stages (and TP shards), sharding, dp.
            self.optimizer = fleet.distributed_optimizer(self.optimizer)

    @property
    def rollout_model(self) -> paddle.nn.Layer:
        """The model that generates and scores rollouts: the eval model if any, else the training model."""
        return self.eval_model if self.eval_model is not None else self.model

    def export_evaluate_model(self) -> None:
        """Reshard the current training weights into the eval model (collective; no-op without one)."""
        if self.eval_model is not None:
            from alignment.ppo.comm_utils import export_evaluate_model

            export_evaluate_model(self.model, self.eval_model)

    def pipeline_step(self, batch: dict[str, Any], loss_fn, loss_scale: float = 1.0) -> float:
        """Forward + backward of one micro-batch through the pipeline, the loss on the last stage.

        ``loss_fn(head_output, batch) -> scalar`` gets the last stage's head output (logits ``[B, L, V]`` or
        scores ``[B, L, 1]``); gradients are those of ``loss_scale * loss``. Returns the unscaled loss on
        every stage.
        """
        with self.autocast():
            loss = self.pipeline.forward_backward(batch, num_micro_batches=1, loss_fn=loss_fn, loss_scale=loss_scale)
        return float(loss.item())

    @property
    def is_data_parallel(self) -> bool:
        return isinstance(self.model_wrapped, paddle.DataParallel)

    def autocast(self):
        """AMP context (a no-op unless fp16/bf16 is on)."""
        return self.autocast_smart_context_manager()

    def train(self, mode: bool = True):  # noqa: D401 - the nn.Layer sense, not Trainer.train
        """Put the model in training (True) or eval (False) mode."""
        self.model.train() if mode else self.model.eval()

    def no_sync(self, accumulating: bool):
        """Skip the DataParallel gradient all-reduce on micro-steps that do not step the optimizer."""
        if accumulating and self.is_data_parallel:
            return self.model_wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: paddle.Tensor) -> None:
        if self.do_grad_scaling:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.clear_grad()

    def optimizer_step(self) -> bool:
        """Reduce gradients where the wrapper does not, step optimizer and schedule, clear grads.

        Returns False when fp16 loss scaling skipped the step (inf/nan gradients).
        """
        from paddle.distributed.fleet.meta_optimizers.dygraph_optimizer import HybridParallelOptimizer
        from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients

        stepped = True
        if isinstance(self.optimizer, HybridParallelOptimizer) and not self.do_grad_scaling:
            parameters = [p for p in self.model.parameters() if not p.stop_gradient]
            if self.optimizer._sharding_enable:
                self.optimizer._inner_opt.reduce_gradients(parameters, self.optimizer._hcg)
            if self.optimizer._dp_enable:
                fused_allreduce_gradients(parameters, self.optimizer._hcg)
            self.optimizer._step(parameters)
        elif self.do_grad_scaling:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = not getattr(self.scaler, "_cache_found_inf", False)
        else:
            self.optimizer.step()
        if stepped:
            self.lr_scheduler.step()
            self.num_optimizer_steps += 1
        self.optimizer.clear_grad()
        return stepped

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.get_lr())

    # ------------------------------------------------------------------------- checkpointing
    def optimizer_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors, extras = optimizer_state_dict(self.optimizer, self.model)
        extras["num_optimizer_steps"] = self.num_optimizer_steps
        if self.do_grad_scaling:
            extras["grad_scaler"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in self.scaler.state_dict().items()}
        return tensors, extras

    def load_optimizer_state(self, tensors: dict[str, np.ndarray], extras: dict[str, Any]) -> None:
        extras = dict(extras)
        self.num_optimizer_steps = int(extras.pop("num_optimizer_steps", 0))
        scaler_state = extras.pop("grad_scaler", None)
        load_optimizer_state_dict(self.optimizer, self.model, tensors, extras)
        if scaler_state is not None and self.do_grad_scaling:
            self.scaler.load_state_dict(scaler_state)

