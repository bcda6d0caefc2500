"""The PPO step's speed levers (issue 18) keep the math: the hand-written RMSNorm backward, the in-place
global-norm clip, and the rollout's own log-probs as ``old_log_probs`` (``rollout_log_probs``)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import paddle
import pytest
from test_ppo_trainer import make_trainer, ppo_config

from alignment.models.kernels import trainable_rms_norm
from alignment.models.ppo_model_utils import rollout_ratio_deviation
from alignment.ppo.infer_utils import token_log_probs
from alignment.ppo.rl_trainer import make_rollout_attention_mask
from alignment.ppo.trainer_utils import InPlaceClipGradByGlobalNorm
from alignment.utils.metrics import METRICS_FILE


# ------------------------------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("shape", [[7, 16], [3, 5, 16]])
def test_trainable_rms_norm_value_and_gradients_equal_autograd_of_the_formula(shape):
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(shape).astype("float32") * 3
    w_np = rng.standard_normal(shape[-1]).astype("float32")
    g_np = rng.standard_normal(shape).astype("float32")
    eps = 1e-5
    expected = x_np / np.sqrt((x_np.astype("float64") ** 2).mean(-1, keepdims=True) + eps) * w_np

    results = []
    for fn in (
        lambda x, w: trainable_rms_norm(x, w, eps),
        lambda x, w: x * paddle.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w,  # autograd of the formula
    ):
        x, w = paddle.to_tensor(x_np, stop_gradient=False), paddle.to_tensor(w_np, stop_gradient=False)
        y = fn(x, w)
        y.backward(paddle.to_tensor(g_np))
        results.append((y.numpy(), x.grad.numpy(), w.grad.numpy()))
    (y, dx, dw), (_, dx_ref, dw_ref) = results
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-5)


def test_trainable_rms_norm_gradient_is_orthogonal_to_its_input_for_unit_weight():
    """``y = x / rms(x)`` is scale-invariant in x, so ``<dx, x> = 0`` for any upstream gradient."""
    rng = np.random.default_rng(1)
    x = paddle.to_tensor(rng.standard_normal([4, 32]).astype("float32"), stop_gradient=False)
    y = trainable_rms_norm(x, paddle.ones([32]), 1e-12)
    y.backward(paddle.to_tensor(rng.standard_normal([4, 32]).astype("float32")))
    np.testing.assert_allclose((x.grad * x).sum(-1).numpy(), 0.0, atol=1e-5)


# ------------------------------------------------------------------------------------------ clipping
def _clip_both(scale: float, poison: float | None = None):
    paddle.seed(0)
    params = [paddle.create_parameter(shape, "float32") for shape in ([30, 20], [20], [5, 7])]
    grads = [paddle.randn(p.shape) * scale for p in params]
    if poison is not None:
        grads[1][3] = poison
    reference = paddle.nn.ClipGradByGlobalNorm(1.0)([(p, g.clone()) for p, g in zip(params, grads)])
    mine = [g.clone() for g in grads]
    returned = InPlaceClipGradByGlobalNorm(1.0)(list(zip(params, mine)))
    return grads, mine, returned, reference


def test_in_place_clip_leaves_small_gradients_bitwise_untouched():
    grads, mine, returned, reference = _clip_both(scale=1e-3)
    for original, g, (_, r), (_, ref) in zip(grads, mine, returned, reference):
        np.testing.assert_array_equal(g.numpy(), original.numpy())
        np.testing.assert_array_equal(r.numpy(), ref.numpy())


def test_in_place_clip_scales_large_gradients_like_paddle_in_place():
    grads, mine, returned, reference = _clip_both(scale=10.0)
    norm = math.sqrt(sum(float((g * g).sum()) for g in mine))
    assert norm == pytest.approx(1.0, rel=1e-5)  # clipped to clip_norm, in the caller's tensors
    for g, (_, r), (_, ref) in zip(mine, returned, reference):
        assert r is g
        np.testing.assert_allclose(g.numpy(), ref.numpy(), rtol=1e-6, atol=1e-9)


def test_in_place_clip_propagates_a_non_finite_norm_like_paddle():
    for poison in (float("inf"), float("nan")):
        _, mine, _, reference = _clip_both(scale=1.0, poison=poison)
        for g, (_, ref) in zip(mine, reference):
            np.testing.assert_array_equal(g.numpy(), ref.numpy())  # (NaN compares equal to NaN here)
        assert np.isnan(mine[1].numpy()[3])


# ------------------------------------------------------------------------------ rollout log-probs
def test_token_log_probs_hand_values():
    logits = np.log(np.array([[1.0, 3.0, 4.0], [2.0, 2.0, 4.0]], dtype="float32"))  # softmax: /8 each row
    np.testing.assert_allclose(token_log_probs(logits, np.array([1, 2])), np.log([3 / 8, 4 / 8]), rtol=1e-6)
    shifted = logits + 1000.0  # max-shifted: no overflow
    np.testing.assert_allclose(token_log_probs(shifted, np.array([1, 2])), np.log([3 / 8, 4 / 8]), rtol=1e-4)


def test_rollout_ratio_deviation_hand_value():
    log_probs = paddle.to_tensor([[0.0, math.log(1.5)], [math.log(0.9), 5.0]])
    old = paddle.zeros([2, 2])
    mask = paddle.to_tensor([[True, True], [True, False]])  # the 5.0 is masked out
    assert float(rollout_ratio_deviation(log_probs, old, mask)) == pytest.approx(0.5, rel=1e-6)


def _experience_with_hook(trainer, batch, step: int):
    """``(experience, forward calls of the actor during make_experience)`` of one sampled rollout."""
    calls = []
    actor = trainer.actor_trainer.rollout_model
    handle = actor.llama.register_forward_pre_hook(lambda layer, inputs: calls.append(1))
    try:
        trainer.state.global_step = step
        with paddle.no_grad():
            sequences = trainer.sample_rollout(batch)
            calls.clear()  # the fast decoder runs on the weights, not through forward(); count experience only
            mask = make_rollout_attention_mask(batch["attention_mask"], sequences, trainer.tokenizer.eos_token_id)
            experience = trainer.make_experience(batch["input_ids"], sequences, mask)
    finally:
        handle.remove()
    return experience, len(calls)


@pytest.mark.parametrize("per_prompt", [False, True])
def test_rollout_log_probs_equal_the_actor_forward_and_replace_it(tmp_path, tiny_assets, tiny_score_model, repo_root, per_prompt):
    # temperature / top-p / repetition penalty change what is sampled, not the log-probs of the raw logits
    path = ppo_config(
        tmp_path, tiny_assets, tiny_score_model, repo_root, rollout_log_probs=True, temperature=0.7, top_p=0.9,
        repetition_penalty=1.2, max_new_tokens=12, rollout_seed_per_prompt=per_prompt, rollout_backend="fast",
    )  # fmt: skip
    trainer = make_trainer(path)
    dataset = trainer.train_dataset
    batch = dataset.get_collator()([dataset[i] for i in range(4)])
    batch["prompt_index"] = list(range(4))
    fast, fast_calls = _experience_with_hook(trainer, batch, step=3)
    assert fast_calls == 0 and trainer.rollout_log_probs is not None

    trainer.args.rollout_log_probs = False
    try:
        plain, plain_calls = _experience_with_hook(trainer, batch, step=3)
    finally:
        trainer.args.rollout_log_probs = True
    assert plain_calls == 1
    np.testing.assert_array_equal(fast["input_ids"].numpy(), plain["input_ids"].numpy())  # same sampled rollout
    mask = fast["response_mask"].numpy()
    assert mask.sum() > 8
    difference = np.abs(fast["old_log_probs"].numpy() - plain["old_log_probs"].numpy())[mask]
    assert difference.max() < 1e-4, difference.max()
    assert (fast["old_log_probs"].numpy()[~mask] == 0).all()  # after EOS: 0, masked everywhere


def test_rollout_log_probs_log_the_ratio_deviation_of_the_first_update(tmp_path, tiny_assets, tiny_score_model, repo_root):
    trainer = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, rollout_log_probs=True, max_steps=1, rollout_backend="fast"))
    trainer.train()
    with open(os.path.join(trainer.args.output_dir, METRICS_FILE)) as file:
        rows = [json.loads(line) for line in file]
    rows = [row for row in rows if "train/rollout_ratio_deviation" in row]
    assert len(rows) == 1
    assert 0.0 <= rows[0]["train/rollout_ratio_deviation"] < 1e-3


def test_without_a_fast_backend_rollout_log_probs_fall_back_to_the_forward_with_one_warning(
    tmp_path, tiny_assets, tiny_score_model, repo_root, caplog
):
    trainer = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, rollout_log_probs=True, rollout_backend="plain"))
    dataset = trainer.train_dataset
    batch = dataset.get_collator()([dataset[i] for i in range(2)])
    with caplog.at_level("WARNING"):
        for step in range(2):
            _, calls = _experience_with_hook(trainer, batch, step=step)
            assert calls == 1 and trainer.rollout_log_probs is None
    assert sum("rollout_log_probs" in r.getMessage() for r in caplog.records) == 1


def test_trainable_rms_norm_with_a_frozen_weight_or_input():
    """LoRA freezes the norm weights; the first layer's input may need no gradient either."""
    x = paddle.randn([3, 8])
    x.stop_gradient = False
    w = paddle.ones([8])  # stop_gradient=True
    trainable_rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None and w.grad is None
    x2, w2 = paddle.randn([3, 8]), paddle.create_parameter([8], "float32")
    trainable_rms_norm(x2, w2, 1e-6).sum().backward()
    assert w2.grad is not None and x2.grad is None


