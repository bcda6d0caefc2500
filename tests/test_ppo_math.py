"""Golden tests for alignment.models.ppo_model_utils on small hand-worked examples.

Every expected number is derived by hand in the comment next to it; the tests compare numbers,
they do not re-implement the formulas.
"""

import math

import numpy as np
import paddle
import pytest

from alignment.models.ppo_model_utils import (
    entropy_from_logits,
    actor_loss_fn,
    add_kl_divergence_regularization,
    critic_loss_fn,
    gather_log_probabilities,
    get_advantages_and_returns,
    kl_divergence_per_sequence,
    last_valid_index,
    make_position_ids,
    make_response_mask,
    make_sequence_mask,
    masked_loss_mean,
    masked_mean,
    ptx_loss_fn,
)

TOL = dict(rtol=1e-6, atol=1e-6)


def f32(values, stop_gradient=True):
    tensor = paddle.to_tensor(np.asarray(values, dtype="float32"))
    tensor.stop_gradient = stop_gradient
    return tensor


def i64(values):
    return paddle.to_tensor(np.asarray(values, dtype="int64"))


def close(tensor, expected):
    np.testing.assert_allclose(tensor.numpy(), np.asarray(expected, dtype="float64"), **TOL)


# ------------------------------------------------------------------------------------------------
# gather_log_probabilities
# ------------------------------------------------------------------------------------------------


def test_gather_log_probabilities_golden():
    # Row 0, position 0: logits = log([1, 2, 5]) -> softmax = [1/8, 2/8, 5/8]; label 2 -> log(5/8).
    # Row 0, position 1: logits = [0, 0, 0] -> uniform 1/3; label 1 -> log(1/3) = -1.0986123.
    logits = f32([[np.log([1.0, 2.0, 5.0]), [0.0, 0.0, 0.0]]])
    labels = i64([[2, 1]])
    out = gather_log_probabilities(logits, labels)
    assert out.shape == [1, 2] and out.dtype == paddle.float32
    close(out, [[math.log(5 / 8), math.log(1 / 3)]])


def test_gather_log_probabilities_with_entropy_golden_and_detached():
    # softmax [1/8, 2/8, 5/8]: H = -(1/8 ln 1/8 + 2/8 ln 2/8 + 5/8 ln 5/8); uniform over 3: H = ln 3.
    logits = f32([[np.log([1.0, 2.0, 5.0]), [0.0, 0.0, 0.0]]])
    logits.stop_gradient = False
    log_probs, entropy = gather_log_probabilities(logits, i64([[2, 1]]), with_entropy=True)
    p = np.array([1, 2, 5]) / 8
    close(entropy, [[-(p * np.log(p)).sum(), math.log(3)]])
    close(log_probs, [[math.log(5 / 8), math.log(1 / 3)]])
    assert entropy.stop_gradient and not log_probs.stop_gradient
    large = logits + 700.0  # max-shifted: no overflow, the same entropy as entropy_from_logits
    close(gather_log_probabilities(large, i64([[2, 1]]), with_entropy=True)[1], entropy_from_logits(large))


def test_gather_log_probabilities_shifted_call_scores_next_token():
    # Sequence x = [0, 2, 1]. Logits at position 0 put all mass on token 2 (x_1), at position 1 on
    # token 1 (x_2), at position 2 on token 0 (would predict x_3, which does not exist).
    # logits[:, :-1] with x[1:] therefore scores x_1 and x_2 at their predicted positions:
    # log_softmax([0, 0, 20])[2] = -log(1 + 2e^-20) ~= -4.1e-9, same for position 1.
    big = 20.0
    logits = f32([[[0, 0, big], [0, big, 0], [big, 0, 0]]])
    input_ids = i64([[0, 2, 1]])
    out = gather_log_probabilities(logits[:, :-1], input_ids[:, 1:])
    close(out, [[-math.log1p(2 * math.exp(-big))] * 2])
    # Mis-aligned (unshifted) call would score x_0 = 0 under position 0: log(1 / (2 + e^20)).
    unshifted = gather_log_probabilities(logits[:, :-1], input_ids[:, :-1])
    assert unshifted.numpy()[0, 0] < -19


