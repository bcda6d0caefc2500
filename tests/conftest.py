"""Shared fixtures: offline tiny assets built once per test session."""

from __future__ import annotations

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO_ROOT, "data")

# Quiet, deterministic, single-threaded by default: tests compare numbers, not speed.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Paddle's bundled MKL runs its slow generic kernels on AMD CPUs unless told otherwise (see
# alignment/utils/env.py); set before the first matmul so every test and subprocess uses AVX2.
from alignment.utils.env import enable_fast_mkl_on_amd  # noqa: E402

enable_fast_mkl_on_amd()


@pytest.fixture(scope="session", autouse=True)
def fast_cpu_llama():
    """Run every test with the CPU Llama kernels the entry points install (tests/test_llama_cpu.py
    compares them with PaddleNLP's own)."""
    from alignment.models.llama_cpu import enable_fast_cpu_llama

    enable_fast_cpu_llama()
    yield


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, str]:
    """``{"tokenizer": dir, "llama": dir}``: the deterministic tiny tokenizer and random Llama."""
    from alignment.utils.tiny_assets import build_tiny_assets

    return build_tiny_assets(str(tmp_path_factory.mktemp("tiny_assets")), preset="tiny", data_dir=DATA_DIR)


@pytest.fixture(scope="session")
def tokenizer(tiny_assets):
    """The tiny LLaMA-style tokenizer (no pad token of its own: pad = eos)."""
    from alignment.data import load_tokenizer

    return load_tokenizer(tiny_assets["tokenizer"], model_max_length=128)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope="session")
def python() -> str:
    """The interpreter running the tests (used to launch subprocesses)."""
    return sys.executable


@pytest.fixture(scope="session")
def tiny_score_model(tiny_assets, tmp_path_factory) -> str:
    """A random score model (fresh head on the tiny Llama) saved with its tokenizer."""
    import shutil

    from alignment.models import AutoModelForScore

    directory = str(tmp_path_factory.mktemp("tiny_score_model"))
    model = AutoModelForScore.from_pretrained(tiny_assets["llama"])
    model.save_pretrained(directory, safe_serialization=True)
    for name in os.listdir(tiny_assets["tokenizer"]):
        shutil.copy(os.path.join(tiny_assets["tokenizer"], name), directory)
    return directory


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, repo_root):
    """The README's quick start (``bash scripts/quickstart.sh``), run once per test session.

    Returns ``(output_dir, completed_process)``. Tests of other algorithms reuse its SFT checkpoint
    (``quickstart.sh --algorithm NAME --sft-from <output_dir>/sft``) instead of training their own.
    """
    import subprocess

    output = tmp_path_factory.mktemp("quickstart") / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    result = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--output-dir", str(output)],  # exactly the README's run
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output, result


@pytest.fixture(scope="session")
def run_quickstart(repo_root):
    """``run_quickstart(output, *args)`` runs ``bash scripts/quickstart.sh --output-dir OUTPUT *args``
    (e.g. ``"--algorithm", "grpo", "--sft-from", sft_dir``), asserts success and returns report.json."""
    return lambda output, *args, timeout=1500: _run_quickstart(repo_root, output, *args, timeout=timeout)


def _run_quickstart(repo_root: str, output, *args: str, timeout: float = 1500) -> dict:
    import json
    import subprocess

    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    result = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--output-dir", str(output), *args],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(os.path.join(str(output), "report.json"), encoding="utf-8") as file:
        return json.load(file)
