"""Supervised fine-tuning data: prompt tokens are masked out of the loss."""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from alignment.data.base import (
    IGNORE_INDEX,
    CollatorBase,
    RawSample,
    length_mask,
    right_padding,
)
from alignment.data.chat_template import TemplatedDataset, conversation_labels

__all__ = ["SupervisedDataset", "SupervisedCollator"]


class SupervisedDataset(TemplatedDataset):
    """``{input_ids, labels}`` per example; labels are -100 on the prompt (and user turns).

    ``(input, answer)`` samples train on ``answer + EOS`` after the prompt of the chat template
    (``chat_template``, default ``beaver``); ``dialogue`` samples train on every assistant turn. An example whose prompt alone fills
    ``max_length`` has nothing to learn and is skipped (counted in ``skipped``).
    """

    REQUIRED_FIELDS = ("input|dialogue",)

    def preprocess(self, raw_sample: RawSample) -> dict[str, np.ndarray] | None:
        if raw_sample.get("dialogue") is not None and raw_sample.get("input") is None:
            return self._preprocess_dialogue(raw_sample["dialogue"])
        if raw_sample.get("answer") is None:
            self.skip("no answer")
            return None
        input_ids, boundary = self.encode_answer(raw_sample["input"], raw_sample["answer"])
        if boundary >= len(input_ids):
            self.skip("prompt fills max_length")
            return None
        labels = input_ids.copy()
        labels[:boundary] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}

    def _preprocess_dialogue(self, dialogue: list[str]) -> dict[str, np.ndarray] | None:
        if not isinstance(dialogue, (list, tuple)) or not dialogue or not all(isinstance(t, str) for t in dialogue):
            raise ValueError(f"'dialogue' must be a non-empty list of strings, got {dialogue!r}")
        input_ids, spans = conversation_labels(self.chat_template, self.tokenizer, dialogue)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        for start, end in spans:  # assistant turns (through their EOS) are learned, the rest is masked
            labels[start:end] = input_ids[start:end]
        if len(input_ids) > self.max_length:
            self.truncated += 1
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if (labels == IGNORE_INDEX).all():
            self.skip("no assistant tokens within max_length")
            return None
        return {"input_ids": input_ids, "labels": labels}

    def get_collator(self, shift: bool = False) -> SupervisedCollator:
        return SupervisedCollator(self.tokenizer.pad_token_id, shift=shift)


class SupervisedCollator(CollatorBase):
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100); ``attention_mask`` from lengths.

    ``shift=True`` drops the last id column and the first label column, so ``labels[t]`` is the
    target of position t (what a loss on unshifted logits expects, e.g. the PPO ptx loss).
    """

    def __init__(self, pad_token_id: int, shift: bool = False) -> None:
        super().__init__(pad_token_id)
        self.shift = shift

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, paddle.Tensor]:
        ids = [np.asarray(sample["input_ids"]) for sample in samples]
        input_ids = right_padding(ids, self.pad_token_id)
        labels = right_padding([np.asarray(sample["labels"]) for sample in samples], IGNORE_INDEX)
        attention_mask = length_mask(ids, left=False)
        if self.shift:
            input_ids, attention_mask, labels = input_ids[:, :-1], attention_mask[:, :-1], labels[:, 1:]
        return {
            "input_ids": paddle.to_tensor(input_ids),
            "labels": paddle.to_tensor(labels),
            "attention_mask": paddle.to_tensor(attention_mask),
        }
