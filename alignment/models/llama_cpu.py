"""Faster CPU versions of three PaddleNLP Llama building blocks (patches for paddlenlp 2.8.1 and 3.0).

Profiling a 4-layer Llama (hidden 256) forward on [8, 96] tokens on a 2-core AMD EPYC with Paddle
3.3.1's CPU wheel showed that the matmuls took a third of the time; the rest was three element-wise
pieces that hit slow CPU kernels:

=============================  ============================================  ========  ========
piece                          slow kernel                                   before    after
=============================  ============================================  ========  ========
``LlamaRMSNorm``               ``x.pow(2)`` (generic pow; ``x * x`` is 100x    3.1 ms    0.03 ms
                               faster)
``apply_rotary_pos_emb``       broadcasting ``[b, s, 1, d]`` over the heads   8.9 ms    3.2 ms
                               axis (explicit ``expand`` first is faster);
                               ``rotate_half``'s slices (their gradients:    5.5 ms    0.9 ms
                               2 ms each; a matmul with a signed              (fwd+bwd)
                               permutation is exact and fast)
``scaled_dot_product_attention`` (non-flash path) transposes copied with   11.2 ms    6.3 ms
                               strides before the matmuls; ``einsum`` avoids
=============================  ============================================  ========  ========

(per call, the two RMSNorms and the attention of one layer; a whole forward went from 138 ms to
about 80 ms and a training step accordingly). :func:`enable_fast_cpu_llama` swaps them in, in
``paddlenlp.transformers.llama.modeling`` only; the math is unchanged (identical outputs up to
float rounding, checked in ``tests/test_llama_cpu.py`` for values and gradients). Configurations
these versions do not cover (flash attention, fused RoPE, alibi, sequence parallel, pipeline
positions) fall through to the original functions. ``use_fused_rms_norm`` runs Paddle's fused CPU
kernel where it can (AVX-512F) and the portable version elsewhere (:mod:`alignment.models.kernels`).
Nothing is patched on GPU.
"""

from __future__ import annotations

import math
from typing import Any

import paddle
import paddle.nn.functional as F

from alignment.models import kernels

__all__ = ["enable_fast_cpu_llama", "disable_fast_cpu_llama", "fast_cpu_llama_enabled"]

_ORIGINALS: dict[str, Any] = {}


def _modeling():
    import paddlenlp.transformers.llama.modeling as modeling

    return modeling


def _rms_norm_forward(self, hidden_states: paddle.Tensor) -> paddle.Tensor:
    # ``use_fused_rms_norm`` on CPU: Paddle's fused kernel where the CPU can execute it (AVX-512F) and no
    # gradient is needed (it has no CPU backward kernel); elsewhere, or with ALIGNMENT_PORTABLE_CPU=1, the
    # portable version below, same math. (PaddleNLP's own fused path imports the GPU-only ``fused_ln``
    # package and cannot run on CPU at all.)
    needs_grad = paddle.is_grad_enabled() and not (hidden_states.stop_gradient and self.weight.stop_gradient)
    if self.config.use_fused_rms_norm and not needs_grad and kernels.fused_rms_norm_usable():
        return kernels.fused_rms_norm(hidden_states, self.weight, self.variance_epsilon)[0]
    if hidden_states.dtype == paddle.float32 and self.weight.dtype == paddle.float32:
        if needs_grad:  # hand-written backward: ~4x faster than autograd through the elementwise chain
            return kernels.trainable_rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return kernels.portable_rms_norm(hidden_states, self.weight, self.variance_epsilon)[0]
    with paddle.amp.auto_cast(False):
        hidden_states = hidden_states.astype("float32")
        variance = paddle.square(hidden_states).mean(-1, keepdim=True)
        hidden_states = paddle.rsqrt(variance + self.variance_epsilon) * hidden_states
    if self.weight.dtype in (paddle.float16, paddle.bfloat16):
        hidden_states = paddle.cast(hidden_states, self.weight.dtype)
    return hidden_states * self.weight


_ROTATION_MATRICES: dict[tuple[int, str], paddle.Tensor] = {}


def _rotate_half(x: paddle.Tensor) -> paddle.Tensor:
    """``concat([-x2, x1])`` as a matmul with a signed permutation: exact, and its gradient is a
    matmul too (the slice gradients of the original take 2 ms each on CPU)."""
    dim = x.shape[-1]
    key = (dim, str(x.dtype))
    if key not in _ROTATION_MATRICES:
        half = dim // 2
        matrix = paddle.zeros([dim, dim], dtype="float32")
        matrix[half:, :half] = -paddle.eye(half)
        matrix[:half, half:] = paddle.eye(half)
        _ROTATION_MATRICES[key] = matrix.astype(x.dtype)
    return paddle.matmul(x, _ROTATION_MATRICES[key])


