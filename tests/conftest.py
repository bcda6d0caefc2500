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
from alignment.utils.env import enable_mkl_avx2_on_amd  # noqa: E402

enable_mkl_avx2_on_amd()


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
