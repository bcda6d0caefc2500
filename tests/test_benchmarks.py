"""The benchmark scripts run and print the JSON fields docs/benchmarks.md is built from (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TINY_SHAPE = ["--vocab-size", "300", "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2",
              "--num-heads", "4", "--batch-size", "2", "--prompt-len", "6", "--new-tokens", "5", "--json"]  # fmt: skip


def run_script(repo_root: str, name: str, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, os.path.join("scripts", name), *TINY_SHAPE, *args],
        cwd=repo_root, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_benchmark_rollout_reports_both_backends(repo_root):
    result = run_script(repo_root, "benchmark_rollout.py", "--repeats", "1")
    assert result["plain_tokens_per_s"] > 0 and result["accelerated_tokens_per_s"] > 0
    assert result["config"]["new_tokens"] == 5


def test_benchmark_ppo_reports_every_phase(repo_root):
    result = run_script(repo_root, "benchmark_ppo.py", "--steps", "1")
    for key in ("median_step_s", "generation_s", "experience_s", "train_s", "peak_rss_mb"):
        assert result[key] > 0, key
    assert result["median_step_s"] == pytest.approx(result["generation_s"] + result["experience_s"] + result["train_s"])


def test_benchmark_shape_errors_name_the_flag(repo_root):
    result = subprocess.run(
        [sys.executable, "scripts/benchmark_ppo.py", "--hidden-size", "30", "--num-heads", "4"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "--hidden-size must be a multiple of --num-heads" in result.stderr
