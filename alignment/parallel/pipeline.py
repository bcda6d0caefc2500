"""Pipeline parallel for Llama-family causal LMs (Llama, Qwen2, Mistral) in dygraph, over plain ``send``/``recv`` (runs on CPU/gloo).

Design note
-----------
Paddle's ``PipelineLayer``/``PipelineParallel`` cannot be constructed on CPU (``ParallelEnv`` has no
``_device_id``), so we use this small engine instead; PPO (``alignment/ppo``) uses it on every device, since
``send``/``recv`` exist on NCCL as on gloo (GPU: expected to work, not verified here; paddlenlp's
``LlamaForCausalLMPipe`` + 1F1B remain the faster stock path for plain LM training). It is an honest
pipeline, not a simulation:

* ``PipelineStage`` is stage ``s`` of ``S``: stage 0 owns the token embedding, every stage owns a contiguous
  slice of decoder layers (Paddle's "uniform" split: later stages take the remainder), the last stage owns
  the final norm and the head (``lm_head``, or a score/value head). Its sub-layers are *taken from a full
  model* and keep their names, so ``stage.state_dict()`` keys are exactly the standard ``save_pretrained``
  keys (``llama.layers.7.mlp.up_proj.weight`` …) and checkpoints stay in the standard layout.
* ``PipelineEngine.forward_backward`` runs a GPipe schedule: all micro-batch forwards (activations sent
  ``s -> s+1``), then all backwards in reverse order (activation gradients sent ``s+1 -> s``; the sender side
  calls ``output.backward(grad)``). GPipe rather than 1F1B because blocking gloo ``send``/``recv`` in 1F1B's
  steady state needs paired isend/irecv to avoid deadlock; the numbers (loss, gradients) are identical and
  only peak activation memory differs.
* The loss runs **inside** the pipeline on the last stage: ``loss_fn(head_output, micro_batch) -> scalar``,
  so PPO actor/critic losses can be plugged in. Each micro-batch loss is scaled by ``1/num_micro_batches``
  before backward (gradient accumulation); the mean loss is broadcast to every stage.
* Every stage sees the whole (replicated) batch dict; only hidden states and their gradients travel. Every
  stage builds the 4-D attention mask from the 2-D ``attention_mask`` itself, exactly as ``LlamaModel`` does.
* Not supported (clear errors): tied input/output embeddings across stages, sequence parallel, alibi,
  KV-cache generation through the pipeline (gather the full model with ``gather_pipeline_state_dict`` and
  generate with a non-pipeline eval model instead). Data parallel on top: all-reduce the stage's gradients
  over the dp group after ``forward_backward`` (e.g. paddle's ``fused_allreduce_gradients``); not exercised
  by the CPU tests.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import paddle
import paddle.distributed as dist
from paddle import nn

__all__ = [
    "partition_layers",
    "split_micro_batches",
    "PipelineStage",
    "PipelineEngine",
    "gather_pipeline_state_dict",
]

LossFn = Callable[[paddle.Tensor, Mapping[str, object]], paddle.Tensor]


# ----------------------------------------------------------------------------------------------- pure helpers
def partition_layers(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` decoder-layer ranges per stage, Paddle's "uniform" rule.

    ``num_layers // num_stages`` layers each; the ``num_layers % num_stages`` extra layers go to the *last*
    stages (e.g. 5 layers, 2 stages -> ``[(0, 2), (2, 5)]``).
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_layers < num_stages:
        raise ValueError(f"num_layers ({num_layers}) must be >= num_stages ({num_stages})")
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for stage in range(1, num_stages + 1):
        bounds.append(bounds[-1] + base + (1 if stage > num_stages - extra else 0))
    return [(bounds[i], bounds[i + 1]) for i in range(num_stages)]


def split_micro_batches(batch: Mapping[str, object], num_micro_batches: int) -> list[dict]:
    """Split every tensor of ``batch`` along axis 0 into ``num_micro_batches`` equal parts.

    Non-tensor values (None, ints, …) are passed unchanged to every micro-batch.
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, paddle.Tensor)}
    if not sizes:
        raise ValueError("batch: needs at least one tensor")
    for key, size in sizes.items():
        if size != next(iter(sizes.values())) or size % num_micro_batches != 0:
            raise ValueError(
                f"batch[{key!r}]: batch size {size} must be equal for all tensors and divisible by "
                f"num_micro_batches={num_micro_batches} (sizes: {sizes})"
            )
    parts = [dict() for _ in range(num_micro_batches)]
    for key, value in batch.items():
        chunks = paddle.split(value, num_micro_batches, axis=0) if isinstance(value, paddle.Tensor) else None
        for i, part in enumerate(parts):
            part[key] = chunks[i] if chunks is not None else value
    return parts


