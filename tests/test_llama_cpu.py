"""The CPU versions of PaddleNLP's Llama RMSNorm / RoPE / attention give the original results."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

from alignment.models.llama_cpu import disable_fast_cpu_llama, enable_fast_cpu_llama, fast_cpu_llama_enabled


def outputs_and_gradients(num_key_value_heads: int):
    paddle.seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=num_key_value_heads, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config)
    input_ids = paddle.randint(3, 300, [3, 12])
    mask = paddle.ones([3, 12], dtype="bool")
    mask[0, :4] = False  # a left-padded row
    position_ids = paddle.clip(paddle.cumsum(mask.astype("int64"), axis=-1) - 1, min=0)
    logits = model(input_ids, attention_mask=mask, position_ids=position_ids, return_dict=True).logits
    (logits * logits).mean().backward()
    return logits.numpy(), {name: p.grad.numpy() for name, p in model.named_parameters()}


@pytest.mark.parametrize("num_key_value_heads", [4, 2])
def test_fast_cpu_llama_matches_paddlenlp(num_key_value_heads):
    was_enabled = fast_cpu_llama_enabled()
    try:
        disable_fast_cpu_llama()
        logits, grads = outputs_and_gradients(num_key_value_heads)
        assert enable_fast_cpu_llama(force=True)
        fast_logits, fast_grads = outputs_and_gradients(num_key_value_heads)
    finally:
        disable_fast_cpu_llama()
        if was_enabled:
            enable_fast_cpu_llama(force=True)
    np.testing.assert_allclose(fast_logits, logits, atol=1e-5)
    for name, grad in grads.items():
        np.testing.assert_allclose(fast_grads[name], grad, atol=1e-6, err_msg=name)
    assert not np.allclose(logits[0], logits[1])  # the comparison is not vacuous
