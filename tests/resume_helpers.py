"""The SIGKILL + resume scaffolding the end-to-end resume tests share (PPO, critic-free, PPO-Lag)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def sigkill_at_checkpoint_then_resume(
    script: str, config: str, output_dir: Path, cwd: str, env: dict, checkpoint: str = "checkpoint-4", wait: float = 240
) -> subprocess.CompletedProcess:
    """Run ``script config``, SIGKILL it as soon as ``output_dir/checkpoint`` is complete (its manifest is
    written), check that it really died before the end (no final ``policy``), then rerun it with
    ``--resume_from_checkpoint auto``. Returns the resumed run (text output), which must have succeeded."""
    process = subprocess.Popen([sys.executable, script, config], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + wait
    while not (output_dir / checkpoint / "manifest.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, f"no {checkpoint} in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output_dir / "policy").exists()  # it really died before the end
    resumed = subprocess.run(
        [sys.executable, script, config, "--resume_from_checkpoint", "auto"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return resumed