def _apply_rotary_pos_emb(q, k, cos, sin, position_ids):
    """``q, k``: ``[b, s, heads, d]``; ``cos, sin``: ``[1, max_len, 1, d]``; ``position_ids``: ``[b, s]``."""
    if position_ids is None:
        return _ORIGINALS["apply_rotary_pos_emb"](q, k, cos, sin, position_ids)
    cos = cos.squeeze(axis=[0, 2])[position_ids].unsqueeze(2)  # [b, s, 1, d]
    sin = sin.squeeze(axis=[0, 2])[position_ids].unsqueeze(2)
    cos_q, sin_q = cos.expand(q.shape), sin.expand(q.shape)
    if k.shape == q.shape:
        cos_k, sin_k = cos_q, sin_q
    else:  # grouped-query attention: fewer key heads
        cos_k, sin_k = cos.expand(k.shape), sin.expand(k.shape)
    return q * cos_q + _rotate_half(q) * sin_q, k * cos_k + _rotate_half(k) * sin_k


def _scaled_dot_product_attention(
    query_states,
    config,
    key_states,
    value_states,
    attention_mask,
    output_attentions,
    alibi=None,
    sequence_parallel=False,
    reshard_layer=None,
    npu_is_casual=False,
    attn_mask_startend_row_indices=None,
    **kwargs,
):
    """The eager (non-flash) attention of paddlenlp with ``einsum`` instead of transposed matmuls.

    ``query/key/value_states``: ``[b, s, heads, d]`` (keys already repeated for GQA);
    ``attention_mask``: additive, ``[b, 1, s, kv]``. Returns ``[b, s, heads * d]``.
    Every keyword of either paddlenlp version is accepted (3.0 adds ``attn_mask_startend_row_indices``
    and ``skip_recompute``); cases this version does not cover go to the original function.
    """
    if (
        config.use_flash_attention or alibi is not None or reshard_layer is not None or output_attentions
        or attention_mask is None or attn_mask_startend_row_indices is not None
    ):  # fmt: skip
        if attn_mask_startend_row_indices is not None:  # paddlenlp 2.8.1 does not know the keyword
            kwargs["attn_mask_startend_row_indices"] = attn_mask_startend_row_indices
        return _ORIGINALS["scaled_dot_product_attention"](
            query_states, config, key_states, value_states, attention_mask, output_attentions,
            alibi=alibi, sequence_parallel=sequence_parallel, reshard_layer=reshard_layer, npu_is_casual=npu_is_casual,
            **kwargs,
        )  # fmt: skip
    bsz, q_len, num_heads, head_dim = query_states.shape
    kv_len = value_states.shape[1]
    scores = paddle.einsum("bqhd,bkhd->bhqk", query_states / math.sqrt(head_dim), key_states)
    # (expanded first: Paddle's CPU add broadcasting over the heads axis is ~2x slower than equal shapes)
    scores = scores + attention_mask.reshape([bsz, 1, q_len, kv_len]).expand(scores.shape)
    with paddle.amp.auto_cast(False):
        probs = F.softmax(scores, axis=-1, dtype="float32").astype(query_states.dtype)
    output = paddle.einsum("bhqk,bkhd->bqhd", probs, value_states)
    if sequence_parallel:
        return output.reshape([bsz * q_len, head_dim * num_heads])
    return output.reshape([bsz, q_len, head_dim * num_heads])


def fast_cpu_llama_enabled() -> bool:
    return bool(_ORIGINALS)


def enable_fast_cpu_llama(force: bool = False) -> bool:
    """Install the faster versions when running on CPU (or ``force``); True if they are active."""
    if _ORIGINALS:
        return True
    if not force and paddle.device.get_device().split(":")[0] != "cpu":
        return False
    modeling = _modeling()
    _ORIGINALS["rms_norm_forward"] = modeling.LlamaRMSNorm.forward
    _ORIGINALS["apply_rotary_pos_emb"] = modeling.apply_rotary_pos_emb
    _ORIGINALS["scaled_dot_product_attention"] = modeling.scaled_dot_product_attention
    modeling.LlamaRMSNorm.forward = _rms_norm_forward
    modeling.apply_rotary_pos_emb = _apply_rotary_pos_emb
    modeling.scaled_dot_product_attention = _scaled_dot_product_attention
    return True


def disable_fast_cpu_llama() -> None:
    """Restore PaddleNLP's own functions."""
    if not _ORIGINALS:
        return
    modeling = _modeling()
    modeling.LlamaRMSNorm.forward = _ORIGINALS.pop("rms_norm_forward")
    modeling.apply_rotary_pos_emb = _ORIGINALS.pop("apply_rotary_pos_emb")
    modeling.scaled_dot_product_attention = _ORIGINALS.pop("scaled_dot_product_attention")
