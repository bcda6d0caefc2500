"""Reward-model losses and accuracy against hand-computed values.

Handy sigmoid values used below: sigma(0) = 1/2, sigma(ln 3) = 3/4, sigma(-ln 3) = 1/4, so
-log sigma(0) = ln 2 = 0.693147, -log sigma(ln 3) = ln(4/3) = 0.287682, -log sigma(-ln 3) = ln 4 = 1.386294;
-log sigma(1) = ln(1 + e^-1) = 0.313262, -log sigma(-1) = ln(1 + e) = 1.313262.
"""

import math

import numpy as np
import paddle
import pytest

from alignment.models import reward_accuracy, reward_sequence_loss, reward_token_loss
from alignment.models.score_model_utils import divergence_span_mask, first_divergence_index

LN3 = math.log(3.0)


def tensor(values, dtype="float32"):
    return paddle.to_tensor(values, dtype=dtype)


# ----------------------------------------------------------------------------- sequence-wise


def test_sequence_loss_equal_rewards_is_log2():
    # h - l = 0 for every pair: -log sigma(0) = ln 2, whatever the common value.
    loss = reward_sequence_loss(tensor([0.0, 5.0, -2.0]), tensor([0.0, 5.0, -2.0]))
    assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)


def test_sequence_loss_golden():
    # h - l = [1, 0, -1]: loss = (ln(1+e^-1) + ln 2 + ln(1+e)) / 3 = (0.313262 + 0.693147 + 1.313262) / 3
    #                          = 2.319671 / 3 = 0.773224
    h, l = tensor([1.0, 0.0, 2.0]), tensor([0.0, 0.0, 3.0])
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.e)) / 3
    assert expected == pytest.approx(0.773224, abs=1e-6)
    assert float(reward_sequence_loss(h, l)) == pytest.approx(expected, rel=1e-6)


def test_sequence_loss_regulariser_is_sum_of_two_means():
    # Same pairs, reg = 0.1: mean l^2 = (0 + 0 + 9)/3 = 3, mean h^2 = (1 + 0 + 4)/3 = 5/3,
    # so the loss grows by 0.1 * (3 + 5/3) = 0.466667 -> 0.773224 + 0.466667 = 1.239890.
    h, l = tensor([1.0, 0.0, 2.0]), tensor([0.0, 0.0, 3.0])
    base = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.e)) / 3
    assert float(reward_sequence_loss(h, l, regularization=0.1)) == pytest.approx(base + 0.1 * (3 + 5 / 3), rel=1e-6)
    assert float(reward_sequence_loss(h, l, regularization=0.1)) == pytest.approx(1.239890, abs=1e-5)


def test_sequence_loss_is_stable_for_large_margins():
    # -log sigma(-200) = 200 (naive log(sigmoid(x)) would give inf); -log sigma(200) ~ 0.
    loss = reward_sequence_loss(tensor([0.0, 200.0]), tensor([200.0, 0.0]))
    assert float(loss) == pytest.approx(100.0, rel=1e-6)


def test_sequence_loss_gradient():
    # d/dh [-log sigma(h - l)] = -(1 - sigma(h - l)); at h - l = 0 that is -1/2, divided by B = 2.
    h = tensor([0.0, 0.0])
    h.stop_gradient = False
    reward_sequence_loss(h, tensor([0.0, 0.0])).backward()
    np.testing.assert_allclose(h.grad.numpy(), [-0.25, -0.25], rtol=1e-6)


def test_sequence_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="higher_end_rewards"):
        reward_sequence_loss(tensor([1.0, 2.0]), tensor([1.0]))
    with pytest.raises(ValueError, match="higher_end_rewards"):
        reward_sequence_loss(tensor([[1.0], [2.0]]), tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match="regularization"):
        reward_sequence_loss(tensor([1.0]), tensor([0.0]), regularization=-1.0)


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_counts_ties_as_wrong():
    # 1 > 0 yes, 2 > 2 tie -> no, 3 > 5 no, 4 > 3.9 yes -> 2/4.
    acc = reward_accuracy(tensor([1.0, 2.0, 3.0, 4.0]), tensor([0.0, 2.0, 5.0, 3.9]))
    assert acc.dtype == paddle.float32
    assert float(acc) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- token-wise

