"""Property tests (hypothesis) for alignment.models.ppo_model_utils on random shapes and masks."""

import numpy as np
import paddle
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.models.ppo_model_utils import (
    actor_loss_fn,
    add_kl_divergence_regularization,
    critic_loss_fn,
    gather_log_probabilities,
    get_advantages_and_returns,
    kl_divergence_per_sequence,
    make_position_ids,
    make_response_mask,
    masked_loss_mean,
    masked_mean,
)

SETTINGS = settings(max_examples=40, deadline=None)
TOL = dict(rtol=1e-5, atol=1e-5)


def f32(array, stop_gradient=True):
    tensor = paddle.to_tensor(np.asarray(array, dtype="float32"))
    tensor.stop_gradient = stop_gradient
    return tensor


def i64(array):
    return paddle.to_tensor(np.asarray(array, dtype="int64"))


@st.composite
def batches(draw, max_batch=4, max_len=8):
    """(rng, B, T, mask): a left-padded prompt region and a response that may end early.

    Each row has ``pad`` left pads, ``length`` valid tokens, then right pads
    (``pad + length <= T``);
    rows may be empty. The mask is contiguous per row.
    """
    batch = draw(st.integers(1, max_batch))
    width = draw(st.integers(2, max_len))
    mask = np.zeros((batch, width), dtype="int64")
    for row in range(batch):
        pad = draw(st.integers(0, width))
        length = draw(st.integers(0, width - pad))
        mask[row, pad : pad + length] = 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng, batch, width, mask


@st.composite
def random_masks(draw, max_batch=4, max_len=8):
    """(rng, mask) with an arbitrary (non-contiguous) 0/1 mask."""
    batch = draw(st.integers(1, max_batch))
    width = draw(st.integers(1, max_len))
    bits = draw(st.lists(st.booleans(), min_size=batch * width, max_size=batch * width))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng, np.array(bits, dtype="int64").reshape(batch, width)


def reverse_cumsum(x):
    return np.flip(np.cumsum(np.flip(x, axis=-1), axis=-1), axis=-1)


# ------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(batches(), st.data())
def test_gae_lambda_gamma_one_returns_are_reverse_cumsums(batch, data):
    # With gamma = lambda = 1 the value terms telescope: R_t = sum_{k >= t} r^_k and A = R - V^.
    rng, _, width, mask = batch
    start = data.draw(st.integers(0, width - 1))
    values = rng.normal(size=mask.shape)
    rewards = rng.normal(size=mask.shape)
    advantages, returns = get_advantages_and_returns(
        f32(values), f32(rewards), i64(mask), start, gamma=1.0, gae_lambda=1.0
    )
    masked_rewards = (rewards * mask)[:, start:]
    np.testing.assert_allclose(returns.numpy(), reverse_cumsum(masked_rewards), **TOL)
    np.testing.assert_allclose(
        advantages.numpy(), returns.numpy() - (values * mask)[:, start:], **TOL
    )


@SETTINGS
@given(batches(), st.floats(0.0, 1.0))
def test_gae_lambda_zero_is_one_step_td(batch, gamma):
    # lambda = 0: A_t = delta_t = r^_t + gamma V^_{t+1} - V^_t, with V^_T = 0.
    rng, _, _, mask = batch
    values = rng.normal(size=mask.shape) * mask
    rewards = rng.normal(size=mask.shape) * mask
    advantages, _ = get_advantages_and_returns(
        f32(values), f32(rewards), i64(mask), 0, gamma=gamma, gae_lambda=0.0
    )
    next_values = np.concatenate([values[:, 1:], np.zeros_like(values[:, :1])], axis=1)
    np.testing.assert_allclose(advantages.numpy(), rewards + gamma * next_values - values, **TOL)


