"""DPO-family losses (alignment.models.dpo_model_utils): golden values, the registry, properties."""

from __future__ import annotations

import math

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.models.dpo_model_utils import (
    get_preference_loss,
    preference_loss_names,
    preference_loss_uses_reference,
    register_preference_loss,
    sequence_log_probs,
)


def t(*values):
    return paddle.to_tensor(list(values), dtype="float32")


def call(name, pc, pr, rc=None, rr=None, lc=None, lr=None, beta=0.1, label_smoothing=0.0, simpo_gamma=0.5):
    ones = t(*([1.0] * len(pc)))
    losses, chosen, rejected = get_preference_loss(name)(
        policy_chosen_logps=t(*pc),
        policy_rejected_logps=t(*pr),
        reference_chosen_logps=None if rc is None else t(*rc),
        reference_rejected_logps=None if rr is None else t(*rr),
        chosen_lengths=ones if lc is None else t(*lc),
        rejected_lengths=ones if lr is None else t(*lr),
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
    )
    return losses.numpy(), chosen.numpy(), rejected.numpy()


SOFTPLUS_M1 = math.log(1 + math.exp(-1))  # -log sigma(1) = 0.31326...


# ============================================================================ golden values


def test_sigmoid_golden_with_and_without_label_smoothing():
    # pair 0: pc=-2, pr=-4, rc=-3, rr=-3 -> h = (-2+4) - 0 = 2, beta h = 1 -> -log sigma(1)
    # pair 1: h = (-5+4) - (-3+3) = -1,     beta h = -1/2 -> -log sigma(-1/2) = log(1 + e^{1/2})
    losses, chosen, rejected = call("sigmoid", [-2, -5], [-4, -4], [-3, -3], [-3, -3], beta=0.5)
    np.testing.assert_allclose(losses, [SOFTPLUS_M1, math.log(1 + math.exp(0.5))], rtol=1e-6)
    np.testing.assert_allclose(chosen, [0.5, -1.0], rtol=1e-6)  # beta (pc - rc)
    np.testing.assert_allclose(rejected, [-0.5, -0.5], rtol=1e-6)  # beta (pr - rr)
    # conservative DPO, ls = 0.1: 0.9 (-log sigma(1)) + 0.1 (-log sigma(-1)); -log sigma(-1) = 1 - log sigma(1)
    losses, _, _ = call("sigmoid", [-2], [-4], [-3], [-3], beta=0.5, label_smoothing=0.1)
    np.testing.assert_allclose(losses, [SOFTPLUS_M1 + 0.1], rtol=1e-6)


