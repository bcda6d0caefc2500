"""Model-parallel (tensor-parallel) collectives as autograd functions over plain gloo-capable collectives.

Design note
-----------
Paddle's Megatron-style layers (``ColumnParallelLinear``, ``RowParallelLinear``, ``VocabParallelEmbedding``,
``ParallelCrossEntropy``) and paddlenlp's ``parallel_matmul`` call a handful of private ops in
``paddle.distributed.fleet.layers.mpu.mp_ops``. On GPU those run NCCL kernels (``c_identity``, ``c_concat``,
``c_split``, ``all_reduce_on_calc_stream``, ``c_softmax_with_cross_entropy``) and we never touch them. On CPU
several of them have no kernel, and ``ProcessGroupGloo`` has no ``*_on_calc_stream`` methods.

This module re-implements the *math* of those ops as ``paddle.autograd.PyLayer`` functions that only use
``paddle.distributed.all_reduce`` / ``all_gather`` on the model-parallel group, which gloo supports:

============================  ==========================  ==============================
function                      forward                     backward
============================  ==========================  ==============================
``mp_identity``               identity                    all-reduce(sum) of the grad
``mp_allreduce``              all-reduce(sum)             identity
``mp_split``                  keep own slice of last dim  all-gather + concat last dim
``mp_concat``                 all-gather + concat last    keep own slice of last dim
``vocab_parallel_cross_entropy``  softmax-CE over a vocab sharded on the last dim (3 all-reduces)
``vocab_parallel_lookup``     rows of this rank's vocab shard, zeros for other ids (no communication;
                              ``VocabParallelEmbedding`` sums it with ``mp_allreduce``)
============================  ==========================  ==============================

The "identity backward" of ``mp_allreduce`` is correct because every rank of the model-parallel group holds
the same replicated computation downstream of the reduction, so each rank already receives the full gradient.

``alignment.parallel.tensor_parallel.enable_cpu_model_parallel`` installs these into paddle on CPU only.
"""

from __future__ import annotations

import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer

__all__ = [
    "mp_identity",
    "mp_allreduce",
    "mp_split",
    "mp_concat",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_lookup",
    "vocab_shard_range",
]


def _resolve_group(group):
    """The model-parallel group: ``group`` itself, or the global group when None."""
    if group is None:
        from paddle.distributed.communication.group import _get_global_group

        return _get_global_group()
    return group


def _all_reduce_sum(tensor: paddle.Tensor, group) -> paddle.Tensor:
    """Out-of-place sum over ``group`` (the input is left untouched)."""
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _gather_last_dim(tensor: paddle.Tensor, group) -> paddle.Tensor:
    """``[..., d]`` on each of n ranks -> ``[..., n*d]``, ordered by rank in ``group``."""
    parts: list = []
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return paddle.concat(parts, axis=-1)


def _own_slice_last_dim(tensor: paddle.Tensor, group) -> paddle.Tensor:
    """``[..., n*d]`` -> this rank's ``[..., d]`` slice."""
    n = group.nranks
    width = tensor.shape[-1]
    if width % n != 0:
        raise ValueError(f"tensor: last dim {width} is not divisible by the model-parallel degree {n}")
    return paddle.split(tensor, n, axis=-1)[group.rank]


class _Identity(PyLayer):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        return _all_reduce_sum(dy, ctx.group)


class _AllReduce(PyLayer):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, dy):
        return dy.clone()


class _Split(PyLayer):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_slice_last_dim(x, group).clone()

    @staticmethod
    def backward(ctx, dy):
        return _gather_last_dim(dy, ctx.group)


class _Concat(PyLayer):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, dy):
        return _own_slice_last_dim(dy, ctx.group).clone()


def mp_identity(x: paddle.Tensor, group=None) -> paddle.Tensor:
    """Identity forward, gradient summed over the model-parallel ``group`` backward. Any shape."""
    return _Identity.apply(x, _resolve_group(group))


def mp_allreduce(x: paddle.Tensor, group=None) -> paddle.Tensor:
    """Sum over the model-parallel ``group`` forward, identity backward. Any shape; out-of-place."""
    return _AllReduce.apply(x, _resolve_group(group))


