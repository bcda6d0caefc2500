"""PPO-Lagrangian pieces against hand-derived numbers: cost shaping, combined advantage, the multiplier."""

from __future__ import annotations

import json
import math

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.models.lagrange import LagrangeMultiplier, add_kl_divergence_to_cost, combine_advantages, lagrangian_loss
from alignment.models.ppo_model_utils import add_kl_divergence_regularization


def tensor(values, dtype="float32"):
    return paddle.to_tensor(values, dtype=dtype)


# Two rows, T = 3. log_probs - ref_log_probs = [[0.4, 0, -0.2], [0.2, 0, 0]]; row 1's last column is padding,
# so the ends are e = [2, 1]. beta = 0.1 -> +beta * kl = [[0.04, 0, -0.02], [0.02, 0, 0]].
LOG_PROBS = [[0.5, 0.2, 0.1], [0.3, 0.0, 7.0]]
REF_LOG_PROBS = [[0.1, 0.2, 0.3], [0.1, 0.0, 0.0]]
MASK = [[1, 1, 1], [1, 1, 0]]


def test_cost_shaping_adds_the_kl_penalty_to_the_cost_golden():
    cost = tensor([2.0, -1.0])
    shaped = add_kl_divergence_to_cost(cost, tensor(LOG_PROBS), tensor(REF_LOG_PROBS), tensor(MASK, "int64"), 0.1, 50.0)
    # The cost lands at the end index: 2 + (-0.02) = 1.98 in row 0, -1 + 0 at column 1 of row 1.
    # (Row 1's padding column keeps its KL term 0.1 * 7 = 0.7: GAE masks it, as for the reward channel.)
    np.testing.assert_allclose(shaped.numpy(), [[0.04, 0.0, 1.98], [0.02, -1.0, 0.7]], rtol=1e-6, atol=1e-7)
    # The reward channel has the opposite KL sign: -0.04, 0, +0.02 + 2 = 2.02 at the end.
    reward = add_kl_divergence_regularization(cost, tensor(LOG_PROBS), tensor(REF_LOG_PROBS), tensor(MASK, "int64"), 0.1, 50.0)
    np.testing.assert_allclose(reward.numpy(), [[-0.04, 0.0, 2.02], [-0.02, -1.0, -0.7]], rtol=1e-6, atol=1e-7)


def test_cost_shaping_clip_modes_golden():
    args = (tensor([2.0, -1.0]), tensor(LOG_PROBS), tensor(REF_LOG_PROBS), tensor(MASK, "int64"), 0.1, 1.5)
    # "score": clip(2, -1.5, 1.5) = 1.5 then + KL: 1.5 - 0.02 = 1.48.
    np.testing.assert_allclose(add_kl_divergence_to_cost(*args, clip_mode="score").numpy()[0], [0.04, 0.0, 1.48], rtol=1e-6)
    # "total": 1.98 is clipped to 1.5 after the sum.
    np.testing.assert_allclose(add_kl_divergence_to_cost(*args, clip_mode="total").numpy()[0], [0.04, 0.0, 1.5], rtol=1e-6)


def test_combine_advantages_golden():
    reward_advantages, cost_advantages = tensor([[1.0, -2.0]]), tensor([[0.5, 1.0]])
    # lambda = 3: (1 - 1.5) / 4 = -0.125, (-2 - 3) / 4 = -1.25
    np.testing.assert_allclose(combine_advantages(reward_advantages, cost_advantages, 3.0).numpy(), [[-0.125, -1.25]])
    # lambda = 0: the reward advantage alone.
    np.testing.assert_allclose(combine_advantages(reward_advantages, cost_advantages, 0.0).numpy(), [[1.0, -2.0]])
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        combine_advantages(reward_advantages, cost_advantages, -1.0)
    with pytest.raises(ValueError, match="one shape"):
        combine_advantages(reward_advantages, tensor([[1.0]]), 1.0)


@settings(max_examples=25, deadline=None)
@given(st.floats(-5, 5), st.floats(-5, 5), st.floats(0, 50))
def test_combined_advantage_is_a_convex_combination_of_a_r_and_minus_a_c(a_r, a_c, lam):
    # (A_r - l A_c) / (1 + l) = w A_r + (1 - w)(-A_c) with w = 1 / (1 + l): always between A_r and -A_c.
    value = float(combine_advantages(tensor([a_r]), tensor([a_c]), lam)[0])
    low, high = min(a_r, -a_c), max(a_r, -a_c)
    assert low - 1e-4 <= value <= high + 1e-4


def test_lagrangian_loss_golden():
    assert lagrangian_loss(2.0, 0.0, 0.0) == -2.0
    assert lagrangian_loss(2.0, 3.0, math.log(2.0)) == pytest.approx(2.0)


