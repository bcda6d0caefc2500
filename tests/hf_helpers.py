"""Building Hugging Face checkpoints with transformers for the tests (test-only: torch, transformers)."""

from __future__ import annotations

import json
import os

import numpy as np

#: A chat template in transformers' style (system turn, bos_token, an end-of-turn EOS and a trailing newline).
ZEPHYR_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

#: ChatML-like: turns end with a marker that is not the EOS token (the EOS is appended to answers).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '[' + message['role'] + ']' + message['content'] + '[end]' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}"
)

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def save_hf_tokenizer(directory: str, sentencepiece_dir: str, chat_template: str | None = None) -> None:
    """transformers' own tokenizer files (tokenizer.model, tokenizer_config.json with
    ``added_tokens_decoder`` dicts, special_tokens_map.json) for the tiny SentencePiece model.

    The slow (SentencePiece) tokenizer is the reference: transformers' conversion of this tiny BPE model
    to a ``tokenizer.json`` merges differently from SentencePiece itself (real Llama models agree)."""
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer(
        vocab_file=os.path.join(sentencepiece_dir, "sentencepiece.bpe.model"), legacy=True, add_bos_token=True
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)


def build_hf_llama(
    directory: str,
    sentencepiece_dir: str,
    seed: int = 0,
    chat_template: str | None = None,
    rope_parameters=None,
    max_shard_size: str = "5GB",
    **overrides,
):
    """A random transformers ``LlamaForCausalLM`` (GQA) saved in the hub layout; returns the torch model.

    ``rope_parameters`` rewrites config.json in transformers-5 form (no top-level rope_theta/rope_scaling);
    a small ``max_shard_size`` writes sharded safetensors with an index.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    defaults = dict(vocab_size=1000, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)
    config = LlamaConfig(**{**defaults, **SHAPE, **overrides})
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    save_hf_tokenizer(directory, sentencepiece_dir, chat_template)
    if rope_parameters is not None:
        path = os.path.join(directory, "config.json")
        with open(path) as file:
            saved = json.load(file)
        saved.pop("rope_theta", None)
        saved.pop("rope_scaling", None)
        saved["rope_parameters"] = rope_parameters
        with open(path, "w") as file:
            json.dump(saved, file)
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def paddle_logits(model, ids: np.ndarray) -> np.ndarray:
    import paddle

    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(ids), return_dict=True).logits.numpy()


def directory_state(directory: str) -> dict[str, tuple[int, int]]:
    """``{name: (size, mtime_ns)}`` of every file below ``directory`` (to prove nothing was written)."""
    state = {}
    for root, _, files in os.walk(directory):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            state[os.path.relpath(os.path.join(root, name), directory)] = (stat.st_size, stat.st_mtime_ns)
    return state