# Pair 0: ids diverge at d = 2 (7 vs 9); last valid tokens 3 (higher) and 2 (lower) -> e = 3, span {2, 3}.
# Pair 1: ids diverge at d = 1; higher is right-padded after index 2, lower is full -> e = 4, span {1..4}
#         (higher's pad positions 3, 4 are inside the span, as upstream).
HIGHER_IDS = [[5, 6, 7, 8, 0], [5, 9, 9, 0, 0]]
LOWER_IDS = [[5, 6, 9, 0, 0], [5, 6, 7, 8, 9]]
HIGHER_MASK = [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
LOWER_MASK = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
BIG = 50.0  # outside the spans: would dominate the loss if it leaked in
# Pair 0 span values: h = [1, ln3], l = [1, 0]  -> h - l = [0, ln3]
# Pair 1 span values: h = [ln3, 0, 2, 0], l = [0, ln3, 2, 0] -> h - l = [ln3, -ln3, 0, 0]
HIGHER_REWARDS = [[-BIG, -BIG, 1.0, LN3, -BIG], [-BIG, LN3, 0.0, 2.0, 0.0]]
LOWER_REWARDS = [[BIG, BIG, 1.0, 0.0, BIG], [BIG, 0.0, LN3, 2.0, 0.0]]


def token_inputs():
    return (
        tensor(HIGHER_REWARDS),
        tensor(LOWER_REWARDS),
        tensor(HIGHER_IDS, "int64"),
        tensor(LOWER_IDS, "int64"),
        tensor(HIGHER_MASK, "int64"),
        tensor(LOWER_MASK, "int64"),
    )


def test_span_mask_and_divergence_index():
    h, l, hid, lid, hm, lm = token_inputs()
    np.testing.assert_array_equal(first_divergence_index(hid, lid).numpy(), [2, 1])
    span = divergence_span_mask(hid, lid, hm, lm).numpy()
    np.testing.assert_array_equal(span, [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])


def test_token_loss_golden():
    # Pair 0: (ln 2 + ln 4/3) / 2 = (0.693147 + 0.287682) / 2 = 0.490415
    # Pair 1: (ln 4/3 + ln 4 + ln 2 + ln 2) / 4 = (0.287682 + 1.386294 + 0.693147 * 2) / 4 = 0.765068
    # loss = (0.490415 + 0.765068) / 2 = 0.627741
    pair0 = (math.log(2) + math.log(4 / 3)) / 2
    pair1 = (math.log(4 / 3) + math.log(4) + 2 * math.log(2)) / 4
    assert (pair0 + pair1) / 2 == pytest.approx(0.627741, abs=1e-6)
    assert float(reward_token_loss(*token_inputs())) == pytest.approx((pair0 + pair1) / 2, rel=1e-6)


def test_token_loss_regulariser_uses_span_means():
    # reg = 0.1. Pair 0: mean l^2 = (1 + 0)/2 = 0.5, mean h^2 = (1 + ln3^2)/2 = 1.103474
    #   -> 0.490415 + 0.1 * 1.603474 = 0.650762
    # Pair 1: mean l^2 = (0 + ln3^2 + 4 + 0)/4 = 1.301737 = mean h^2 -> 0.765068 + 0.1 * 2.603474 = 1.025415
    # loss = (0.650762 + 1.025415) / 2 = 0.838089
    pair0 = (math.log(2) + math.log(4 / 3)) / 2 + 0.1 * (0.5 + (1 + LN3**2) / 2)
    pair1 = (math.log(4 / 3) + math.log(4) + 2 * math.log(2)) / 4 + 0.1 * 2 * (LN3**2 + 4) / 4
    assert (pair0 + pair1) / 2 == pytest.approx(0.838089, abs=1e-6)
    loss = reward_token_loss(*token_inputs(), regularization=0.1)
    assert float(loss) == pytest.approx((pair0 + pair1) / 2, rel=1e-6)


def test_token_loss_gradient_only_inside_span():
    h, l, hid, lid, hm, lm = token_inputs()
    h.stop_gradient = False
    reward_token_loss(h, l, hid, lid, hm, lm).backward()
    grad = h.grad.numpy()
    span = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=bool)
    assert np.all(grad[~span] == 0)
    # Pair 0, t = 2 (h - l = 0): d/dh = -(1 - 1/2) / n_0 / B = -0.5 / 2 / 2 = -0.125
    assert grad[0, 2] == pytest.approx(-0.125, rel=1e-5)


def test_token_loss_with_single_token_span_equals_sequence_loss():
    # Ids differ only at the last valid token (d = e = 2), so both losses look at one value per pair.
    hid = tensor([[1, 2, 3, 0]], "int64")
    lid = tensor([[1, 2, 4, 0]], "int64")
    mask = tensor([[1, 1, 1, 0]], "int64")
    h = tensor([[9.0, 9.0, 0.5, 9.0]])
    l = tensor([[-9.0, -9.0, 2.0, -9.0]])
    token = reward_token_loss(h, l, hid, lid, mask, mask, regularization=0.01)
    sequence = reward_sequence_loss(h[:, 2], l[:, 2], regularization=0.01)
    assert float(token) == pytest.approx(float(sequence), rel=1e-6)


def test_token_loss_rejects_identical_pairs():
    ids = tensor([[1, 2, 3], [4, 5, 6]], "int64")
    other = tensor([[1, 2, 3], [4, 5, 7]], "int64")
    mask = paddle.ones([2, 3], dtype="int64")
    scores = paddle.zeros([2, 3])
    with pytest.raises(ValueError, match=r"identical in rows \[0\]"):
        reward_token_loss(scores, scores, ids, other, mask, mask)


def test_token_loss_rejects_divergence_only_in_padding():
    hid = tensor([[1, 2, 0, 7]], "int64")
    lid = tensor([[1, 2, 0, 8]], "int64")
    mask = tensor([[1, 1, 0, 0]], "int64")
    scores = paddle.zeros([1, 4])
    with pytest.raises(ValueError, match="only in padding"):
        reward_token_loss(scores, scores, hid, lid, mask, mask)


def test_token_loss_rejects_shape_mismatch():
    h, l, hid, lid, hm, lm = token_inputs()
    with pytest.raises(ValueError, match="attention masks"):
        reward_token_loss(h, l, hid, lid, hm[:, :4], lm)
    with pytest.raises(ValueError, match="higher_rewards"):
        reward_token_loss(h, l[:, :4], hid, lid, hm, lm)
