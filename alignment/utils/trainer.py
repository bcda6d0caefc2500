"""Reliability for stages built on PaddleNLP's ``Trainer`` (SFT, reward model).

``ReliableTrainerMixin`` goes before ``Trainer`` in the bases of a stage trainer and adds:

* **atomic checkpoints**: ``Trainer._save_checkpoint`` (paddlenlp 2.8.1) writes in place, so a
  crash mid-save leaves a ``checkpoint-N`` that looks complete. Here it writes into a hidden scratch
  directory; a manifest is added and the directory renamed only when every rank is done. Old
  checkpoints rotate by ``save_total_limit`` only after that (the best one is kept).
* **non-finite loss detection**: a NaN/inf training loss stops the run at the step it happens,
  before the optimizer applies it, with a summary of the offending batch.
* **non-finite parameter detection** (:class:`NonFiniteGuard`): the loss alone is not enough (Paddle's
  ``cross_entropy`` of all-NaN logits can be finite), so the gradients are checked before every
  optimizer step and the weights after it; a NaN/inf stops the run before anything is saved, and a
  checkpoint is never published with non-finite weights.
* **data order independent of the number of ranks**: :class:`SeededDistributedBatchSampler`, so a
  2-process run sees the same global batches as a 1-process run with the same global batch size.

Loading a checkpoint to resume goes through PaddleNLP's own code, which reads Paddle's
pickle-based ``optimizer.pdopt``/``rng_state.pth``; it only happens when the user asks for it
(``resume_from_checkpoint``) on checkpoints they wrote, after :func:`verify_checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import paddle
import paddle.distributed as dist

from alignment.utils.checkpoint import get_last_checkpoint, nonfinite_names, publish_directory, rotate_checkpoints

__all__ = [
    "ReliableTrainerMixin",
    "SeededDistributedBatchSampler",
    "NonFiniteTrainingError",
    "NonFiniteLossError",
    "NonFiniteParameterError",
    "NonFiniteGuard",
    "batch_summary",
]


class NonFiniteTrainingError(FloatingPointError):
    """Training diverged (NaN/inf); nothing was saved from the diverged state."""


class NonFiniteLossError(NonFiniteTrainingError):
    """The training loss became NaN or inf; the weights were not updated with it."""


class NonFiniteParameterError(NonFiniteTrainingError):
    """Gradients or weights became NaN or inf; nothing was saved from them."""


def _any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank (a collective call with several processes)."""
    if dist.get_world_size() <= 1:
        return flag
    tensor = paddle.to_tensor([1 if flag else 0], dtype="int64")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _last_checkpoint_note(output_dir: str) -> str:
    """Names the newest checkpoint that verifies (read once, when a run stops)."""
    last = get_last_checkpoint(output_dir)
    return f"the last checkpoint {last} is intact" if last else "no checkpoint was written"


def _guard_base():
    from paddlenlp.trainer import TrainerCallback

    return TrainerCallback


class NonFiniteGuard(_guard_base()):
    """``TrainerCallback`` that stops training on non-finite gradients (checked before the optimizer
    step) or weights (checked after it), on every rank at the same step.

    Under fp16 loss scaling the gradients are left to the scaler (an overflow there skips the step by
    design); the trained weights are checked in every case. Cost: one pass over the gradients and the
    trained weights per optimizer step, small next to a forward/backward pass.
    """

    def on_optimizer_begin(self, args, state, control, model=None, scaler=None, **kwargs):  # noqa: D401 - hook
        if scaler is not None or model is None:
            return
        grads = ((name, param.grad) for name, param in model.named_parameters() if not param.stop_gradient)
        bad = nonfinite_names(grads)
        if _any_rank(bool(bad)):
            raise NonFiniteParameterError(
                f"non-finite gradients at step {state.global_step + 1} in {_describe(bad)} (before the optimizer "
                f"step: the weights were not updated; {_last_checkpoint_note(args.output_dir)}). The loss may still "
                "look finite. Lower the learning rate, check the data, or use bf16 instead of fp16."
            )

    def on_optimizer_end(self, args, state, control, model=None, **kwargs):  # noqa: D401 - hook
        if model is None:
            return
        trained = ((name, param) for name, param in model.named_parameters() if not param.stop_gradient)  # LoRA: adapters
        bad = nonfinite_names(trained)
        if _any_rank(bool(bad)):
            raise NonFiniteParameterError(
                f"the optimizer step {state.global_step + 1} made {_describe(bad)} NaN/inf (learning rate "
                f"{args.learning_rate:g}); nothing was saved from these weights and "
                f"{_last_checkpoint_note(args.output_dir)}. Lower the learning rate."
            )


