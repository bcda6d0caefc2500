"""PPO under sharding stage 1, tensor parallel 2, pipeline parallel 2 (2 CPU processes), TP 2 x PP 2 and
TP 2 x data parallel 2 (4 processes) == one process.

Every distributed job runs ``run_ppo.main`` on several configs in a row (``dist_scripts/ppo_runs.py``: the
first config initialises fleet, the others share its layout) and is compared with single-process runs of the
same global batch and seed:

* greedy rollouts (``temperature: 0``) with ptx, for sharding, TP ``eval_mode`` single / tensor_parallel and
  PP; sampled rollouts (``rollout_backend: plain``, the paddlenlp sampler under TP) for TP.
* ``max_grad_norm: 0.05`` clips every update and ``adam_epsilon: 1e-4`` keeps AdamW's step proportional to
  the gradient scale, so a clipping norm computed over part of the model (one TP shard, one pipeline
  stage, one optimizer shard) would move the weights by ~7e-5 (measured with the norm off by sqrt(2));
  the parallel runs agree with one process to ~1e-7, and the tests allow 1e-5.
* the sharding, TP and PP runs also resume from their own step-1 checkpoint and must reproduce step 2.

Loading across TP degrees: every TP=2 run starts from TP=1 checkpoints (the tiny actor and score model,
split on load) and writes merged TP=1 checkpoints (``output_dir/policy``, ``value``, ``checkpoint-*``),
which the tests load in this single process and the resumed TP=2 run loads split again.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignment.parallel.launch import launch_distributed
from alignment.utils.metrics import read_metrics

SCRIPTS = Path(__file__).parent / "dist_scripts"
REPO = Path(__file__).parent.parent
RUNS = SCRIPTS / "ppo_runs.py"
_spec = importlib.util.spec_from_file_location("parallel_common", SCRIPTS / "parallel_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

COMPARED = [
    "train/actor_loss",
    "train/reward_critic_loss",
    "train/ptx_loss",
    "train/reward",
    "train/kl_divergence",
    "train/reward_value",
    "train/mean_generated_length",
    "train/actor_lr",
    "eval/reward",
]
WEIGHT_ATOL = 1e-5


def base_settings(tiny_assets: dict, tiny_score_model: str) -> dict:
    """One process: a global batch of 4 prompts, 2 micro-batches of 2 rows, one update per rollout."""
    data = REPO / "data"
    return {
        "train_datasets": f"PKU-SafeRLHF/train:1:{data}/safe_rlhf/train.jsonl",
        "ptx_datasets": f"alpaca:1:{data}/alpaca/train.jsonl",
        "eval_datasets": f"PKU-SafeRLHF/test:8/-1:{data}/safe_rlhf/test.jsonl",  # used with do_eval
        "actor_model_name_or_path": tiny_assets["llama"],
        "reward_model_name_or_path": tiny_score_model,
        "max_length": 48,
        "max_new_tokens": 8,
        "temperature": 0.0,
        "top_p": 0.9,
        "per_device_prompt_batch_size": 4,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "ptx_coeff": 0.5,
        "learning_rate": 5e-4,
        "critic_learning_rate": 5e-4,
        "lr_scheduler_type": "cosine",
        "max_grad_norm": 0.05,
        "adam_epsilon": 1e-4,
        "max_steps": 2,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1,
        "do_train": True,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 11,
    }


SAMPLED = {"temperature": 1.0, "rollout_backend": "plain", "do_eval": True, "evaluation_strategy": "no"}
SHARDED = {  # 2 data-parallel ranks x 2 prompts = the same global batch
    "sharding": "stage1",
    "sharding_parallel_degree": 2,
    "per_device_prompt_batch_size": 2,
    "gradient_accumulation_steps": 1,
}


class Runs:
    """Writes configs named ``name`` under ``root`` and runs them (in one process or an ``nproc``-process job)."""

    def __init__(self, root: Path, base: dict):
        self.root = root
        self.base = base

    def config(self, name: str, **overrides) -> str:
        settings = {**copy.deepcopy(self.base), **overrides, "output_dir": str(self.root / name)}
        path = self.root / f"{name}.json"
        path.write_text(json.dumps(settings))
        return str(path)

    def resume(self, name: str, source: str, **overrides) -> str:
        """Same as ``source`` but resumed from its step-1 checkpoint."""
        checkpoint = str(self.root / source / "checkpoint-1")
        return self.config(name, resume_from_checkpoint=checkpoint, **overrides)

    def launch(self, configs: list[str], nproc: int, timeout: float = 300) -> None:
        if nproc == 1:
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
            result = subprocess.run(
                [sys.executable, str(RUNS), *configs], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
            )
            assert result.returncode == 0, result.stderr[-6000:]
        else:
            launch_distributed(
                RUNS, configs, nproc=nproc, log_dir=self.root / f"logs-{Path(configs[0]).stem}", timeout=timeout,
                cwd=REPO, env={"OMP_NUM_THREADS": "1"},
            )  # fmt: skip
        for config in configs:
            records = common.read_rank_results(str(self.root / Path(config).stem), nproc)
            assert all(r["state"]["global_step"] == self.base["max_steps"] for r in records), records

    def metrics(self, name: str) -> dict[int, dict[str, float]]:
        """``{step: {metric: value}}`` (the final evaluation is merged into the last step)."""
        merged: dict[int, dict[str, float]] = {}
        for record in read_metrics(str(self.root / name)):
            merged.setdefault(record["step"], {}).update({k: record[k] for k in COMPARED if k in record})
        return merged

    def weights(self, name: str, part: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.root / name / part / "model.safetensors"))


def assert_same_run(runs: Runs, reference: str, name: str, steps=(1, 2)) -> None:
    expected, got = runs.metrics(reference), runs.metrics(name)
    assert sorted(got) == list(steps), got
    for step in steps:
        assert set(got[step]) == set(expected[step]), (step, set(got[step]) ^ set(expected[step]))
        for key, value in expected[step].items():
            assert got[step][key] == pytest.approx(value, rel=2e-5, abs=2e-6), (name, step, key)
    for part in ("policy", "value"):
        want, have = runs.weights(reference, part), runs.weights(name, part)
        assert want.keys() == have.keys(), (part, set(want) ^ set(have))
        for key in want:
            np.testing.assert_allclose(have[key], want[key], rtol=0, atol=WEIGHT_ATOL, err_msg=f"{name}/{part}/{key}")


def owned_parameters(checkpoint: Path, part: str, rank: int) -> set[str]:
    """Parameters whose AdamW moments rank ``rank`` saved in ``checkpoint``."""
    from safetensors.numpy import load_file

    state = load_file(str(checkpoint / "optimizer" / f"{part}-rank{rank}.safetensors"))
    return {key.split("/")[1] for key in state if key.startswith("accumulator/")}


# ------------------------------------------------------------------------------------------------- jobs
@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_assets, tiny_score_model) -> Runs:
    return Runs(tmp_path_factory.mktemp("ppo_parallel"), base_settings(tiny_assets, tiny_score_model))


@pytest.fixture(scope="module")
def references(runs) -> Runs:
    """Single-process runs: greedy (``single_greedy``) and sampled with the paddlenlp sampler (``single_sampled``)."""
    runs.launch([runs.config("single_greedy"), runs.config("single_sampled", **SAMPLED)], nproc=1)
    return runs


@pytest.fixture(scope="module")
def sharding_job(references) -> Runs:
    runs = references
    runs.launch([runs.config("sharding", **SHARDED), runs.resume("sharding_resumed", "sharding", **SHARDED)], nproc=2)
    return runs


@pytest.fixture(scope="module")
def tensor_parallel_job(references) -> Runs:
    runs = references
    tp = {"tensor_parallel_degree": 2}
    configs = [
        runs.config("tp_sampled", **tp, **SAMPLED),
        runs.resume("tp_sampled_resumed", "tp_sampled", **tp, **SAMPLED),
        runs.config("tp_eval_single", **tp, eval_mode="single", offload_level="train_model freeze_model optimizer"),
        runs.config("tp_eval_tensor_parallel", **tp, eval_mode="tensor_parallel"),
    ]
    runs.launch(configs, nproc=2)
    return runs


@pytest.fixture(scope="module")
def pipeline_job(references) -> Runs:
    runs = references
    pp = {"pipeline_parallel_degree": 2}
    configs = [
        runs.config("pp_eval_tensor_parallel", **pp, eval_mode="tensor_parallel"),
        runs.resume("pp_resumed", "pp_eval_tensor_parallel", **pp, eval_mode="tensor_parallel"),
        runs.config("pp_eval_single", **pp, eval_mode="single", offload_level="train_model"),
    ]
    runs.launch(configs, nproc=2)
    return runs


@pytest.fixture(scope="module")
def hybrid_job(references) -> Runs:
    """4 processes: tensor parallel 2 x pipeline parallel 2 (fleet's groups need gloo_safe_group_creation)."""
    runs = references
    configs = [runs.config("tp2_pp2", tensor_parallel_degree=2, pipeline_parallel_degree=2, eval_mode="tensor_parallel")]
    runs.launch(configs, nproc=4)
    return runs


@pytest.fixture(scope="module")
def tp_dp_job(references) -> Runs:
    """4 processes: tensor parallel 2 x data parallel 2, greedy (== one process) and sampled with evaluation."""
    runs = references
    tp_dp = {"tensor_parallel_degree": 2, "per_device_prompt_batch_size": 2, "gradient_accumulation_steps": 1}
    configs = [
        runs.config("tp2_dp2", **tp_dp),
        runs.config("tp2_dp2_sampled", **tp_dp, **SAMPLED, per_device_eval_batch_size=4),
    ]
    runs.launch(configs, nproc=4)
    return runs


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.distributed
@pytest.mark.slow
def test_sharding_stage1_matches_single_process(sharding_job):
    runs = sharding_job
    assert_same_run(runs, "single_greedy", "sharding")
    assert_same_run(runs, "single_greedy", "sharding_resumed", steps=(2,))
    # The AdamW state really is split: each rank saved the moments of its own half of the parameters.
    checkpoint = runs.root / "sharding" / "checkpoint-2"
    for part in ("policy", "value"):
        rank0, rank1 = owned_parameters(checkpoint, part, 0), owned_parameters(checkpoint, part, 1)
        assert rank0 and rank1 and not rank0 & rank1
        buffers = {"normalizer.mean", "normalizer.var", "normalizer.count"}  # the score model's statistics
        assert rank0 | rank1 == set(runs.weights("sharding", part)) - buffers


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_parallel_matches_single_process(tensor_parallel_job):
    """TP=2 (split on load, paddlenlp sampling under TP, merged on save) == TP=1, also after resuming."""
    runs = tensor_parallel_job
    assert_same_run(runs, "single_sampled", "tp_sampled")
    assert_same_run(runs, "single_sampled", "tp_sampled_resumed", steps=(2,))
    # Each rank saved the AdamW moments of its own shards (same names, half the columns/rows).
    checkpoint = runs.root / "tp_sampled" / "checkpoint-2"
    assert owned_parameters(checkpoint, "policy", 0) == owned_parameters(checkpoint, "policy", 1)
    config = json.loads((checkpoint / "policy" / "config.json").read_text())
    assert config.get("tensor_parallel_degree", 1) == 1  # merged: a TP=1 checkpoint (3.0 omits the default)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp_eval_single", "tp_eval_tensor_parallel"])
def test_tensor_parallel_eval_modes_match_single_process(tensor_parallel_job, name):
    """The rollout runs on a separate model fed from the TP shards: gathered (single: the fast CPU decoder)
    or copied shard by shard (tensor_parallel: paddlenlp generate under TP)."""
    assert_same_run(tensor_parallel_job, "single_greedy", name)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", ["pp_eval_tensor_parallel", "pp_eval_single"])
def test_pipeline_parallel_matches_single_process(pipeline_job, name):
    """PP=2: actor/critic/ptx losses inside the pipeline, rollout on the gathered non-pipeline models."""
    runs = pipeline_job
    assert_same_run(runs, "single_greedy", name)
    if name == "pp_eval_tensor_parallel":
        assert_same_run(runs, "single_greedy", "pp_resumed", steps=(2,))
        # Each stage saved the AdamW moments of its own layers only.
        checkpoint = runs.root / name / "checkpoint-2"
        first, last = owned_parameters(checkpoint, "policy", 0), owned_parameters(checkpoint, "policy", 1)
        assert "llama.embed_tokens.weight" in first and "lm_head.weight" in last and not first & last


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_and_pipeline_parallel_on_four_processes_match_single_process(hybrid_job):
    """TP=2 x PP=2: each stage holds TP shards; the rollout model gets all layers (pipeline gather) of this
    rank's shard (tensor_parallel eval mode), generates with paddlenlp under TP; the merged checkpoint is
    written by stage 0's model-parallel rank 0."""
    assert_same_run(hybrid_job, "single_greedy", "tp2_pp2")


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_and_data_parallel_on_four_processes(tp_dp_job):
    """TP=2 x DP=2 == one process (greedy); with sampling, the ranks of a model-parallel pair draw the same
    responses and the two data-parallel replicas their own. (paddlenlp's TP sampler broadcasts tokens over
    the global group; without ``model_parallel_broadcast_guard`` replica 1 got replica 0's responses.)"""
    runs = tp_dp_job
    assert_same_run(runs, "single_greedy", "tp2_dp2")

    def generations(rank: int) -> list[tuple[str, str]]:
        path = runs.root / "tp2_dp2_sampled" / "eval_generations" / f"step-2-rank{rank}.jsonl"
        return [(row["prompt"], row["response"]) for row in map(json.loads, path.read_text().splitlines())]

    replica0, replica1 = generations(0), generations(2)
    assert generations(1) == replica0 and generations(3) == replica1
    assert len(replica0) >= 3 and len(replica1) >= 3  # the (deduplicated) eval prompts split over 2 replicas
    assert not {prompt for prompt, _ in replica0} & {prompt for prompt, _ in replica1}
    assert not {response for _, response in replica0} & {response for _, response in replica1}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sharding", "tp_sampled", "pp_eval_single"])
def test_parallel_checkpoints_load_in_a_single_process(references, name, request):
    """``output_dir/policy`` and ``value`` of each layout load with the stock single-process loaders and
    give the same logits / scores as the single-process run's models."""
    import paddle
    from paddlenlp.transformers import AutoModelForCausalLM

    from alignment.models import AutoModelForScore

    job = {"sharding": "sharding_job", "tp_sampled": "tensor_parallel_job", "pp_eval_single": "pipeline_job"}[name]
    runs = request.getfixturevalue(job)
    reference = "single_sampled" if name == "tp_sampled" else "single_greedy"
    batch = common.to_paddle(common.make_lm_batch(0, 2, 10, 1000))
    mask = batch["attention_mask"].astype("bool")
    with paddle.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(str(runs.root / n / "policy"))(
                batch["input_ids"], attention_mask=mask, return_dict=True
            ).logits
            for n in (reference, name)
        ]
        scores = [
            AutoModelForScore.from_pretrained(str(runs.root / n / "value"))(
                batch["input_ids"], attention_mask=mask, return_dict=True
            ).scores
            for n in (reference, name)
        ]
    np.testing.assert_allclose(logits[1].numpy(), logits[0].numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores[1].numpy(), scores[0].numpy(), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------ in-process (1 process)
def _trainer(path: str):
    from alignment.ppo.run_ppo import DataArgument, ModelArgument, TrainingArguments, build_trainer, validate_arguments
    from alignment.utils.config import parse_arguments

    model_args, data_args, args = parse_arguments((ModelArgument, DataArgument, TrainingArguments), [path])
    validate_arguments(model_args, data_args, args, path)
    return build_trainer(model_args, data_args, args, path)


def test_eval_mode_rollout_model_gives_identical_results_and_offload_is_booked(tmp_path, tiny_assets, tiny_score_model):
    """eval_mode single in one process: rollout and experience on a separate copy that receives the training
    weights before every rollout; the numbers are those of eval_mode None. offload_level is bookkeeping only
    on CPU (nothing moves), but every phase books its offload/reload."""
    runs = Runs(tmp_path, {**base_settings(tiny_assets, tiny_score_model), "save_strategy": "no"})
    plain = _trainer(runs.config("plain"))
    plain.train()
    trainer = _trainer(runs.config("eval_single", eval_mode="single", offload_level="freeze_model optimizer train_model"))
    actor = trainer.actor_trainer
    assert actor.eval_model is not None and actor.rollout_model is actor.eval_model is not actor.model
    assert trainer.critic_trainer.rollout_model is trainer.critic_trainer.eval_model
    trainer.train()
    expected, got = runs.metrics("plain"), runs.metrics("eval_single")
    assert sorted(got) == sorted(expected) == [1, 2]
    for step in expected:
        for key, value in expected[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)

    # 2 rollouts of one update each. freeze_model: offloaded at start, then reloaded + offloaded around the
    # reference forward and around the reward forward of each rollout. train_model: offloaded when training
    # starts (the rollout models do the rollouts), reloaded + offloaded around each update. optimizer: around
    # each update.
    assert trainer.offload.active is False
    assert dict(trainer.offload.transitions) == {
        ("offload", "freeze_model"): 1 + 2 * 2,
        ("reload", "freeze_model"): 2 * 2,
        ("offload", "train_model"): 1 + 2,
        ("reload", "train_model"): 2,
        ("offload", "optimizer"): 2,
        ("reload", "optimizer"): 2,
    }
    # The rollout model held the weights of the last rollout; exporting brings it to the trained weights.
    trained = actor.model.state_dict()
    assert any(not np.array_equal(v.numpy(), trained[k].numpy()) for k, v in actor.eval_model.state_dict().items())
    trainer.export_rollout_models()
    for key, value in actor.eval_model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), trained[key].numpy(), err_msg=key)
    assert all(parameter.stop_gradient for parameter in actor.eval_model.parameters())


