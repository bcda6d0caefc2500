"""A clear exit for ranks whose peer died.

When one process of a ``paddle.distributed.launch`` job dies, the launcher notices within a few
seconds ("Pod failed") and sends SIGTERM to the others, which would otherwise wait in a collective
forever. Without a handler they die with a bare C++ stack dump. ``exit_clearly_on_sigterm`` makes
them print one line saying what happened and what is safe to do, then exit at once with code 143
(without running teardown that could block on the dead peer). Checkpoints are written atomically,
so a kill at any moment leaves only complete checkpoints behind.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

__all__ = ["exit_clearly_on_sigterm", "exit_after_distributed_run", "EXIT_CODE_TERMINATED"]

EXIT_CODE_TERMINATED = 128 + signal.SIGTERM


def exit_clearly_on_sigterm(stage: str, output_dir: str | None = None) -> None:
    """Install the SIGTERM handler for the current process (main thread only)."""
    rank = os.environ.get("PADDLE_TRAINER_ID", "0")

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        where = f" Complete checkpoints in {output_dir} are intact;" if output_dir else ""
        message = (
            f"[{stage}] rank {rank}: received SIGTERM: another rank of this job failed (see its workerlog) or "
            f"the job was stopped. Exiting.{where} resume with --resume_from_checkpoint auto.\n"
        )
        try:
            sys.stderr.write(message)
            sys.stderr.flush()
        finally:
            os._exit(EXIT_CODE_TERMINATED)

    signal.signal(signal.SIGTERM, handler)


def exit_after_distributed_run(code: int = 0) -> None:
    """End a ``paddle.distributed.launch`` worker right away once its work is done and flushed.

    On CPU (gloo) the interpreter's teardown of the process group and the TCP store sometimes aborts
    (SIGABRT) when the peer has already exited, which makes the launcher report a failed job after
    a successful run. All ranks meet at a barrier first, so skipping the teardown loses nothing.
    Outside a distributed launch this returns and the process exits normally.
    """
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) <= 1:
        return
    import paddle.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
