"""Run a script under ``python -m paddle.distributed.launch`` and fail loudly with the worker logs.

Design note
-----------
Used by the multi-process tests (CPU/gloo: ``--devices`` does not apply, each process gets
``OMP_NUM_THREADS = cores // nproc``) and usable for any CPU smoke run. On GPU launch the same way with
``--devices``; nothing here is CPU specific except the thread default.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["DistributedLaunchError", "launch_distributed", "worker_logs"]


class DistributedLaunchError(RuntimeError):
    """The launched job failed or timed out; the message carries every worker log."""


def worker_logs(log_dir: str | os.PathLike) -> str:
    """All ``workerlog.*`` files of ``log_dir`` concatenated with headers (last 200 lines each)."""
    chunks = []
    for path in sorted(Path(log_dir).glob("workerlog.*")):
        lines = path.read_text(errors="replace").splitlines()
        chunks.append(f"===== {path.name} ({len(lines)} lines, last 200) =====\n" + "\n".join(lines[-200:]))
    return "\n".join(chunks) if chunks else f"(no worker logs in {log_dir})"


def _kill_tree(pid: int) -> None:
    """Kill ``pid`` and all its descendants (the launcher starts workers in their own sessions)."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    family = root.children(recursive=True) + [root]
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def launch_distributed(
    script: str | os.PathLike,
    script_args: Sequence[str] = (),
    nproc: int = 2,
    log_dir: Optional[str | os.PathLike] = None,
    timeout: float = 120.0,
    cwd: Optional[str | os.PathLike] = None,
    env: Optional[dict] = None,
) -> subprocess.CompletedProcess:
    """Launch ``nproc`` processes of ``script`` and wait.

    Args:
        script: python file run by every rank.
        script_args: its command-line arguments.
        nproc: processes on this node (``--nproc_per_node``).
        log_dir: launcher ``--log_dir`` (worker logs land there as ``workerlog.<rank>``); required.
        timeout: seconds before the whole job is killed.
        cwd: working directory (its path is prepended to ``PYTHONPATH`` so ``alignment`` imports).
        env: extra environment variables.
    Raises:
        DistributedLaunchError on non-zero exit or timeout, with the launcher output and worker logs.
    """
    if log_dir is None:
        raise ValueError("log_dir: required (the worker logs are the only way to debug a failed launch)")
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    run_env = dict(os.environ)
    run_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), run_env.get("PYTHONPATH", "")]))
    run_env.update(env or {})
    cmd = [
        sys.executable,
        "-m",
        "paddle.distributed.launch",
        "--nproc_per_node",
        str(nproc),
        "--log_dir",
        str(log_dir),
        str(script),
        *map(str, script_args),
    ]
    proc = subprocess.Popen(cmd, cwd=cwd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise DistributedLaunchError(
            f"timeout after {timeout}s: {' '.join(cmd)}\n--- launcher ---\n{out[-4000:]}\n{worker_logs(log_dir)}"
        ) from None
    if proc.returncode != 0:
        raise DistributedLaunchError(
            f"exit code {proc.returncode}: {' '.join(cmd)}\n--- launcher ---\n{out[-4000:]}\n{worker_logs(log_dir)}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")
