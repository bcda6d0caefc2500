"""Worker for tests/test_ppo_parallel.py: several PPO runs through ``run_ppo.main`` in one job.

Usage: [python -m paddle.distributed.launch --nproc_per_node N] ppo_runs.py CONFIG.json [CONFIG.json ...]

The configs run one after another in the same processes (paddlenlp initialises fleet on the first one; the
later ones reuse its groups, so they must share the parallel layout). A config may resume from a checkpoint
an earlier one wrote. After each run every rank writes ``<output_dir>/rank<r>.json`` with the final trainer
state and the world size, so the test can tell that all ranks finished.
"""

import sys

from alignment.ppo.run_ppo import main
from alignment.utils.signals import exit_after_distributed_run
from parallel_common import write_rank_result


def run_all(configs: list[str]) -> None:
    import json

    for config in configs:
        result = main([config])
        with open(config) as file:
            output_dir = json.load(file)["output_dir"]
        write_rank_result(output_dir, {"state": result["state"]})


if __name__ == "__main__":
    run_all(sys.argv[1:])
    exit_after_distributed_run()
