"""Every PPO argument does what it says: the update schedule (micro-batches, gradient accumulation,
``update_iters``) and the arguments' wiring through experience, losses and optimizers.

Each test changes one argument and asserts the resulting change; the trainers are built in-process
from a JSON file with the tiny session assets (see ``tests/test_ppo_trainer.py`` for the helpers).
"""

from __future__ import annotations

import types

import numpy as np
import paddle
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_ppo_trainer import FixedResponses, make_trainer, ppo_config

from alignment.models.ppo_model_utils import make_rollout_attention_mask

ROWS = 6  # prompts of the fixed rollout (one sample each)


def fixed_experience(trainer, rows: int = ROWS) -> dict:
    """Experience of a fixed rollout: ``rows`` prompts, responses of different lengths (EOS-ended)."""
    eos = trainer.tokenizer.eos_token_id
    responses = [[10 + i] * (1 + i % 4) + [eos] for i in range(rows)]  # 2..5 response tokens, varied
    responses = [r + [eos] * (6 - len(r)) for r in responses]
    trainer._generate_fn = FixedResponses(responses)
    batch = trainer.train_dataset.get_collator()([trainer.train_dataset[i] for i in range(rows)])
    with paddle.no_grad():
        sequences = trainer.generate(batch["input_ids"], batch["attention_mask"])
        mask = make_rollout_attention_mask(batch["attention_mask"], sequences, eos)
        return trainer.make_experience(batch["input_ids"], sequences, mask)


def take_rows(experience: dict, rows: list[int]) -> dict:
    """The batch of ``rows`` (repeats allowed) of an experience, as ``split_micro_batches`` builds them."""
    index = paddle.to_tensor(rows, dtype="int64")
    total = experience["input_ids"].shape[0]
    return {
        k: (paddle.gather(v, index, axis=0) if isinstance(v, paddle.Tensor) and v.ndim > 0 and v.shape[0] == total else v)
        for k, v in experience.items()
        if k not in ("metrics", "finite_check")
    }


def record_gradients(trainer) -> list[np.ndarray]:
    """Make both step trainers record the flat gradient (actor ++ critic) at every optimizer step."""
    log: list[np.ndarray] = []
    pending: dict[str, np.ndarray] = {}
    for step_trainer in (trainer.critic_trainer, trainer.actor_trainer):
        original = step_trainer.optimizer_step

        def step(step_trainer=step_trainer, original=original):
            grads = [p.grad.numpy().ravel() for p in step_trainer.model.parameters() if p.grad is not None]
            pending[step_trainer.name] = np.concatenate(grads)
            if len(pending) == 2:  # both models stepped (in the loop's role order): one optimizer step
                log.append(np.concatenate([pending.pop("actor"), pending.pop("critic")]))
            return original()

        step_trainer.optimizer_step = step
    return log


def reset_training_state(trainer, weights: dict) -> None:
    """Initial weights, fresh optimizers and schedules, step 0 (a new run on the same trainer)."""
    for name, step_trainer in (("actor", trainer.actor_trainer), ("critic", trainer.critic_trainer)):
        step_trainer.model.set_state_dict({k: paddle.to_tensor(v) for k, v in weights[name].items()})
        step_trainer.optimizer = None
        step_trainer.lr_scheduler = None
        step_trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        step_trainer.optimizer.clear_grad()
    trainer.state.global_step = 0
    trainer.total_steps = 1000


def snapshot(trainer) -> dict:
    return {
        name: {k: v.numpy().copy() for k, v in t.model.state_dict().items()}
        for name, t in (("actor", trainer.actor_trainer), ("critic", trainer.critic_trainer))
    }


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def split_trainer(tmp_path_factory, tiny_assets, tiny_score_model, repo_root):
    tmp_path = tmp_path_factory.mktemp("split")
    path = ppo_config(
        tmp_path, tiny_assets, tiny_score_model, repo_root, per_device_prompt_batch_size=ROWS,
        per_device_train_batch_size=ROWS, learning_rate=1e-3, lr_scheduler_type="constant", critic_learning_rate=1e-3,
    )  # fmt: skip
    trainer = make_trainer(path)
    experience = fixed_experience(trainer)
    return trainer, experience, snapshot(trainer)


