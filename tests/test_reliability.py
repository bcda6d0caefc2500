"""Faults and bad input: killed ranks, SIGKILLed runs, NaN guards, corrupt checkpoints, bad configs.

docs/reliability.md lists each case with what the user sees; every row is backed by a test here or
in the stage's own test file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from alignment.utils.checkpoint import CheckpointError
from alignment.utils.config import ConfigError
from alignment.utils.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_REWARD = os.path.join(REPO, "alignment", "rm", "run_reward.py")
DATA = os.path.join(REPO, "data", "safe_rlhf")


def reward_config(path, model: str, output_dir, **overrides) -> str:
    config = {
        "model_name_or_path": model,
        "train_datasets": f"PKU-SafeRLHF/train:256/-1:{DATA}/train.jsonl",
        "output_dir": str(output_dir),
        "max_length": 64,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "num_train_epochs": 1,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 8,
        "do_train": True,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 5,
    }
    config.update(overrides)
    with open(path, "w") as file:
        json.dump(config, file)
    return str(path)


def worker_of_rank(launcher: psutil.Process, rank: int, deadline: float) -> psutil.Process:
    while time.time() < deadline:
        for child in launcher.children(recursive=True):
            try:
                if child.environ().get("PADDLE_TRAINER_ID") == str(rank) and "run_reward.py" in " ".join(child.cmdline()):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} found")


@pytest.mark.distributed
@pytest.mark.slow
def test_killing_one_rank_stops_the_other_with_a_clear_message(tmp_path, tiny_assets):
    config = reward_config(tmp_path / "rm.json", tiny_assets["llama"], tmp_path / "out", num_train_epochs=50)
    log_dir = tmp_path / "logs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir), RUN_REWARD, config],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        victim = worker_of_rank(psutil.Process(launcher.pid), 1, time.time() + 120)
        deadline = time.time() + 180
        while not (tmp_path / "out" / "metrics.jsonl").exists():  # training is under way
            assert launcher.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.1)
        killed_at = time.time()
        victim.send_signal(signal.SIGKILL)
        launcher.wait(timeout=120)  # bounded: the other rank must not hang in a collective
        elapsed = time.time() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert elapsed < 60, f"the surviving rank took {elapsed:.0f}s to stop"
    survivor_log = (log_dir / "workerlog.0").read_text(errors="replace")
    # Depending on timing the survivor either gets the launcher's SIGTERM (our message) or sees the
    # dead peer's socket close inside a collective first (gloo aborts the process with this error).
    assert (
        "received SIGTERM: another rank of this job failed" in survivor_log
        or "Connection reset by peer" in survivor_log
    ), survivor_log[-2000:]


@pytest.mark.slow
def test_reward_model_resumes_after_sigkill_with_the_same_metrics(tmp_path, tiny_assets):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = reward_config(tmp_path / "ref.json", tiny_assets["llama"], tmp_path / "ref", max_steps=24)
    subprocess.run([sys.executable, RUN_REWARD, reference], check=True, cwd=REPO, env=env, capture_output=True, timeout=300)

    output = tmp_path / "killed"
    killed = reward_config(tmp_path / "killed.json", tiny_assets["llama"], output, max_steps=24)
    process = subprocess.Popen([sys.executable, RUN_REWARD, killed], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while not (output / "checkpoint-8" / "manifest.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with pytest.raises(subprocess.CalledProcessError) as refused:  # resuming is opt-in
        subprocess.run([sys.executable, RUN_REWARD, killed], check=True, cwd=REPO, env=env, capture_output=True, text=True)
    assert "--resume_from_checkpoint auto" in refused.value.stderr
    resumed = subprocess.run([sys.executable, RUN_REWARD, killed, "--resume_from_checkpoint", "auto"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume_from_checkpoint=auto: " in resumed.stdout + resumed.stderr

    def losses(directory):
        return [(r["step"], r["loss"]) for r in read_metrics(str(directory)) if "loss" in r]

    expected, got = losses(tmp_path / "ref"), losses(output)
    # The exact sequence: each step once (rows the killed run logged after checkpoint-8 are dropped on resume).
    assert [step for step, _ in got] == [step for step, _ in expected] == list(range(1, 25))
    for (step, loss), (_, reference) in zip(got, expected):
        assert loss == pytest.approx(reference, rel=1e-5), step


def test_nonfinite_reward_stops_or_skips_ppo(tmp_path, tiny_assets, tiny_score_model, repo_root):
    from test_ppo_trainer import make_trainer, ppo_config

    from alignment.ppo.rl_trainer import NonFiniteError

    def poison(trainer, at_call: int):
        original, calls = trainer.reward_score, {"n": 0}

        def reward_score(input_ids, attention_mask):
            calls["n"] += 1
            scores = original(input_ids, attention_mask)
            return scores * float("nan") if calls["n"] == at_call else scores

        trainer.reward_score = reward_score

    one_update_per_rollout = dict(max_steps=3, gradient_accumulation_steps=2)
    stopping = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, "stop", **one_update_per_rollout))
    poison(stopping, at_call=2)
    before = {k: v.numpy().copy() for k, v in stopping.actor_trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"non-finite rollout at step 1 .*'reward': nan"):
        stopping.train()
    assert stopping.state.global_step == 1
    after = stopping.actor_trainer.model.state_dict()
    assert any(not np.array_equal(before[k], after[k].numpy()) for k in before)  # step 1 did update...
    weights_at_step_1 = {k: v.numpy().copy() for k, v in after.items()}
    assert all(np.isfinite(v).all() for v in weights_at_step_1.values())  # ...and nothing was poisoned

    skipping = make_trainer(
        ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, "skip", on_nonfinite="skip", **one_update_per_rollout)
    )
    poison(skipping, at_call=2)
    state = skipping.train()
    assert state.global_step == 3 and state.skipped_updates == 1
    assert skipping.actor_trainer.num_optimizer_steps == 2
    records = read_metrics(os.path.join(tmp_path, "skip"))
    assert records[-1]["train/skipped_updates"] == 1
    assert all(np.isfinite(v.numpy()).all() for v in skipping.actor_trainer.model.state_dict().values())


def test_nonfinite_loss_stops_the_reward_model_before_the_update(tmp_path, tiny_assets, monkeypatch):
    from alignment.rm import run_reward
    from alignment.rm.reward_trainer import RewardTrainer
    from alignment.utils.trainer import NonFiniteLossError

    original, calls = RewardTrainer.compute_loss, {"n": 0}

    def compute_loss(self, model, inputs, return_outputs=False):
        calls["n"] += 1
        loss = original(self, model, inputs, return_outputs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(RewardTrainer, "compute_loss", compute_loss)
    config = reward_config(tmp_path / "rm.json", tiny_assets["llama"], tmp_path / "out", max_steps=6, save_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 2 .*Batch: .*better_input_ids"):
        run_reward.main([config])
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint")) == ["checkpoint-2"]


def test_corrupt_checkpoint_is_named_and_auto_resume_skips_it(tmp_path, tiny_assets):
    from alignment.rm import run_reward

    config = reward_config(tmp_path / "rm.json", tiny_assets["llama"], tmp_path / "out", max_steps=4, save_steps=2)
    run_reward.main([config])
    checkpoint = tmp_path / "out" / "checkpoint-4"
    weights = checkpoint / "model_state.pdparams"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{weights.name} has \d+ bytes, expected \d+ \(truncated"):
        run_reward.main([config, "--resume_from_checkpoint", str(checkpoint)])
    # "auto" falls back to the newest checkpoint that verifies.
    from alignment.utils.checkpoint import get_last_checkpoint

    assert get_last_checkpoint(str(tmp_path / "out")) == str(tmp_path / "out" / "checkpoint-2")


def test_every_config_problem_is_reported_at_once(tmp_path, tiny_assets, tiny_score_model):
    from alignment.ppo import run_ppo

    config = {
        "train_datasets": f"PKU-SafeRLHF/train:1:{DATA}/train.jsonl",
        "actor_model_name_or_path": tiny_assets["llama"],
        "reward_model_name_or_path": "./no/such/model",
        "output_dir": str(tmp_path / "out"),
        "top_p": 1.5,
        "clip_range_ratio": 0,
        "per_device_prompt_batch_size": 3,
        "per_device_train_batch_size": 2,
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        run_ppo.main([str(path)])
    message = str(info.value)
    for expected in ["reward_model_name_or_path: path './no/such/model' does not exist", "top_p: must be in (0, 1]",
                     "clip_range_ratio: must be > 0", "per_device_train_batch_size: must divide"]:  # fmt: skip
        assert expected in message, message
    assert message.startswith("4 problem(s)")

    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({**config, "top_p": 0.9, "clip_range_ratio": 0.2, "per_device_prompt_batch_size": 4,
                                "reward_model_name_or_path": tiny_score_model, "kl_coef": 0.1, "max_steps": "ten"}))  # fmt: skip
    with pytest.raises(ConfigError) as info:
        run_ppo.main([str(typo)])
    assert "kl_coef: unknown argument; did you mean 'kl_coeff'?" in str(info.value)
    assert "max_steps: expected an integer, got 'ten'" in str(info.value)
