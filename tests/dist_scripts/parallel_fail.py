"""Worker for tests/test_parallel_launch.py: rank 1 fails with a recognisable message."""

import sys

import paddle.distributed as dist

if __name__ == "__main__":
    dist.init_parallel_env()
    print(f"rank {dist.get_rank()} of {dist.get_world_size()} started", flush=True)
    if dist.get_rank() == 1:
        sys.exit(f"deliberate failure on rank 1: {sys.argv[1]}")