# ------------------------------------------------------------------------------------------------------ p2p
_DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "bool", "uint8"]
_MAX_NDIM = 8


def _dtype_name(tensor: paddle.Tensor) -> str:
    return str(tensor.dtype).replace("paddle.", "")


def _send_with_meta(tensor: paddle.Tensor, dst: int, group) -> None:
    """Send ``[ndim, dtype, *shape]`` (int64 header) then the data to global rank ``dst``."""
    if tensor.ndim > _MAX_NDIM:
        raise ValueError(f"tensor: at most {_MAX_NDIM} dims can be sent, got {tensor.ndim}")
    header = [tensor.ndim, _DTYPES.index(_dtype_name(tensor))] + list(tensor.shape)
    header += [0] * (2 + _MAX_NDIM - len(header))
    dist.send(paddle.to_tensor(header, dtype="int64"), dst=dst, group=group)
    dist.send(tensor.contiguous(), dst=dst, group=group)


def _recv_with_meta(src: int, group) -> paddle.Tensor:
    header = paddle.zeros([2 + _MAX_NDIM], dtype="int64")
    dist.recv(header, src=src, group=group)
    ndim, dtype_index, *shape = header.tolist()
    out = paddle.empty(shape[:ndim], dtype=_DTYPES[dtype_index])
    dist.recv(out, src=src, group=group)
    return out


def _broadcast_with_meta(tensor: Optional[paddle.Tensor], src: int, group) -> paddle.Tensor:
    """Broadcast a tensor whose shape/dtype only ``src`` (global rank) knows."""
    header = paddle.zeros([2 + _MAX_NDIM], dtype="int64")
    if dist.get_rank() == src:
        values = [tensor.ndim, _DTYPES.index(_dtype_name(tensor))] + list(tensor.shape)
        header = paddle.to_tensor(values + [0] * (2 + _MAX_NDIM - len(values)), dtype="int64")
    dist.broadcast(header, src=src, group=group)
    ndim, dtype_index, *shape = header.tolist()
    out = tensor.clone() if dist.get_rank() == src else paddle.empty(shape[:ndim], dtype=_DTYPES[dtype_index])
    dist.broadcast(out, src=src, group=group)
    return out


def _default_pipe_group():
    """The pipeline group of fleet's hybrid topology, else the global group."""
    try:
        from paddle.distributed import fleet

        hcg = fleet.get_hybrid_communicate_group()
        if hcg is not None:
            return hcg.get_pipe_parallel_group()
    except (AttributeError, AssertionError):
        pass
    from paddle.distributed.communication.group import _get_global_group

    return _get_global_group()