@SETTINGS
@given(batches(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_is_zero_after_the_last_valid_token_and_ignores_masked_inputs(batch, gamma, lam):
    rng, _, _, mask = batch
    values = rng.normal(size=mask.shape)
    rewards = rng.normal(size=mask.shape)
    advantages, returns = get_advantages_and_returns(
        f32(values), f32(rewards), i64(mask), 0, gamma=gamma, gae_lambda=lam
    )
    # Garbage at masked positions does not change anything.
    noise = np.where(mask == 1, 0.0, rng.normal(size=mask.shape) * 1e3)
    advantages2, returns2 = get_advantages_and_returns(
        f32(values + noise), f32(rewards - noise), i64(mask), 0, gamma=gamma, gae_lambda=lam
    )
    np.testing.assert_allclose(advantages2.numpy(), advantages.numpy(), **TOL)
    np.testing.assert_allclose(returns2.numpy(), returns.numpy(), **TOL)
    after_end = np.cumsum(mask[:, ::-1], axis=-1)[:, ::-1] == 0  # no valid token at or after t
    assert np.all(advantages.numpy()[after_end] == 0)
    assert np.all(returns.numpy()[after_end] == 0)


# ------------------------------------------------------------------------------------------------
# masked means
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(random_masks(), st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
def test_masked_mean_only_sees_valid_positions(batch, garbage):
    rng, mask = batch
    x = rng.normal(size=mask.shape)
    dirty = np.where(mask == 1, x, garbage)
    overall = masked_mean(f32(dirty), i64(mask)).numpy()
    per_row = masked_mean(f32(dirty), i64(mask), axis=-1).numpy()
    expected_overall = x[mask == 1].mean() if mask.any() else 0.0
    expected_rows = [row[m == 1].mean() if m.any() else 0.0 for row, m in zip(x, mask)]
    np.testing.assert_allclose(overall, expected_overall, **TOL)
    np.testing.assert_allclose(per_row, expected_rows, **TOL)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 6), st.data())
def test_sequence_and_token_means_agree_when_rows_have_equal_counts(batch, width, data):
    count = data.draw(st.integers(1, width))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    mask = np.zeros((batch, width), dtype="int64")
    for row in range(batch):
        mask[row, rng.choice(width, size=count, replace=False)] = 1
    x = f32(rng.normal(size=(batch, width)))
    np.testing.assert_allclose(
        masked_loss_mean(x, i64(mask), "sequence").numpy(),
        masked_loss_mean(x, i64(mask), "token").numpy(),
        **TOL,
    )


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(batches(), st.floats(0.01, 0.5), st.sampled_from(["token", "sequence"]))
def test_actor_loss_properties(batch, epsilon, mean_type):
    rng, _, _, mask = batch
    old = -np.abs(rng.normal(size=mask.shape)) * 3
    advantages = rng.normal(size=mask.shape) * 5
    log_probs = f32(old + rng.normal(size=mask.shape), stop_gradient=False)

    loss = actor_loss_fn(log_probs, f32(old), f32(advantages), i64(mask), epsilon, mean_type)
    assert np.isfinite(loss.numpy())
    loss.backward()
    assert np.all(log_probs.grad.numpy()[mask == 0] == 0)

    # On-policy (ratio 1) the loss is minus the mean advantage.
    on_policy = actor_loss_fn(f32(old), f32(old), f32(advantages), i64(mask), epsilon, mean_type)
    expected = -masked_loss_mean(f32(advantages), i64(mask), mean_type).numpy()
    np.testing.assert_allclose(on_policy.numpy(), expected, **TOL)

    # Zero advantages give zero loss whatever the ratio.
    zero = actor_loss_fn(log_probs, f32(old), f32(np.zeros_like(old)), i64(mask), epsilon)
    assert zero.numpy() == 0


@SETTINGS
@given(batches(), st.floats(0.1, 10.0), st.sampled_from(["token", "sequence"]))
def test_critic_loss_properties(batch, clip, mean_type):
    rng, _, _, mask = batch
    values = rng.normal(size=mask.shape) * 3
    old_values = values + rng.normal(size=mask.shape)
    returns = rng.normal(size=mask.shape) * 3

    loss = critic_loss_fn(f32(values), f32(old_values), f32(returns), i64(mask), clip, mean_type)
    assert np.isfinite(loss.numpy()) and loss.numpy() >= 0
    # Clipping can only increase the per-token error, so the loss is >= the unclipped MSE loss.
    unclipped = 0.5 * masked_loss_mean(f32((values - returns) ** 2), i64(mask), mean_type)
    assert loss.numpy() >= unclipped.numpy() - 1e-5
    # A critic that already predicts the returns (and has not moved) has zero loss.
    exact = critic_loss_fn(f32(returns), f32(returns), f32(returns), i64(mask), clip, mean_type)
    assert exact.numpy() == 0


# ------------------------------------------------------------------------------------------------
# KL-shaped rewards
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(batches(), st.floats(0.0, 1.0), st.floats(0.5, 20.0))
def test_kl_reward_sums_to_clipped_score_minus_kl(batch, kl_coeff, clip):
    rng, _, _, mask = batch
    score = rng.normal(size=mask.shape[0]) * 10
    log_probs = -np.abs(rng.normal(size=mask.shape))
    ref_log_probs = -np.abs(rng.normal(size=mask.shape))
    kl = log_probs - ref_log_probs
    rewards = add_kl_divergence_regularization(
        f32(score), f32(log_probs), f32(ref_log_probs), i64(mask), kl_coeff, clip
    ).numpy()
    has_tokens = mask.any(axis=-1)
    # Rows with tokens: the masked sum is clip(score) - beta * sum(kl * m).
    expected_sums = np.clip(score, -clip, clip) - kl_coeff * (kl * mask).sum(-1)
    np.testing.assert_allclose(
        (rewards * mask).sum(-1)[has_tokens], expected_sums[has_tokens], **TOL
    )
    # The unmasked row sum always adds exactly one clipped score (empty rows at index 0).
    np.testing.assert_allclose(
        rewards.sum(-1), np.clip(score, -clip, clip) - kl_coeff * kl.sum(-1), **TOL
    )


@SETTINGS
@given(batches(), st.floats(0.0, 5.0), st.floats(0.5, 20.0))
def test_kl_reward_total_mode_is_bounded(batch, kl_coeff, clip):
    rng, _, _, mask = batch
    rewards = add_kl_divergence_regularization(
        f32(rng.normal(size=mask.shape[0]) * 50),
        f32(rng.normal(size=mask.shape) * 5),
        f32(rng.normal(size=mask.shape) * 5),
        i64(mask),
        kl_coeff,
        clip,
        clip_mode="total",
    ).numpy()
    assert np.all(np.abs(rewards) <= clip + 1e-6)


@SETTINGS
@given(batches())
def test_kl_divergence_per_sequence_is_masked_row_sum(batch):
    rng, _, _, mask = batch
    log_probs, ref = rng.normal(size=mask.shape), rng.normal(size=mask.shape)
    out = kl_divergence_per_sequence(f32(log_probs), f32(ref), i64(mask)).numpy()
    np.testing.assert_allclose(out, ((log_probs - ref) * mask).sum(-1), **TOL)


# ------------------------------------------------------------------------------------------------
# Log-probabilities, positions, response masks
# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 12), st.integers(0, 2**32 - 1))
def test_gather_log_probabilities_is_a_distribution(batch, length, vocab, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, length, vocab)) * 10
    # Gather every vocabulary entry at every position: one [B, L * V] call with repeated logits.
    all_labels = np.broadcast_to(np.arange(vocab), (batch, length, vocab))
    repeated = np.repeat(logits, vocab, axis=1)  # row b, position (t * V + v) holds logits[b, t]
    out = gather_log_probabilities(f32(repeated), i64(all_labels.reshape(batch, -1))).numpy()
    out = out.reshape(batch, length, vocab)
    assert np.all(out <= 0)
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-5)
    # Shift invariance: adding a constant per position does not change log-probs.
    shift = rng.normal(size=(batch, length * vocab, 1)) * 100
    shifted = gather_log_probabilities(f32(repeated + shift), i64(all_labels.reshape(batch, -1)))
    np.testing.assert_allclose(shifted.numpy().reshape(out.shape), out, atol=1e-4)


