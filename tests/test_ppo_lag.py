"""PPO-Lagrangian through run_ppo.py (``rl_algorithm: ppo_lag``): early argument errors, the multiplier's
trajectory in the logs and checkpoints, SIGKILL + resume, and 2 processes == 1.

The session's random score model plays reward model, cost model and both critics (loaded with
``score_type`` cost for the cost model); tiny shapes keep a run to a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from resume_helpers import sigkill_at_checkpoint_then_resume

from alignment.parallel.launch import launch_distributed
from alignment.utils.metrics import read_metrics

RUN_PPO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alignment", "ppo", "run_ppo.py")

COMPARABLE = [
    "train/actor_loss", "train/reward_critic_loss", "train/cost_critic_loss", "train/reward", "train/cost",
    "train/cost_value", "train/cost_advantage", "train/lambda", "train/episode_cost", "train/kl_divergence",
    "train/cost_critic_lr",
]  # fmt: skip
# Token-weighted means are averaged per rank, so they depend on how rows are split across ranks.
SPLIT_INDEPENDENT = [k for k in COMPARABLE if k not in ("train/cost_value", "train/cost_advantage")]


def write_config(path, tiny_assets, tiny_score_model, repo_root, **overrides) -> str:
    data = os.path.join(repo_root, "data")
    config = {
        "rl_algorithm": "ppo_lag",
        "train_datasets": f"PKU-SafeRLHF/train:1:{data}/safe_rlhf/train.jsonl",
        "actor_model_name_or_path": tiny_assets["llama"],
        "reward_model_name_or_path": tiny_score_model,
        "cost_model_name_or_path": tiny_score_model,
        "max_length": 48,
        "max_new_tokens": 12,
        "top_p": 0.9,
        "per_device_prompt_batch_size": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 5e-4,
        "critic_learning_rate": 5e-4,
        "logging_steps": 1,
        "save_strategy": "no",
        "do_train": True,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 11,
        # lambda must move visibly in a few steps: a big step size, a threshold below the random model's costs
        "lambda_lr": 0.3,
        "threshold": -0.5,
        "lambda_max": 2.0,
        "episode_cost_window_size": 6,
    }
    config.update(overrides)
    with open(path, "w") as file:
        json.dump(config, file)
    return str(path)


def comparable(records: list[dict]) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: r[k] for k in COMPARABLE if k in r} for r in records if "train/actor_loss" in r}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(cost_model_name_or_path=None), r"cost_model_name_or_path: is required with rl_algorithm 'ppo_lag'"),
        (dict(lambda_init=2.0, lambda_max=1.0), r"lambda_init: \(2.0\) must not exceed lambda_max \(1.0\)"),
        (dict(episode_cost_window_size=0, lambda_lr=-1.0), r"(?s)lambda_lr: must be >= 0.*episode_cost_window_size: must be >= 1"),
        (dict(rl_algorithm="ppo"), r"cost_model_name_or_path: is a ppo_lag argument, but rl_algorithm is 'ppo'"),
        (dict(cost_critic_model_name_or_path="/no/such/dir"), r"cost_critic_model_name_or_path: path '/no/such/dir' does not exist"),
    ],
)
def test_bad_ppo_lag_arguments_fail_before_loading(tmp_path, tiny_assets, tiny_score_model, repo_root, overrides, message):
    from alignment.ppo.run_ppo import main
    from alignment.utils.config import ConfigError

    config = write_config(tmp_path / "c.json", tiny_assets, tiny_score_model, repo_root, output_dir=str(tmp_path / "o"), **overrides)
    with pytest.raises(ConfigError, match=message):
        main([config])
    assert not (tmp_path / "o").exists()


def check_lambda_trajectory(records: list[dict], lambda_init: float, lambda_lr: float, threshold: float, lambda_max: float) -> list[float]:
    """Every logged lambda is one SGD step on log lambda from the previous one, using the logged window
    mean, clamped at lambda_max."""
    log_lambda, lambdas = math.log(lambda_init), []
    for record in sorted((r for r in records if "train/lambda" in r), key=lambda r: r["step"]):
        log_lambda += lambda_lr * (record["train/episode_cost"] - threshold) * math.exp(log_lambda)
        log_lambda = min(log_lambda, math.log(lambda_max))
        assert record["train/lambda"] == pytest.approx(math.exp(log_lambda), rel=1e-9), record["step"]
        lambdas.append(record["train/lambda"])
    return lambdas


@pytest.mark.slow
def test_sigkilled_ppo_lag_run_resumes_with_the_same_lambda_trajectory(tmp_path, tiny_assets, tiny_score_model, repo_root):
    settings = dict(max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=2)  # 1 update per rollout
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = write_config(tmp_path / "ref.json", tiny_assets, tiny_score_model, repo_root, output_dir=str(tmp_path / "ref"), **settings)
    subprocess.run([sys.executable, RUN_PPO, reference], check=True, cwd=repo_root, env=env, capture_output=True, timeout=300)

    # The uninterrupted run: the multiplier follows its SGD rule on the logged episode costs and moved;
    # the window holds the last 6 episode costs; the cost critic is saved next to the policy and value.
    records = read_metrics(str(tmp_path / "ref"))
    lambdas = check_lambda_trajectory(records, lambda_init=1.0, lambda_lr=0.3, threshold=-0.5, lambda_max=2.0)
    assert len(lambdas) == 6 and abs(lambdas[-1] - 1.0) > 0.1, lambdas
    assert all("train/cost_critic_lr" in r for r in records if "train/lambda" in r)
    state = json.loads((tmp_path / "ref" / "checkpoint-6" / "trainer_state.json").read_text())["extra_state"]["lagrange"]
    assert math.exp(state["log_lambda"]) == pytest.approx(lambdas[-1], rel=1e-12)
    assert state["optimizer"]["num_updates"] == 6 and len(state["episode_costs"]) == 6
    assert sum(state["episode_costs"]) / 6 == pytest.approx(records[-1]["train/episode_cost"], rel=1e-6)
    from alignment.models import AutoModelForScore

    cost_critic = AutoModelForScore.from_pretrained(str(tmp_path / "ref" / "cost_value"))
    assert cost_critic.config.score_type == "critic"

    output = tmp_path / "killed"
    killed = write_config(tmp_path / "killed.json", tiny_assets, tiny_score_model, repo_root, output_dir=str(output), **settings)
    resumed = sigkill_at_checkpoint_then_resume(RUN_PPO, killed, output, repo_root, env)
    assert "resumed from" in resumed.stderr + resumed.stdout
    expected, got = comparable(records), comparable(read_metrics(str(output)))
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        for key in COMPARABLE:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_ppo_lag_matches_one_process(tmp_path, tiny_assets, tiny_score_model, repo_root):
    common = dict(temperature=0.0, max_steps=3, per_device_train_batch_size=2)  # greedy rollouts
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
    assert "workerlog.1" in os.listdir(tmp_path / "logs")

    one, two = comparable(read_metrics(str(tmp_path / "single"))), comparable(read_metrics(str(tmp_path / "double")))
    assert sorted(one) == sorted(two) == [1, 2, 3], (one, two, result.stdout[-2000:])
    for step in one:
        for key in SPLIT_INDEPENDENT:
            assert two[step][key] == pytest.approx(one[step][key], rel=2e-3, abs=2e-4), (step, key)
    # The multiplier moved, identically: the window held both ranks' episode costs.
    assert abs(one[3]["train/lambda"] - 1.0) > 0.1


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_parallel_ppo_lag_matches_one_process(tmp_path, tiny_assets, tiny_score_model, repo_root):
    """PP=2: the cost critic is a pipeline (LlamaValuePipe) like the reward critic, its loss runs on the last
    stage, and the run equals one process: metrics, lambda, and the saved cost critic."""
    from safetensors.numpy import load_file

    runs_script = os.path.join(repo_root, "tests", "dist_scripts", "ppo_runs.py")
    # clipping every update + a large adam epsilon make a stage-local gradient norm visible (see test_ppo_parallel)
    common = dict(temperature=0.0, max_steps=2, per_device_prompt_batch_size=4, gradient_accumulation_steps=2,
                  max_grad_norm=0.05, adam_epsilon=1e-4, save_strategy="steps", save_steps=1)  # fmt: skip
    single = write_config(tmp_path / "single.json", tiny_assets, tiny_score_model, repo_root, output_dir=str(tmp_path / "single"), **common)
    pipeline = write_config(
        tmp_path / "pp.json", tiny_assets, tiny_score_model, repo_root, output_dir=str(tmp_path / "pp"),
        pipeline_parallel_degree=2, eval_mode="single", **common,
    )  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo_root)
    subprocess.run([sys.executable, runs_script, single], check=True, cwd=repo_root, env=env, capture_output=True, timeout=300)
    launch_distributed(runs_script, [pipeline], nproc=2, log_dir=tmp_path / "logs", timeout=300, cwd=repo_root,
                       env={"OMP_NUM_THREADS": "1"})  # fmt: skip

    one, two = comparable(read_metrics(str(tmp_path / "single"))), comparable(read_metrics(str(tmp_path / "pp")))
    assert sorted(one) == sorted(two) == [1, 2]
    for step in one:
        for key in COMPARABLE:
            assert two[step][key] == pytest.approx(one[step][key], rel=2e-5, abs=2e-6), (step, key)
    for part in ("policy", "value", "cost_value"):
        want, have = load_file(str(tmp_path / "single" / part / "model.safetensors")), load_file(str(tmp_path / "pp" / part / "model.safetensors"))
        assert want.keys() == have.keys(), part
        for key in want:
            assert abs(have[key] - want[key]).max() <= 1e-5, (part, key)
    # Each stage saved the cost critic's AdamW moments of its own layers.
    assert {f"cost_value-rank{r}.safetensors" for r in (0, 1)} <= set(os.listdir(tmp_path / "pp" / "checkpoint-2" / "optimizer"))
