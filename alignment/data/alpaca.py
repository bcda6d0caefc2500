"""Stanford Alpaca instruction data (``tatsu-lab/alpaca``), hub or local copy with its columns."""

from __future__ import annotations

from alignment.data.base import DatasetError, RawDataset, RawSample
from alignment.data.files import load_table

__all__ = ["AlpacaDataset"]


class AlpacaDataset(RawDataset):
    """``input`` = instruction (+ " " + input when non-empty), ``answer`` = output."""

    NAME = "alpaca"
    ALIASES = ("stanford-alpaca",)
    PATH = "tatsu-lab/alpaca"
    SPLIT = "train"

    def __init__(self, path: str | None = None) -> None:
        self.data = load_table(self.NAME, self.PATH, self.SPLIT, path, ("instruction", "input", "output"))

    def __getitem__(self, index: int) -> RawSample:
        row = self.data[index]
        instruction, extra, output = row["instruction"], row["input"], row["output"]
        for column, value in (("instruction", instruction), ("input", extra), ("output", output)):
            if value is not None and not isinstance(value, str):
                raise DatasetError(
                    f"dataset {self.NAME!r} record {index}: column {column!r} must be text, got {type(value).__name__}"
                )
        text = f"{instruction} {extra}" if extra else instruction
        return RawSample(input=text, answer=output)

    def __len__(self) -> int:
        return len(self.data)
