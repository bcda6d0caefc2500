"""Critic-free RL (GRPO, RLOO, REINFORCE++) on the one RL loop: arguments, rewards, experience, checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import paddle
import pytest
from resume_helpers import sigkill_at_checkpoint_then_resume

from alignment.ppo.run_ppo import DataArgument, ModelArgument, TrainingArguments, build_trainer, validate_arguments
from alignment.utils.config import ConfigError, parse_arguments
from alignment.utils.metrics import read_metrics

REWARD_MODULE = '''
from alignment.rewards.functions import register_reward_function

@register_reward_function("test_chars")
def chars(prompt, response, **extras):
    # the dataset row's other fields arrive as keyword arguments
    assert "answer" in extras and "input" not in extras, sorted(extras)
    return float(len(response))
'''


def critic_free_config(tmp_path, tiny_assets, repo_root, name: str = "grpo", **overrides) -> str:
    data = os.path.join(repo_root, "data")
    module = tmp_path.parent / "critic_free_rewards.py"  # one file per session: a name registers once
    if not module.exists():
        module.write_text(REWARD_MODULE)
    config = {
        "rl_algorithm": "grpo",
        "train_datasets": f"PKU-SafeRLHF/train:1:{data}/safe_rlhf/train.jsonl",
        "actor_model_name_or_path": tiny_assets["llama"],
        "reward_functions": "test_chars",
        "custom_reward_modules": str(module),
        "output_dir": str(tmp_path / name),
        "max_length": 48,
        "max_new_tokens": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "per_device_prompt_batch_size": 2,
        "per_device_train_batch_size": 2,
        "rollout_n": 2,
        "kl_coeff": 0.0,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "do_train": True,
        "report_to": "none",
        "rollout_backend": "plain",
        "disable_tqdm": True,
        "seed": 5,
    }
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not None}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def parse(path: str):
    model_args, data_args, args = parse_arguments((ModelArgument, DataArgument, TrainingArguments), [path])
    validate_arguments(model_args, data_args, args, path)
    return model_args, data_args, args


def make_trainer(path: str):
    return build_trainer(*parse(path), path)


@pytest.mark.parametrize(
    "overrides, field, message",
    [
        (dict(rollout_n=None, num_return_sequences=1), "num_return_sequences", "group of one has no baseline"),
        (dict(rl_algorithm="rloo", rollout_n=1), "num_return_sequences", "group of one"),
        (dict(critic_learning_rate=1e-5), "critic_learning_rate", "trains no critic"),
        (dict(reward_critic_model_name_or_path="some/critic"), "reward_critic_model_name_or_path", "trains no critic"),
        (dict(gae_lambda=0.9), "gae_lambda", "trains no critic"),
        (dict(reward_functions=None), "reward_functions", "needs a reward"),
        (dict(reward_functions="test_chars,tsak_score:2"), "reward_functions", "unknown reward function 'tsak_score'; registered: .*task_score"),
        (dict(reward_functions="test_chars:heavy"), "reward_functions", "is not a number"),
        (dict(reward_server="localhost:8000"), "reward_server", "http"),
        (dict(rollout_n=4, num_return_sequences=2), "rollout_n", "alias of num_return_sequences"),
        (dict(clip_range_ratio_low=1.5), "clip_range_ratio_low", "must be < 1"),
        (dict(kl_loss_coeff=-1.0), "kl_loss_coeff", ">= 0"),
    ],
)  # fmt: skip
def test_bad_critic_free_arguments_fail_before_any_model_loads(tmp_path, tiny_assets, repo_root, overrides, field, message):
    path = critic_free_config(tmp_path, tiny_assets, repo_root, **overrides)
    with pytest.raises(ConfigError, match=f"{field}: .*{message}"):
        parse(path)


def test_rollout_n_is_num_return_sequences_and_single_samples_are_fine_for_reinforce_plus_plus(tmp_path, tiny_assets, repo_root):
    _, _, args = parse(critic_free_config(tmp_path, tiny_assets, repo_root, rollout_n=3, per_device_train_batch_size=3))
    assert args.num_return_sequences == 3
    _, _, args = parse(critic_free_config(tmp_path, tiny_assets, repo_root, rl_algorithm="reinforce_plus_plus", rollout_n=1))
    assert args.num_return_sequences == 1


class FixedResponses:
    """A ``generate_fn`` returning given response ids after each (left-padded) prompt."""

    def __init__(self, responses: list[list[int]]):
        self.responses = responses

    def __call__(self, model, input_ids, attention_mask, *, num_return_sequences, pad_token_id, **kwargs):
        prompts = paddle.repeat_interleave(input_ids, num_return_sequences, axis=0)
        width = max(len(r) for r in self.responses)
        rows = [r + [pad_token_id] * (width - len(r)) for r in self.responses[: prompts.shape[0]]]
        return paddle.concat([prompts, paddle.to_tensor(rows, dtype="int64")], axis=1)


def test_grpo_experience_uses_rule_rewards_of_raw_samples_and_group_advantages(tmp_path, tiny_assets, repo_root):
    trainer = make_trainer(critic_free_config(tmp_path, tiny_assets, repo_root, rl_algorithm="grpo", per_device_prompt_batch_size=2, rollout_n=3, per_device_train_batch_size=3))
    assert list(trainer.trainers) == ["actor"] and trainer.reward_model is None
    assert trainer.model_parts().keys() == {"policy"}
    tokenizer = trainer.tokenizer
    eos = tokenizer.eos_token_id
    # two prompts x three samples; different response lengths give different rewards within a group
    responses = [[30, eos], [31, 32, 33, eos], [34, 35, eos], [40, 41, 42, 43, 44], [45, eos], [46, 47, 48, eos]]
    trainer._generate_fn = FixedResponses(responses)
    batch = next(iter(trainer.prompt_loader))
    with paddle.no_grad():
        sequences = trainer.sample_rollout(batch)
        from alignment.models.ppo_model_utils import make_rollout_attention_mask

        mask = make_rollout_attention_mask(batch["attention_mask"], sequences, eos)
        experience = trainer.make_experience(batch["input_ids"], sequences, mask, prompt_indices=batch["prompt_index"])
    # the expected rewards from the texts themselves
    texts = [tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip() for r in responses]
    scores = np.asarray([len(t) for t in texts], dtype=np.float64)
    expected = []
    for group in (scores[:3], scores[3:]):
        expected += list((group - group.mean()) / (group.std(ddof=1) + 1e-6))
    advantages = experience["advantages"].numpy()
    response_mask = experience["response_mask"].numpy()
    for row in range(6):
        np.testing.assert_allclose(advantages[row][response_mask[row]], expected[row], rtol=1e-5, atol=1e-5)
        assert np.all(advantages[row][~response_mask[row]] == 0)
    metrics = experience["metrics"]
    assert metrics["train/reward"] == pytest.approx(scores.mean(), rel=1e-5)
    assert metrics["train/group_reward_std"] == pytest.approx(np.mean([scores[:3].std(ddof=1), scores[3:].std(ddof=1)]), rel=1e-5)
    assert metrics["train/zero_variance_groups"] == 0.0
    assert "old_values" not in experience


def test_critic_free_training_saves_no_value_and_logs_group_metrics(tmp_path, tiny_assets, repo_root):
    path = critic_free_config(
        tmp_path, tiny_assets, repo_root, rl_algorithm="rloo", save_strategy="steps", save_steps=2, max_steps=2,
        kl_loss_coeff=0.05, entropy_coeff=0.01,
    )  # fmt: skip
    trainer = make_trainer(path)
    before = {k: v.numpy().copy() for k, v in trainer.actor_trainer.model.state_dict().items()}
    state = trainer.train()
    trainer.save_final_models()
    assert state.global_step == 2 and trainer.actor_trainer.num_optimizer_steps == 2
    output = tmp_path / "grpo"
    assert sorted(os.listdir(output / "checkpoint-2")) == ["manifest.json", "optimizer", "policy", "trainer_state.json"]
    assert sorted(os.listdir(output / "checkpoint-2" / "optimizer")) == ["policy-rank0.json", "policy-rank0.safetensors"]
    assert not (output / "value").exists() and (output / "policy").is_dir()
    after = trainer.actor_trainer.model.state_dict()
    assert any(not np.allclose(before[k], after[k].numpy()) for k in before)  # the policy learned something
    records = [r for r in read_metrics(str(output)) if "train/actor_loss" in r]
    for key in ("train/reward", "train/reward_std", "train/group_reward_std", "train/zero_variance_groups", "train/kl_divergence",
                "train/entropy", "train/clip_fraction", "train/kl_loss", "train/mean_generated_length", "train/reward_test_chars"):  # fmt: skip
        assert all(np.isfinite(r[key]) for r in records), key
    assert "train/reward_critic_loss" not in records[0] and "train/reward_critic_lr" not in records[0]
    assert all(r["train/entropy"] > 0 for r in records)

    # resume restores the policy and its optimizer (no critic expected)
    resumed = make_trainer(critic_free_config(tmp_path, tiny_assets, repo_root, name="resumed", rl_algorithm="rloo", max_steps=4))
    resumed.load_checkpoint(str(output / "checkpoint-2"))
    assert resumed.state.global_step == 2 and resumed.actor_trainer.num_optimizer_steps == 2


def test_groups_survive_micro_batch_splits(tmp_path, tiny_assets, repo_root):
    """One rollout of 2 prompts x 4 samples: 1 micro-batch of 8 rows or 4 of 2 rows accumulated give the same update."""

    def train(name: str, rows: int, accumulation: int):
        trainer = make_trainer(critic_free_config(
            tmp_path, tiny_assets, repo_root, name=name, rollout_n=4, per_device_train_batch_size=rows,
            gradient_accumulation_steps=accumulation, max_steps=1, temperature=1.0,
        ))  # fmt: skip
        trainer.train()
        return {k: v.numpy() for k, v in trainer.actor_trainer.model.state_dict().items()}, read_metrics(str(tmp_path / name))

    (whole, whole_metrics), (split, split_metrics) = train("whole", 8, 1), train("split", 2, 4)
    assert whole_metrics[0]["train/reward"] == split_metrics[0]["train/reward"]  # same rollout
    assert whole_metrics[0]["train/zero_variance_groups"] < 2  # some learning signal
    for name in whole:
        np.testing.assert_allclose(split[name], whole[name], atol=2e-5, err_msg=name)  # Adam steps are ~lr = 1e-3


RUN_PPO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alignment", "ppo", "run_ppo.py")
# Metrics whose definition does not depend on how the groups are spread over ranks and micro-batches.
COMPARABLE = [
    "train/actor_loss", "train/reward", "train/group_reward_std", "train/kl_divergence", "train/kl_loss", "train/entropy",
    "train/mean_generated_length", "train/max_generated_length", "train/actor_lr",
]  # fmt: skip


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_grpo_matches_one_process_with_the_same_global_batch(tmp_path, tiny_assets, repo_root):
    """Sampled rollouts (rollout_seed_per_prompt), the rule reward, group advantages: metrics and weights agree."""
    import subprocess
    import sys

    from alignment.parallel.launch import launch_distributed

    common = dict(
        reward_functions="length", custom_reward_modules=None, rollout_seed_per_prompt=True, max_steps=3, max_new_tokens=10,
        kl_loss_coeff=0.1, learning_rate=5e-4, per_device_train_batch_size=2,
    )  # fmt: skip
    single = critic_free_config(tmp_path, tiny_assets, repo_root, "single", per_device_prompt_batch_size=4, gradient_accumulation_steps=4, **common)
    double = critic_free_config(tmp_path, tiny_assets, repo_root, "double", per_device_prompt_batch_size=2, gradient_accumulation_steps=2, **common)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, RUN_PPO, single], check=True, cwd=repo_root, env=env, capture_output=True, timeout=300)
    result = launch_distributed(RUN_PPO, [double], nproc=2, log_dir=tmp_path / "logs", timeout=300, cwd=repo_root)
    assert "workerlog.1" in os.listdir(tmp_path / "logs")

    def comparable(name):
        return {r["step"]: r for r in read_metrics(str(tmp_path / name)) if "train/actor_loss" in r}

    one, two = comparable("single"), comparable("double")
    assert sorted(one) == sorted(two) == [1, 2, 3], (one, two, result.stdout[-2000:])
    assert any(one[step]["train/group_reward_std"] > 0 for step in one)  # the groups carried a signal
    for step in one:
        for key in COMPARABLE:
            assert two[step][key] == pytest.approx(one[step][key], rel=2e-3, abs=2e-4), (step, key)
    from safetensors.numpy import load_file

    weights_one = load_file(str(tmp_path / "single" / "policy" / "model.safetensors"))
    weights_two = load_file(str(tmp_path / "double" / "policy" / "model.safetensors"))
    initial = load_file(os.path.join(tiny_assets["llama"], "model.safetensors"))
    assert any(not np.allclose(weights_one[k], initial[k]) for k in initial if k in weights_one)  # it trained
    for name in weights_one:
        np.testing.assert_allclose(weights_two[name], weights_one[name], atol=2e-4, err_msg=name)
    assert not os.path.exists(tmp_path / "double" / "value")


@pytest.mark.parametrize("name", ["config/tiny/grpo_argument.json", "config/llama/grpo_argument.json"])
def test_critic_free_recipes_use_known_arguments(repo_root, name):
    from alignment.utils.config import field_types, load_argument_file

    config = load_argument_file(os.path.join(repo_root, name))
    known = field_types((ModelArgument, DataArgument, TrainingArguments))
    assert set(config) <= set(known), set(config) - set(known)
    assert config["rl_algorithm"] == "grpo" and config["rollout_n"] >= 2
    assert not {k for k in config if k.startswith("critic_") or k in ("reward_critic_model_name_or_path", "clip_range_value")}


def test_benchmark_ppo_times_a_critic_free_step(repo_root):
    """``benchmark_ppo.py --algorithm grpo``: the same JSON, a grouped rollout, no critic."""
    import subprocess
    import sys

    shape = ["--vocab-size", "300", "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2",
             "--num-heads", "4", "--batch-size", "4", "--prompt-len", "6", "--new-tokens", "5", "--json", "--steps", "1"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "scripts/benchmark_ppo.py", *shape, "--algorithm", "grpo"],
        cwd=repo_root, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["config"]["algorithm"] == "grpo" and report["config"]["samples"] == 2
    for key in ("median_step_s", "generation_s", "experience_s", "train_s", "peak_rss_mb"):
        assert report[key] > 0, key
    bad = subprocess.run(
        [sys.executable, "scripts/benchmark_ppo.py", *shape, "--algorithm", "rloo", "--samples", "1"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "--samples" in bad.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_grpo_under_tensor_and_pipeline_parallel_matches_one_process(tmp_path, tiny_assets, repo_root):
    """TP=2 and PP=2 (2 processes each, one job): both ranks of the replica sample the same groups, the
    estimator sees whole groups, the actor loss (with its entropy / KL / clip metrics broadcast from the last
    pipeline stage) runs inside the pipeline; metrics and the policy equal one process. No critic anywhere."""
    from test_ppo_parallel import Runs  # the PPO parallel harness: run_ppo.main on several configs per job

    data = os.path.join(repo_root, "data")
    base = {
        "rl_algorithm": "grpo", "rollout_n": 2, "reward_functions": "length", "kl_coeff": 0.0, "kl_loss_coeff": 0.1,
        "entropy_coeff": 0.01, "clip_range_ratio_high": 0.3,
        "train_datasets": f"PKU-SafeRLHF/train:1:{data}/safe_rlhf/train.jsonl",
        "actor_model_name_or_path": tiny_assets["llama"], "max_length": 48, "max_new_tokens": 8,
        "temperature": 1.0, "top_p": 1.0, "rollout_backend": "plain",
        "per_device_prompt_batch_size": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "update_iters": 2, "learning_rate": 5e-4, "max_grad_norm": 0.05, "adam_epsilon": 1e-4, "max_steps": 4,
        "logging_steps": 1, "save_strategy": "no", "do_train": True, "report_to": "none", "disable_tqdm": True, "seed": 13,
    }  # fmt: skip
    runs = Runs(tmp_path, base)
    runs.base["max_steps"] = 4
    runs.launch([runs.config("single")], nproc=1)
    runs.launch([runs.config("tp", tensor_parallel_degree=2)], nproc=2)
    runs.launch([runs.config("pp", pipeline_parallel_degree=2, eval_mode="single")], nproc=2)

    keys = ["train/actor_loss", "train/reward", "train/group_reward_std", "train/zero_variance_groups", "train/kl_divergence",
            "train/kl_loss", "train/entropy", "train/clip_fraction", "train/mean_generated_length"]  # fmt: skip
    expected = {r["step"]: r for r in read_metrics(str(tmp_path / "single")) if "train/actor_loss" in r}
    assert sorted(expected) == [2, 4] and all(r["train/kl_loss"] > 0 and r["train/entropy"] > 0 for r in expected.values())
    for name in ("tp", "pp"):
        got = {r["step"]: r for r in read_metrics(str(tmp_path / name)) if "train/actor_loss" in r}
        assert sorted(got) == [2, 4], (name, got)
        for step in expected:
            for key in keys:
                assert got[step][key] == pytest.approx(expected[step][key], rel=2e-5, abs=2e-6), (name, step, key)
        want, have = runs.weights("single", "policy"), runs.weights(name, "policy")
        for key in want:
            np.testing.assert_allclose(have[key], want[key], rtol=0, atol=1e-5, err_msg=f"{name}/{key}")
        assert not (tmp_path / name / "value").exists()


@pytest.mark.slow
def test_sigkilled_grpo_run_resumes_with_the_same_metrics_and_policy(tmp_path, tiny_assets, repo_root):
    """The one-model loop checkpoints and resumes what it declared: policy + its optimizer, counters, data order."""
    import subprocess
    import sys

    settings = dict(
        reward_functions="length", custom_reward_modules=None, per_device_prompt_batch_size=2, rollout_n=2,
        per_device_train_batch_size=2, max_steps=8, save_strategy="steps", save_steps=2, save_total_limit=2,
        kl_loss_coeff=0.05, learning_rate=5e-4,
    )  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = critic_free_config(tmp_path, tiny_assets, repo_root, "ref", **settings)
    subprocess.run([sys.executable, RUN_PPO, reference], check=True, cwd=repo_root, env=env, capture_output=True, timeout=300)

    output = tmp_path / "killed"
    killed = critic_free_config(tmp_path, tiny_assets, repo_root, "killed", **settings)
    sigkill_at_checkpoint_then_resume(RUN_PPO, killed, output, repo_root, env)

    def records(name):
        return {r["step"]: r for r in read_metrics(str(tmp_path / name)) if "train/actor_loss" in r}

    expected, got = records("ref"), records("killed")
    assert sorted(got) == sorted(expected) == [2, 4, 6, 8]
    for step in expected:
        for key in COMPARABLE + ["train/zero_variance_groups", "train/clip_fraction"]:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6), (step, key)
    from safetensors.numpy import load_file

    want, have = load_file(str(tmp_path / "ref" / "policy" / "model.safetensors")), load_file(str(output / "policy" / "model.safetensors"))
    for key in want:
        np.testing.assert_allclose(have[key], want[key], atol=1e-6, err_msg=key)
    assert sorted(n for n in os.listdir(output) if n.startswith("checkpoint-")) == ["checkpoint-6", "checkpoint-8"]
    assert sorted(os.listdir(output / "checkpoint-8" / "optimizer")) == ["policy-rank0.json", "policy-rank0.safetensors"]