def test_hinge_golden():
    # beta = 0.5; h = 2, 0, -2 -> relu(1 - beta h) = 0, 1, 2
    losses, chosen, rejected = call("hinge", [0, 0, 0], [-2, 0, 2], [0, 0, 0], [0, 0, 0], beta=0.5)
    np.testing.assert_allclose(losses, [0.0, 1.0, 2.0], atol=1e-7)
    np.testing.assert_allclose(chosen, [0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(rejected, [-1.0, 0.0, 1.0], rtol=1e-6)


def test_ipo_golden():
    # beta = 0.5 -> target margin 1/(2 beta) = 1; h = 2, 0, 3 -> (h - 1)^2 = 1, 1, 4
    losses, chosen, rejected = call("ipo", [1, 0, 0], [-1, 0, -3], [0, 0, 0], [0, 0, 0], beta=0.5)
    np.testing.assert_allclose(losses, [1.0, 1.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(chosen, [0.5, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(rejected, [-0.5, 0.0, -1.5], rtol=1e-6)


def test_simpo_golden():
    # beta = 2, gamma = 1: pc=-4 over 4 tokens -> -1; pr=-9 over 3 tokens -> -3
    # rewards 2*(-1) = -2, 2*(-3) = -6; loss = -log sigma(-2 + 6 - 1) = log(1 + e^-3)
    losses, chosen, rejected = call("simpo", [-4], [-9], lc=[4], lr=[3], beta=2.0, simpo_gamma=1.0)
    np.testing.assert_allclose(losses, [math.log(1 + math.exp(-3))], rtol=1e-6)
    np.testing.assert_allclose(chosen, [-2.0], rtol=1e-6)
    np.testing.assert_allclose(rejected, [-6.0], rtol=1e-6)
    # gamma matters: gamma = 4 -> -log sigma(0) = log 2
    losses, _, _ = call("simpo", [-4], [-9], lc=[4], lr=[3], beta=2.0, simpo_gamma=4.0)
    np.testing.assert_allclose(losses, [math.log(2)], rtol=1e-6)


def test_orpo_golden():
    # chosen: 2 tokens, sum log p = 2 log(1/2): mean log p = log 1/2, odds 1, log odds 0
    # rejected: 3 tokens, sum = 3 log(1/5): mean log 1/5, odds (1/5)/(4/5) = 1/4, log odds -log 4
    # odds-ratio term: -log sigma(log 4) = -log(4/5) = log(5/4); SFT term: -log(1/2) = log 2
    # loss = log 2 + beta log(5/4); rewards beta log(1/2), beta log(1/5)
    beta = 0.1
    losses, chosen, rejected = call("orpo", [2 * math.log(0.5)], [3 * math.log(0.2)], lc=[2], lr=[3], beta=beta)
    np.testing.assert_allclose(losses, [math.log(2) + beta * math.log(1.25)], rtol=1e-5)
    np.testing.assert_allclose(chosen, [beta * math.log(0.5)], rtol=1e-6)
    np.testing.assert_allclose(rejected, [beta * math.log(0.2)], rtol=1e-6)
    # the SFT term is per chosen token: 4 tokens with the same total -> mean log p = log(1/2)/2
    a = math.log(0.5) / 2
    log_odds_a = a - math.log(1 - math.exp(a))
    expected = -a + beta * math.log(1 + math.exp(-(log_odds_a + math.log(4))))
    losses, _, _ = call("orpo", [2 * math.log(0.5)], [3 * math.log(0.2)], lc=[4], lr=[3], beta=beta)
    np.testing.assert_allclose(losses, [expected], rtol=1e-5)


def test_orpo_is_finite_for_very_unlikely_and_almost_certain_answers():
    losses, _, _ = call("orpo", [-1e-9, -300.0], [-200.0, -1e-9], lc=[1, 3], lr=[2, 1], beta=0.1)
    assert np.isfinite(losses).all()


def test_reference_free_mode_takes_reference_log_probs_as_zero():
    for name in ("sigmoid", "hinge", "ipo"):
        free = call(name, [-2, -7], [-4, -3], beta=0.3)
        zero = call(name, [-2, -7], [-4, -3], [0, 0], [0, 0], beta=0.3)
        for a, b in zip(free, zero):
            np.testing.assert_allclose(a, b, rtol=1e-7)
    losses, chosen, _ = call("sigmoid", [-2], [-4], beta=0.5)  # h = 2
    np.testing.assert_allclose(losses, [SOFTPLUS_M1], rtol=1e-6)
    np.testing.assert_allclose(chosen, [-1.0], rtol=1e-6)  # beta * pc


def test_sequence_log_probs_sums_masked_tokens():
    log_probs = paddle.to_tensor([[-1.0, -2.0, -4.0], [-0.5, -0.25, -8.0]])
    mask = paddle.to_tensor([[False, True, True], [True, False, False]])
    sums, counts = sequence_log_probs(log_probs, mask)
    np.testing.assert_allclose(sums.numpy(), [-6.0, -0.5])
    np.testing.assert_allclose(counts.numpy(), [2.0, 1.0])
    with pytest.raises(ValueError, match="must both be"):
        sequence_log_probs(log_probs, mask[:, :2])


# ============================================================================ registry and argument checks


def test_registry_names_and_unknown_name():
    assert {"sigmoid", "hinge", "ipo", "simpo", "orpo"} <= set(preference_loss_names())
    with pytest.raises(ValueError, match=r"unknown preference loss 'dpo'.*'hinge'.*'sigmoid'"):
        get_preference_loss("dpo")
    assert preference_loss_uses_reference("sigmoid") and not preference_loss_uses_reference("simpo")
    assert not preference_loss_uses_reference("orpo")


def test_register_a_custom_loss_and_refuse_a_duplicate_name():
    @register_preference_loss("test-margin-only", uses_reference=False)
    def margin(*, policy_chosen_logps, policy_rejected_logps, **_):
        return policy_rejected_logps - policy_chosen_logps, policy_chosen_logps, policy_rejected_logps

    assert get_preference_loss("test-margin-only") is margin
    losses, _, _ = call("test-margin-only", [-1.0], [-3.0])
    np.testing.assert_allclose(losses, [-2.0])
    with pytest.raises(ValueError, match="already registered"):
        register_preference_loss("sigmoid")(margin)


def test_bad_loss_arguments_are_clear():
    with pytest.raises(ValueError, match="beta must be > 0"):
        call("sigmoid", [-1], [-2], [-1], [-2], beta=0.0)
    with pytest.raises(ValueError, match="hinge loss has no label smoothing"):
        call("hinge", [-1], [-2], [-1], [-2], label_smoothing=0.1)
    with pytest.raises(ValueError, match="give both reference"):
        call("sigmoid", [-1], [-2], [-1], None)
    with pytest.raises(ValueError, match="simpo is reference-free"):
        call("simpo", [-1], [-2], [-1], [-2])
    with pytest.raises(ValueError, match="chosen_lengths must be >= 1"):
        call("simpo", [-1], [-2], lc=[0], lr=[1])
    with pytest.raises(ValueError, match=r"must both be \[B\]"):
        call("ipo", [-1, -2], [-2], [-1, -1], [-2, -2])
    with pytest.raises(TypeError):  # keyword-only
        get_preference_loss("sigmoid")(t(-1), t(-2), t(-1), t(-2), t(1), t(1), 0.1, 0.0, 0.5)


# ============================================================================ properties

finite = st.floats(min_value=-50, max_value=0, allow_nan=False, width=32)
betas = st.floats(min_value=0.01, max_value=2.0)


@settings(max_examples=40, deadline=None)
@given(pc=finite, pr=finite, rc=finite, rr=finite, shift=st.floats(-20, 20), beta=betas, ls=st.floats(0, 0.45))
def test_reference_losses_depend_on_the_margin_only(pc, pr, rc, rr, shift, beta, ls):
    """sigmoid/hinge/ipo see the policy and reference only through h = (pc - pr) - (rc - rr); the
    reward margin is beta * h."""
    for name, smoothing in (("sigmoid", ls), ("hinge", 0.0), ("ipo", 0.0)):
        base = call(name, [pc], [pr], [rc], [rr], beta=beta, label_smoothing=smoothing)
        moved = call(name, [pc + shift], [pr + shift], [rc + shift], [rr + shift], beta=beta, label_smoothing=smoothing)
        np.testing.assert_allclose(moved[0], base[0], rtol=1e-3, atol=1e-3)
        h = (pc - pr) - (rc - rr)
        np.testing.assert_allclose(base[1] - base[2], [beta * h], rtol=1e-3, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(pc=finite, pr=finite, rc=finite, rr=finite, beta=betas, ls=st.floats(0, 0.45))
def test_sigmoid_gradient_matches_the_closed_form(pc, pr, rc, rr, beta, ls):
    """d loss / d pc = -beta [(1 - ls) sigma(-beta h) - ls sigma(beta h)] and d loss / d pr is its negative;
    the reference gets no gradient."""
    policy_chosen = paddle.to_tensor([pc], dtype="float32", stop_gradient=False)
    policy_rejected = paddle.to_tensor([pr], dtype="float32", stop_gradient=False)
    reference = paddle.to_tensor([rc], dtype="float32", stop_gradient=False)
    losses, _, _ = get_preference_loss("sigmoid")(
        policy_chosen_logps=policy_chosen, policy_rejected_logps=policy_rejected,
        reference_chosen_logps=reference, reference_rejected_logps=t(rr),
        chosen_lengths=t(1.0), rejected_lengths=t(1.0), beta=beta, label_smoothing=ls, simpo_gamma=0.0,
    )  # fmt: skip
    losses.sum().backward()
    h = (pc - pr) - (rc - rr)
    sigma = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -beta * ((1 - ls) * sigma(-beta * h) - ls * sigma(beta * h))
    np.testing.assert_allclose(policy_chosen.grad.numpy(), [expected], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(policy_rejected.grad.numpy(), [-expected], rtol=1e-3, atol=1e-6)
    assert reference.grad is None or float(reference.grad.abs().sum()) == 0.0


@settings(max_examples=30, deadline=None)
@given(h=st.floats(-10, 10), beta=betas)
def test_ipo_is_minimal_at_the_target_margin(h, beta):
    target = 1 / (2 * beta)
    at_target = call("ipo", [target], [0.0], [0.0], [0.0], beta=beta)[0]
    elsewhere = call("ipo", [h], [0.0], [0.0], [0.0], beta=beta)[0]
    assert at_target[0] <= 1e-6 and elsewhere[0] >= at_target[0]
