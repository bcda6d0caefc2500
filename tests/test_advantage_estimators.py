"""Critic-free estimators, KL estimators, entropy and the asymmetric PPO clip: hand-derived golden values
and hypothesis properties (pure functions of alignment/models/ppo_model_utils.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.models.ppo_model_utils import (
    actor_loss_fn,
    entropy_from_logits,
    get_advantage_estimator,
    kl_penalty,
    ratio_clip_fraction,
    register_advantage_estimator,
    registered_advantage_estimators,
)

T = paddle.to_tensor


def call(name, rewards, mask, index=None, **kwargs):
    adv, ret = get_advantage_estimator(name)(
        rewards=T(rewards, dtype="float32"), sequence_mask=T(mask, dtype="bool"), index=index, **kwargs
    )
    return adv.numpy(), ret.numpy()


def test_registry_lists_names_and_refuses_unknown():
    assert {"gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"} <= set(registered_advantage_estimators())
    with pytest.raises(KeyError, match="registered: .*grpo"):
        get_advantage_estimator("grpoo")

    @register_advantage_estimator("test_zero")
    def zero(*, rewards, sequence_mask, **_):
        return paddle.zeros_like(rewards), paddle.zeros_like(rewards)

    assert get_advantage_estimator("test_zero") is zero
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("test_zero")(lambda **_: None)


# Scores: row 0 = 0 + 1 = 1 (masked 9 ignored), row 1 = 3, row 2 = 2, row 3 = 0.5 + 1.5 = 2, row 4 = 5.
REWARDS = [[0, 1, 9], [0, 0, 3], [2, 7, 7], [0.5, 1.5, -4], [0, 5, 0]]
MASK = [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
GROUPS = [0, 0, 1, 1, 2]  # group 2 is a group of one


def test_grpo_golden():
    # group 0: mean 2, unbiased std sqrt(2); group 1: std 0; group of one: mean 0, std 1.
    adv, ret = call("grpo", REWARDS, MASK, GROUPS, epsilon=1e-6, norm_by_std=True, gamma=1.0, values=None)
    per_row = [-1 / (math.sqrt(2) + 1e-6), 1 / (math.sqrt(2) + 1e-6), 0.0, 0.0, 5 / (1 + 1e-6)]
    expected = np.asarray(per_row)[:, None] * np.asarray(MASK)
    np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ret, expected, rtol=1e-6, atol=1e-7)
    # Dr. GRPO: no division by the std.
    adv, _ = call("grpo", REWARDS, MASK, np.asarray(GROUPS), epsilon=1e-6, norm_by_std=False)
    np.testing.assert_allclose(adv, np.asarray([-1, 1, 0, 0, 5.0])[:, None] * np.asarray(MASK), atol=1e-6)
    # index as an int tensor gives the same
    adv_t, _ = call("grpo", REWARDS, MASK, T(GROUPS, dtype="int64"), epsilon=1e-6, norm_by_std=False)
    np.testing.assert_array_equal(adv, adv_t)


def test_rloo_golden():
    adv, ret = call("rloo", REWARDS, MASK, GROUPS)
    # s_i - mean(others): 1 - 3, 3 - 1, 2 - 2, 2 - 2; the group of one keeps s = 5.
    np.testing.assert_allclose(adv, np.asarray([-2, 2, 0, 0, 5.0])[:, None] * np.asarray(MASK), atol=1e-6)
    np.testing.assert_array_equal(adv, ret)
    # a group of three: scores 1, 2, 6 -> 1 - 4, 2 - 3.5, 6 - 1.5
    adv, _ = call("rloo", [[1.0], [2.0], [6.0]], [[1], [1], [1]], [7, 7, 7])
    np.testing.assert_allclose(adv[:, 0], [-3, -1.5, 4.5], atol=1e-6)


def test_reinforce_plus_plus_golden():
    rewards = [[0.5, 0, 1], [1, 2, 7]]
    mask = [[1, 1, 1], [1, 1, 0]]
    adv, ret = call("reinforce_plus_plus", rewards, mask, gamma=0.5, index=[0, 1])
    # G (gamma 0.5): row 0: 1, 0 + 0.5 = 0.5, 0.5 + 0.25 = 0.75; row 1 (the masked 7 resets): 2, 1 + 1 = 2.
    np.testing.assert_allclose(ret, [[0.75, 0.5, 1.0], [2.0, 2.0, 0.0]], atol=1e-6)
    # masked mean 1.25, squared deviations sum 2.0, unbiased variance 2 / 4 = 0.5
    std = math.sqrt(0.5 + 1e-8)
    np.testing.assert_allclose(adv, [[-0.5 / std, -0.75 / std, -0.25 / std], [0.75 / std, 0.75 / std, 0.0]], rtol=1e-6)


def test_reinforce_plus_plus_baseline_golden():
    rewards = [[0, 1], [3, 8], [0, 4]]
    mask = [[1, 1], [1, 0], [1, 1]]
    adv, ret = call("reinforce_plus_plus_baseline", rewards, mask, [0, 0, 1])
    # scores 1, 3 (group mean 2) and 4 (group of one, mean 0): centred -1, 1, 4 broadcast over the mask
    np.testing.assert_allclose(ret, [[-1, -1], [1, 0], [4, 4]], atol=1e-6)
    # masked values -1, -1, 1, 4, 4: mean 1.4, squared deviations 25.2, unbiased variance 6.3
    std = math.sqrt(6.3 + 1e-8)
    np.testing.assert_allclose(adv, [[-2.4 / std, -2.4 / std], [-0.4 / std, 0.0], [2.6 / std, 2.6 / std]], rtol=1e-6)


def test_gae_estimator_matches_hand_values_and_needs_values():
    adv, ret = call("gae", [[0.0, 3.0]], [[1, 1]], [0], values=T([[1.0, 2.0]]), gamma=1.0, gae_lambda=1.0)
    # delta_1 = 3 - 2 = 1, delta_0 = 0 + 2 - 1 = 1 -> A = [2, 1], R = A + V = [3, 3]
    np.testing.assert_allclose(adv, [[2.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(ret, [[3.0, 3.0]], atol=1e-6)
    with pytest.raises(ValueError, match="needs `values`"):
        call("gae", [[0.0, 3.0]], [[1, 1]], [0], values=None)


def test_bad_index_is_refused():
    with pytest.raises(ValueError, match="one group id per row"):
        call("grpo", REWARDS, MASK, [0, 1])
    with pytest.raises(TypeError, match="integer group ids"):
        call("rloo", REWARDS, MASK, [0.5, 0, 1, 1, 2])


def test_kl_penalty_golden():
    logp, ref = T([-1.0, -2.0, -20.0]), T([-1.5, -1.0, 0.0])  # logp - ref = 0.5, -1, -20
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1").numpy(), [0.5, -1.0, -20.0], atol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2").numpy(), [0.125, 0.5, 200.0], atol=1e-5)
    # k3 = exp(ref - logp) - (ref - logp) - 1, clamped at 10
    np.testing.assert_allclose(kl_penalty(logp, ref, "k3").numpy(), [math.exp(-0.5) - 0.5, math.e - 2, 10.0], atol=1e-6)
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, "k4")


def test_entropy_golden():
    logits = T([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    expected = [math.log(2.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    np.testing.assert_allclose(entropy_from_logits(logits).numpy()[0], expected, atol=1e-6)


def test_asymmetric_clip_golden():
    ratios = np.asarray([[1.5, 0.5, 1.2, 0.5]])
    old = T(np.zeros((1, 4)), dtype="float32")
    logp = T(np.log(ratios), dtype="float32")
    adv = T([[1.0, -1.0, 2.0, 1.0]])
    mask = T([[1, 1, 1, 1]], dtype="bool")
    # (0.8, 1.3): -1.3 (clipped), 0.8 (clipped), -2.4, -0.5 (pessimistic: unclipped) -> mean -0.85
    loss = actor_loss_fn(logp, old, adv, mask, 0.2, clip_range_ratio_low=0.2, clip_range_ratio_high=0.3)
    assert float(loss) == pytest.approx(-0.85, abs=1e-6)
    assert float(ratio_clip_fraction(logp, old, adv, mask, 0.2, clip_range_ratio_high=0.3)) == pytest.approx(0.5)
    # symmetric 0.2: the first term becomes -1.2 -> mean -0.825; low alone changes the second term
    assert float(actor_loss_fn(logp, old, adv, mask, 0.2)) == pytest.approx(-0.825, abs=1e-6)
    assert float(actor_loss_fn(logp, old, adv, mask, 0.2, clip_range_ratio_low=0.4)) == pytest.approx((-1.2 + 0.6 - 2.4 - 0.5) / 4, abs=1e-6)
    with pytest.raises(ValueError, match="clip_range_ratio_low"):
        actor_loss_fn(logp, old, adv, mask, 0.2, clip_range_ratio_low=1.0)


def test_actor_loss_with_kl_loss_and_entropy_golden():
    """PPOTrainer.actor_loss adds kl_loss_coeff x KL(k1/k3) and subtracts entropy_coeff x entropy."""
    from alignment.ppo.ppo_trainer import PPOTrainer

    logits = T([[[0.0, 0.0], [0.0, math.log(3.0)]]])  # predicts tokens 1 then 0
    logp = [-math.log(2.0), math.log(0.25)]
    batch = {
        "input_ids": T([[0, 1, 0]]), "start": 0, "response_mask": T([[True, True]]),
        "old_log_probs": T([logp]), "advantages": T([[1.0, 1.0]]), "ref_log_probs": T([[-math.log(2.0)] * 2]),
    }  # fmt: skip

    def loss(**overrides):
        args = dict(clip_range_ratio=0.2, clip_range_ratio_low=None, clip_range_ratio_high=None, loss_mean_type="token",
                    kl_loss_coeff=0.0, kl_estimator=None, entropy_coeff=0.0)  # fmt: skip
        args.update(overrides)
        metrics = {}
        value = float(PPOTrainer.actor_loss(SimpleNamespace(args=SimpleNamespace(**args)), logits, batch, metrics))
        return value, metrics

    value, metrics = loss()
    assert value == pytest.approx(-1.0, abs=1e-6)  # ratio 1, advantage 1 on both tokens
    entropy = (math.log(2.0) + 0.25 * math.log(4.0) + 0.75 * math.log(4.0 / 3.0)) / 2
    assert metrics["train/entropy"] == pytest.approx(entropy, abs=1e-6)
    assert metrics["train/clip_fraction"] == 0.0
    # logp - ref = 0, -ln 2: k3 = (0 + (2 - ln 2 - 1)) / 2 ; k1 = -ln 2 / 2
    k3 = (2 - math.log(2.0) - 1) / 2
    value, metrics = loss(kl_loss_coeff=0.1, entropy_coeff=0.01)  # kl_estimator None -> k3
    assert value == pytest.approx(-1.0 + 0.1 * k3 - 0.01 * entropy, abs=1e-6)
    assert metrics["train/kl_loss"] == pytest.approx(k3, abs=1e-6)
    value, _ = loss(kl_loss_coeff=0.1, kl_estimator="k1")
    assert value == pytest.approx(-1.0 - 0.1 * math.log(2.0) / 2, abs=1e-6)


# ------------------------------------------------------------------------------------------ properties
@st.composite
def grouped_batches(draw, min_group=1):
    groups = draw(st.integers(1, 4))
    sizes = [draw(st.integers(min_group, 4)) for _ in range(groups)]
    rows = sum(sizes)
    width = draw(st.integers(1, 5))
    index = np.repeat(np.arange(groups), sizes)
    perm = np.random.default_rng(draw(st.integers(0, 1000))).permutation(rows)  # groups need not be contiguous
    values = st.floats(-5, 5, allow_nan=False, width=32)
    rewards = np.asarray(draw(st.lists(values, min_size=rows * width, max_size=rows * width)), dtype=np.float32).reshape(rows, width)
    lengths = [draw(st.integers(1, width)) for _ in range(rows)]
    mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    return rewards, mask, index[perm]


@settings(max_examples=60, deadline=None)
@given(grouped_batches(min_group=2))
def test_grpo_group_advantages_sum_to_zero(batch):
    rewards, mask, index = batch
    adv, _ = call("grpo", rewards, mask, index)
    first = adv[:, 0]  # every row has its first token valid; the advantage is constant along the row
    for group in np.unique(index):
        assert abs(first[index == group].sum()) < 1e-3 * max(1.0, np.abs(first).max())
    assert np.all(adv[~mask] == 0)


@settings(max_examples=60, deadline=None)
@given(grouped_batches(min_group=2))
def test_rloo_is_score_minus_mean_of_the_others(batch):
    rewards, mask, index = batch
    adv, _ = call("rloo", rewards, mask, index)
    scores = np.where(mask, rewards, 0).astype(np.float64).sum(axis=1)
    for row in range(len(scores)):
        others = [scores[o] for o in range(len(scores)) if index[o] == index[row] and o != row]
        np.testing.assert_allclose(adv[row][mask[row]], scores[row] - np.mean(others), atol=1e-4)
    assert np.all(adv[~mask] == 0)


@settings(max_examples=60, deadline=None)
@given(grouped_batches(), st.sampled_from(["reinforce_plus_plus", "reinforce_plus_plus_baseline"]), st.floats(0, 1))
def test_whitened_advantages_have_mean_zero_and_unit_variance(batch, name, gamma):
    rewards, mask, index = batch
    adv, ret = call(name, rewards, mask, index, gamma=gamma)
    valid = ret[mask].astype(np.float64)
    assert np.all(adv[~mask] == 0) and np.all(ret[~mask] == 0)
    if valid.size < 2 or valid.std() < 1e-2:
        return  # (near-)constant targets: whitening has nothing to scale
    assert abs(adv[mask].mean()) < 1e-4
    assert adv[mask].astype(np.float64).var(ddof=1) == pytest.approx(1.0, rel=1e-3)
