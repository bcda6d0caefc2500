"""PaddleNLP arguments the PPO loop cannot honour are refused by name (before any model loads); the
ones it honours (report_to tensorboard/wandb, dataloader_drop_last) do what they say; config-level
model checks (vocabulary, positions) and the fleet-group lookup fail loudly."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ppo_trainer import make_trainer, ppo_config

from alignment.ppo import run_ppo, trainer_utils
from alignment.ppo.run_ppo import DataArgument, ModelArgument, TrainingArguments, validate_arguments
from alignment.ppo.trainer_utils import GlobalBatchSampler
from alignment.utils.config import ConfigError, parse_arguments


def validate(path):
    model_args, data_args, args = parse_arguments((ModelArgument, DataArgument, TrainingArguments), [path])
    validate_arguments(model_args, data_args, args, path)
    return args


@pytest.fixture
def config(tmp_path, tiny_assets, tiny_score_model, repo_root):
    return lambda **overrides: ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, **overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ptx_coeff=0.5), "ptx_coeff: is > 0 but no ptx_datasets are given"),
        (dict(report_to="tensorboard"), "report_to: 'tensorboard' is not installed (pip install tensorboardX)"),
        (dict(report_to="wandb"), "report_to: 'wandb' is not installed (pip install wandb)"),
        (dict(report_to="autonlp"), "report_to: 'autonlp' is not supported by the PPO loop"),
        (dict(load_best_model_at_end=True, evaluation_strategy="steps", save_strategy="steps", eval_steps=2, save_steps=2),
         "load_best_model_at_end: True is not supported by the PPO loop (it tracks no best model)"),
        (dict(metric_for_best_model="eval/reward"),
         "metric_for_best_model: 'eval/reward' is not supported by the PPO loop: save_total_limit keeps the newest"),
        (dict(unified_checkpoint=True), "unified_checkpoint: True is not supported by the PPO loop"),
        (dict(pipeline_parallel_config="disable_p2p_cache_shape enable_delay_scale_loss"),
         "pipeline_parallel_config: 'disable_p2p_cache_shape enable_delay_scale_loss' only 'disable_p2p_cache_shape' is accepted"),
        (dict(critic_lr_scheduler_type="cosin"), "critic_lr_scheduler_type: 'cosin' is not one of ['linear', 'cosine'"),
        (dict(critic_warmup_ratio=1.5), "critic_warmup_ratio: must be in [0, 1], got 1.5"),
        (dict(critic_warmup_steps=-1), "critic_warmup_steps: must be >= 0, got -1"),
        (dict(critic_learning_rate=-0.1), "critic_learning_rate: must be >= 0, got -0.1"),
    ],
)  # fmt: skip
def test_unsupported_or_bad_arguments_are_refused_by_name(config, overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(config(**overrides))
    assert message in str(error.value)


def test_accepted_values_of_the_refused_arguments(config):
    args = validate(config(report_to="visualdl", pipeline_parallel_config="disable_p2p_cache_shape", unified_checkpoint=False,
                           load_best_model_at_end=False))  # fmt: skip
    assert args.report_to == ["visualdl"]
    assert validate(config(report_to="none")).report_to == []


def test_the_shipped_configs_pass_the_new_checks(repo_root):
    """config/{tiny,llama}/ppo_argument.json set report_to and pipeline_parallel_config to accepted values."""
    for name in ("tiny", "llama"):
        with open(os.path.join(repo_root, "config", name, "ppo_argument.json")) as file:
            values = json.load(file)
        for field, refused, _ in run_ppo.UNSUPPORTED_TRAINING_ARGUMENTS:
            assert not refused(values.get(field)), (name, field)
        report_to = values.get("report_to", [])
        assert run_ppo.report_to_problems([report_to] if isinstance(report_to, str) else report_to) == []


# ---------------------------------------------------------------------------------- report_to
def fake_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    return module


def test_report_to_tensorboard_and_wandb_are_honoured_when_installed(config, monkeypatch):
    """With the libraries importable (stand-ins here), every logged metric reaches both, names kept."""
    scalars, wandb_logs, wandb_inits = [], [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    wandb = fake_module("wandb", run=None, init=lambda **kwargs: wandb_inits.append(kwargs),
                        log=lambda values, step: wandb_logs.append((values, step)), finish=lambda: None)  # fmt: skip
    monkeypatch.setitem(sys.modules, "tensorboardX", fake_module("tensorboardX", SummaryWriter=SummaryWriter))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("WANDB_PROJECT", "ppo-test")
    trainer = make_trainer(config(report_to=["tensorboard", "wandb"]))
    assert trainer.reporter.writers[0].log_dir == trainer.args.logging_dir
    assert wandb_inits[0]["project"] == "ppo-test" and wandb_inits[0]["config"]["kl_coeff"] == 0.02
    trainer.state.global_step = 3
    trainer.log_metrics({"train/reward": 1.5, "eval/reward": 0.25})
    assert ("train/reward", 1.5, 3) in scalars and ("eval/reward", 0.25, 3) in scalars
    assert wandb_logs[0][1] == 3 and wandb_logs[0][0]["train/reward"] == 1.5


# ------------------------------------------------------------------------------ dataloader_drop_last
@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 40), batch=st.integers(1, 6), world=st.integers(1, 3), epoch=st.integers(0, 3))
def test_prompt_sampler_drops_or_completes_the_last_global_batch(size, batch, world, epoch):
    def batches(drop_last, rank, per_rank, ranks):
        sampler = GlobalBatchSampler(size, per_rank, rank, ranks, seed=5, drop_last=drop_last)
        sampler.set_epoch(epoch)
        return list(sampler)

    global_batch = batch * world
    for drop_last in (True, False):
        per_rank = [batches(drop_last, r, batch, world) for r in range(world)]
        assert all(len(b) == batch for rank in per_rank for b in rank)  # every batch is full
        merged = [sum((per_rank[r][i] for r in range(world)), []) for i in range(len(per_rank[0]))]
        assert merged == batches(drop_last, 0, global_batch, 1)  # world x batch = 1 rank x (world * batch)
        seen = [i for b in merged for i in b]
        if drop_last:
            assert len(merged) == size // global_batch and len(set(seen)) == len(seen)
        else:
            assert len(merged) == -(-size // global_batch) and set(seen) == set(range(size))  # all seen
            order = seen[:size]
            assert len(set(order)) == size and seen[size:] == (order * global_batch)[: len(seen) - size]  # tail from the start


# ------------------------------------------------------------------------------ config-level checks
def test_tokenizer_larger_than_the_vocabulary_is_refused_before_loading(tmp_path, tiny_assets, tiny_score_model, repo_root, monkeypatch):
    actor = str(tmp_path / "small_vocab")
    shutil.copytree(tiny_assets["llama"], actor)
    with open(os.path.join(actor, "config.json")) as file:
        model_config = json.load(file)
    vocab = model_config["vocab_size"]
    model_config["vocab_size"] = vocab - 1
    with open(os.path.join(actor, "config.json"), "w") as file:
        json.dump(model_config, file)
    monkeypatch.setattr(run_ppo, "load_models", lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(ConfigError, match=rf"actor_model_name_or_path: tokenizer has {vocab} tokens but the model's vocab_size is {vocab - 1}"):
        make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, actor_model_name_or_path=actor))


def test_prompt_plus_generation_beyond_the_positions_is_refused_before_loading(tmp_path, tiny_assets, tiny_score_model, repo_root, monkeypatch):
    monkeypatch.setattr(run_ppo, "load_models", lambda *a, **k: pytest.fail("models loaded before the check"))
    with pytest.raises(ConfigError, match=r"max_new_tokens: max_length \(48\) \+ max_new_tokens \(470\) = 518 exceeds the actor's max_position_embeddings 512"):
        make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, max_new_tokens=470))


# ------------------------------------------------------------------------------ fleet group lookup
def test_hybrid_group_tolerates_only_an_uninitialised_fleet(monkeypatch):
    from paddle.distributed import fleet

    monkeypatch.setattr(trainer_utils.dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(fleet.fleet, "_hcg", None, raising=False)
    assert trainer_utils._hybrid_group() is None  # fleet.init was never called: plain data parallel

    def broken():
        raise RuntimeError("communication group is broken")

    monkeypatch.setattr(fleet.fleet, "_hcg", object(), raising=False)  # fleet initialised ...
    monkeypatch.setattr(fleet, "get_hybrid_communicate_group", broken)  # ... but its group lookup fails
    with pytest.raises(RuntimeError, match="communication group is broken"):
        trainer_utils._hybrid_group()
    sentinel = object()
    monkeypatch.setattr(fleet, "get_hybrid_communicate_group", lambda: sentinel)
    assert trainer_utils._hybrid_group() is sentinel
