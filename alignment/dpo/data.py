"""Preference pairs for DPO: :class:`~alignment.data.PreferenceDataset` plus where each response starts.

DPO sums log-probs over the *response* tokens of each answer (EOS included), so besides the two
sequences of a pair the batch needs their response masks. ``DPODataset`` reads any registered or
custom preference dataset exactly as ``PreferenceDataset`` does (same chat template, truncation and
skipping of identical pairs) and records, per side, the number of leading prompt tokens; the
collator turns them into ``better_response_mask`` / ``worse_response_mask``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from alignment.data import PreferenceDataset
from alignment.data.base import RawSample
from alignment.data.chat_template import encode_conversation
from alignment.data.preference import PreferenceCollator

__all__ = ["DPODataset", "DPOCollator", "ReferenceLogProbsDataset", "REFERENCE_KEYS"]

#: Batch keys of precomputed reference log-probs (the names of the loss arguments).
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


class DPODataset(PreferenceDataset):
    """``{better_input_ids, worse_input_ids, better_prompt_length, worse_prompt_length}`` per pair.

    ``*_prompt_length`` is where the answer starts, as the chat template's
    :func:`~alignment.data.chat_template.encode_conversation` finds it (the generation prompt; tokens a
    tokenizer merges across the boundary count as prompt). A pair where either side has no response
    token left within ``max_length`` is skipped and counted ("prompt fills max_length").
    """

    def preprocess(self, raw_sample: RawSample) -> dict[str, np.ndarray] | None:
        example = super().preprocess(raw_sample)
        if example is None:
            return None
        better, worse = raw_sample["answer"], raw_sample["other_answer"]
        if not raw_sample["better"]:
            better, worse = worse, better
        for side, answer in (("better", better), ("worse", worse)):
            ids = example[f"{side}_input_ids"]
            full_ids, start = encode_conversation(self.chat_template, self.tokenizer, raw_sample["input"], answer)
            assert (full_ids[: len(ids)] == ids).all(), "DPODataset and PreferenceDataset disagree on the tokens"
            if start >= len(ids):
                self.skip("prompt fills max_length")
                return None
            example[f"{side}_prompt_length"] = np.int64(start)
        return example

    def get_collator(self) -> DPOCollator:
        return DPOCollator(self.tokenizer.pad_token_id)


class DPOCollator(PreferenceCollator):
    """``PreferenceCollator``'s four ``[B, W]`` tensors plus ``better_response_mask`` and
    ``worse_response_mask`` (``[B, W]`` bool, true on response tokens: after the prompt, before the
    padding) and, when the examples carry them, ``reference_chosen_logps`` / ``reference_rejected_logps``
    (``[B]`` float32)."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, paddle.Tensor]:
        batch = super().__call__(samples)
        width = batch["better_input_ids"].shape[1]
        positions = np.arange(width)[None, :]
        for side in ("better", "worse"):
            starts = np.asarray([int(s[f"{side}_prompt_length"]) for s in samples])[:, None]
            ends = np.asarray([len(s[f"{side}_input_ids"]) for s in samples])[:, None]
            batch[f"{side}_response_mask"] = paddle.to_tensor((positions >= starts) & (positions < ends))
        if all(REFERENCE_KEYS[0] in s for s in samples):
            for key in REFERENCE_KEYS:
                batch[key] = paddle.to_tensor(np.asarray([s[key] for s in samples], dtype=np.float32))
        return batch


class ReferenceLogProbsDataset(paddle.io.Dataset):
    """A DPO dataset whose examples also carry precomputed reference log-probs.

    ``logps``: ``[N, 2]`` float32, column 0 the chosen (better) answer, column 1 the rejected one.
    """

    def __init__(self, dataset: Any, logps: np.ndarray) -> None:
        logps = np.asarray(logps, dtype=np.float32)
        if logps.shape != (len(dataset), 2):
            raise ValueError(f"reference log-probs must be [{len(dataset)}, 2], got {list(logps.shape)}")
        self.dataset = dataset
        self.logps = logps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self.dataset[index])
        example[REFERENCE_KEYS[0]], example[REFERENCE_KEYS[1]] = self.logps[index]
        return example

    def get_collator(self) -> DPOCollator:
        return self.dataset.get_collator()
