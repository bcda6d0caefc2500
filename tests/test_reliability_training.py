"""Faults during training, round two (issue 14): no NaN model is saved or published as good in any
stage, resume never duplicates metric rows, and ``auto`` resume never starts over when every
checkpoint is damaged. Listed in docs/reliability.md."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from test_reliability_inputs import DATA, REPO, SCRIPTS, no_weights, stage_config, stage_main  # noqa: F401 - fixture

from alignment.utils.checkpoint import CheckpointError, verify_checkpoint, write_manifest
from alignment.utils.metrics import read_metrics
from alignment.utils.trainer import NonFiniteGuard, NonFiniteParameterError, NonFiniteTrainingError


def saved_weight_files(directory) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names
            if name.endswith(".safetensors")]  # fmt: skip


# ------------------------------------------------------------------------ SFT / reward model


GRADIENTS_STOP = r"non-finite gradients at step 2 in \d+ parameter\(s\) on this rank \(llama\.embed_tokens\.weight"
WEIGHTS_STOP = r"the optimizer step 1 made \d+ parameter\(s\) on this rank \(.*\) NaN/inf \(learning rate 1e\+39\)"


@pytest.mark.parametrize(
    "stage, learning_rate, stop, checkpoints",
    [
        # 1e30: step 1 sends the weights to ~1e30 (finite), step 2's gradients are NaN while the SFT loss stays
        # finite (cross_entropy of all-NaN logits is ln(vocab) here): the gradient check stops it.
        ("sft", 1e30, GRADIENTS_STOP, ["checkpoint-1"]),
        ("rm", 1e30, r"training loss is nan at step 1 \(before the optimizer step", ["checkpoint-1"]),  # 0-based
        # 1e39 overflows float32: step 1 itself makes the weights NaN/inf; checked before anything is saved.
        ("sft", 1e39, WEIGHTS_STOP, []),
        ("rm", 1e39, WEIGHTS_STOP, []),
    ],
    ids=["sft-gradients", "rm-loss", "sft-weights", "rm-weights"],
)
def test_absurd_learning_rate_stops_without_saving_a_nonfinite_model(
    stage, learning_rate, stop, checkpoints, tmp_path, tiny_assets
):
    """The run stops at the first non-finite step: the final model is never written, and every checkpoint
    written (save_steps 1) is finite."""
    output = tmp_path / f"{stage}_out"
    path = stage_config(stage, tmp_path, tiny_assets, learning_rate=learning_rate, max_steps=3,
                        save_strategy="steps", save_steps=1, save_total_limit=5)  # fmt: skip
    with pytest.raises(NonFiniteTrainingError, match=stop) as info:
        stage_main(stage)([path])
    if isinstance(info.value, NonFiniteParameterError):  # it names what is left on disk
        last = f"the last checkpoint {output / checkpoints[-1]} is intact" if checkpoints else "no checkpoint was written"
        assert last in str(info.value)
    assert sorted(n for n in os.listdir(output) if n.startswith("checkpoint")) == checkpoints
    assert not [n for n in os.listdir(output) if n.endswith((".safetensors", ".pdparams"))]  # no final model
    for name in checkpoints:
        verify_checkpoint(str(output / name))  # includes: every safetensors tensor is finite


def test_guard_checks_gradients_before_and_weights_after_the_optimizer_step(tmp_path):
    guard, layer = NonFiniteGuard(), paddle.nn.Linear(2, 2)
    args, state = SimpleNamespace(output_dir=str(tmp_path), learning_rate=0.5), SimpleNamespace(global_step=6)
    (layer(paddle.ones([1, 2])).sum() * float("inf")).backward()  # inf x ... = NaN/inf gradients
    with pytest.raises(NonFiniteParameterError, match=r"non-finite gradients at step 7 in 2 parameter\(s\) .*no checkpoint"):
        guard.on_optimizer_begin(args, state, None, model=layer, scaler=None)
    guard.on_optimizer_begin(args, state, None, model=layer, scaler=object())  # fp16: the scaler skips such steps
    guard.on_optimizer_end(args, state, None, model=layer)  # the weights are still finite
    for step in (4, 5):  # checkpoint-5 is incomplete (no manifest): the note names checkpoint-4
        os.makedirs(tmp_path / f"checkpoint-{step}")
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    write_manifest(str(tmp_path / "checkpoint-4"))
    with paddle.no_grad():
        layer.bias.set_value(paddle.to_tensor([1.0, float("nan")]))
    with pytest.raises(NonFiniteParameterError, match=r"optimizer step 7 made 1 parameter\(s\) on this rank \(bias\) "
                                                      rf"NaN/inf .* and the last checkpoint {tmp_path / 'checkpoint-4'} is intact"):  # fmt: skip
        guard.on_optimizer_end(args, state, None, model=layer)


# ------------------------------------------------------------------------ PPO


def test_ppo_never_publishes_nonfinite_weights_and_resume_falls_back(tmp_path, tiny_assets, tiny_score_model, caplog):
    from test_ppo_trainer import make_trainer, ppo_config

    from alignment.ppo.rl_trainer import NonFiniteError
    from alignment.utils.checkpoint import find_resume_checkpoint

    path = ppo_config(tmp_path, tiny_assets, tiny_score_model, REPO, max_steps=3, gradient_accumulation_steps=2,
                      save_strategy="steps", save_steps=1)  # fmt: skip  (one update per rollout, saved each)
    trainer = make_trainer(path)
    step, calls = trainer.actor_trainer.optimizer_step, {"n": 0}

    def diverging_step():  # the second update overflows the weights; its loss was finite
        calls["n"] += 1
        result = step()
        if calls["n"] == 2:
            with paddle.no_grad():
                for param in trainer.actor_trainer.model.parameters():
                    param.set_value(param * float("inf"))
        return result

    trainer.actor_trainer.optimizer_step = diverging_step
    output = tmp_path / "ppo"
    with pytest.raises(NonFiniteError, match=rf"non-finite weights at step 2 \(policy:.*\): not saving checkpoint-2; "
                                             rf"the last good checkpoint is {output / 'checkpoint-1'}"):  # fmt: skip
        trainer.train()
    assert sorted(n for n in os.listdir(output) if n.startswith("checkpoint")) == ["checkpoint-1"]
    verify_checkpoint(str(output / "checkpoint-1"))

    # A checkpoint published with NaN weights (as before this check existed) is refused on resume...
    bad = output / "checkpoint-2"
    shutil.copytree(output / "checkpoint-1", bad)
    weights = bad / "policy" / "model.safetensors"
    from safetensors.numpy import load_file, save_file

    state = load_file(str(weights))
    state = {k: np.full_like(v, np.nan) if "q_proj" in k else v for k, v in state.items()}
    save_file(state, str(weights), metadata={"format": "np"})
    write_manifest(str(bad))  # a valid manifest: only the values are wrong
    with pytest.raises(CheckpointError, match=r"policy/model.safetensors holds NaN/inf values in 2 tensor\(s\)"):
        trainer.load_checkpoint(str(bad))
    # ...and `auto` falls back to the previous good one, saying so.
    with caplog.at_level(logging.WARNING, logger="alignment.utils.checkpoint"):
        assert find_resume_checkpoint(str(output)) == str(output / "checkpoint-1")
    assert f"skipping checkpoint {bad}" in caplog.text and "NaN/inf" in caplog.text
    assert f"falling back to {output / 'checkpoint-1'}, the newest intact checkpoint" in caplog.text


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_nonfinite_ppo_loss_drops_the_update_or_stops(on_nonfinite, tmp_path, tiny_assets, tiny_score_model):
    from test_ppo_trainer import make_trainer, ppo_config

    from alignment.ppo.rl_trainer import NonFiniteError

    path = ppo_config(tmp_path, tiny_assets, tiny_score_model, REPO, on_nonfinite=on_nonfinite, max_steps=3,
                      gradient_accumulation_steps=2)  # fmt: skip  (one update of 2 micro-batches per rollout)
    trainer = make_trainer(path)
    rl_step, calls = trainer.rl_step, {"n": 0}

    def rl_step_with_a_nan_critic_loss(*args, **kwargs):  # the 4th micro-batch: the 2nd update's window
        calls["n"] += 1
        metrics = rl_step(*args, **kwargs)
        return {**metrics, "train/reward_critic_loss": float("nan")} if calls["n"] == 4 else metrics

    trainer.rl_step = rl_step_with_a_nan_critic_loss
    before = {k: v.numpy().copy() for k, v in trainer.actor_trainer.model.state_dict().items()}
    if on_nonfinite == "stop":
        with pytest.raises(NonFiniteError, match=r"non-finite update at step 1 .*'loss': nan"):
            trainer.train()
        assert trainer.actor_trainer.num_optimizer_steps == 1  # the NaN window was never applied
        return
    state = trainer.train()
    assert state.global_step == 3 and state.skipped_updates == 1
    assert trainer.actor_trainer.num_optimizer_steps == trainer.critic_trainer.num_optimizer_steps == 2
    after = trainer.actor_trainer.model.state_dict()
    assert any(not np.array_equal(before[k], after[k].numpy()) for k in before)


# ------------------------------------------------------------------------ resume


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_auto_resume_with_every_checkpoint_damaged_refuses_and_keeps_every_file(
    stage, tmp_path, tiny_assets, tiny_score_model, no_weights
):
    output = tmp_path / f"{stage}_out"
    for step in (2, 4):
        os.makedirs(output / f"checkpoint-{step}")
        (output / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")  # no manifest: incomplete
    (output / "metrics.jsonl").write_text('{"step": 1, "loss": 6.9}\n')
    before = sorted(os.path.relpath(os.path.join(r, n), output) for r, _, ns in os.walk(output) for n in ns)
    path = stage_config(stage, tmp_path, tiny_assets, tiny_score_model, resume_from_checkpoint="auto")
    with pytest.raises(CheckpointError) as info:
        stage_main(stage)([path])
    message = str(info.value)
    assert message.startswith(f"resume_from_checkpoint=auto: none of the 2 checkpoint(s) in {output} can be resumed"), message
    assert f"checkpoint '{output / 'checkpoint-4'}' has no manifest.json" in message
    assert "Nothing was changed" in message
    after = sorted(os.path.relpath(os.path.join(r, n), output) for r, _, ns in os.walk(output) for n in ns)
    assert after == before and (output / "metrics.jsonl").read_text() == '{"step": 1, "loss": 6.9}\n'


@pytest.mark.slow
def test_sft_resumes_after_sigkill_without_duplicated_metric_rows(tmp_path, tiny_assets):
    """Killed after a row past checkpoint-3 was logged; the resumed log has each step exactly once, with the
    losses of an uninterrupted run."""
    overrides = dict(max_steps=8, save_strategy="steps", save_steps=3, seed=7, unified_checkpoint=True)
    os.makedirs(tmp_path / "ref")
    reference = stage_config("sft", tmp_path / "ref", tiny_assets, **overrides)
    stage_main("sft")([reference])
    expected = [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "ref" / "sft_out")) if "loss" in r]
    assert [step for step, _ in expected] == list(range(1, 9))

    path = stage_config("sft", tmp_path, tiny_assets, **overrides)
    output = tmp_path / "sft_out"
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    process = subprocess.Popen([sys.executable, SCRIPTS["sft"], path], cwd=REPO, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def logged_steps() -> list[int]:
        try:
            return [r["step"] for r in read_metrics(str(output)) if "loss" in r]
        except (OSError, ValueError):  # not there yet, or a line being written
            return []

    try:
        deadline = time.time() + 180
        while not ((output / "checkpoint-3" / "manifest.json").exists() and max(logged_steps(), default=0) >= 4):
            assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert 4 in logged_steps()  # rows after checkpoint-3 were logged by the killed run

    stage_main("sft")([path, "--resume_from_checkpoint", "auto"])
    got = [(r["step"], r["loss"]) for r in read_metrics(str(output)) if "loss" in r]
    assert [step for step, _ in got] == list(range(1, 9))  # each step once, in order
    for (step, loss), (_, reference_loss) in zip(got, expected):
        assert loss == pytest.approx(reference_loss, rel=1e-5), step
