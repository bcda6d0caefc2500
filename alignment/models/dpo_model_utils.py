"""Offline preference-optimisation math: the DPO family of losses as a registry of pure functions.

Every loss is registered under a name with :func:`register_preference_loss` and looked up with
:func:`get_preference_loss` (the ``loss_type`` argument of ``alignment/dpo/run_dpo.py``). A loss is
called with keyword arguments only::

    losses, chosen_rewards, rejected_rewards = loss_fn(
        policy_chosen_logps=pc,         # [B] float, log pi(chosen | prompt), summed over response tokens
        policy_rejected_logps=pr,       # [B]
        reference_chosen_logps=rc,      # [B] or None (reference-free: taken as 0)
        reference_rejected_logps=rr,    # [B] or None
        chosen_lengths=lc,              # [B] number of response tokens of the chosen answer (>= 1)
        rejected_lengths=lr,            # [B]
        beta=0.1, label_smoothing=0.0, simpo_gamma=0.5,
    )  # -> ([B] per-pair losses, [B] implicit reward of chosen, [B] implicit reward of rejected)

and returns per-pair values: the trainer averages them over the batch. Notation below:
``h = (pc - pr) - (rc - rr)`` (the log-ratio margin), ``ls`` = ``label_smoothing``, ``σ`` the
logistic function, ``|c|`` / ``|r|`` the response lengths. All computation is in float32.

Losses that use a reference model are registered with ``uses_reference=True``; the trainer only
loads a reference model for them (and not with ``reference_free``).
"""

from __future__ import annotations

from typing import Callable, Optional

import paddle
import paddle.nn.functional as F

__all__ = [
    "PreferenceLoss",
    "register_preference_loss",
    "get_preference_loss",
    "preference_loss_names",
    "preference_loss_uses_reference",
    "preference_loss_uses_label_smoothing",
    "sequence_log_probs",
    "sigmoid_loss",
    "hinge_loss",
    "ipo_loss",
    "simpo_loss",
    "orpo_loss",
]

PreferenceLoss = Callable[..., tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]]

_LOSSES: dict[str, PreferenceLoss] = {}
_USES_REFERENCE: dict[str, bool] = {}
_USES_LABEL_SMOOTHING: dict[str, bool] = {}


def register_preference_loss(
    name: str, *, uses_reference: bool = True, uses_label_smoothing: bool = False
) -> Callable[[PreferenceLoss], PreferenceLoss]:
    """Decorator: register a preference loss under ``name`` (a name can be registered once).

    ``uses_reference``: whether the loss compares with a reference model (False for SimPO and ORPO);
    ``uses_label_smoothing``: whether a non-zero ``label_smoothing`` means something to it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a preference loss needs a non-empty string name, got {name!r}")

    def decorator(fn: PreferenceLoss) -> PreferenceLoss:
        known = _LOSSES.get(name)
        # Re-importing a module (a custom module named twice, a script run twice) re-creates its
        # functions: that is the same loss, not a clash.
        if known is not None and (known.__module__, known.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"preference loss {name!r} is already registered ({known.__module__}.{known.__qualname__})")
        _LOSSES[name] = fn
        _USES_REFERENCE[name] = uses_reference
        _USES_LABEL_SMOOTHING[name] = uses_label_smoothing
        return fn

    return decorator


def preference_loss_names() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(_LOSSES)


def get_preference_loss(name: str) -> PreferenceLoss:
    """The loss registered as ``name``; an unknown name is a ``ValueError`` listing the registered ones."""
    try:
        return _LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown preference loss {name!r}; registered: {preference_loss_names()}") from None


def preference_loss_uses_reference(name: str) -> bool:
    """Whether the loss ``name`` needs reference-model log-probs (unless run reference-free)."""
    get_preference_loss(name)
    return _USES_REFERENCE[name]


def preference_loss_uses_label_smoothing(name: str) -> bool:
    """Whether ``label_smoothing`` changes the loss ``name``."""
    get_preference_loss(name)
    return _USES_LABEL_SMOOTHING[name]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def sequence_log_probs(token_log_probs: paddle.Tensor, response_mask: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Sum of response-token log-probs per row, and the number of response tokens.

    Args:
        token_log_probs: ``[N, T]`` float, log-prob of each (shifted) target token.
        response_mask: ``[N, T]`` bool/int, true on response tokens (not prompt, not padding).

    Returns:
        ``([N] float32 sums, [N] float32 counts)``.
    """
    if list(token_log_probs.shape) != list(response_mask.shape) or token_log_probs.ndim != 2:
        raise ValueError(
            f"token_log_probs {list(token_log_probs.shape)} and response_mask {list(response_mask.shape)} "
            "must both be [N, T]"
        )
    mask = response_mask.astype("float32")
    return (token_log_probs.astype("float32") * mask).sum(axis=-1), mask.sum(axis=-1)


def _float(x: paddle.Tensor) -> paddle.Tensor:
    return x.astype("float32") if x.dtype != paddle.float32 else x


