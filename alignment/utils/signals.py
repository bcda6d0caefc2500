"""A clear exit for ranks whose peer died, and for Ctrl-C.

When one process of a ``paddle.distributed.launch`` job dies, the launcher notices within a few
seconds ("Pod failed") and sends SIGTERM to the others, which would otherwise wait in a collective
forever. Without a handler they die with a bare C++ stack dump. ``exit_clearly_on_sigterm`` makes
them print one line saying what happened and what is safe to do, then exit at once with code 143
(without running teardown that could block on the dead peer). Checkpoints are written atomically,
so a kill at any moment leaves only complete checkpoints behind. SIGINT (Ctrl-C) gets the same
treatment (exit code 130) instead of a ``KeyboardInterrupt`` traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

__all__ = ["exit_clearly_on_sigterm", "exit_after_distributed_run", "stop_message", "EXIT_CODE_TERMINATED", "EXIT_CODE_INTERRUPTED"]

EXIT_CODE_TERMINATED = 128 + signal.SIGTERM
EXIT_CODE_INTERRUPTED = 128 + signal.SIGINT


def exit_clearly_on_sigterm(stage: str, output_dir: str | None = None) -> None:
    """Install the SIGTERM and SIGINT (Ctrl-C) handlers for the current process (main thread only).

    Both print one line naming the signal, what it means and that the complete checkpoints are
    intact, then exit at once with ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), never
    through a ``KeyboardInterrupt`` traceback. A save in progress leaves only its scratch directory,
    which is never taken for a checkpoint.
    """
    rank = os.environ.get("PADDLE_TRAINER_ID", "0")
    reasons = {
        signal.SIGTERM: "received SIGTERM: another rank of this job failed (see its workerlog) or the job was stopped",
        signal.SIGINT: "received SIGINT (Ctrl-C): stopped by the user",
    }

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        message = stop_message(stage, rank, reasons[signum], output_dir)
        try:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        finally:
            os._exit(128 + signum)

    for signum in reasons:
        signal.signal(signum, handler)


def stop_message(stage: str, rank: str, reason: str, output_dir: str | None) -> str:
    """The line printed when a signal stops a run."""
    where = f" Complete checkpoints in {output_dir} are intact;" if output_dir else ""
    return f"[{stage}] rank {rank}: {reason}. Exiting.{where} resume with --resume_from_checkpoint auto."


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
