"""Hybrid-parallel initialisation shared by CPU tests and scripts.

Design note
-----------
``fleet.init`` with a hybrid strategy builds the dp / mp / pp / sharding groups; this works on CPU (gloo)
and GPU (NCCL) alike. paddlenlp's ``TrainingArguments`` performs the same call for trainer runs; use this
helper when no ``TrainingArguments`` is involved (tests, eval scripts). On CPU it also installs the
gloo-capable model-parallel collectives (``enable_cpu_model_parallel``); on GPU that step is a no-op.
"""

from __future__ import annotations

import paddle
import paddle.distributed as dist
from paddle.distributed import fleet

from alignment.parallel.tensor_parallel import enable_cpu_model_parallel

__all__ = ["init_hybrid_parallel"]


def init_hybrid_parallel(
    dp_degree: int = 1, mp_degree: int = 1, pp_degree: int = 1, sharding_degree: int = 1, seed: int = 1234
):
    """``fleet.init`` with the given degrees (their product must equal the world size); returns the hcg.

    ``seed`` seeds the global generator identically on all ranks and registers fleet's model-parallel RNG
    stream (different per mp rank, as ``model_parallel_random_seed`` does), used by the TP layers' init.
    """
    degrees = dict(dp_degree=dp_degree, mp_degree=mp_degree, pp_degree=pp_degree, sharding_degree=sharding_degree)
    for name, value in degrees.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    world = dist.get_world_size()
    product = dp_degree * mp_degree * pp_degree * sharding_degree
    if product != world:
        raise ValueError(f"dp*mp*pp*sharding = {product} must equal the world size {world} ({degrees})")
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = degrees
    fleet.init(is_collective=True, strategy=strategy)
    enable_cpu_model_parallel()
    hcg = fleet.get_hybrid_communicate_group()
    from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker

    tracker = get_rng_state_tracker()
    tracker.reset()
    tracker.add("model_parallel_rng", seed + 1 + hcg.get_model_parallel_rank())
    paddle.seed(seed)
    return hcg
