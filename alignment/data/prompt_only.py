"""Prompt-only data for PPO rollouts: deduplicated prompts, left-padded batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from alignment.data.base import CollatorBase, RawSample, left_padding, length_mask
from alignment.data.chat_template import TemplatedDataset

__all__ = ["PromptOnlyDataset", "PromptOnlyCollator"]


class PromptOnlyDataset(TemplatedDataset):
    """``{input_ids}`` of the chat template's generation prompt (no answer), exactly the prompt tokens
    the other datasets mask.

    Prompts are deduplicated by text after mixing (the last occurrence is kept, order preserved,
    as safe-rlhf). A prompt longer than ``max_length`` tokens is skipped and counted rather than
    cut, since a cut prompt loses its ``ASSISTANT:`` cue.
    """

    REQUIRED_FIELDS = ("input",)

    def _merge_raw_datasets(self) -> list[tuple[int, int]]:
        merged = super()._merge_raw_datasets()
        last_position: dict[Any, int] = {}
        for position, (dataset_position, raw_index) in enumerate(merged):
            name, raw = self.raw_datasets[dataset_position]
            sample = raw[raw_index]
            self.check_sample(sample, name, raw_index, raw)
            prompt = sample["input"]
            key = tuple(prompt) if isinstance(prompt, list) else prompt
            last_position[key] = position
        kept = sorted(last_position.values())
        duplicates = len(merged) - len(kept)
        if duplicates:
            self.skipped["duplicate prompt"] = duplicates
        return [merged[position] for position in kept]

    def preprocess(self, raw_sample: RawSample) -> dict[str, np.ndarray] | None:
        input_ids = self.encode_prompt(raw_sample["input"])
        if len(input_ids) > self.max_length:
            self.skip(f"prompt longer than max_length={self.max_length}")
            return None
        return {"input_ids": input_ids}

    def get_collator(self) -> PromptOnlyCollator:
        return PromptOnlyCollator(self.tokenizer.pad_token_id)


class PromptOnlyCollator(CollatorBase):
    """Left-pads ``input_ids`` so every prompt ends at the last column; bool ``attention_mask``."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, paddle.Tensor]:
        ids = [np.asarray(sample["input_ids"]) for sample in samples]
        return {
            "input_ids": paddle.to_tensor(left_padding(ids, self.pad_token_id)),
            "attention_mask": paddle.to_tensor(length_mask(ids, left=True)),
        }