def test_one_lambda_step_without_clamp_golden():
    multiplier = LagrangeMultiplier(lambda_init=1.0, lambda_lr=0.1, threshold=0.0)
    multiplier.add_episode_costs([1.0, 3.0])  # C = 2
    # loss = -(2 - 0) * e^0 = -2; log lambda = 0 - 0.1 * (-2) = 0.2; lambda = e^0.2 = 1.221403
    metrics = multiplier.step(global_step=0)
    assert multiplier.log_lambda == pytest.approx(0.2)
    assert metrics == pytest.approx({"train/lambda": 1.221403, "train/episode_cost": 2.0, "train/lambda_loss": -2.0}, abs=1e-6)
    # Second step: loss = -2 e^0.2 = -2.442806; log lambda = 0.2 + 0.2442806 = 0.4442806; lambda = 1.559368
    multiplier.step(global_step=1)
    assert multiplier.lambda_value == pytest.approx(math.exp(0.2 + 0.2 * math.exp(0.2)), rel=1e-12)
    assert multiplier.lambda_value == pytest.approx(1.559368, abs=1e-6)


def test_lambda_shrinks_when_the_cost_is_below_the_threshold():
    multiplier = LagrangeMultiplier(lambda_init=1.0, lambda_lr=0.1, threshold=3.0)
    multiplier.add_episode_costs([1.0, 3.0])  # C - threshold = -1: loss = +1, log lambda = -0.1
    multiplier.step(global_step=0)
    assert multiplier.lambda_value == pytest.approx(math.exp(-0.1))  # 0.904837


def test_one_lambda_step_with_clamp_golden():
    multiplier = LagrangeMultiplier(lambda_init=1.0, lambda_lr=0.1, lambda_max=1.1)
    multiplier.add_episode_costs([1.0, 3.0])
    # unclamped log lambda would be 0.2 > log 1.1 = 0.0953102 -> lambda = 1.1 exactly
    assert multiplier.step(global_step=0)["train/lambda"] == pytest.approx(1.1)
    assert multiplier.log_lambda == pytest.approx(math.log(1.1))


def test_delay_steps_hold_lambda_until_the_delay():
    multiplier = LagrangeMultiplier(lambda_init=2.0, lambda_lr=0.1, update_delay_steps=2)
    multiplier.add_episode_costs([1.0])
    assert multiplier.step(0)["train/lambda"] == 2.0
    assert multiplier.step(1) == {"train/lambda": 2.0, "train/episode_cost": 1.0, "train/lambda_loss": 0.0}
    # step 2: loss = -1 * 2 = -2; log lambda = ln 2 + 0.2; lambda = 2 e^0.2 = 2.442806
    assert multiplier.step(2)["train/lambda"] == pytest.approx(2.442806, abs=1e-6)
    assert multiplier.num_updates == 1


def test_window_keeps_the_last_costs_and_an_empty_window_does_not_step():
    multiplier = LagrangeMultiplier(window_size=2)
    assert multiplier.step(0)["train/lambda"] == 1.0 and multiplier.num_updates == 0
    multiplier.add_episode_costs([1.0, 3.0, 5.0])
    assert list(multiplier.episode_costs) == [3.0, 5.0] and multiplier.mean_episode_cost() == 4.0


def test_non_finite_episode_costs_are_left_out_whole():
    multiplier = LagrangeMultiplier()
    assert multiplier.add_episode_costs([1.0, 2.0])
    assert not multiplier.add_episode_costs([3.0, float("nan")]) and not multiplier.add_episode_costs([float("inf")])
    assert list(multiplier.episode_costs) == [1.0, 2.0]
    assert math.isfinite(multiplier.step(0)["train/lambda"])


def test_state_round_trip_continues_the_same_trajectory():
    def run(multiplier, steps):
        out = []
        for step in steps:
            multiplier.add_episode_costs([0.3 * step - 0.5, 1.0 - 0.1 * step])
            out.append(multiplier.step(step)["train/lambda"])
        return out

    kwargs = dict(lambda_init=0.5, lambda_lr=0.2, lambda_max=3.0, threshold=0.1, update_delay_steps=1, window_size=3)
    straight = LagrangeMultiplier(**kwargs)
    expected = run(straight, range(6))
    first = LagrangeMultiplier(**kwargs)
    head = run(first, range(3))
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    resumed = LagrangeMultiplier(**kwargs)
    resumed.load_state_dict(state)
    assert head + run(resumed, range(3, 6)) == expected
    with pytest.raises(ValueError, match="episode_cost_window_size"):
        LagrangeMultiplier(window_size=4).load_state_dict(state)


def test_bad_multiplier_settings_are_named():
    with pytest.raises(ValueError, match=r"lambda_init must be > 0.*lambda_max must be > 0"):
        LagrangeMultiplier(lambda_init=0.0, lambda_max=-1.0)
    with pytest.raises(ValueError, match=r"must not exceed lambda_max"):
        LagrangeMultiplier(lambda_init=2.0, lambda_max=1.0)
