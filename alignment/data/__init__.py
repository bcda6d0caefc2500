"""Datasets for every stage: the ``RawDataset`` registry, built-in raw datasets, tokenized datasets.

>>> from alignment.data import RawDataset, RawSample, PreferenceDataset
"""

from __future__ import annotations

from alignment.data.alpaca import AlpacaDataset
from alignment.data.arguments import DataArgument
from alignment.data.base import (
    IGNORE_INDEX,
    PROMPT_ASSISTANT,
    PROMPT_BEGIN,
    PROMPT_INPUT,
    PROMPT_USER,
    CollatorBase,
    DatasetError,
    DatasetSpec,
    RawDataset,
    RawSample,
    TokenizedDataset,
    format_prompt,
    left_padding,
    parse_dataset,
    parse_datasets,
    right_padding,
)
from alignment.data.chat_template import (
    CHAT_TEMPLATES,
    ChatTemplate,
    TemplatedDataset,
    encode_conversation,
    encode_prompt,
    load_chat_template,
    register_chat_template,
)
from alignment.data.custom import import_custom_dataset_modules
from alignment.data.preference import PreferenceCollator, PreferenceDataset
from alignment.data.prompt_only import PromptOnlyCollator, PromptOnlyDataset
from alignment.data.safe_rlhf import (
    SafeRLHF10KTrainDataset,
    SafeRLHF30KTestDataset,
    SafeRLHF30KTrainDataset,
    SafeRLHFDataset,
    SafeRLHFTestDataset,
    SafeRLHFTrainDataset,
)
from alignment.data.safety_preference import SafetyPreferenceCollator, SafetyPreferenceDataset
from alignment.data.supervised import SupervisedCollator, SupervisedDataset
from alignment.data.tokenizer import batch_retokenize, is_same_tokenizer, load_tokenizer


__all__ = [
    "IGNORE_INDEX",
    "PROMPT_BEGIN",
    "PROMPT_USER",
    "PROMPT_ASSISTANT",
    "PROMPT_INPUT",
    "format_prompt",
    "left_padding",
    "right_padding",
    "RawSample",
    "RawDataset",
    "DatasetError",
    "DatasetSpec",
    "parse_dataset",
    "parse_datasets",
    "import_custom_dataset_modules",
    "DataArgument",
    "load_tokenizer",
    "is_same_tokenizer",
    "batch_retokenize",
    "TokenizedDataset",
    "TemplatedDataset",
    "ChatTemplate",
    "CHAT_TEMPLATES",
    "register_chat_template",
    "load_chat_template",
    "encode_prompt",
    "encode_conversation",
    "CollatorBase",
    "SupervisedDataset",
    "SupervisedCollator",
    "PreferenceDataset",
    "PreferenceCollator",
    "SafetyPreferenceDataset",
    "SafetyPreferenceCollator",
    "PromptOnlyDataset",
    "PromptOnlyCollator",
    "AlpacaDataset",
    "SafeRLHFDataset",
    "SafeRLHFTrainDataset",
    "SafeRLHFTestDataset",
    "SafeRLHF30KTrainDataset",
    "SafeRLHF30KTestDataset",
    "SafeRLHF10KTrainDataset",
]
