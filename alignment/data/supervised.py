"""Supervised fine-tuning data: prompt tokens are masked out of the loss."""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from alignment.data.base import (
    IGNORE_INDEX,
    PROMPT_ASSISTANT,
    PROMPT_BEGIN,
    PROMPT_USER,
    CollatorBase,
    RawSample,
    TokenizedDataset,
    format_prompt,
    length_mask,
    right_padding,
)

__all__ = ["SupervisedDataset", "SupervisedCollator"]


def _common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    width = min(len(a), len(b))
    unequal = np.nonzero(a[:width] != b[:width])[0]
    return int(unequal[0]) if len(unequal) else width


class SupervisedDataset(TokenizedDataset):
    """``{input_ids, labels}`` per example; labels are -100 on the prompt (and user turns).

    ``(input, answer)`` samples train on ``answer + EOS`` after the formatted prompt;
    ``dialogue`` samples train on every assistant turn. An example whose prompt alone fills
    ``max_length`` has nothing to learn and is skipped (counted in ``skipped``).
    """

    REQUIRED_FIELDS = ("input|dialogue",)

    def preprocess(self, raw_sample: RawSample) -> dict[str, np.ndarray] | None:
        if raw_sample.get("dialogue") is not None and raw_sample.get("input") is None:
            return self._preprocess_dialogue(raw_sample["dialogue"])
        if raw_sample.get("answer") is None:
            self.skip("no answer")
            return None
        prompt = format_prompt(raw_sample["input"], eos_token=self.eos_token)
        input_ids, _ = self.tokenize_with_eos(prompt + raw_sample["answer"])
        prompt_ids = self.tokenize(prompt, max_length=self.max_length + 1)
        # Tokenizers may merge across the prompt/answer boundary: mask the shared prefix only.
        boundary = _common_prefix_length(prompt_ids, input_ids)
        if boundary >= len(input_ids):
            self.skip("prompt fills max_length")
            return None
        labels = input_ids.copy()
        labels[:boundary] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}

    def _preprocess_dialogue(self, dialogue: list[str]) -> dict[str, np.ndarray] | None:
        if not isinstance(dialogue, (list, tuple)) or not dialogue or not all(isinstance(t, str) for t in dialogue):
            raise ValueError(f"'dialogue' must be a non-empty list of strings, got {dialogue!r}")
        text = PROMPT_BEGIN
        offsets = [0]
        input_ids = self.tokenize(text, max_length=10**9)
        for index, turn in enumerate(dialogue):
            text += PROMPT_USER.format(input=turn) + PROMPT_ASSISTANT if index % 2 == 0 else turn + self.eos_token
            input_ids = self.tokenize(text, max_length=10**9)
            offsets.append(len(input_ids))
        if len(dialogue) % 2 == 1:  # ends on a user turn: nothing to answer
            offsets.pop()
        input_ids = input_ids[: offsets[-1]]
        labels = input_ids.copy()
        for start, end in zip(offsets[0::2], offsets[1::2]):  # begin + user segments
            labels[start:end] = IGNORE_INDEX
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
