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


def test_benchmark_ppo_reports_flops_memory_and_warmup(repo_root):
    result = run_script(repo_root, "benchmark_ppo.py", "--steps", "1", "--warmup", "0", "--gemm-size", "64")
    for key in ("generation_gflops", "experience_gflops", "train_gflops", "step_gflops", "gemm_peak_gflops",
                "memory_lower_bound_mb", "peak_rss_over_bound"):  # fmt: skip
        assert result[key] > 0, key
    assert set(result["phase_gflop"]) == {"generation", "experience", "training"}
    counts = result["param_counts"]
    assert set(counts) == {"actor", "reference", "critic", "reward"} and counts["actor"] == counts["reference"]
    trained, frozen = counts["actor"] + counts["critic"], counts["reference"] + counts["reward"]
    assert result["memory_lower_bound_mb"] == pytest.approx((16 * trained + 4 * frozen) / 2**20)
    assert result["cpu_path"] == "auto" and isinstance(result["avx512_kernels_enabled"], bool)
    assert "trl" not in result


def test_benchmark_ppo_compares_with_trl_on_the_portable_path(repo_root):
    """--compare-trl runs TRL's PPOv2Trainer on the same tiny shape; --cpu-path portable makes both sides AVX2-only."""
    pytest.importorskip("trl")
    result = run_script(repo_root, "benchmark_ppo.py", "--steps", "1", "--gemm-size", "64", "--compare-trl",
                        "--cpu-path", "portable")  # fmt: skip
    trl = result["trl"]
    for key in ("median_step_s", "generation_s", "experience_s", "train_s", "gc_collect_s", "peak_rss_mb"):
        assert trl[key] > 0, key
    assert set(result["ours_over_trl_phases"]) == {"generation", "experience", "train"}
    assert result["ours_over_trl_without_gc"] >= result["ours_over_trl"]
    assert trl["steps"] == 1 and trl["torch_threads"] == result["threads"]
    assert {k: trl["config"][k] for k in ("hidden_size", "batch_size", "prompt_len", "new_tokens")} == {
        k: result["config"][k] for k in ("hidden_size", "batch_size", "prompt_len", "new_tokens")
    }
    assert result["ours_over_trl"] == pytest.approx(result["median_step_s"] / trl["median_step_s"])
    assert result["cpu_path"] == "portable" and result["avx512_kernels_enabled"] is False
    assert trl["cpu_capability"] in ("AVX2", "DEFAULT") and trl["env"]["ATEN_CPU_CAPABILITY"] == "avx2"


def test_benchmark_ppo_without_trl_says_what_to_install(repo_root, tmp_path):
    """A python that cannot import trl/torch (here: ours with -S, i.e. without site-packages): one line, exit 2."""
    python = tmp_path / "python-without-trl"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "scripts/benchmark_ppo.py", *TINY_SHAPE, "--steps", "1", "--compare-trl",
         "--trl-python", str(python)],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "pip install trl==0.11.4 torch" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    refused = subprocess.run(
        [sys.executable, "scripts/benchmark_ppo.py", *TINY_SHAPE, "--compare-trl", "--algorithm", "grpo"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "--compare-trl" in refused.stderr
