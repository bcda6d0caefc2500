"""The critic-free quick start: SFT (the session's README run) -> GRPO / RLOO / REINFORCE++ on the example
task's rule reward, no reward model and no critic. The trained policy's ground-truth task score on
held-out prompts must clearly beat the SFT policy's (docs/critic_free.md records the numbers)."""

from __future__ import annotations

import os

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_plus_plus"])
def test_critic_free_quickstart_improves_the_task_score(quickstart_run, run_quickstart, tmp_path, algorithm):
    sft = quickstart_run[0] / "sft"
    report = run_quickstart(tmp_path / "out", "--algorithm", algorithm, "--sft-from", str(sft))
    assert report["algorithm"] == algorithm
    for key in ("sft_task_score", "ppo_task_score", "sft_reward_mean", "ppo_reward_mean"):
        assert report[key] is not None, key
    assert set(report["stage_seconds"]) == {"eval_sft", algorithm, "eval_policy"}  # no SFT, RM or critic stage
    assert report["rm_eval_accuracy"] is None and "reward_model" not in report["checkpoints"]
    # The rule reward is the task score: both evaluations measure the ground truth.
    assert report["sft_reward_mean"] == pytest.approx(report["sft_task_score"])
    assert report["ppo_task_score"] > report["sft_task_score"] + 0.08, report

    stage = tmp_path / "out" / algorithm
    assert report["checkpoints"]["policy"] == str(stage / "policy")
    assert "value" not in report["checkpoints"] and not (stage / "value").exists()
    assert sorted(os.listdir(stage / "checkpoint-50")) == ["manifest.json", "optimizer", "policy", "trainer_state.json"]
    assert os.path.isfile(report["plots"][algorithm])
