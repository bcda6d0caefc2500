"""Worker for tests/test_parallel_data.py: data parallel / sharding stage 1 over 2 CPU processes (gloo).

Usage: python -m paddle.distributed.launch --nproc_per_node 2 parallel_data.py MODE CKPT DATA.npz OUT_DIR STEPS

MODE ``dp``: ``paddle.DataParallel`` (gradients averaged over the 2 ranks).
MODE ``sharding1``: ``fleet.init`` with sharding_degree=2, ``fleet.distributed_model`` +
``fleet.distributed_optimizer`` (each rank keeps the AdamW state of half of the parameters, as paddlenlp's
Trainer does for ``sharding="stage1"``).
Rank r trains on rows ``[r*B/2, (r+1)*B/2)`` of the global batch. Writes rank<r>.json (per-step losses, the
optimizer class, the number of parameters whose optimizer state this rank owns) and, on rank 0, weights.npz.
"""

import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.distributed import fleet
from paddlenlp.transformers import LlamaForCausalLM

from alignment.parallel.topology import init_hybrid_parallel
from parallel_common import to_paddle, write_rank_result
from alignment.utils.signals import exit_after_distributed_run

LR, ADAM_EPS = 1e-2, 1e-4  # eps >> grad round-off, so Adam's g/sqrt(v) is stable across processes


def main(mode: str, ckpt: str, data: str, out_dir: str, steps: str) -> None:
    if mode == "dp":
        init_hybrid_parallel(dp_degree=2)
    elif mode == "sharding1":
        init_hybrid_parallel(sharding_degree=2)
    else:
        raise ValueError(f"mode must be 'dp' or 'sharding1', got {mode!r}")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = LlamaForCausalLM.from_pretrained(ckpt, tensor_parallel_output=False)
    optimizer = paddle.optimizer.AdamW(learning_rate=LR, epsilon=ADAM_EPS, parameters=model.parameters())
    if mode == "dp":
        wrapped = paddle.DataParallel(model)
    else:
        wrapped = fleet.distributed_model(model)
        optimizer = fleet.distributed_optimizer(optimizer)

    batch = to_paddle(dict(np.load(data)))
    batch["attention_mask"] = batch["attention_mask"].astype("bool")
    local = batch["input_ids"].shape[0] // world
    shard = {k: v[rank * local : (rank + 1) * local] for k, v in batch.items()}

    losses = []
    for _ in range(int(steps)):
        loss = wrapped(**shard, return_dict=False)[0]
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(float(global_loss) / world)

    inner = getattr(optimizer, "_inner_opt", optimizer)
    owned = getattr(inner, "_rank2params", None)
    record = dict(
        mode=mode,
        losses=losses,
        optimizer=type(inner).__name__,
        owned_params=len(owned[rank]) if owned is not None else None,
        total_params=len(model.parameters()),
    )
    if rank == 0:
        np.savez(os.path.join(out_dir, "weights.npz"), **{k: v.numpy() for k, v in model.state_dict().items()})
    write_rank_result(out_dir, record)


if __name__ == "__main__":
    main(*sys.argv[1:6])
    exit_after_distributed_run()  # skip gloo teardown, which can abort after success
