"""Moving model and optimizer state between devices to save accelerator memory (``offload_level``).

``offload_level`` is a space-separated set of ``freeze_model`` (reference and reward models),
``optimizer`` (actor/critic optimizer states) and ``train_model`` (actor/critic weights). An
offloaded object lives in pinned host memory while unused and is reloaded right before its phase:
frozen models around the experience forward passes, training models and optimizers around the
update. On a CPU-only run the objects already live in host memory, so the manager only keeps its
bookkeeping (and says so once): results are identical with and without offloading.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import paddle

__all__ = ["OffloadManager", "OFFLOAD_LEVELS", "offload_tensors", "reload_tensors"]

logger = logging.getLogger(__name__)

OFFLOAD_LEVELS = ("freeze_model", "optimizer", "train_model")


def _on_accelerator() -> bool:
    return paddle.device.get_device().split(":")[0] not in ("cpu",)


def _state_tensors(obj: Any) -> list[paddle.Tensor]:
    if isinstance(obj, paddle.nn.Layer):
        return list(obj.state_dict().values())
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
        self.moves = 0  # how many offload/reload transitions were made (for tests and logs)

    def enabled(self, level: str) -> bool:
        return level in self.levels

    def offload_now(self, level: str, *objects: Any) -> None:
        if self.enabled(level):
            self.moves += 1
            if self.active:
                for obj in objects:
                    offload_tensors(_state_tensors(obj))

    @contextlib.contextmanager
    def use(self, level: str, *objects: Any) -> Iterator[None]:
        """Reload ``objects`` for the block, offload them after it (if ``level`` is enabled)."""
        if not self.enabled(level):
            yield
            return
        self.moves += 1
        if self.active:
            for obj in objects:
                reload_tensors(_state_tensors(obj))
        try:
            yield
        finally:
            self.offload_now(level, *objects)
