"""launch_distributed: failures and timeouts surface as DistributedLaunchError carrying the worker logs."""

from pathlib import Path

import psutil
import pytest

from alignment.parallel.launch import DistributedLaunchError, launch_distributed

SCRIPTS = Path(__file__).parent / "dist_scripts"
REPO = Path(__file__).parent.parent


@pytest.mark.distributed
def test_failing_rank_raises_with_worker_logs(tmp_path):
    with pytest.raises(DistributedLaunchError) as info:
        launch_distributed(
            SCRIPTS / "parallel_fail.py",
            ["marker-4711", "fail"],
            nproc=2,
            log_dir=tmp_path / "logs",
            timeout=60,
            cwd=REPO,
        )
    message = str(info.value)
    assert "exit code" in message
    assert "===== workerlog.0" in message and "===== workerlog.1" in message
    assert "rank 0 of 2 started" in message and "rank 1 of 2 started" in message
    assert "deliberate failure on rank 1: marker-4711" in message


@pytest.mark.slow
@pytest.mark.distributed
def test_timeout_kills_the_workers(tmp_path):
    """The launcher runs workers in their own sessions; a timeout must still leave none of them alive."""
    with pytest.raises(DistributedLaunchError, match="timeout after 30"):
        launch_distributed(
            SCRIPTS / "parallel_fail.py",
            ["m", "hang", tmp_path],
            nproc=2,
            log_dir=tmp_path / "logs",
            timeout=30,
            cwd=REPO,
        )
    # 30 s leaves ample time for both ranks to start (about 5 s when the machine is idle)
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in range(2)]
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_log_dir_and_nproc_are_checked():
    with pytest.raises(ValueError, match="log_dir"):
        launch_distributed(SCRIPTS / "parallel_fail.py")
    with pytest.raises(ValueError, match="nproc"):
        launch_distributed(SCRIPTS / "parallel_fail.py", nproc=0, log_dir="unused")
