"""PKU-Alignment's PKU-SafeRLHF preference datasets (hub or local copy with the hub's columns)."""

from __future__ import annotations

from typing import Any, ClassVar

from alignment.data.base import DatasetError, RawDataset, RawSample
from alignment.data.files import load_table

__all__ = [
    "SafeRLHFDataset",
    "SafeRLHFTrainDataset",
    "SafeRLHFTestDataset",
    "SafeRLHF30KTrainDataset",
    "SafeRLHF30KTestDataset",
    "SafeRLHF10KTrainDataset",
]

COLUMNS = (
    "prompt",
    "response_0",
    "response_1",
    "is_response_0_safe",
    "is_response_1_safe",
    "better_response_id",
    "safer_response_id",
)


def _response_id(value: Any, column: str, name: str, index: int) -> int:
    if isinstance(value, bool) or value not in (0, 1, "0", "1"):
        raise DatasetError(f"dataset {name!r} record {index}: column {column!r} must be 0 or 1, got {value!r}")
    return int(value)


def _flag(value: Any, column: str, name: str, index: int) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):  # some exports write booleans as integers
        return bool(value)
    raise DatasetError(f"dataset {name!r} record {index}: column {column!r} must be a boolean, got {value!r}")


class SafeRLHFDataset(RawDataset):
    """Base of the PKU-SafeRLHF splits: one prompt, two responses, helpfulness and safety labels.

    ``answer``/``other_answer`` are ``response_0``/``response_1``; ``better`` and ``safer`` say
    whether ``response_0`` wins; ``is_safe``/``is_other_safe`` are the per-response safety labels.
    """

    PATH: ClassVar[str]
    SPLIT: ClassVar[str]

    def __init__(self, path: str | None = None) -> None:
        self.data = load_table(self.NAME, self.PATH, self.SPLIT, path, COLUMNS)

    def __getitem__(self, index: int) -> RawSample:
        row = self.data[index]
        return RawSample(
            input=row["prompt"],
            answer=row["response_0"],
            other_answer=row["response_1"],
            better=_response_id(row["better_response_id"], "better_response_id", self.NAME, index) == 0,
            safer=_response_id(row["safer_response_id"], "safer_response_id", self.NAME, index) == 0,
            is_safe=_flag(row["is_response_0_safe"], "is_response_0_safe", self.NAME, index),
            is_other_safe=_flag(row["is_response_1_safe"], "is_response_1_safe", self.NAME, index),
        )

    def __len__(self) -> int:
        return len(self.data)


class SafeRLHFTrainDataset(SafeRLHFDataset):
    NAME = "PKU-SafeRLHF/train"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF/train",)
    PATH = "PKU-Alignment/PKU-SafeRLHF"
    SPLIT = "train"


class SafeRLHFTestDataset(SafeRLHFDataset):
    NAME = "PKU-SafeRLHF/test"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF/test",)
    PATH = "PKU-Alignment/PKU-SafeRLHF"
    SPLIT = "test"


class SafeRLHF30KTrainDataset(SafeRLHFDataset):
    NAME = "PKU-SafeRLHF-30K/train"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF-30K/train",)
    PATH = "PKU-Alignment/PKU-SafeRLHF-30K"
    SPLIT = "train"


class SafeRLHF30KTestDataset(SafeRLHFDataset):
    NAME = "PKU-SafeRLHF-30K/test"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF-30K/test",)
    PATH = "PKU-Alignment/PKU-SafeRLHF-30K"
    SPLIT = "test"


class SafeRLHF10KTrainDataset(SafeRLHFDataset):
    NAME = "PKU-SafeRLHF-10K/train"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF-10K/train",)
    PATH = "PKU-Alignment/PKU-SafeRLHF-10K"
    SPLIT = "train"
