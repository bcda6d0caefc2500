"""Safety preference data (safer vs. unsafer answer plus per-answer safety labels), as safe-rlhf."""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from alignment.data.base import CollatorBase, RawSample, length_mask, right_padding
from alignment.data.chat_template import TemplatedDataset

__all__ = ["SafetyPreferenceDataset", "SafetyPreferenceCollator"]


class SafetyPreferenceDataset(TemplatedDataset):
    """``{safer_input_ids, safer_safety_sign, unsafer_input_ids, unsafer_safety_sign}``.

    The safety sign is +1 for an answer labelled safe and -1 for unsafe (a cost model's target
    sign is its negation). A pair whose safer answer is labelled unsafe while the other is labelled
    safe contradicts itself and is skipped and counted, as are pairs identical after tokenization.
    """

    REQUIRED_FIELDS = ("input", "answer", "other_answer", "safer", "is_safe", "is_other_safe")

    def preprocess(self, raw_sample: RawSample) -> dict[str, np.ndarray] | None:
        safer, unsafer = raw_sample["answer"], raw_sample["other_answer"]
        safer_is_safe, unsafer_is_safe = raw_sample["is_safe"], raw_sample["is_other_safe"]
        if not raw_sample["safer"]:
            safer, unsafer = unsafer, safer
            safer_is_safe, unsafer_is_safe = unsafer_is_safe, safer_is_safe
        safer_sign = 1 if safer_is_safe else -1
        unsafer_sign = 1 if unsafer_is_safe else -1
        if safer_sign < unsafer_sign:
            self.skip("safer answer labelled unsafe while the other is labelled safe")
            return None
        safer_input_ids, _ = self.encode_answer(raw_sample["input"], safer)
        unsafer_input_ids, _ = self.encode_answer(raw_sample["input"], unsafer)
        if len(safer_input_ids) == len(unsafer_input_ids) and (safer_input_ids == unsafer_input_ids).all():
            self.skip("identical safer/unsafer after tokenization")
            return None
        return {
            "safer_input_ids": safer_input_ids,
            "safer_safety_sign": np.asarray(safer_sign, dtype=np.int64),
            "unsafer_input_ids": unsafer_input_ids,
            "unsafer_safety_sign": np.asarray(unsafer_sign, dtype=np.int64),
        }

    def get_collator(self) -> SafetyPreferenceCollator:
        return SafetyPreferenceCollator(self.tokenizer.pad_token_id)


class SafetyPreferenceCollator(CollatorBase):
    """Right-pads safer and unsafer rows to one width; signs are ``[batch]`` int64 (+1/-1)."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, paddle.Tensor]:
        sequences = [np.asarray(s["safer_input_ids"]) for s in samples] + [
            np.asarray(s["unsafer_input_ids"]) for s in samples
        ]
        input_ids = right_padding(sequences, self.pad_token_id)
        attention_mask = length_mask(sequences, left=False)
        size = len(samples)
        return {
            "safer_input_ids": paddle.to_tensor(input_ids[:size]),
            "safer_attention_mask": paddle.to_tensor(attention_mask[:size]),
            "safer_safety_sign": paddle.to_tensor(np.asarray([s["safer_safety_sign"] for s in samples], np.int64)),
            "unsafer_input_ids": paddle.to_tensor(input_ids[size:]),
            "unsafer_attention_mask": paddle.to_tensor(attention_mask[size:]),
            "unsafer_safety_sign": paddle.to_tensor(np.asarray([s["unsafer_safety_sign"] for s in samples], np.int64)),
        }
