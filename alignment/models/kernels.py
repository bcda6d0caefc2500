"""Kernel dispatch: Paddle's fused ops where this machine can run them, exact portable twins elsewhere.

Paddle's CPU wheel ships kernels that need more than the AVX2 baseline without checking the CPU
(:mod:`alignment.utils.env` explains the SIGILL). Every call of such a kernel in this package goes
through this module, which picks the fused kernel only where it is safe and otherwise runs a
composition of portable ops with the same result (``tests/test_cpu_portability.py`` compares them):

=====================  ==================================  =============================  ====================
op                     fused kernel                        runs where                     portable twin
=====================  ==================================  =============================  ====================
RMSNorm (+ residual)   ``incubate...fused_rms_norm``       GPU; CPU with AVX-512F,        square/mean/rsqrt
                       (CPU: ``RmsNormAvxKernel``)         forward only (no CPU grad
                                                           kernel is registered)
=====================  ==================================  =============================  ====================

``ALIGNMENT_PORTABLE_CPU=1`` forces the portable column on any CPU (CI runs the rollout tests and an
end-to-end PPO run that way). Model flags that only select GPU kernels are checked by
:func:`cpu_model_flag_problems` before any weights load.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import paddle

from alignment.utils.env import avx512_kernels_enabled

__all__ = [
    "RMSNormFn",
    "fused_rms_norm_usable",
    "portable_rms_norm",
    "trainable_rms_norm",
    "fused_rms_norm",
    "select_rms_norm",
    "rms_norm",
    "cpu_model_flag_problems",
    "GPU_ONLY_MODEL_FLAGS",
]

# (hidden, weight, eps, residual) -> (normed, hidden + residual)
RMSNormFn = Callable[[paddle.Tensor, paddle.Tensor, float, Optional[paddle.Tensor]], "tuple[paddle.Tensor, paddle.Tensor]"]


def _on_cpu() -> bool:
    return paddle.device.get_device().split(":")[0] == "cpu"


def fused_rms_norm_usable() -> bool:
    """True where ``fused_rms_norm`` cannot fault: any GPU, or a CPU with AVX-512F and the portable
    path not forced."""
    return not _on_cpu() or avx512_kernels_enabled()


def portable_rms_norm(
    hidden: paddle.Tensor, weight: paddle.Tensor, eps: float, residual: Optional[paddle.Tensor] = None
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """RMSNorm over the last axis from portable ops (any CPU).

    Args:
        hidden: ``[..., H]``.
        weight: ``[H]``.
        eps: added to the mean square.
        residual: optional ``[..., H]`` added to ``hidden`` first (pre-norm residual stream).
    Returns:
        ``(normed, summed)``: ``normed = s / sqrt(mean(s^2) + eps) * weight`` with ``s = hidden +
        residual`` (or ``hidden``), and ``summed = s``, both ``[..., H]`` in ``hidden``'s dtype; the
        statistics are float32 (as the fused kernel computes them).
    """
    summed = hidden if residual is None else hidden + residual
    values = summed if summed.dtype == paddle.float32 else summed.astype("float32")
    normed = values * _inverse_rms(values, eps).expand(values.shape)
    if normed.dtype != hidden.dtype:
        normed = normed.astype(hidden.dtype)
    return normed * weight, summed


def _inverse_rms(values: paddle.Tensor, eps: float) -> paddle.Tensor:
    """``[..., 1]`` ``1 / sqrt(mean(values^2) + eps)`` over the last axis.

    ``square`` rather than ``pow(2)`` (Paddle's CPU pow kernel is ~100x slower), and callers ``expand``
    the result before multiplying (broadcasting elementwise kernels are 3-5x slower on CPU).
    """
    return paddle.rsqrt(paddle.square(values).mean(-1, keepdim=True) + eps)


class _RMSNormFunction(paddle.autograd.PyLayer):
    """float32 RMSNorm ``x * r * w`` (``r = 1 / sqrt(mean(x^2) + eps)``) with a hand-written backward.

    Autograd through square/mean/rsqrt and two broadcasting multiplies takes ~2.7 ms forward +
    backward on ``[8, 96, 256]`` on CPU; this takes ~0.7 ms. With ``x_hat = x * r`` and ``u = g * w``::

        dx = r * (u - x_hat * mean(u * x_hat))        dw = sum over rows of (g * x_hat)
    """

    @staticmethod
    def forward(ctx, hidden, weight, eps):
        inverse = _inverse_rms(hidden, eps)
        normalized = hidden * inverse.expand(hidden.shape)
        ctx.save_for_backward(normalized, inverse, weight)
        ctx.needs_grad = (not hidden.stop_gradient, not weight.stop_gradient)  # (Paddle wants None for the others)
        return normalized * weight

    @staticmethod
    def backward(ctx, grad):
        normalized, inverse, weight = ctx.saved_tensor()
        grad_hidden = grad_weight = None
        if ctx.needs_grad[0]:
            scaled = grad * weight
            dot = (scaled * normalized).mean(-1, keepdim=True)
            grad_hidden = (scaled - normalized * dot.expand(normalized.shape)) * inverse.expand(normalized.shape)
        if ctx.needs_grad[1]:
            grad_weight = (grad * normalized).reshape([-1, normalized.shape[-1]]).sum(0)
        return grad_hidden, grad_weight


def trainable_rms_norm(hidden: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """RMSNorm of float32 ``hidden [..., H]`` by ``weight [H]`` for training: the portable math with a
    hand-written backward (:class:`_RMSNormFunction`); portable ops only, so the same on every CPU."""
    return _RMSNormFunction.apply(hidden, weight, eps)


def fused_rms_norm(
    hidden: paddle.Tensor, weight: paddle.Tensor, eps: float, residual: Optional[paddle.Tensor] = None
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """The same contract as :func:`portable_rms_norm` through Paddle's fused kernel (one op; on CPU
    AVX-512 only: call it through :func:`select_rms_norm` / :func:`rms_norm`)."""
    from paddle.incubate.nn.functional import fused_rms_norm as fused

    axis = hidden.ndim - 1
    if residual is None:
        return fused(hidden, weight, None, eps, axis)[0], hidden
    normed, summed = fused(hidden, weight, None, eps, axis, residual=residual)
    return normed, summed


def select_rms_norm() -> RMSNormFn:
    """The RMSNorm this process may run now: :func:`fused_rms_norm` where usable, else the portable
    twin. Hot loops resolve it once (e.g. per rollout) instead of per call."""
    return fused_rms_norm if fused_rms_norm_usable() else portable_rms_norm


def rms_norm(
    hidden: paddle.Tensor, weight: paddle.Tensor, eps: float, residual: Optional[paddle.Tensor] = None
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """RMSNorm (+ residual) with the fastest kernel this machine can run (see :func:`portable_rms_norm`)."""
    return select_rms_norm()(hidden, weight, eps, residual)


# Model-config flags that only select GPU kernels (Paddle registers no CPU kernel for them: the run
# would stop deep in the first forward with "kernel ... is not registered").
GPU_ONLY_MODEL_FLAGS = {
    "use_flash_attention": "flash attention has no CPU kernel in Paddle",
    "use_fused_rope": "fused rotary embedding (fused_rotary_position_embedding) has no CPU kernel in Paddle",
}
# ``use_fused_rms_norm`` is not listed: on CPU it runs the fused kernel only with AVX-512F and the
# portable twin otherwise (alignment/models/llama_cpu.py), with the same result.


def cpu_model_flag_problems(config: Any, on_cpu: Optional[bool] = None) -> list[tuple[str, str]]:
    """``[(flag, reason)]`` for every GPU-only kernel flag ``config`` turns on while running on CPU.

    ``config``: a model config object or its ``config.json`` dict. ``on_cpu`` defaults to the current
    Paddle device. Empty on GPU.
    """
    if on_cpu is None:
        on_cpu = _on_cpu()
    if not on_cpu:
        return []
    get = config.get if isinstance(config, Mapping) else (lambda name, default=None: getattr(config, name, default))
    return [
        (flag, f"{reason}; set {flag}=false to run on CPU (the math is the same)")
        for flag, reason in GPU_ONLY_MODEL_FLAGS.items()
        if get(flag, False)
    ]