def _describe(bad: list[str]) -> str:
    if not bad:
        return "the parameters of another rank"
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    return f"{len(bad)} parameter(s) on this rank ({shown})"


def batch_summary(inputs: dict[str, Any]) -> dict[str, Any]:
    """Shapes and a few statistics of a batch, small enough for a log line."""
    summary = {}
    for key, value in inputs.items():
        if isinstance(value, paddle.Tensor):
            entry: dict[str, Any] = {"shape": list(value.shape), "dtype": str(value.dtype).replace("paddle.", "")}
            if value.dtype in (paddle.int64, paddle.int32):
                entry["min"], entry["max"] = int(value.min().item()), int(value.max().item())
            elif value.dtype == paddle.bool:
                entry["true"] = int(value.astype("int64").sum().item())
            summary[key] = entry
    return summary


def _barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()


class SeededDistributedBatchSampler(paddle.io.DistributedBatchSampler):
    """``DistributedBatchSampler`` whose shuffle is seeded by ``seed + epoch`` (Paddle's uses ``epoch``).

    Used with any number of data-parallel ranks, including one, so that the global batches (the union
    of the ranks' batches of a step) are the same for every data-parallel degree with the same global
    batch size: a 2-process run then reproduces the 1-process loss curve.
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = int(seed)
        self.epoch = self.seed

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(self.seed + epoch)


class ReliableTrainerMixin:
    """Atomic checkpoints, non-finite loss/gradient/weight detection and rank-independent data order for a
    ``paddlenlp.trainer.Trainer`` (put it first among the bases)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # PaddleNLP sets these only when training starts; until then every rank would claim to be the
        # main process, and callbacks would log an evaluation before training once per rank.
        self.state.is_world_process_zero = self.is_world_process_zero()
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.add_callback(NonFiniteGuard())

    def _get_train_sampler(self):  # noqa: D401 - Trainer hook
        from paddlenlp.trainer.trainer_utils import has_length

        if self.train_dataset is None or not has_length(self.train_dataset):
            return None
        return SeededDistributedBatchSampler(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            shuffle=True,
            num_replicas=max(1, self.args.dataset_world_size),
            rank=self.args.dataset_rank if self.args.dataset_world_size > 1 else 0,
            drop_last=self.args.dataloader_drop_last,
            seed=self.args.seed,
        )

    def training_step(self, model, inputs):  # noqa: D401 - Trainer hook
        loss = super().training_step(model, inputs)
        value = float(loss.item()) if isinstance(loss, paddle.Tensor) else float(loss)
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"training loss is {value} at step {self.state.global_step} (before the optimizer step: "
                f"the weights and the last checkpoint are intact). Batch: {json.dumps(batch_summary(inputs))}. "
                "Lower the learning rate, check the data, or use bf16 instead of fp16."
            )
        return loss

    def _save_checkpoint(self, model, metrics=None):  # noqa: D401 - Trainer hook
        args = self.args
        bad = nonfinite_names(model.named_parameters())
        if _any_rank(bool(bad)):  # never publish a diverged model as a checkpoint
            raise NonFiniteParameterError(
                f"not saving checkpoint-{self.state.global_step}: {_describe(bad)} are NaN/inf; "
                f"{_last_checkpoint_note(args.output_dir)}"
            )
        final_parent = args.output_dir
        folder = f"checkpoint-{self.state.global_step}"
        scratch_parent = os.path.join(final_parent, f".saving-{folder}")
        if dist.get_rank() == 0:
            shutil.rmtree(scratch_parent, ignore_errors=True)
            os.makedirs(scratch_parent)
        _barrier()
        limit = args.save_total_limit
        args.output_dir, args.save_total_limit = scratch_parent, None  # write there, rotate later
        try:
            super()._save_checkpoint(model, metrics)
        finally:
            args.output_dir, args.save_total_limit = final_parent, limit
        final = os.path.join(final_parent, folder)
        scratch = os.path.join(scratch_parent, folder)
        best = self.state.best_model_checkpoint
        if best and os.path.abspath(best) == os.path.abspath(scratch):
            self.state.best_model_checkpoint = final
        _barrier()
        if dist.get_rank() == 0:
            if args.should_save:
                self.state.save_to_json(os.path.join(scratch, "trainer_state.json"))
            publish_directory(scratch, final)
            shutil.rmtree(scratch_parent, ignore_errors=True)
            rotate_checkpoints(final_parent, limit, keep=self.state.best_model_checkpoint)
        _barrier()