# ------------------------------------------------------------------ the experience forward reused
def _train_two_rollouts(tmp_path, tiny_assets, tiny_score_model, repo_root, name, reuse: bool, **overrides):
    """``(actor weights, metric rows, actor forward calls)`` after 2 rollouts, reusing or not."""
    settings = dict(max_steps=2, per_device_prompt_batch_size=4, per_device_train_batch_size=4, rollout_backend="fast")
    path = ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, name=name, **{**settings, **overrides})
    trainer = make_trainer(path)
    if not reuse:
        trainer.first_update_reuses_experience = lambda rows: False
    calls = []
    handle = trainer.actor_trainer.model.llama.register_forward_pre_hook(lambda layer, inputs: calls.append(1))
    try:
        trainer.train()
    finally:
        handle.remove()
    with open(os.path.join(trainer.args.output_dir, METRICS_FILE)) as file:
        rows = [json.loads(line) for line in file if "train/actor_loss" in line]
    return {k: v.numpy() for k, v in trainer.actor_trainer.model.state_dict().items()}, rows, len(calls)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_first_update_reuses_the_experience_forward_with_the_same_result(tmp_path, tiny_assets, tiny_score_model, repo_root, algorithm):
    """One pass over one micro-batch: the experience forward of the actor is its update forward too
    (one actor forward per step instead of two); weights and metrics equal the unshared run."""
    extra = {} if algorithm == "ppo" else {"rl_algorithm": "grpo", "num_return_sequences": 2, "per_device_prompt_batch_size": 2}
    reused = _train_two_rollouts(tmp_path, tiny_assets, tiny_score_model, repo_root, "reused", True, **extra)
    plain = _train_two_rollouts(tmp_path, tiny_assets, tiny_score_model, repo_root, "plain", False, **extra)
    assert reused[2] == 2 and plain[2] == 4  # forwards of the actor (the rollout decoder uses no forward)
    for key, value in plain[0].items():
        np.testing.assert_allclose(reused[0][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert len(reused[1]) == len(plain[1]) == 2
    for mine, theirs in zip(reused[1], plain[1]):
        for key in ("train/actor_loss", "train/kl_divergence", "train/reward", "train/entropy", "train/clip_fraction"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_reused_actor_forward_runs_after_every_other_experience_forward(tmp_path, tiny_assets, tiny_score_model, repo_root, algorithm):
    """The kept actor graph is built last, so no other model's forward runs while it is held (at 110M and
    1024 tokens those forwards' attention buffers on top of it cost GBs)."""
    extra = {} if algorithm == "ppo" else {"rl_algorithm": "grpo", "num_return_sequences": 2, "per_device_prompt_batch_size": 2}
    settings = dict(max_steps=1, per_device_prompt_batch_size=4, per_device_train_batch_size=4, rollout_backend="fast")
    trainer = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, **{**settings, **extra}))
    assert trainer.first_update_reuses_experience(4)
    # (causal LMs: their backbone, which response_logits calls directly)
    models = {"actor": trainer.actor_trainer.model.llama, "reference": trainer.reference_model.llama, "reward": trainer.reward_model}
    if algorithm == "ppo":
        models["critic"] = trainer.critic_trainer.model
    calls = []
    handles = [model.register_forward_pre_hook(lambda layer, inputs, name=name: calls.append(name)) for name, model in models.items()]
    try:
        trainer.train()
    finally:
        for handle in handles:
            handle.remove()
    expected = ["reference", "reward", "critic", "actor", "critic"] if algorithm == "ppo" else ["reference", "reward", "actor"]
    assert calls == expected  # experience (actor last), then the update: the critic's forward only


def test_experience_forward_is_not_reused_when_the_update_splits_or_repeats(tmp_path, tiny_assets, tiny_score_model, repo_root):
    trainer = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, per_device_prompt_batch_size=4,
                                      per_device_train_batch_size=4))  # fmt: skip
    assert trainer.first_update_reuses_experience(4)
    assert not trainer.first_update_reuses_experience(8)  # two micro-batches: the second sees updated weights
    for name, value in (("update_iters", 2), ("gradient_accumulation_steps", 2), ("per_device_experience_batch_size", 2)):
        old = getattr(trainer.args, name)
        setattr(trainer.args, name, value)
        try:
            assert not trainer.first_update_reuses_experience(4), name
        finally:
            setattr(trainer.args, name, old)


def test_a_kept_experience_forward_is_used_only_for_its_rows_before_any_step(tmp_path, tiny_assets, tiny_score_model, repo_root):
    """An update that splits the rollout differently, or comes after an optimizer step, runs its own forward."""
    trainer = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root))
    ids = paddle.to_tensor([[1, 2, 3], [4, 5, 6]])
    kept = paddle.ones([2, 2, 5])
    for step, rows, expected in ((0, ids, kept), (0, ids[:1], None), (1, ids, None), (0, ids + 1, None)):
        trainer.state.global_step = 0
        trainer.reused_outputs["actor"] = (0, ids, kept)
        trainer.state.global_step = step
        assert trainer._take_reused_output("actor", rows) is expected
        assert "actor" not in trainer.reused_outputs  # dropped either way
