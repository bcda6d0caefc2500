"""Hybrid-parallel initialisation shared by CPU tests and scripts.

Design note
-----------
``fleet.init`` with a hybrid strategy builds the dp / mp / pp / sharding groups. paddlenlp's
``TrainingArguments`` performs the same call for trainer runs; use ``init_hybrid_parallel`` when no
``TrainingArguments`` is involved (tests, eval scripts). It is the stock call on GPU. On CPU it adds two things:

* ``gloo_safe_group_creation()``: paddle 3.3.1 creates every gloo process group over the *same* default
  TCP store, and gloo's full-mesh rendezvous uses keys named only by the in-group rank. Once groups with
  different members exist (a world of 4+ ranks, e.g. ``[0, 2]`` and ``[1, 3]``) a rank can read another
  group's address: "Connection refused", "address.cc:30 sizeof(impl_) == bytes.size()", gloo TIMEOUT or a
  hang (probed: 4-process ``fleet.init`` failed in every run; serialising with barriers only made it flaky).
  Inside the block each new gloo group gets its *own* ``TCPStore`` (hosted by the group's first rank, its
  port published through the default store under a key that contains the unique group id), so rendezvous
  keys can no longer collide. With 2 processes every dimension has one group and stock paddle works.
* the gloo-capable model-parallel collectives (``enable_cpu_model_parallel``).
"""

from __future__ import annotations

import contextlib
import os
import socket

import paddle
import paddle.distributed as dist
from paddle.distributed import fleet

from alignment.parallel.tensor_parallel import enable_cpu_model_parallel

__all__ = ["init_hybrid_parallel", "gloo_safe_group_creation"]

_GROUP_STORES: list = []  # keep the per-group stores (and their servers) alive for the process lifetime
_STORE_TIMEOUT_S = 900


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gloo_safe_group_creation():
    """Within the block, every new gloo process group rendezvouses over its own TCP store (CPU only).

    Wrap code that creates several process groups on gloo, e.g. ``fleet.init`` or paddlenlp
    ``TrainingArguments(...)`` (as ``alignment/ppo/run_ppo.py`` does) with 4+ processes. A no-op on non-CPU
    devices; non-gloo backends untouched.
    """
    if not paddle.get_device().startswith("cpu"):
        yield
        return
    import paddle.distributed.collective as collective
    from paddle.base import core

    # The default (global) group is left alone: ``init_parallel_env`` imports its own reference to the
    # factory, and one group over all ranks has no colliding rendezvous keys. Not initialising here also
    # keeps paddlenlp's ``TrainingArguments`` calling ``fleet.init`` (it skips it once a parallel
    # context exists), so the block can wrap it.
    original = collective._new_process_group_impl
    host = os.environ.get("PADDLE_CURRENT_ENDPOINT", "127.0.0.1:0").split(":")[0] or "127.0.0.1"

    def create_with_own_store(backend, store, rank, world_size, group_name, pg_options, group_id=0, **kwargs):
        if backend != "gloo":
            return original(backend, store, rank, world_size, group_name, pg_options, group_id=group_id, **kwargs)
        key = f"alignment.gloo_group_store.{group_id}"
        if rank == 0:
            port = _free_port(host)
            store.set(key, f"{host}:{port}")  # publish first: the master's constructor waits for the clients
            own_store = core.TCPStore(host, port, True, world_size, _STORE_TIMEOUT_S)
        else:
            store.wait(key)
            own_host, port = store.get(key).decode().rsplit(":", 1)
            own_store = core.TCPStore(own_host, int(port), False, world_size, _STORE_TIMEOUT_S)
        _GROUP_STORES.append(own_store)
        return core.ProcessGroupGloo.create(own_store, rank, world_size, group_id)

    collective._new_process_group_impl = create_with_own_store
    try:
        yield
    finally:
        collective._new_process_group_impl = original


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
