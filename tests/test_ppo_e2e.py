"""PPO through its public entry point: 2 processes match 1, and a SIGKILLed run resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from resume_helpers import sigkill_at_checkpoint_then_resume

from alignment.parallel.launch import launch_distributed
from alignment.utils.metrics import read_metrics

RUN_PPO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alignment", "ppo", "run_ppo.py")

# Metrics whose definition does not depend on how rows are split across ranks/micro-batches.
COMPARABLE = [
    "train/actor_loss",
    "train/reward_critic_loss",
    "train/reward",
    "train/kl_divergence",
    "train/mean_generated_length",
    "train/max_generated_length",
    "train/actor_lr",
]


def write_config(path, tiny_assets, tiny_score_model, repo_root, **overrides) -> str:
    data = os.path.join(repo_root, "data")
    config = {
        "train_datasets": f"PKU-SafeRLHF/train:1:{data}/safe_rlhf/train.jsonl",
        "actor_model_name_or_path": tiny_assets["llama"],
        "reward_model_name_or_path": tiny_score_model,
        "max_length": 48,
        "max_new_tokens": 12,
        "top_p": 0.9,
        "per_device_train_batch_size": 2,
        "learning_rate": 5e-4,
        "critic_learning_rate": 5e-4,
        "lr_scheduler_type": "cosine",
        "logging_steps": 1,
        "save_strategy": "no",
        "do_train": True,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 11,
    }
    config.update(overrides)
    with open(path, "w") as file:
        json.dump(config, file)
    return str(path)


def comparable(records: list[dict]) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: r[k] for k in COMPARABLE if k in r} for r in records if "train/actor_loss" in r}


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_assets, tiny_score_model, repo_root):
    common = dict(temperature=0.0, max_steps=3)  # greedy: generation is deterministic on both sides
    single = write_config(
        tmp_path / "single.json", tiny_assets, tiny_score_model, repo_root,
        output_dir=str(tmp_path / "single"), per_device_prompt_batch_size=4, gradient_accumulation_steps=2, **common,
    )  # fmt: skip
    double = write_config(
        tmp_path / "double.json", tiny_assets, tiny_score_model, repo_root,
        output_dir=str(tmp_path / "double"), per_device_prompt_batch_size=2, gradient_accumulation_steps=1, **common,
    )  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, RUN_PPO, single], check=True, cwd=repo_root, env=env, capture_output=True, timeout=300)
    result = launch_distributed(RUN_PPO, [double], nproc=2, log_dir=tmp_path / "logs", timeout=300, cwd=repo_root)
    assert "workerlog.1" in os.listdir(tmp_path / "logs")  # two ranks really ran

    one, two = comparable(read_metrics(str(tmp_path / "single"))), comparable(read_metrics(str(tmp_path / "double")))
    assert sorted(one) == sorted(two) == [1, 2, 3], (one, two, result.stdout[-2000:])
    for step in one:
        for key in COMPARABLE:
            assert two[step][key] == pytest.approx(one[step][key], rel=2e-3, abs=2e-4), (step, key)

    # The trained policies agree and the 2-process checkpoint loads in a single process.
    from safetensors.numpy import load_file

    weights_one = load_file(str(tmp_path / "single" / "policy" / "model.safetensors"))
    weights_two = load_file(str(tmp_path / "double" / "policy" / "model.safetensors"))
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        np.testing.assert_allclose(weights_two[name], weights_one[name], atol=2e-4, err_msg=name)
    from paddlenlp.transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "double" / "policy"))


@pytest.mark.slow
def test_sigkilled_run_resumes_with_the_same_metrics(tmp_path, tiny_assets, tiny_score_model, repo_root):
    settings = dict(
        per_device_prompt_batch_size=4,
        num_return_sequences=2,
        gradient_accumulation_steps=2,  # 2 updates per rollout
        max_steps=8,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
        ptx_datasets=f"alpaca:1:{os.path.join(repo_root, 'data', 'alpaca', 'train.jsonl')}",
        ptx_coeff=0.5,
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = write_config(tmp_path / "ref.json", tiny_assets, tiny_score_model, repo_root, output_dir=str(tmp_path / "ref"), **settings)
    subprocess.run([sys.executable, RUN_PPO, reference], check=True, cwd=repo_root, env=env, capture_output=True, timeout=300)

    output = tmp_path / "killed"
    killed = write_config(tmp_path / "killed.json", tiny_assets, tiny_score_model, repo_root, output_dir=str(output), **settings)
    resumed = sigkill_at_checkpoint_then_resume(RUN_PPO, killed, output, repo_root, env)
    assert "resumed from" in resumed.stderr + resumed.stdout

    expected, got = comparable(read_metrics(str(tmp_path / "ref"))), comparable(read_metrics(str(output)))
    assert sorted(got) == sorted(expected) == [2, 4, 6, 8]  # one record per rollout of 2 updates
    for step in expected:
        for key in expected[step]:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6), (step, key)
    # Rotation kept only the newest complete checkpoints; no scratch directory survives.
    names = sorted(os.listdir(output))
    assert not [n for n in names if ".tmp" in n or ".old" in n], names
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-6", "checkpoint-8"]