@SETTINGS
@given(batches())
def test_position_ids_count_real_tokens(batch):
    _, _, _, mask = batch
    positions = make_position_ids(i64(mask)).numpy()
    for row_positions, row_mask in zip(positions, mask):
        valid = row_mask == 1
        np.testing.assert_array_equal(row_positions[valid], np.arange(valid.sum()))
        assert np.all(row_positions >= 0)
        # Left pads (before the first real token) get position 0.
        first = np.argmax(valid) if valid.any() else len(row_mask)
        assert np.all(row_positions[:first] == 0)


@SETTINGS
@given(
    st.integers(1, 4),
    st.integers(1, 8),
    st.lists(st.integers(0, 3), min_size=1, max_size=2),
    st.integers(0, 2**32 - 1),
)
def test_response_mask_is_prefix_through_first_eos(batch, width, eos_ids, seed):
    # Vocabulary {0..5}, so EOS tokens (from 0..3) are frequent; pad may coincide with EOS.
    ids = np.random.default_rng(seed).integers(0, 6, size=(batch, width))
    mask = make_response_mask(i64(ids), eos_ids).numpy()
    for row_ids, row_mask in zip(ids, mask):
        hits = np.flatnonzero(np.isin(row_ids, eos_ids))
        length = hits[0] + 1 if hits.size else width
        np.testing.assert_array_equal(row_mask, np.arange(width) < length)
