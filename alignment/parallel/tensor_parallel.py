"""Tensor parallel on CPU: one switch that makes Paddle's model-parallel layers run over gloo.

Design note
-----------
* GPU / XPU / custom devices: **nothing is changed**. ``enable_cpu_model_parallel()`` returns False and
  Paddle's stock NCCL ops (``c_identity``, ``c_concat``, ``c_split``, ``mp_allreduce`` on the calc stream,
  ``c_softmax_with_cross_entropy``) run as upstream.
* CPU: the private functions the layers look up at call time are replaced by the PyLayer
  implementations in ``alignment.parallel.collectives`` (plain ``all_reduce``/``all_gather`` on the
  model-parallel group). Replaced names, in both ``paddle.distributed.fleet.layers.mpu.mp_ops`` and
  ``paddle.distributed.collective`` (which re-exports some of them and is what paddlenlp's
  ``parallel_matmul`` calls):

  ``_c_identity``, ``_mp_allreduce``, ``_c_split``, ``_c_concat``, ``_c_lookup_table``,
  ``_c_softmax_with_cross_entropy``.

  ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``VocabParallelEmbedding`` / ``ParallelCrossEntropy``
  and paddlenlp's Llama therefore run unchanged. Also replaced: ``broadcast_input_data`` as used by fleet's
  ``TensorParallel`` model wrapper (what ``fleet.distributed_model`` / paddlenlp's ``Trainer`` wrap a TP model
  in): it broadcasts every forward input from the model-parallel source rank and asserts a GPU/XPU device;
  ours does the same broadcasts over gloo. Not covered on CPU: ``mp_async_allreduce`` (its
  ``InnerOverlapLinear`` calls the process group directly), ``fuse_matmul_bias``, sequence parallel
  (``sequence_parallel_utils``), ``ParallelMultiLabelCrossEntropy``.

Usage (after ``fleet.init`` with ``mp_degree > 1``, e.g. done by paddlenlp's ``TrainingArguments``)::

    from alignment.parallel.tensor_parallel import enable_cpu_model_parallel
    enable_cpu_model_parallel()   # no-op (returns False) on GPU
"""

from __future__ import annotations

import paddle

from alignment.parallel import collectives

__all__ = ["enable_cpu_model_parallel", "disable_cpu_model_parallel", "cpu_model_parallel_enabled"]

# Modules whose attributes are replaced; originals are saved in ``_originals`` on install.
_PATCH_SITES = (
    "paddle.distributed.fleet.layers.mpu.mp_ops",
    "paddle.distributed.collective",
)
_TENSOR_PARALLEL_WRAPPER = "paddle.distributed.fleet.meta_parallel.tensor_parallel"
_originals: dict = {}


def _is_member(group) -> bool:
    return group is None or group.is_member()


def _c_identity(tensor, group=None, skip_c_identity_dynamic=False):
    if not _is_member(group):
        return None
    return collectives.mp_identity(tensor, group)


def _mp_allreduce(
    tensor,
    op=None,
    group=None,
    use_calc_stream=True,
    use_model_parallel=True,
    skip_c_identity_dynamic=False,
):
    if not _is_member(group):
        return None
    if op is not None and op != paddle.distributed.ReduceOp.SUM:
        raise ValueError(f"op: only ReduceOp.SUM is supported for model-parallel all-reduce, got {op}")
    return collectives.mp_allreduce(tensor, group)


def _c_split(tensor, group=None):
    if not _is_member(group):
        return None
    return collectives.mp_split(tensor, group)


def _c_concat(tensor, group=None):
    if not _is_member(group):
        return None
    return collectives.mp_concat(tensor, group)


def _c_lookup_table(table, index, start_index=0, vocab_size=-1, name=None):
    return collectives.vocab_parallel_lookup(table, index, start_index)


def _c_softmax_with_cross_entropy(logits, label, group=None, return_softmax=False, ignore_index=-100):
    if not _is_member(group):
        return None
    return collectives.vocab_parallel_cross_entropy(
        logits, label, group=group, ignore_index=ignore_index, return_softmax=return_softmax
    )


def _broadcast_input_data(hcg, *inputs, **kwargs):
    """fleet's ``broadcast_input_data`` on CPU: every tensor (in place) and every other value of the forward
    inputs from the model-parallel source rank, so all model-parallel ranks compute on rank 0's data."""
    group, source = hcg.get_model_parallel_group(), hcg.get_model_parallel_group_src_rank()

    def visit(value):
        if isinstance(value, paddle.Tensor):
            with paddle.no_grad():
                paddle.distributed.broadcast(value, src=source, group=group)
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(visit(item) for item in value)
        if isinstance(value, dict):
            return {key: visit(item) for key, item in value.items()}
        holder = [value]
        paddle.distributed.broadcast_object_list(holder, src=source, group=group)
        return holder[0]

    return visit(list(inputs)), visit(kwargs)


_REPLACEMENTS = {
    "_c_identity": _c_identity,
    "_mp_allreduce": _mp_allreduce,
    "_c_split": _c_split,
    "_c_concat": _c_concat,
    "_c_lookup_table": _c_lookup_table,
    "_c_softmax_with_cross_entropy": _c_softmax_with_cross_entropy,
}


def _sites():
    """``(module, {name: replacement})`` pairs to patch."""
    import importlib

    sites = [(importlib.import_module(path), _REPLACEMENTS) for path in _PATCH_SITES]
    sites.append((importlib.import_module(_TENSOR_PARALLEL_WRAPPER), {"broadcast_input_data": _broadcast_input_data}))
    return sites


def _on_cpu() -> bool:
    return paddle.get_device().startswith("cpu")


def cpu_model_parallel_enabled() -> bool:
    """True while the CPU model-parallel collectives are installed."""
    return bool(_originals)


def enable_cpu_model_parallel(force: bool = False) -> bool:
    """Install gloo-capable model-parallel collectives into paddle when running on CPU.

    Args:
        force: install even when the current device is not CPU (tests only; NCCL users should not).
    Returns:
        True if the CPU implementations are active after the call, False if the stock ops are kept.
    Idempotent; safe to call before or after ``fleet.init`` and model construction.
    """
    if not (force or _on_cpu()):
        return False
    if _originals:
        return True
    for module, replacements in _sites():
        for name, replacement in replacements.items():
            if hasattr(module, name):
                _originals[(module.__name__, name)] = getattr(module, name)
                setattr(module, name, replacement)
    return True


def disable_cpu_model_parallel() -> None:
    """Restore paddle's stock model-parallel ops (undo ``enable_cpu_model_parallel``)."""
    import importlib

    for (module_name, name), original in _originals.items():
        setattr(importlib.import_module(module_name), name, original)
    _originals.clear()
