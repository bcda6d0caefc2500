"""Pipeline-parallel PPO models: the seed's ``LlamaPolicyPipe`` and ``LlamaValuePipe``.

Upstream builds them on Paddle's ``PipelineLayer``, which does not run on CPU. Here they are stages of
:class:`alignment.parallel.pipeline.PipelineStage` (dygraph, send/recv over any backend), so the same
code is tested on CPU with gloo and runs on GPU with NCCL. Each stage owns a contiguous slice of the
decoder layers and shares the full model's weights (checkpoints keep the standard ``save_pretrained``
names); the last stage adds the final norm and the head. As upstream, the PPO losses run inside the
pipeline: the trainer hands the actor loss (plus the ptx loss) or the critic loss to the
``PipelineEngine`` as its ``loss_fn``, applied to the last stage's head output.
"""

from __future__ import annotations

from typing import Optional, Sequence

from paddle import nn

from alignment.parallel.pipeline import PipelineStage

__all__ = ["LlamaPolicyPipe", "LlamaValuePipe", "PIPE_MODEL_FOR_ROLE"]


class LlamaPolicyPipe(PipelineStage):
    """Actor stage of a ``LlamaForCausalLM``: the last stage outputs logits ``[B, L, V]``."""

    def __init__(self, model: nn.Layer, stage_id: int, num_stages: int, layer_ranges: Optional[Sequence[tuple[int, int]]] = None):
        super().__init__(model, stage_id, num_stages, head_name="lm_head", layer_ranges=layer_ranges)


class LlamaValuePipe(PipelineStage):
    """Critic stage of a ``LlamaModelForScore``: the last stage outputs per-token scores ``[B, L, 1]``."""

    def __init__(self, model: nn.Layer, stage_id: int, num_stages: int, layer_ranges: Optional[Sequence[tuple[int, int]]] = None):
        super().__init__(model, stage_id, num_stages, head_name="score_head", layer_ranges=layer_ranges)


#: Which pipeline model each trainable PPO role uses.
PIPE_MODEL_FOR_ROLE = {"actor": LlamaPolicyPipe, "critic": LlamaValuePipe, "cost_critic": LlamaValuePipe}
