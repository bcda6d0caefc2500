"""Pairwise preference data for reward-model training."""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from alignment.data.base import CollatorBase, RawSample, length_mask, right_padding
from alignment.data.chat_template import TemplatedDataset

__all__ = ["PreferenceDataset", "PreferenceCollator"]


class PreferenceDataset(TemplatedDataset):
    """``{better_input_ids, worse_input_ids}``: prompt + answer + EOS for the preferred and the other
    (prompt rendered by the chat template, ``chat_template``).

    A pair whose two sides tokenize identically (same answer, or both cut at ``max_length``)
    teaches nothing and would make the token-wise loss undefined: it is skipped and counted.
    """

    REQUIRED_FIELDS = ("input", "answer", "other_answer", "better")

    def preprocess(self, raw_sample: RawSample) -> dict[str, np.ndarray] | None:
        better, worse = raw_sample["answer"], raw_sample["other_answer"]
        if not raw_sample["better"]:
            better, worse = worse, better
        better_input_ids, _ = self.encode_answer(raw_sample["input"], better)
        worse_input_ids, _ = self.encode_answer(raw_sample["input"], worse)
        if len(better_input_ids) == len(worse_input_ids) and (better_input_ids == worse_input_ids).all():
            self.skip("identical better/worse after tokenization")
            return None
        return {"better_input_ids": better_input_ids, "worse_input_ids": worse_input_ids}

    def get_collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_token_id)


class PreferenceCollator(CollatorBase):
    """Right-pads better and worse rows to ONE common width; masks come from lengths.

    Returns ``better_input_ids``, ``better_attention_mask``, ``worse_input_ids``,
    ``worse_attention_mask``, each ``[batch, width]``.
    """

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, paddle.Tensor]:
        sequences = [np.asarray(s["better_input_ids"]) for s in samples] + [
            np.asarray(s["worse_input_ids"]) for s in samples
        ]
        input_ids = right_padding(sequences, self.pad_token_id)
        attention_mask = length_mask(sequences, left=False)
        size = len(samples)
        return {
            "better_input_ids": paddle.to_tensor(input_ids[:size]),
            "better_attention_mask": paddle.to_tensor(attention_mask[:size]),
            "worse_input_ids": paddle.to_tensor(input_ids[size:]),
            "worse_attention_mask": paddle.to_tensor(attention_mask[size:]),
        }
