"""Tensor / pipeline / data parallel for CPU (gloo) tests and GPU runs.

GPU runs use Paddle's stock NCCL paths; on CPU this package supplies what Paddle lacks. See each module's
design note: ``collectives`` + ``tensor_parallel`` (TP), ``pipeline`` (PP), ``checkpoint`` (TP conversion),
``topology`` (fleet init + gloo group fix), ``launch`` (multi-process runs).
"""

from alignment.parallel.checkpoint import (
    gather_tensor_parallel_state_dict,
    load_tensor_parallel_pretrained,
    merge_tensor_parallel_checkpoint,
    split_state_dict,
)
from alignment.parallel.launch import DistributedLaunchError, launch_distributed
from alignment.parallel.pipeline import (
    PipelineEngine,
    PipelineStage,
    gather_pipeline_state_dict,
    partition_layers,
    split_micro_batches,
)
from alignment.parallel.tensor_parallel import (
    cpu_model_parallel_enabled,
    disable_cpu_model_parallel,
    enable_cpu_model_parallel,
)
from alignment.parallel.topology import gloo_safe_group_creation, init_hybrid_parallel

__all__ = [
    "enable_cpu_model_parallel",
    "disable_cpu_model_parallel",
    "cpu_model_parallel_enabled",
    "init_hybrid_parallel",
    "gloo_safe_group_creation",
    "PipelineStage",
    "PipelineEngine",
    "gather_pipeline_state_dict",
    "partition_layers",
    "split_micro_batches",
    "load_tensor_parallel_pretrained",
    "gather_tensor_parallel_state_dict",
    "merge_tensor_parallel_checkpoint",
    "split_state_dict",
    "launch_distributed",
    "DistributedLaunchError",
]
