"""Hybrid-parallel initialisation shared by CPU tests and scripts.

Design note
-----------
``fleet.init`` with a hybrid strategy builds the dp / mp / pp / sharding groups. paddlenlp's
``TrainingArguments`` performs the same call for trainer runs; use ``init_hybrid_parallel`` when no
``TrainingArguments`` is involved (tests, eval scripts). It is the stock call on GPU. On CPU it adds two things:

* ``gloo_safe_group_creation()``: with the gloo backend of paddle 3.3.1, creating two *disjoint* subgroups
  concurrently (e.g. ``[0, 2]`` and ``[1, 3]``, which ``fleet.init`` does for every dimension once the world
  has 4+ ranks) cross-wires their rendezvous: "Connection refused" / gloo TIMEOUT / hang (probed 4/4 runs
  failing). A world barrier after every ``new_group`` serialises the rendezvous and fixes it (3/3 runs).
  With 2 processes each dimension has a single group and the problem does not occur.
* the gloo-capable model-parallel collectives (``enable_cpu_model_parallel``).
"""

from __future__ import annotations

import contextlib
import functools

import paddle
import paddle.distributed as dist
from paddle.distributed import fleet

from alignment.parallel.tensor_parallel import enable_cpu_model_parallel

__all__ = ["init_hybrid_parallel", "gloo_safe_group_creation"]


@contextlib.contextmanager
def gloo_safe_group_creation():
    """Within the block, every ``paddle.distributed.new_group`` is followed by a world barrier (CPU only).

    Wrap any code that creates several process groups on gloo, e.g. ``fleet.init`` or paddlenlp
    ``TrainingArguments(...)`` with 4+ processes. A no-op on non-CPU devices. Requires every rank to create the
    same groups in the same order (which ``fleet.init`` does).
    """
    if not paddle.get_device().startswith("cpu"):
        yield
        return
    import paddle.distributed.collective as collective

    if not dist.is_initialized():
        dist.init_parallel_env()
    original = collective.new_group

    @functools.wraps(original)
    def new_group_then_barrier(*args, **kwargs):
        group = original(*args, **kwargs)
        dist.barrier()
        return group

    paddle.distributed.new_group = collective.new_group = new_group_then_barrier
    try:
        yield
    finally:
        paddle.distributed.new_group = collective.new_group = original


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
    with gloo_safe_group_creation():
        fleet.init(is_collective=True, strategy=strategy)
    enable_cpu_model_parallel()
    hcg = fleet.get_hybrid_communicate_group()
    from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker

    tracker = get_rng_state_tracker()
    tracker.reset()
    tracker.add("model_parallel_rng", seed + 1 + hcg.get_model_parallel_rank())
    paddle.seed(seed)
    return hcg