def mp_split(x: paddle.Tensor, group=None) -> paddle.Tensor:
    """``[..., n*d] -> [..., d]`` (this rank's slice) forward; all-gather of the grad backward."""
    return _Split.apply(x, _resolve_group(group))


def mp_concat(x: paddle.Tensor, group=None) -> paddle.Tensor:
    """``[..., d] -> [..., n*d]`` (all ranks' slices, rank order) forward; own slice of the grad backward."""
    return _Concat.apply(x, _resolve_group(group))


def vocab_shard_range(vocab_shard_size: int, group) -> tuple[int, int]:
    """``[start, end)`` of the vocabulary ids held by this rank when the vocab is split evenly by rank."""
    rank = _resolve_group(group).rank
    return rank * vocab_shard_size, (rank + 1) * vocab_shard_size


def vocab_parallel_cross_entropy(
    logits: paddle.Tensor,
    label: paddle.Tensor,
    group=None,
    ignore_index: int = -100,
    return_softmax: bool = False,
):
    """Softmax cross-entropy whose logits are split over the vocabulary (last dim) across ``group``.

    Args:
        logits: ``[..., V/n]`` this rank's logits shard (rank r holds ids ``[r*V/n, (r+1)*V/n)``).
        label: ``[...]`` or ``[..., 1]`` int64 global token ids; ``ignore_index`` entries get loss 0.
        ignore_index: label value to skip.
        return_softmax: also return this rank's shard of the softmax probabilities ``[..., V/n]``.

    Returns:
        loss ``[..., 1]`` in nats (same value on every rank), and optionally the softmax shard.

    Math: with ``m`` the global max (a constant shift, so no gradient is needed through it),
    ``loss = log(sum_r sum_v exp(x_v - m)) - (x_label - m)``; the two sums over ranks are
    ``mp_allreduce`` calls so each rank back-propagates only into its own shard.
    """
    group = _resolve_group(group)
    if label.ndim == logits.ndim - 1:
        label = label.unsqueeze(-1)
    if label.ndim != logits.ndim or label.shape[-1] != 1:
        raise ValueError(
            f"label: expected shape {list(logits.shape[:-1])} or {list(logits.shape[:-1]) + [1]}, "
            f"got {list(label.shape)}"
        )
    logits = logits.astype("float32")
    shard = logits.shape[-1]
    start, end = vocab_shard_range(shard, group)

    with paddle.no_grad():
        global_max = logits.max(axis=-1, keepdim=True)
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - global_max  # [..., V/n]

    exp_shifted = paddle.exp(shifted)
    sum_exp = mp_allreduce(exp_shifted.sum(axis=-1, keepdim=True), group)  # [..., 1]

    label = label.astype("int64")
    in_shard = paddle.logical_and(label >= start, label < end)  # [..., 1]
    local_label = paddle.where(in_shard, label - start, paddle.zeros_like(label))
    picked = paddle.take_along_axis(shifted, local_label, axis=-1)  # [..., 1]
    picked = paddle.where(in_shard, picked, paddle.zeros_like(picked))
    label_logit = mp_allreduce(picked, group)  # [..., 1]

    loss = paddle.log(sum_exp) - label_logit
    valid = label != ignore_index
    loss = paddle.where(valid, loss, paddle.zeros_like(loss))
    if return_softmax:
        return loss, exp_shifted / sum_exp
    return loss


def vocab_parallel_lookup(table: paddle.Tensor, ids: paddle.Tensor, start_index: int = 0) -> paddle.Tensor:
    """Rows of a vocab-sharded embedding table; ids outside this shard give zero rows.

    Args:
        table: ``[V/n, H]`` this rank's rows (global ids ``[start_index, start_index + V/n)``).
        ids: ``[...]`` int global token ids.
    Returns:
        ``[..., H]``; summing it over the model-parallel group (``mp_allreduce``) gives the full lookup.
    """
    rows = table.shape[0]
    in_shard = paddle.logical_and(ids >= start_index, ids < start_index + rows)
    local_ids = paddle.where(in_shard, ids - start_index, paddle.zeros_like(ids))
    out = paddle.nn.functional.embedding(local_ids, table)
    return out * in_shard.unsqueeze(-1).astype(out.dtype)