def test_parallel_layout_is_checked_before_fleet_starts(tmp_path):
    from alignment.ppo.run_ppo import TrainingArguments, parallel_layout_problems
    from alignment.utils.config import ConfigError

    with pytest.raises(ConfigError, match=r"= 2 must divide the number of processes \(1"):
        TrainingArguments(output_dir=str(tmp_path), tensor_parallel_degree=2)
    assert parallel_layout_problems(2, 2, "", -1, 4) == []  # tp 2 x pp 2, no data parallel
    assert parallel_layout_problems(2, 1, "stage1", 2, 8) == []  # tp 2 x sharding 2 x dp 2
    assert parallel_layout_problems(1, 1, "stage1", -1, 2) == []  # sharding takes all ranks
    [(name, message)] = parallel_layout_problems(2, 1, "stage1", 2, 6)
    assert name == "tensor_parallel_degree" and "(2) x pipeline_parallel_degree (1) x sharding_parallel_degree (2) = 4" in message
    assert [n for n, _ in parallel_layout_problems(1, 1, "stage3", 2, 2)] == ["sharding"]
    assert [n for n, _ in parallel_layout_problems(1, 1, "stage2", 2, 2)] == ["sharding"]  # CPU: GPU/XPU only
    assert [n for n, _ in parallel_layout_problems(1, 1, "", 2, 2)] == ["sharding_parallel_degree"]


def test_pipeline_parallel_needs_a_rollout_model(tmp_path, tiny_assets, tiny_score_model):
    from alignment.ppo.run_ppo import DataArgument, ModelArgument, TrainingArguments, validate_arguments
    from alignment.ppo.trainer_utils import derive_args
    from alignment.utils.config import ConfigError, parse_arguments

    runs = Runs(tmp_path, base_settings(tiny_assets, tiny_score_model))
    model_args, data_args, args = parse_arguments((ModelArgument, DataArgument, TrainingArguments), [runs.config("pp")])
    pipelined = derive_args(args, pipeline_parallel_degree=2)  # as paddlenlp sets it in a 2-process job
    with pytest.raises(ConfigError, match="eval_mode: must be 'single' or 'tensor_parallel' with pipeline_parallel_degree > 1"):
        validate_arguments(model_args, data_args, pipelined)
    with pytest.raises(ConfigError, match="fp16: fp16 loss scaling is not supported with pipeline parallel"):
        validate_arguments(model_args, data_args, derive_args(pipelined, eval_mode="single", fp16=True))
    validate_arguments(model_args, data_args, derive_args(pipelined, eval_mode="single"))
