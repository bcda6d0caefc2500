"""Worker for tests/test_parallel_launch.py.

Usage: parallel_fail.py MARKER fail|hang [PID_DIR]
``fail``: rank 1 exits with a recognisable message. ``hang``: every rank writes its pid to PID_DIR and sleeps.
"""

import os
import sys
import time

import paddle.distributed as dist

if __name__ == "__main__":
    marker, mode = sys.argv[1], sys.argv[2]
    dist.init_parallel_env()
    print(f"rank {dist.get_rank()} of {dist.get_world_size()} started", flush=True)
    if mode == "fail" and dist.get_rank() == 1:
        sys.exit(f"deliberate failure on rank 1: {marker}")
    if mode == "hang":
        with open(os.path.join(sys.argv[3], f"pid{dist.get_rank()}"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
