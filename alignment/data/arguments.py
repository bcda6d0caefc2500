"""The data arguments every stage's JSON file shares (PaddleNLP ``PdArgumentParser`` dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["DataArgument"]


@dataclass
class DataArgument:
    """Which datasets to mix and how long an example may be.

    Dataset fields take comma-separated ``name[:proportion[:path]]`` specs, e.g.
    ``"PKU-SafeRLHF/train:0.5,alpaca:1000/-1:/data/alpaca.jsonl"``.
    """

    train_datasets: Optional[str] = field(
        default=None, metadata={"help": "Training datasets: comma-separated name[:proportion[:path]]."}
    )
    eval_datasets: Optional[str] = field(
        default=None, metadata={"help": "Evaluation datasets, same syntax. Or use eval_split_ratio."}
    )
    eval_split_ratio: Optional[float] = field(
        default=None, metadata={"help": "Without eval_datasets: hold out this share of the training data."}
    )
    max_length: int = field(default=2048, metadata={"help": "Maximum tokens of one example (prompt for PPO)."})
    chat_template: str = field(
        default="beaver",
        metadata={
            "help": "How conversations become text: 'beaver' (BEGINNING OF CONVERSATION: USER: ... ASSISTANT:), "
            "'tokenizer' (the tokenizer's jinja chat_template) or a path to a jinja file."
        },
    )
    system_prompt: Optional[str] = field(
        default=None, metadata={"help": "System message for jinja chat templates (not with 'beaver')."}
    )
    custom_dataset_modules: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated modules or .py files defining custom RawDataset subclasses to import."},
    )