def _check_inputs(
    policy_chosen_logps: paddle.Tensor,
    policy_rejected_logps: paddle.Tensor,
    reference_chosen_logps: Optional[paddle.Tensor],
    reference_rejected_logps: Optional[paddle.Tensor],
    beta: float,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Shape/argument checks shared by the losses; returns the reference log-probs (zeros when None)."""
    if policy_chosen_logps.ndim != 1 or list(policy_rejected_logps.shape) != list(policy_chosen_logps.shape):
        raise ValueError(
            f"policy_chosen_logps {list(policy_chosen_logps.shape)} and policy_rejected_logps "
            f"{list(policy_rejected_logps.shape)} must both be [B]"
        )
    if (reference_chosen_logps is None) != (reference_rejected_logps is None):
        raise ValueError("give both reference_chosen_logps and reference_rejected_logps, or neither (reference-free)")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if reference_chosen_logps is None:
        zeros = paddle.zeros_like(_float(policy_chosen_logps))
        return zeros, zeros
    for name, value in (("reference_chosen_logps", reference_chosen_logps), ("reference_rejected_logps", reference_rejected_logps)):
        if list(value.shape) != list(policy_chosen_logps.shape):
            raise ValueError(f"{name} has shape {list(value.shape)}, expected {list(policy_chosen_logps.shape)}")
    return _float(reference_chosen_logps).detach(), _float(reference_rejected_logps).detach()


def _no_label_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing != 0:
        raise ValueError(f"the {name} loss has no label smoothing; got label_smoothing={label_smoothing} (use 0)")


def _smoothed_logsigmoid_loss(logits: paddle.Tensor, label_smoothing: float) -> paddle.Tensor:
    """``-(1 - ls) * log σ(x) - ls * log σ(-x)``, elementwise."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    return -(1.0 - label_smoothing) * F.log_sigmoid(logits) - label_smoothing * F.log_sigmoid(-logits)


def _lengths(name: str, lengths: paddle.Tensor, like: paddle.Tensor) -> paddle.Tensor:
    if lengths is None or list(lengths.shape) != list(like.shape):
        raise ValueError(f"{name} must be [B] like the log-probs, got {None if lengths is None else list(lengths.shape)}")
    lengths = lengths.astype("float32")
    if lengths.numel() > 0 and float(lengths.min()) < 1:
        raise ValueError(f"{name} must be >= 1 (every answer has at least one response token)")
    return lengths


# --------------------------------------------------------------------------------------------------
# Reference-based losses: DPO (+ conservative DPO), hinge (SLiC), IPO
# --------------------------------------------------------------------------------------------------


@register_preference_loss("sigmoid", uses_label_smoothing=True)
def sigmoid_loss(
    *,
    policy_chosen_logps: paddle.Tensor,
    policy_rejected_logps: paddle.Tensor,
    reference_chosen_logps: Optional[paddle.Tensor],
    reference_rejected_logps: Optional[paddle.Tensor],
    chosen_lengths: paddle.Tensor,
    rejected_lengths: paddle.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """DPO: ``-(1 - ls) log σ(β h) - ls log σ(-β h)``; rewards ``β (pc - rc)``, ``β (pr - rr)``.

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model" (arXiv:2305.18290). ``label_smoothing`` > 0 is conservative DPO (Mitchell 2023, "A note on
    DPO with noisy preferences"): the labels are assumed flipped with probability ``ls``.
    Shapes: every tensor ``[B]``; returns three ``[B]`` float32 tensors.
    """
    rc, rr = _check_inputs(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)
    pc, pr = _float(policy_chosen_logps), _float(policy_rejected_logps)
    h = (pc - pr) - (rc - rr)
    losses = _smoothed_logsigmoid_loss(beta * h, label_smoothing)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


@register_preference_loss("hinge")
def hinge_loss(
    *,
    policy_chosen_logps: paddle.Tensor,
    policy_rejected_logps: paddle.Tensor,
    reference_chosen_logps: Optional[paddle.Tensor],
    reference_rejected_logps: Optional[paddle.Tensor],
    chosen_lengths: paddle.Tensor,
    rejected_lengths: paddle.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Hinge: ``relu(1 - β h)``; rewards ``β (pc - rc)``, ``β (pr - rr)``.

    The hinge calibration loss of SLiC (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration
    with Human Feedback", arXiv:2305.10425) on DPO's log-ratio margin, as in RSO (Liu et al. 2023,
    "Statistical Rejection Sampling Improves Preference Optimization", arXiv:2309.06657), with
    margin ``1 / β``. Shapes: every tensor ``[B]``.
    """
    _no_label_smoothing("hinge", label_smoothing)
    rc, rr = _check_inputs(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)
    pc, pr = _float(policy_chosen_logps), _float(policy_rejected_logps)
    h = (pc - pr) - (rc - rr)
    return F.relu(1.0 - beta * h), beta * (pc - rc).detach(), beta * (pr - rr).detach()


@register_preference_loss("ipo")
def ipo_loss(
    *,
    policy_chosen_logps: paddle.Tensor,
    policy_rejected_logps: paddle.Tensor,
    reference_chosen_logps: Optional[paddle.Tensor],
    reference_rejected_logps: Optional[paddle.Tensor],
    chosen_lengths: paddle.Tensor,
    rejected_lengths: paddle.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """IPO: ``(h - 1 / (2 β))^2``; rewards ``β (pc - rc)``, ``β (pr - rr)``.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
    (arXiv:2310.12036), eq. 17 with ``τ = β``: the log-ratio margin is regressed to ``1 / (2τ)``
    instead of pushed to infinity. ``h`` uses log-probs summed over the response, as every loss
    here. Shapes: every tensor ``[B]``.
    """
    _no_label_smoothing("ipo", label_smoothing)
    rc, rr = _check_inputs(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)
    pc, pr = _float(policy_chosen_logps), _float(policy_rejected_logps)
    h = (pc - pr) - (rc - rr)
    return (h - 1.0 / (2.0 * beta)) ** 2, beta * (pc - rc).detach(), beta * (pr - rr).detach()


# --------------------------------------------------------------------------------------------------
# Reference-free losses: SimPO, ORPO
# --------------------------------------------------------------------------------------------------


@register_preference_loss("simpo", uses_reference=False, uses_label_smoothing=True)
def simpo_loss(
    *,
    policy_chosen_logps: paddle.Tensor,
    policy_rejected_logps: paddle.Tensor,
    reference_chosen_logps: Optional[paddle.Tensor] = None,
    reference_rejected_logps: Optional[paddle.Tensor] = None,
    chosen_lengths: paddle.Tensor,
    rejected_lengths: paddle.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """SimPO: ``-log σ(β (pc/|c| - pr/|r|) - γ)``; rewards ``β pc/|c|``, ``β pr/|r|``.

    Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (arXiv:2405.14734), eq. 6: the implicit reward is the length-normalised log-likelihood and
    ``γ`` (``simpo_gamma``) a target reward margin. Reference log-probs are not used (they must be
    None). With ``label_smoothing`` ls the loss is smoothed as conservative DPO's:
    ``-(1 - ls) log σ(x) - ls log σ(-x)`` (ls = 0 is the paper's loss). Shapes: every tensor ``[B]``.
    """
    if reference_chosen_logps is not None or reference_rejected_logps is not None:
        raise ValueError("simpo is reference-free: pass reference_chosen_logps=None and reference_rejected_logps=None")
    _check_inputs(policy_chosen_logps, policy_rejected_logps, None, None, beta)
    pc, pr = _float(policy_chosen_logps), _float(policy_rejected_logps)
    chosen_rewards = beta * pc / _lengths("chosen_lengths", chosen_lengths, pc)
    rejected_rewards = beta * pr / _lengths("rejected_lengths", rejected_lengths, pr)
    losses = _smoothed_logsigmoid_loss(chosen_rewards - rejected_rewards - simpo_gamma, label_smoothing)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _log1m_exp(x: paddle.Tensor) -> paddle.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable near 0 and for very negative x."""
    return paddle.where(x > -0.6931471805599453, paddle.log(-paddle.expm1(x)), paddle.log1p(-paddle.exp(x)))


@register_preference_loss("orpo", uses_reference=False)
def orpo_loss(
    *,
    policy_chosen_logps: paddle.Tensor,
    policy_rejected_logps: paddle.Tensor,
    reference_chosen_logps: Optional[paddle.Tensor] = None,
    reference_rejected_logps: Optional[paddle.Tensor] = None,
    chosen_lengths: paddle.Tensor,
    rejected_lengths: paddle.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """ORPO: ``-pc/|c| - β log σ(log odds(c) - log odds(r))``; rewards ``β pc/|c|``, ``β pr/|r|``.

    Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (arXiv:2403.07691), eqs. 6-7 with ``λ = β``. With ``a = pc/|c|`` and ``b = pr/|r|`` the
    length-normalised log-likelihoods, ``log odds(y) = a - log(1 - exp(a))``; the first term is the
    SFT loss on the chosen answer (mean negative log-likelihood per response token of that pair).
    Reference log-probs are not used (they must be None). Shapes: every tensor ``[B]``.
    """
    _no_label_smoothing("orpo", label_smoothing)
    if reference_chosen_logps is not None or reference_rejected_logps is not None:
        raise ValueError("orpo is reference-free: pass reference_chosen_logps=None and reference_rejected_logps=None")
    _check_inputs(policy_chosen_logps, policy_rejected_logps, None, None, beta)
    pc, pr = _float(policy_chosen_logps), _float(policy_rejected_logps)
    a = pc / _lengths("chosen_lengths", chosen_lengths, pc)
    b = pr / _lengths("rejected_lengths", rejected_lengths, pr)
    # log sums of log-probs are <= 0; an average of exactly 0 (probability 1) has infinite odds: clip.
    a, b = paddle.clip(a, max=-1e-7), paddle.clip(b, max=-1e-7)
    log_odds = (a - _log1m_exp(a)) - (b - _log1m_exp(b))
    losses = -a - beta * F.log_sigmoid(log_odds)
    return losses, (beta * a).detach(), (beta * b).detach()
