"""Moving weights between models, devices and process groups for the RL loop.

* ``export_evaluate_model``: reshard the training weights of the actor/critic (tensor-parallel shard,
  pipeline stage, or both) into a separate non-pipeline rollout model (``eval_mode``).
* ``OffloadManager``: ``offload_level`` bookkeeping and the host/accelerator moves it implies.
* ``model_parallel_broadcast_guard``: keeps paddlenlp's sampling broadcast inside the model-parallel group.

``offload_level`` is a space-separated set of ``freeze_model`` (reference and reward models),
``optimizer`` (actor/critic optimizer states) and ``train_model`` (actor/critic weights; only with
``eval_mode``, when a separate rollout model does the rollout and experience). An offloaded object lives
in pinned host memory while unused and is reloaded right before its phase: frozen models around the
experience forward passes, training models and optimizers around the update. On a CPU-only run the
objects already live in host memory, so the manager only keeps its bookkeeping (and says so once):
results are identical with and without offloading.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from typing import Any, Iterator

import paddle
import paddle.distributed as dist

__all__ = [
    "OffloadManager",
    "OFFLOAD_LEVELS",
    "offload_tensors",
    "reload_tensors",
    "export_evaluate_model",
    "tensor_parallel_degree",
    "model_parallel_broadcast_guard",
]

logger = logging.getLogger(__name__)

OFFLOAD_LEVELS = ("freeze_model", "optimizer", "train_model")


def _on_accelerator() -> bool:
    return paddle.device.get_device().split(":")[0] not in ("cpu",)


def _state_tensors(obj: Any) -> list[paddle.Tensor]:
    if isinstance(obj, paddle.nn.Layer):
        return list(obj.state_dict().values())
    while hasattr(obj, "_inner_opt"):  # fleet's HybridParallelOptimizer / sharding wrappers
        obj = obj._inner_opt
    if isinstance(obj, paddle.optimizer.Optimizer):
        tensors = []
        for accumulators in getattr(obj, "_accumulators", {}).values():
            tensors.extend(accumulators.values())
        tensors.extend(getattr(obj, "_master_weights", {}).values())
        return tensors
    raise TypeError(f"cannot offload a {type(obj).__name__}")


def offload_tensors(tensors: list[paddle.Tensor]) -> None:
    """Move tensors to pinned host memory in place (their Python objects stay valid)."""
    for tensor in tensors:
        if tensor.place.is_gpu_place():
            host = tensor._copy_to(paddle.CUDAPinnedPlace(), False)
            host._share_buffer_to(tensor)


def reload_tensors(tensors: list[paddle.Tensor]) -> None:
    """Move tensors back to the current accelerator in place."""
    place = paddle.framework._current_expected_place()
    for tensor in tensors:
        if tensor.place.is_cuda_pinned_place():
            device = tensor._copy_to(place, False)
            device._share_buffer_to(tensor)


class OffloadManager:
    """Applies ``offload_level`` around each phase that needs an object."""

    def __init__(self, offload_level: str | None) -> None:
        self.levels = set((offload_level or "").split())
        unknown = self.levels - set(OFFLOAD_LEVELS)
        if unknown:
            raise ValueError(f"offload_level: unknown value(s) {sorted(unknown)}; choose from {list(OFFLOAD_LEVELS)}")
        self.active = _on_accelerator()
        if self.levels and not self.active:
            logger.info("offload_level=%r: running on CPU, nothing to offload", " ".join(sorted(self.levels)))
        # (action, level) -> how many offload/reload transitions were made (for tests and logs)
        self.transitions: collections.Counter = collections.Counter()

    @property
    def moves(self) -> int:
        return sum(self.transitions.values())

    def enabled(self, level: str) -> bool:
        return level in self.levels

    def offload_now(self, level: str, *objects: Any) -> None:
        if self.enabled(level):
            self.transitions["offload", level] += 1
            if self.active:
                for obj in objects:
                    offload_tensors(_state_tensors(obj))

    @contextlib.contextmanager
    def use(self, level: str, *objects: Any) -> Iterator[None]:
        """Reload ``objects`` for the block, offload them after it (if ``level`` is enabled)."""
        if not self.enabled(level):
            yield
            return
        self.transitions["reload", level] += 1
        if self.active:
            for obj in objects:
                reload_tensors(_state_tensors(obj))
        try:
            yield
        finally:
            self.offload_now(level, *objects)


# ------------------------------------------------------------------------------------ resharding
def tensor_parallel_degree(model: paddle.nn.Layer) -> int:
    """The tensor-parallel degree a model (or pipeline stage) was built with (1 when not split)."""
    return max(int(getattr(model.config, "tensor_parallel_degree", 1) or 1), 1)


@paddle.no_grad()
def export_evaluate_model(train_model: paddle.nn.Layer, eval_model: paddle.nn.Layer) -> None:
    """Copy the current training weights into the rollout model ``eval_model``, resharding on the way.

    ``train_model`` is the unwrapped training model: a full model (tensor-parallel shard or not) or an
    ``alignment.parallel.PipelineStage``. ``eval_model`` is a full (non-pipeline) model of the same
    architecture whose tensor-parallel degree is the training one (``eval_mode: tensor_parallel``) or 1
    (``eval_mode: single``). Steps: pipeline stages -> all layers (``gather_pipeline_state_dict`` over the
    pipeline group), then TP shards -> full weights if the rollout model is not split
    (``gather_tensor_parallel_state_dict`` over the model-parallel group), then a copy into ``eval_model``.
    Collective: every rank of the pipeline group (and, for TP -> single, of the model-parallel group)
    must call it. A TP degree change other than n -> 1 raises ``ValueError``.
    """
    from alignment.parallel.checkpoint import gather_tensor_parallel_state_dict
    from alignment.parallel.pipeline import PipelineStage, gather_pipeline_state_dict

    train_degree, eval_degree = tensor_parallel_degree(train_model), tensor_parallel_degree(eval_model)
    if eval_degree not in (1, train_degree):
        raise ValueError(
            f"eval_model: tensor_parallel_degree {eval_degree} cannot be fed from training degree {train_degree}; "
            "use the training degree (eval_mode 'tensor_parallel') or 1 (eval_mode 'single')"
        )
    if isinstance(train_model, PipelineStage):
        state = gather_pipeline_state_dict(train_model)
        model_class = train_model.model_class
    else:
        state = train_model.state_dict()
        model_class = type(train_model)
    if eval_degree < train_degree:
        state = gather_tensor_parallel_state_dict(model_class, train_model.config, state)
    missing, unexpected = eval_model.set_state_dict(state)
    if missing or unexpected:
        raise ValueError(
            f"eval_model: {type(eval_model).__name__} does not match the exported weights: "
            f"missing={missing[:5]}, unexpected={unexpected[:5]}"
        )


@contextlib.contextmanager
def model_parallel_broadcast_guard(model: paddle.nn.Layer) -> Iterator[None]:
    """Within the block, ``paddle.distributed.broadcast(..., group=None)`` targets ``model``'s model-parallel group.

    paddlenlp 2.8.1's ``GenerationMixin.sample`` (tensor_parallel_degree > 1) broadcasts each drawn token
    from the model-parallel source rank, but looks the group up with a method the group does not have and
    falls back to ``group=None``: the *global* group. With data parallel on top that overwrites every
    replica's tokens with rank 0's and hangs once replicas stop at different lengths. This guard restores
    the intended group (what upstream's ``infer_guard`` also did). A no-op unless ``model`` is tensor
    parallel in a multi-process job.
    """
    if tensor_parallel_degree(model) <= 1 or dist.get_world_size() <= 1:
        yield
        return
    from paddle.distributed import fleet

    hcg = fleet.get_hybrid_communicate_group()
    mp_group, mp_source = hcg.get_model_parallel_group(), hcg.get_model_parallel_group_src_rank()
    original = dist.broadcast

    def broadcast(tensor, src=0, group=None, sync_op=True):
        if group is None:
            return original(tensor, src=mp_source, group=mp_group, sync_op=sync_op)
        return original(tensor, src=src, group=group, sync_op=sync_op)

    dist.broadcast = broadcast
    try:
        yield
    finally:
        dist.broadcast = original