# --------------------------------------------------------------------------------------------------- stage
class PipelineStage(nn.Layer):
    """Stage ``stage_id`` of ``num_stages`` of a decoder-only causal LM (Llama family).

    Built from a full model (``LlamaForCausalLM`` or any model with ``base_model_prefix`` whose base has
    ``embed_tokens``, ``layers``, ``norm`` and ``_prepare_decoder_attention_mask``, plus a head attribute).
    The stage *shares* the full model's sub-layers (no copy); drop the full model afterwards.

    Args:
        model: full model (possibly tensor-parallel).
        stage_id, num_stages: position of this stage.
        head_name: sub-layer of ``model`` used as head on the last stage (``"lm_head"``; ``"score_head"`` for
            reward/value models). Called as ``head(hidden_states)``. The last stage also adopts every other
            top-level sub-layer of ``model`` (criterion, score normalizer, …) so the stages' state dicts
            together cover the full model.
        layer_ranges: optional explicit ``[(start, end), ...]`` per stage (default ``partition_layers``).

    ``forward(batch)`` takes the micro-batch dict (``input_ids`` used on stage 0; ``attention_mask``
    ``[B, L]`` and ``position_ids`` ``[B, L]`` optional, used on all stages) and, on stages > 0, the received
    hidden states ``[B, L, H]``. It returns hidden states ``[B, L, H]``, or the head output on the last stage.
    ``config`` and ``model_class`` (the full model's class, whose tensor-parallel split/merge rules apply to
    the stage's weights) stay available for checkpoint conversion.
    """

    def __init__(
        self,
        model: nn.Layer,
        stage_id: int,
        num_stages: int,
        head_name: str = "lm_head",
        layer_ranges: Optional[Sequence[tuple[int, int]]] = None,
    ):
        super().__init__()
        config = model.config
        if not 0 <= stage_id < num_stages:
            raise ValueError(f"stage_id must be in [0, {num_stages}), got {stage_id}")
        if num_stages > 1 and getattr(config, "tie_word_embeddings", False):
            raise NotImplementedError("tie_word_embeddings=True across pipeline stages is not supported")
        for flag in ("sequence_parallel", "alibi"):
            if getattr(config, flag, False):
                raise NotImplementedError(f"config.{flag}=True is not supported by PipelineStage")
        prefix = model.base_model_prefix
        base = getattr(model, prefix)
        ranges = list(layer_ranges) if layer_ranges is not None else partition_layers(len(base.layers), num_stages)
        if len(ranges) != num_stages:
            raise ValueError(f"layer_ranges: expected {num_stages} ranges, got {len(ranges)}")
        start, end = ranges[stage_id]

        self.config = config
        self.model_class = type(model)
        self.stage_id = stage_id
        self.num_stages = num_stages
        self.layer_range = (start, end)
        self.is_first = stage_id == 0
        self.is_last = stage_id == num_stages - 1
        self._prefix = prefix
        self._head_name = head_name
        self._prepare_decoder_attention_mask = base._prepare_decoder_attention_mask

        body = nn.Layer()
        if self.is_first:
            body.embed_tokens = base.embed_tokens
        body.layers = nn.LayerDict({str(i): base.layers[i] for i in range(start, end)})
        if self.is_last:
            body.norm = base.norm
            if not isinstance(getattr(model, head_name, None), nn.Layer):
                raise ValueError(f"head_name: model {type(model).__name__} has no sub-layer {head_name!r}")
            # every top-level sub-layer besides the backbone (head, criterion, a score normalizer, ...)
            for name, child in model.named_children():
                if name != prefix:
                    setattr(self, name, child)
        setattr(self, prefix, body)

    def _decoder_mask(self, attention_mask, shape, hidden_states) -> paddle.Tensor:
        """The base model's 4-D additive mask. Llama and Qwen2 take ``(mask, shape, past_len, dtype)``;
        Mistral's method takes ``(mask, shape, inputs_embeds, past_len)``."""
        import inspect

        parameters = list(inspect.signature(self._prepare_decoder_attention_mask).parameters)
        if "inputs_embeds" in parameters:
            return self._prepare_decoder_attention_mask(attention_mask, shape, hidden_states, 0)
        return self._prepare_decoder_attention_mask(attention_mask, shape, 0, hidden_states.dtype)

    @property
    def body(self) -> nn.Layer:
        return getattr(self, self._prefix)

    @property
    def head(self) -> Optional[nn.Layer]:
        return getattr(self, self._head_name) if self.is_last else None

    def forward(self, batch: Mapping[str, object], hidden_states: Optional[paddle.Tensor] = None):
        if self.is_first:
            hidden_states = self.body.embed_tokens(batch["input_ids"])
        elif hidden_states is None:
            raise ValueError("hidden_states: required on pipeline stages after the first")
        batch_size, seq_len = hidden_states.shape[0], hidden_states.shape[1]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = paddle.ones([batch_size, seq_len], dtype="bool")
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = paddle.arange(seq_len, dtype="int64").expand([batch_size, seq_len])
        mask = self._decoder_mask(attention_mask, (batch_size, seq_len), hidden_states)
        for layer in self.body.layers.values():  # keywords: Mistral's layer takes the mask second
            out = layer(hidden_states, position_ids=position_ids, attention_mask=mask)
            hidden_states = out[0] if isinstance(out, tuple) else out
        if not self.is_last:
            return hidden_states
        return self.head(self.body.norm(hidden_states))


