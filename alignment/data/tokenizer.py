"""Loading tokenizers the same way in every stage, and moving token ids between tokenizers."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import paddle

__all__ = ["load_tokenizer", "is_same_tokenizer", "batch_retokenize"]

logger = logging.getLogger(__name__)


def load_tokenizer(name_or_path: str, padding_side: str = "right", model_max_length: int | None = None) -> Any:
    """``AutoTokenizer.from_pretrained`` plus the fixes every stage needs.

    A tokenizer without a pad token (LLaMA) gets ``pad = eos``. That is safe here because every
    attention mask in this toolkit is built from lengths or from the first EOS, never from
    ``ids != pad`` (upstream's mistake, which hid the final EOS).

    A Hugging Face checkpoint or tokenizer directory is converted first (``alignment.models.hf_convert``).
    The jinja chat template of ``tokenizer_config.json`` (or of a ``chat_template.jinja`` next to it) is
    kept as ``tokenizer.init_kwargs["chat_template"]``, so it is saved with the tokenizer and read by
    ``chat_template: tokenizer`` whatever PaddleNLP itself does with it.
    """
    from paddlenlp.transformers import AutoTokenizer

    from alignment.models.hf_convert import read_chat_template, resolve_tokenizer_dir

    name_or_path = resolve_tokenizer_dir(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side=padding_side)
    source = read_chat_template(name_or_path)
    if source is not None and not isinstance(tokenizer.init_kwargs.get("chat_template"), (str, list)):
        tokenizer.init_kwargs["chat_template"] = source
    if model_max_length is not None:
        tokenizer.model_max_length = int(model_max_length)
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no eos_token; it cannot mark the end of an answer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer %s has no pad token: using eos %r as pad", name_or_path, tokenizer.eos_token)
    return tokenizer


def is_same_tokenizer(tokenizer: Any, other: Any) -> bool:
    """True if both map text to the same ids (same class and same vocabulary)."""
    return tokenizer is other or (type(tokenizer) is type(other) and tokenizer.get_vocab() == other.get_vocab())


def batch_retokenize(
    input_ids: paddle.Tensor,
    attention_mask: paddle.Tensor,
    src_tokenizer: Any,
    dest_tokenizer: Any,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Re-encode ``[batch, len]`` ids of ``src_tokenizer`` for ``dest_tokenizer``.

    Each row's real tokens (``attention_mask``) are decoded without special tokens, ``dest``'s EOS
    is appended, and the texts are re-encoded right-padded. The returned mask comes from the
    re-encoded lengths (not ``ids != pad``), so it stays right when dest's pad equals its EOS.
    """
    ids = input_ids.numpy()
    mask = attention_mask.numpy().astype(bool)
    texts = [
        src_tokenizer.decode(row[row_mask].tolist(), skip_special_tokens=True) + dest_tokenizer.eos_token
        for row, row_mask in zip(ids, mask)
    ]
    encoded = [dest_tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    width = max(len(row) for row in encoded)
    out_ids = np.full((len(encoded), width), dest_tokenizer.pad_token_id, dtype=np.int64)
    out_mask = np.zeros((len(encoded), width), dtype=bool)
    for index, row in enumerate(encoded):
        out_ids[index, : len(row)] = row
        out_mask[index, : len(row)] = True
    return paddle.to_tensor(out_ids), paddle.to_tensor(out_mask)