# (rows per micro-batch, gradient_accumulation_steps, update_iters): micro-steps = update_iters x 6 / rows.
# "straddle" layouts have an accumulation window that spans two passes over the rollout.
SPLITS = [
    (2, 3, 1),  # 3 micro-batches, one window
    (3, 1, 1),  # 2 windows of one micro-batch
    (1, 6, 2),  # 6 micro-batches per pass, one window per pass
    (2, 2, 2),  # straddle: windows (mb0 mb1) (mb2 | mb0) (mb1 mb2) -- the layout
    (1, 4, 2),  # straddle: (r0..r3) (r4 r5 | r0 r1) (r2..r5)
    (3, 3, 3),  # straddle with repeated rows: (mb0 mb1 | mb0) (mb1 | mb0 mb1)
    (6, 2, 2),  # whole-rollout micro-batches: one window spans both passes
]


@pytest.mark.parametrize("loss_mean_type", ["token", "sequence"])
def test_any_split_over_micro_batches_accumulation_and_update_iters_gives_the_unsplit_updates(split_trainer, loss_mean_type):
    """Each optimizer step equals one unsplit step on the concatenated rows of its window."""
    trainer, experience, initial = split_trainer
    args = trainer.args
    args.loss_mean_type = loss_mean_type
    gradients = record_gradients(trainer)
    try:
        for rows, accumulation, update_iters in SPLITS:
            assert (update_iters * ROWS // rows) % accumulation == 0  # a layout validate_arguments accepts
            args.per_device_train_batch_size, args.gradient_accumulation_steps, args.update_iters = rows, accumulation, update_iters
            reset_training_state(trainer, initial)
            gradients.clear()
            trainer.update(trainer.split_micro_batches(experience), None)
            split = list(gradients)
            split_weights = snapshot(trainer)

            # The unsplit computation: one micro-batch holding the window's rows, weight 1, no accumulation.
            schedule = list(range(ROWS)) * update_iters
            window_rows = rows * accumulation
            reset_training_state(trainer, initial)
            gradients.clear()
            for begin in range(0, len(schedule), window_rows):
                batch = take_rows(experience, schedule[begin : begin + window_rows])
                metrics = trainer.rl_step(batch, 1.0, accumulating=False, actor_accumulating=False)
                trainer.finish_update(True, metrics)
            assert len(split) == len(gradients) == len(schedule) // window_rows, (rows, accumulation, update_iters)
            for step, (got, want) in enumerate(zip(split, gradients)):
                assert relative_error(got, want) < 1e-4, (rows, accumulation, update_iters, step)
            for name, weights in snapshot(trainer).items():
                for key, value in weights.items():
                    np.testing.assert_allclose(split_weights[name][key], value, atol=1e-4, err_msg=f"{name}.{key}")
    finally:
        for step_trainer in (trainer.actor_trainer, trainer.critic_trainer):
            del step_trainer.optimizer_step  # back to the class method
        args.loss_mean_type = "token"


def test_loss_weights_sum_to_one_per_window_even_when_windows_straddle_passes(split_trainer):
    trainer, experience, _ = split_trainer
    args = trainer.args
    args.per_device_train_batch_size, args.gradient_accumulation_steps, args.update_iters = 2, 2, 2
    micro_batches = trainer.split_micro_batches(experience)
    tokens = [float(b["response_mask"].astype("float32").sum()) for b in micro_batches]
    assert len(set(tokens)) > 1  # the rows have different lengths, so the weights are not all equal
    weights = trainer.loss_weights(micro_batches, passes=2)
    schedule = tokens * 2
    expected = []
    for begin in range(0, 6, 2):
        window = schedule[begin : begin + 2]
        expected += [n / sum(window) for n in window]
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    np.testing.assert_allclose([sum(weights[i : i + 2]) for i in range(0, 6, 2)], [1.0, 1.0, 1.0], rtol=1e-6)


def test_update_iters_passes_visit_the_micro_batches_in_the_same_order(split_trainer, monkeypatch):
    """``update_iters`` passes over the rollout, no reshuffle between passes (safe-rlhf, PaddleNLP)."""
    trainer, experience, initial = split_trainer
    args = trainer.args
    seen = []
    original = trainer.rl_step

    def rl_step(batch, *rest, **kwargs):
        seen.append(batch["input_ids"].numpy()[:, -6:].tolist())
        return original(batch, *rest, **kwargs)

    monkeypatch.setattr(trainer, "rl_step", rl_step)
    for update_iters in (1, 3):
        args.per_device_train_batch_size, args.gradient_accumulation_steps, args.update_iters = 2, 3, update_iters
        reset_training_state(trainer, initial)
        seen.clear()
        micro_batches = trainer.split_micro_batches(experience)
        trainer.update(micro_batches, None)
        one_pass = [b["input_ids"].numpy()[:, -6:].tolist() for b in micro_batches]
        assert seen == one_pass * update_iters
        assert trainer.state.global_step == update_iters  # 3 micro-batches per pass, one update per 3


@pytest.mark.parametrize("loss", ["actor_loss", "critic_loss"])
def test_nonfinite_actor_or_critic_loss_drops_the_window_or_stops(split_trainer, monkeypatch, loss):
    """docs/reliability.md: a NaN loss in a window drops that window's gradients on every rank
    (``on_nonfinite: skip``) or stops before any optimizer step (``stop``)."""
    from alignment.ppo.rl_trainer import NonFiniteError

    trainer, experience, initial = split_trainer
    args = trainer.args
    args.per_device_train_batch_size, args.gradient_accumulation_steps, args.update_iters = 2, 3, 1
    micro_batches = trainer.split_micro_batches(experience)
    original = getattr(trainer, loss)
    calls = []

    def poisoned(values, batch, *rest):
        calls.append(1)
        result = original(values, batch, *rest)
        return result * float("nan") if len(calls) == 2 else result  # the window's second micro-batch

    # A clean update from the initial weights: what a later window must still produce.
    reset_training_state(trainer, initial)
    trainer.update(micro_batches, None)
    clean = snapshot(trainer)
    try:
        for mode in ("stop", "skip"):
            args.on_nonfinite = mode
            reset_training_state(trainer, initial)
            skipped = trainer.state.skipped_updates
            calls.clear()
            monkeypatch.setattr(trainer, loss, poisoned)
            if mode == "stop":
                with pytest.raises(NonFiniteError, match=r"non-finite update at step 0 .*on_nonfinite='stop'"):
                    trainer.update(micro_batches, None)
            else:
                trainer.update(micro_batches, None)
                assert trainer.state.skipped_updates == skipped + 1 and trainer.state.global_step == 1
            for name, weights in snapshot(trainer).items():  # no optimizer step used the NaN gradients
                for key, value in weights.items():
                    np.testing.assert_array_equal(value, initial[name][key], err_msg=f"{mode} {name}.{key}")
            if mode == "skip":  # the dropped gradients do not leak into the next window
                monkeypatch.setattr(trainer, loss, original)
                trainer.update(micro_batches, None)
                for name, weights in snapshot(trainer).items():
                    for key, value in weights.items():
                        np.testing.assert_allclose(value, clean[name][key], atol=1e-6, err_msg=f"{name}.{key}")
    finally:
        args.on_nonfinite = "stop"


@settings(max_examples=100, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    accumulation=st.integers(1, 5),
    passes=st.integers(1, 3),
)
def test_loss_weights_are_window_shares_of_the_whole_schedule(counts, accumulation, passes):
    """Any layout: weight = tokens / tokens of its window, windows cut from ``passes x micro-batches``."""
    from alignment.ppo.rl_trainer import RLTrainer

    steps = len(counts) * passes
    assume(steps % accumulation == 0)  # validate_arguments accepts only layouts ending on a step
    fake = types.SimpleNamespace(
        args=types.SimpleNamespace(gradient_accumulation_steps=accumulation), dp_world=1, loss_weight_basis=lambda b: b["n"]
    )
    weights = RLTrainer.loss_weights(fake, [{"n": float(n)} for n in counts], passes)
    schedule = counts * passes
    assert len(weights) == steps
    for begin in range(0, steps, accumulation):
        window = schedule[begin : begin + accumulation]
        for offset, n in enumerate(window):
            assert weights[begin + offset] == pytest.approx(n / sum(window) if sum(window) else 0.0)