# -------------------------------------------------------------------------------------------------- engine
class PipelineEngine:
    """Runs a ``PipelineStage`` per rank of the pipeline ``group`` (GPipe schedule, loss on the last stage).

    Args:
        stage: this rank's stage; ``stage.stage_id`` must equal the rank in ``group``.
        loss_fn: ``loss_fn(head_output, micro_batch) -> scalar Tensor`` (mean over the micro-batch), run on
            the last stage; ``micro_batch`` is the full micro-batch dict (labels, advantages, masks, …).
        group: pipeline group (default: fleet's pipe group, else the global group). Size 1 is allowed and
            runs the same code path without communication.
    """

    def __init__(self, stage: PipelineStage, loss_fn: Optional[LossFn] = None, group=None):
        self.stage = stage
        self.loss_fn = loss_fn
        self.group = group if group is not None else _default_pipe_group()
        if stage.num_stages != self.group.nranks or stage.stage_id != self.group.rank:
            raise ValueError(
                f"stage: stage {stage.stage_id}/{stage.num_stages} does not match rank "
                f"{self.group.rank} of a pipeline group of size {self.group.nranks}"
            )
        ranks = self.group.ranks
        self._prev = ranks[stage.stage_id - 1] if not stage.is_first else None
        self._next = ranks[stage.stage_id + 1] if not stage.is_last else None
        self._last = ranks[-1]
        self.micro_batch_losses: Optional[paddle.Tensor] = None

    # one micro-batch forward on this stage; returns (received input or None, output)
    def _forward_micro(self, micro_batch):
        received = None
        if not self.stage.is_first:
            received = _recv_with_meta(self._prev, self.group)
            received.stop_gradient = not paddle.is_grad_enabled()
        output = self.stage(micro_batch, received)
        if not self.stage.is_last:
            _send_with_meta(output.detach(), self._next, self.group)
        return received, output

    def _loss_fn(self, loss_fn: Optional[LossFn]) -> LossFn:
        loss_fn = loss_fn if loss_fn is not None else self.loss_fn
        if loss_fn is None:
            raise ValueError("loss_fn: pass one to PipelineEngine or to this call")
        return loss_fn

    def forward_backward(
        self,
        batch: Mapping[str, object],
        num_micro_batches: int = 1,
        loss_fn: Optional[LossFn] = None,
        loss_scale: float = 1.0,
    ) -> paddle.Tensor:
        """One training step's forward + backward over ``num_micro_batches`` (gradients accumulate).

        Gradients equal those of ``loss_scale * mean_i loss_fn(model(mb_i), mb_i)`` on an unsplit model; the
        caller runs ``optimizer.step()`` / ``clear_grad()`` (several calls before one step accumulate, e.g. an
        actor batch and a ptx batch with different ``loss_fn``). ``loss_fn`` overrides the engine's for this
        call; ``loss_scale`` weights this call's gradients (e.g. a loss coefficient or a gradient-accumulation
        share) without changing the reported loss. Returns the unscaled mean loss (float32 scalar) on every
        stage; ``self.micro_batch_losses`` holds the per-micro-batch losses ``[num_micro_batches]``.
        """
        loss_fn = self._loss_fn(loss_fn)
        micro_batches = split_micro_batches(batch, num_micro_batches)
        saved, losses = [], []
        for micro_batch in micro_batches:
            received, output = self._forward_micro(micro_batch)
            if self.stage.is_last:
                loss = loss_fn(output, micro_batch)
                if int(paddle.numel(loss)) != 1:
                    raise ValueError(f"loss_fn must return a scalar, got shape {list(loss.shape)}")
                losses.append(loss.detach().astype("float32").reshape([]))
                output = loss * (loss_scale / num_micro_batches)
            saved.append((received, output))
        for received, output in reversed(saved):
            if self.stage.is_last:
                output.backward()
            else:
                grad = paddle.empty(output.shape, dtype=output.dtype)
                dist.recv(grad, src=self._next, group=self.group)
                output.backward(grad)
            if received is not None:
                dist.send(received.grad.contiguous(), dst=self._prev, group=self.group)
        stacked = paddle.stack(losses) if self.stage.is_last else None
        self.micro_batch_losses = self._from_last_stage(stacked)
        return self.micro_batch_losses.mean()

    @paddle.no_grad()
    def eval_batch(
        self,
        batch: Mapping[str, object],
        num_micro_batches: int = 1,
        compute_loss: bool = False,
        loss_fn: Optional[LossFn] = None,
    ) -> paddle.Tensor:
        """Forward only. Returns, on every stage, the head outputs concatenated over micro-batches along
        axis 0 (e.g. logits ``[B, L, V]``), or the mean loss over micro-batches if ``compute_loss``."""
        loss_fn = self._loss_fn(loss_fn) if compute_loss else None
        outputs = []
        for micro_batch in split_micro_batches(batch, num_micro_batches):
            _, output = self._forward_micro(micro_batch)
            if self.stage.is_last:
                outputs.append(loss_fn(output, micro_batch).reshape([]) if compute_loss else output)
        result = None
        if self.stage.is_last:
            result = paddle.stack(outputs).mean() if compute_loss else paddle.concat(outputs, axis=0)
        return self._from_last_stage(result)

    def _from_last_stage(self, tensor: Optional[paddle.Tensor]) -> paddle.Tensor:
        if self.group.nranks == 1:
            return tensor
        return _broadcast_with_meta(tensor, self._last, self.group)