def test_gather_log_probabilities_is_stable_for_large_logits():
    # logits [1000, 0]: log_softmax = [0, -1000] exactly (e^-1000 underflows); a naive
    # log(softmax) would give log(0) = -inf for label 1.
    out = gather_log_probabilities(f32([[[1000.0, 0.0]]]), i64([[1]]))
    close(out, [[-1000.0]])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gather_log_probabilities_computes_low_precision_input_in_float32(dtype):
    # logits [0, 1, 2] are exact in bf16/fp16. logsumexp = log(1 + e + e^2) = log(11.1073379)
    # = 2.4076059644; label 0 -> -2.4076059644. bf16 arithmetic would round 2.4076 to 2.40625
    # (spacing 2^-6 in [2, 4)), an error of 1.4e-3, far outside the 1e-6 tolerance.
    logits = f32([[[0.0, 1.0, 2.0]]]).astype(dtype)
    out = gather_log_probabilities(logits, i64([[0]]))
    assert out.dtype == paddle.float32
    close(out, [[-2.4076059644]])


def test_gather_log_probabilities_validates_input():
    logits = f32(np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="labels"):
        gather_log_probabilities(logits, i64([[0, 1, 2]]))
    # -1 would silently select the last vocabulary entry in paddle; 3 is out of range.
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        gather_log_probabilities(logits, i64([[0, -1]]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        gather_log_probabilities(logits, i64([[0, 3]]))
    with pytest.raises(TypeError, match="labels"):
        gather_log_probabilities(logits, f32([[0, 1]]))
    with pytest.raises(ValueError, match="logits"):
        gather_log_probabilities(f32(np.zeros((2, 3))), i64([[0, 1]]))


# ------------------------------------------------------------------------------------------------
# masked_mean / masked_loss_mean
# ------------------------------------------------------------------------------------------------

X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
M = [[1, 1, 0], [0, 0, 0]]


def test_masked_mean_global():
    # Valid entries 1 and 2 -> (1 + 2) / 2 = 1.5.
    out = masked_mean(f32(X), i64(M))
    assert out.shape == [] and out.dtype == paddle.float32
    close(out, 1.5)


def test_masked_mean_per_row_and_per_column():
    # axis=-1: row 0 -> (1 + 2) / 2 = 1.5; row 1 has no valid entry -> 0.
    close(masked_mean(f32(X), i64(M), axis=-1), [1.5, 0.0])
    # axis=0: column 0 -> 1/1 = 1, column 1 -> 2/1 = 2, column 2 -> nothing valid -> 0.
    close(masked_mean(f32(X), i64(M), axis=0), [1.0, 2.0, 0.0])


def test_masked_mean_all_masked_is_zero_not_nan():
    close(masked_mean(f32(X), i64(np.zeros((2, 3)))), 0.0)


def test_masked_mean_ignores_nan_and_inf_at_masked_positions_and_accepts_bool_mask():
    x = f32([[1.0, 2.0, np.nan], [np.inf, -np.inf, 6.0]])
    mask = paddle.to_tensor(np.array([[True, True, False], [False, False, True]]))
    # (1 + 2 + 6) / 3 = 3.
    close(masked_mean(x, mask), 3.0)
    close(masked_mean(x, mask, axis=-1), [1.5, 6.0])


def test_masked_mean_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="mask"):
        masked_mean(f32(X), i64([[1, 1]]))


def test_masked_loss_mean_token_vs_sequence():
    x = f32([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    m = i64([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # token: (1 + 2 + 3 + 10) / 4 = 4.
    close(masked_loss_mean(x, m, "token"), 4.0)
    # sequence: row means 2 and 10; the empty row 2 is left out -> (2 + 10) / 2 = 6.
    close(masked_loss_mean(x, m, "sequence"), 6.0)
    close(masked_loss_mean(x, i64(np.zeros((3, 3))), "sequence"), 0.0)
    with pytest.raises(ValueError, match="loss_mean_type"):
        masked_loss_mean(x, m, "tokens")


# ------------------------------------------------------------------------------------------------
# Positions and masks
# ------------------------------------------------------------------------------------------------


def test_make_position_ids():
    mask = i64([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    # cumsum - 1: row 0 [-1, -1, 0, 1, 2] -> clip -> [0, 0, 0, 1, 2]
    #             row 1 [0, 1, 2, 2, 2] (right pads repeat the last position)
    #             row 2 [-1] * 5 -> [0] * 5
    out = make_position_ids(mask)
    assert out.dtype == paddle.int64
    np.testing.assert_array_equal(out.numpy(), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0] * 5])
    # A bool mask gives the same ids.
    np.testing.assert_array_equal(make_position_ids(mask.astype("bool")).numpy(), out.numpy())


def test_make_response_mask_pad_differs_from_eos():
    eos, pad = 2, 0
    ids = i64([[5, 6, eos, pad, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad]])
    # Valid up to and including the first EOS; a row without EOS (length limit) is all valid.
    expected = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    out = make_response_mask(ids, eos)
    assert out.dtype == paddle.bool
    np.testing.assert_array_equal(out.numpy(), np.array(expected, dtype=bool))


def test_make_response_mask_pad_equals_eos():
    # pad == eos == 2 (Llama without a pad token). Upstream masked every 2, so the final EOS lost
    # its reward. Here the first 2 stays valid and the padding 2s after it do not.
    ids = i64([[5, 6, 2, 2, 2], [5, 2, 2, 2, 2], [5, 6, 7, 8, 2]])
    expected = [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    np.testing.assert_array_equal(make_response_mask(ids, 2).numpy(), np.array(expected, bool))


def test_make_response_mask_several_eos_ids():
    # Either 2 or 9 ends a response: row 0 ends at 9 (t=1), row 1 at 2 (t=2).
    ids = i64([[5, 9, 2, 2], [5, 6, 2, 9]])
    expected = [[1, 1, 0, 0], [1, 1, 1, 0]]
    np.testing.assert_array_equal(make_response_mask(ids, [2, 9]).numpy(), np.array(expected, bool))


@pytest.mark.parametrize("bad", [[], "2", 2.0, [2, None], True])
def test_make_response_mask_rejects_bad_eos(bad):
    with pytest.raises(ValueError, match="eos_token_id"):
        make_response_mask(i64([[1, 2]]), bad)


def test_make_sequence_mask():
    # attention_mask[:, 1:] = [[1, 1, 1, 0], [1, 1, 1, 1]]; columns t < start=2 are dropped.
    attention_mask = i64([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    out = make_sequence_mask(attention_mask, start=2)
    expected = [[0, 0, 1, 0], [0, 0, 1, 1]]
    np.testing.assert_array_equal(out.numpy(), np.array(expected, dtype=bool))
    with pytest.raises(ValueError, match="start"):
        make_sequence_mask(attention_mask, start=4)


def test_last_valid_index():
    # Row 0 ends at 1; row 1 is not contiguous, last valid is 3; row 2 is empty -> 0.
    out = last_valid_index(i64([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]))
    np.testing.assert_array_equal(out.numpy(), [1, 3, 0])


# ------------------------------------------------------------------------------------------------
# add_kl_divergence_regularization
# ------------------------------------------------------------------------------------------------

# Row 0: logp - ref = [-1 - -1.5, -0.5 - -0.5, -2 - -1, -1 - -3] = [0.5, 0, -1, 2];
#        beta = 0.1 -> KL reward -0.1 * diff = [-0.05, 0, 0.1, -0.2].
#        mask [0, 1, 1, 0] (prompt column, two response tokens, pad) -> end index 2. Score 3.0.
# Row 1: logp - ref = [-1 - -31, 0, 0, 0] = [30, 0, 0, 0] -> KL reward [-3, 0, 0, 0].
#        mask all zero -> the score -0.5 goes to index 0.
KL_INPUTS = dict(
    reward=[3.0, -0.5],
    log_probs=[[-1.0, -0.5, -2.0, -1.0], [-1.0, -1.0, -1.0, -1.0]],
    ref_log_probs=[[-1.5, -0.5, -1.0, -3.0], [-31.0, -1.0, -1.0, -1.0]],
    sequence_mask=[[0, 1, 1, 0], [0, 0, 0, 0]],
)


def kl_args():
    return {
        name: (i64(v) if name == "sequence_mask" else f32(v)) for name, v in KL_INPUTS.items()
    }


def test_kl_regularization_clips_only_the_score():
    # Score mode, c = 2: clip(3.0) = 2.0 added at t=2 -> 0.1 + 2.0 = 2.1; the KL terms outside
    # the mask (t=0, t=3) stay (GAE masks them later).
    # Row 1: clip(-0.5) = -0.5 added at t=0 -> -3 - 0.5 = -3.5; the KL part is not clipped.
    out = add_kl_divergence_regularization(**kl_args(), kl_coeff=0.1, clip_range_score=2.0)
    assert out.dtype == paddle.float32
    close(out, [[-0.05, 0.0, 2.1, -0.2], [-3.5, 0.0, 0.0, 0.0]])


def test_kl_regularization_total_clip_mode():
    # Total mode (safe-rlhf), c = 2: add the unclipped score, then clip every entry to [-2, 2].
    # Row 0: [-0.05, 0, 0.1 + 3.0 = 3.1, -0.2] -> [-0.05, 0, 2.0, -0.2].
    # Row 1: [-3 - 0.5 = -3.5, 0, 0, 0]      -> [-2.0, 0, 0, 0].
    out = add_kl_divergence_regularization(
        **kl_args(), kl_coeff=0.1, clip_range_score=2.0, clip_mode="total"
    )
    close(out, [[-0.05, 0.0, 2.0, -0.2], [-2.0, 0.0, 0.0, 0.0]])


def test_kl_regularization_accepts_bf16_log_probs():
    # log_probs in bf16 ([-1, -0.5, -2, -1] are exact in bf16), result is float32 and identical.
    args = kl_args()
    args["log_probs"] = args["log_probs"].astype("bfloat16")
    out = add_kl_divergence_regularization(**args, kl_coeff=0.1, clip_range_score=2.0)
    assert out.dtype == paddle.float32
    close(out, [[-0.05, 0.0, 2.1, -0.2], [-3.5, 0.0, 0.0, 0.0]])


def test_kl_regularization_validates_input():
    good = dict(kl_coeff=0.1, clip_range_score=2.0)
    args = kl_args()
    with pytest.raises(ValueError, match="clip_range_score"):
        add_kl_divergence_regularization(**args, kl_coeff=0.1, clip_range_score=0.0)
    with pytest.raises(ValueError, match="kl_coeff"):
        add_kl_divergence_regularization(**args, kl_coeff=-0.1, clip_range_score=2.0)
    with pytest.raises(ValueError, match="clip_mode"):
        add_kl_divergence_regularization(**args, **good, clip_mode="sum")
    with pytest.raises(ValueError, match="reward"):
        add_kl_divergence_regularization(**{**args, "reward": f32([[3.0], [1.0]])}, **good)
    with pytest.raises(ValueError, match="ref_log_probs"):
        add_kl_divergence_regularization(
            **{**args, "ref_log_probs": f32(np.zeros((2, 3)))}, **good
        )


# ------------------------------------------------------------------------------------------------
# get_advantages_and_returns
# ------------------------------------------------------------------------------------------------


def test_gae_hand_worked_1x4():
    # gamma = 0.9, lambda = 0.5 -> gamma * lambda = 0.45; all tokens valid, start = 0.
    # values V = [1, 2, 3, 4], rewards r = [0.5, -1, 2, 10].
    # t=3: delta = 10  + 0.9*0 - 4 = 6.0;   A = 6.0;                    R = 6.0 + 4 = 10.0
    # t=2: delta = 2   + 0.9*4 - 3 = 2.6;   A = 2.6 + 0.45*6.0 = 5.3;     R = 5.3 + 3 = 8.3
    # t=1: delta = -1  + 0.9*3 - 2 = -0.3;  A = -0.3 + 0.45*5.3 = 2.085;  R = 2.085 + 2 = 4.085
    # t=0: delta = 0.5 + 0.9*2 - 1 = 1.3;   A = 1.3 + 0.45*2.085 = 2.23825; R = 3.23825
    advantages, returns = get_advantages_and_returns(
        values=f32([[1.0, 2.0, 3.0, 4.0]]),
        rewards=f32([[0.5, -1.0, 2.0, 10.0]]),
        sequence_mask=i64([[1, 1, 1, 1]]),
        start=0,
        gamma=0.9,
        gae_lambda=0.5,
    )
    close(advantages, [[2.23825, 2.085, 5.3, 6.0]])
    close(returns, [[3.23825, 4.085, 8.3, 10.0]])


def test_gae_with_start_padding_early_end_and_empty_row():
    # Defaults gamma = 1, lambda = 0.95; T = 5, start = 2 -> outputs cover columns 2, 3, 4.
    # Row 0: prompt columns 0-1 masked, response tokens at 2-3, a pad at 4.
    #   V^ = [0, 0, 1, 2, 0] (9s and 7 masked out), r^ = [0, 0, 0.5, 1, 0].
    #   t=4: delta = 0 + 0 - 0 = 0;      A = 0;                  R = 0
    #   t=3: delta = 1 + 0 - 2 = -1;     A = -1 + 0.95*0 = -1;   R = -1 + 2 = 1
    #   t=2: delta = 0.5 + 2 - 1 = 1.5;  A = 1.5 + 0.95*-1 = 0.55; R = 0.55 + 1 = 1.55
    # Row 1: mask all zero -> V^ = r^ = 0 -> A = R = 0.
    # Row 2: all valid, V = [7, 7, 1, 1, 1], r = [7, 7, 0, 0, 1]: a perfect critic.
    #   t=4: delta = 1 + 0 - 1 = 0; t=3: 0 + 1 - 1 = 0; t=2: 0 + 1 - 1 = 0 -> A = 0, R = V = 1.
    values = f32([[9, 9, 1, 2, 7], [1, 2, 3, 4, 5], [7, 7, 1, 1, 1]])
    rewards = f32([[5, 5, 0.5, 1, 3], [1, 1, 1, 1, 1], [7, 7, 0, 0, 1]])
    mask = i64([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    advantages, returns = get_advantages_and_returns(values, rewards, mask, start=2)
    assert advantages.shape == [3, 3] and returns.shape == [3, 3]
    close(advantages, [[0.55, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(returns, [[1.55, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])


def test_gae_outputs_are_detached():
    values = f32([[1.0, 2.0]], stop_gradient=False)
    rewards = f32([[0.0, 1.0]], stop_gradient=False)
    advantages, returns = get_advantages_and_returns(values, rewards, i64([[1, 1]]), start=0)
    assert advantages.stop_gradient and returns.stop_gradient


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(start=2), "start"),
        (dict(start=-1), "start"),
        (dict(start=0, gamma=1.5), "gamma"),
        (dict(start=0, gae_lambda=-0.1), "gae_lambda"),
    ],
)
def test_gae_validates_scalars(kwargs, name):
    with pytest.raises(ValueError, match=name):
        get_advantages_and_returns(f32([[1.0, 2.0]]), f32([[0.0, 1.0]]), i64([[1, 1]]), **kwargs)


def test_gae_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="sequence_mask"):
        get_advantages_and_returns(f32([[1.0, 2.0]]), f32([[0.0, 1.0]]), i64([[1]]), start=0)


# ------------------------------------------------------------------------------------------------
# actor_loss_fn
# ------------------------------------------------------------------------------------------------

# epsilon = 0.2 -> clip range [0.8, 1.2]. logp - old = log(ratio).
#   t=0: A =  1, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped)   -> d/dlogp = 0
#   t=1: A =  1, ratio 0.5: max(-0.5, -0.8) = -0.5 (unclipped) -> d/dlogp = -A*ratio = -0.5
#   t=2: A = -2, ratio 1.5: max( 3.0,  2.4) =  3.0 (unclipped) -> d/dlogp = -A*ratio =  3.0
#   t=3: A = -2, ratio 0.5: max( 1.0,  1.6) =  1.6 (clipped)   -> d/dlogp = 0
#   t=4: masked (A = 100)                                          -> d/dlogp = 0
# token mean over 4 valid tokens: (-1.2 - 0.5 + 3.0 + 1.6) / 4 = 2.9 / 4 = 0.725;
# gradient = per-token derivative / 4 = [0, -0.125, 0.75, 0, 0].
RATIOS = [1.5, 0.5, 1.5, 0.5, 1.0]
ACTOR_ADV = [[1.0, 1.0, -2.0, -2.0, 100.0]]
ACTOR_MASK = [[1, 1, 1, 1, 0]]


def test_actor_loss_value_and_gradient_clipped_and_unclipped():
    old = np.array([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    log_probs = f32(old + np.log(RATIOS), stop_gradient=False)
    loss = actor_loss_fn(log_probs, f32(old), f32(ACTOR_ADV), i64(ACTOR_MASK), clip_range_ratio=0.2)
    assert loss.shape == [] and loss.dtype == paddle.float32
    close(loss, 0.725)
    loss.backward()
    close(log_probs.grad, [[0.0, -0.125, 0.75, 0.0, 0.0]])


def test_actor_loss_on_policy_gradient():
    # First PPO step: log_probs == old_log_probs -> ratio 1 and both surrogate branches tie.
    # loss = mean(-A) = (-2 + 1) / 2 = -0.5; d/dlogp = -A * ratio / N = [-2/2, 1/2] = [-1, 0.5].
    log_probs = f32([[-1.0, -2.0]], stop_gradient=False)
    loss = actor_loss_fn(log_probs, f32([[-1.0, -2.0]]), f32([[2.0, -1.0]]), i64([[1, 1]]), 0.2)
    close(loss, -0.5)
    loss.backward()
    close(log_probs.grad, [[-1.0, 0.5]])


def test_actor_loss_sequence_mean():
    # Per-token losses as above, rearranged: row 0 [-1.2, -0.5], row 1 [3.0] + pad, row 2 empty.
    # token:    (-1.2 - 0.5 + 3.0) / 3 = 1.3 / 3 = 0.4333333
    # sequence: row means -0.85 and 3.0, empty row excluded -> (-0.85 + 3.0) / 2 = 1.075
    old = np.zeros((3, 2))
    ratios = np.array([[1.5, 0.5], [1.5, 1.0], [1.0, 1.0]])
    adv = f32([[1.0, 1.0], [-2.0, 50.0], [9.0, 9.0]])
    mask = i64([[1, 1], [1, 0], [0, 0]])
    log_probs = f32(old + np.log(ratios))
    close(actor_loss_fn(log_probs, f32(old), adv, mask, 0.2, "token"), 1.3 / 3)
    close(actor_loss_fn(log_probs, f32(old), adv, mask, 0.2, "sequence"), 1.075)


def test_actor_loss_validates_input():
    x = f32([[0.0, 0.0]])
    m = i64([[1, 1]])
    with pytest.raises(ValueError, match="loss_mean_type"):
        actor_loss_fn(x, x, x, m, 0.2, loss_mean_type="mean")
    with pytest.raises(ValueError, match="clip_range_ratio"):
        actor_loss_fn(x, x, x, m, 0.0)
    with pytest.raises(ValueError, match="old_log_probs"):
        actor_loss_fn(x, f32([[0.0]]), x, m, 0.2)


# ------------------------------------------------------------------------------------------------
# critic_loss_fn
# ------------------------------------------------------------------------------------------------


def test_critic_loss_value_and_gradient():
    # c = 0.5 -> V_clip = clip(V, old - 0.5, old + 0.5).
    #   t=0: V=2,   old=1, R=3: V_clip=1.5; (2-3)^2=1, (1.5-3)^2=2.25 -> 2.25 (clipped, dV = 0)
    #   t=1: V=2,   old=1, R=0: V_clip=1.5; (2-0)^2=4, (1.5-0)^2=2.25 -> 4    (dV = 2*(2-0) = 4)
    #   t=2: V=1.2, old=1, R=1: V_clip=1.2; both (0.2)^2 = 0.04         (dV = 2*0.2 = 0.4)
    #   t=3: masked (V = 100)                                            (dV = 0)
    # loss = 0.5 * (2.25 + 4 + 0.04) / 3 = 0.5 * 6.29 / 3 = 1.0483333
    # gradient = 0.5 * [0, 4, 0.4, 0] / 3 = [0, 0.6666667, 0.0666667, 0]
    values = f32([[2.0, 2.0, 1.2, 100.0]], stop_gradient=False)
    loss = critic_loss_fn(
        values,
        old_values=f32([[1.0, 1.0, 1.0, 1.0]]),
        returns=f32([[3.0, 0.0, 1.0, 0.0]]),
        mask=i64([[1, 1, 1, 0]]),
        clip_range_value=0.5,
    )
    close(loss, 0.5 * 6.29 / 3)
    loss.backward()
    close(values.grad, [[0.0, 2 / 3, 0.2 / 3, 0.0]])


def test_critic_loss_sequence_mean():
    # Per-token (V - R)^2 with V == old (no clipping): row 0 [1, 9], row 1 [4] + masked.
    # token:    0.5 * (1 + 9 + 4) / 3 = 7/3 = 2.3333333
    # sequence: 0.5 * ((1 + 9)/2 + 4) / 2 = 0.5 * 9 / 2 = 2.25
    values = f32([[1.0, 1.0], [0.0, 0.0]])
    returns = f32([[0.0, 4.0], [2.0, 7.0]])
    mask = i64([[1, 1], [1, 0]])
    close(critic_loss_fn(values, values, returns, mask, 5.0, "token"), 7 / 3)
    close(critic_loss_fn(values, values, returns, mask, 5.0, "sequence"), 2.25)


def test_critic_loss_validates_input():
    x = f32([[0.0, 0.0]])
    with pytest.raises(ValueError, match="clip_range_value"):
        critic_loss_fn(x, x, x, i64([[1, 1]]), -1.0)
    with pytest.raises(ValueError, match="returns"):
        critic_loss_fn(x, x, f32([[0.0, 0.0, 0.0]]), i64([[1, 1]]), 5.0)


# ------------------------------------------------------------------------------------------------
# ptx_loss_fn
# ------------------------------------------------------------------------------------------------


def test_ptx_loss_golden():
    # Position 0: logits log([1, 1, 2]) -> p = [1/4, 1/4, 1/2]; label 2 -> CE = log 2.
    # Position 1: label -100, ignored (its logits are huge to show they do not matter).
    # Position 2: logits [0, 0, 0] -> p = 1/3; label 0 -> CE = log 3.
    # mean over 2 labelled positions = (log 2 + log 3) / 2 = log(6) / 2 = 0.8958797
    logits = f32([[np.log([1.0, 1.0, 2.0]), [1e4, -1e4, 0.0], [0.0, 0.0, 0.0]]])
    labels = i64([[2, -100, 0]])
    loss = ptx_loss_fn(logits, labels)
    assert loss.shape == [] and loss.dtype == paddle.float32
    close(loss, math.log(6) / 2)
    # bf16 logits: log 2 and log 3 are not exact in bf16, so compare with the bf16-rounded input:
    # the loss is still computed in float32 from those rounded logits.
    rounded = logits.astype("bfloat16")
    close(ptx_loss_fn(rounded, labels), ptx_loss_fn(rounded.astype("float32"), labels).numpy())


def test_ptx_loss_all_ignored_is_zero_and_custom_ignore_index():
    logits = f32(np.zeros((1, 2, 3)))
    close(ptx_loss_fn(logits, i64([[-100, -100]])), 0.0)
    # ignore_index=0: only the label 1 at position 1 counts, uniform over 3 -> log 3.
    close(ptx_loss_fn(logits, i64([[0, 1]]), ignore_index=0), math.log(3))


def test_ptx_loss_rejects_unknown_negative_labels():
    # -1 is neither a token id nor the ignore index.
    with pytest.raises(ValueError, match="labels"):
        ptx_loss_fn(f32(np.zeros((1, 2, 3))), i64([[-1, 0]]))


# ------------------------------------------------------------------------------------------------
# kl_divergence_per_sequence
# ------------------------------------------------------------------------------------------------


def test_kl_divergence_per_sequence():
    # Row 0: diffs [-1 - -2, -2 - -2, -3 - -1] = [1, 0, -2]; mask [1, 1, 0] -> 1 + 0 = 1.
    # Row 1: mask all zero -> 0.
    out = kl_divergence_per_sequence(
        f32([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]),
        f32([[-2.0, -2.0, -1.0], [0.0, 0.0, 0.0]]),
        i64([[1, 1, 0], [0, 0, 0]]),
    )
    assert out.shape == [2]
    close(out, [1.0, 0.0])
    with pytest.raises(ValueError, match="mask"):
        kl_divergence_per_sequence(f32([[0.0]]), f32([[0.0]]), i64([[1, 1]]))


def test_make_rollout_attention_mask_repeats_prompt_masks_and_stops_after_eos():
    from alignment.models.ppo_model_utils import make_rollout_attention_mask

    # Two left-padded prompts (widths 2 and 3 of 3), two samples each; EOS = pad = 2.
    prompt_mask = paddle.to_tensor([[0, 1, 1], [1, 1, 1]])
    sequences = paddle.to_tensor(
        [
            [2, 5, 6, 7, 2, 2],  # prompt 0, sample 0: EOS at response position 1
            [2, 5, 6, 8, 9, 4],  # prompt 0, sample 1: never ends
            [4, 5, 6, 2, 2, 2],  # prompt 1, sample 0: EOS first
            [4, 5, 6, 7, 8, 2],  # prompt 1, sample 1: EOS last
        ]
    )
    mask = make_rollout_attention_mask(prompt_mask, sequences, eos_token_id=2).numpy().astype(int).tolist()
    assert mask == [
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    with pytest.raises(ValueError, match="multiple of 2 rows"):
        make_rollout_attention_mask(prompt_mask, sequences[:3], eos_token_id=2)