# ---------------------------------------------------------------------------------------------- gathering
def gather_pipeline_state_dict(stage: PipelineStage, group=None, dst: Optional[int] = None) -> dict:
    """Collect every stage's parameters/buffers into one full state dict with standard key names.

    Args:
        stage: this rank's stage.
        group: pipeline group (default as in ``PipelineEngine``).
        dst: global rank that receives the full state dict; None = every rank of ``group`` receives it.
    Returns:
        ``{name: Tensor}`` covering the whole model on receiving ranks, ``{}`` elsewhere. Load it into a
        full (non-pipeline) model with ``set_state_dict`` to save with ``save_pretrained`` or to roll out.
    """
    group = group if group is not None else _default_pipe_group()
    local = stage.state_dict()
    names_per_rank: list = []
    dist.all_gather_object(names_per_rank, list(local.keys()), group=group)
    me = dist.get_rank()
    full: dict = {}
    for owner, names in zip(group.ranks, names_per_rank):
        for name in names:
            if dst is None:
                full[name] = _broadcast_with_meta(local.get(name), owner, group)
            elif owner == dst == me:
                full[name] = local[name].clone()
            elif owner == me:
                _send_with_meta(local[name], dst, group)
            elif me == dst:
                full[name] = _recv_with_meta(owner, group)
    return full
