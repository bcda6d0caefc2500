"""Dataset protocol shared by every stage: raw samples, the name registry, mixing and tokenization.

The flow is ``RawDataset`` (one source, yields ``RawSample`` dicts) -> ``TokenizedDataset`` (a
seeded mix of raw datasets, validated and tokenized once) -> a collator that pads a batch.

Registration is by class attribute: any subclass of ``RawDataset`` with a ``NAME`` (and optional
``ALIASES``) is registered when its module is imported, and can then be named in a JSON argument
file (``"train_datasets": "my-dataset:0.5:/path/to/file.jsonl"``).
"""

from __future__ import annotations

import abc
import copy
import logging
import os
from fractions import Fraction
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, TypedDict

import numpy as np
import paddle

try:  # Python < 3.11
    from typing import NotRequired
except ImportError:  # pragma: no cover
    from typing_extensions import NotRequired

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
    "DatasetSpec",
    "parse_dataset",
    "parse_datasets",
    "TokenizedDataset",
    "CollatorBase",
    "DatasetError",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT_BEGIN = "BEGINNING OF CONVERSATION: "
PROMPT_USER = "USER: {input} "
PROMPT_ASSISTANT = "ASSISTANT:"  # no trailing space, on purpose (the answer follows directly)
PROMPT_INPUT = PROMPT_BEGIN + PROMPT_USER + PROMPT_ASSISTANT


class DatasetError(ValueError):
    """Bad dataset name, specification or record. The message names the dataset and field."""


def format_prompt(input: str | list[str], eos_token: str) -> str:  # noqa: A002 - seed's name
    """``"hi"`` -> ``"BEGINNING OF CONVERSATION: USER: hi ASSISTANT:"``.

    A list is a dialogue context of odd length ending on a user turn: user turns are wrapped in
    ``USER: ... ASSISTANT:`` and assistant turns are followed by ``eos_token``.
    """
    if isinstance(input, str):
        turns = [input]
    elif isinstance(input, (list, tuple)) and all(isinstance(turn, str) for turn in input):
        turns = list(input)
        if len(turns) % 2 != 1:
            raise DatasetError(
                f"a dialogue context must have an odd number of turns ending on a user turn, got {len(turns)}"
            )
    else:
        raise DatasetError(f"'input' must be a string or a list of strings, got {type(input).__name__}")
    parts = [PROMPT_BEGIN]
    for index, turn in enumerate(turns):
        if index % 2 == 0:
            parts.append(PROMPT_USER.format(input=turn) + PROMPT_ASSISTANT)
        else:
            parts.append(turn + eos_token)
    return "".join(parts)


def right_padding(sequences: list[np.ndarray], padding_value: int) -> np.ndarray:
    """Stack 1-D int arrays into ``[batch, max_len]``, padding on the right."""
    width = max(len(seq) for seq in sequences)
    out = np.full((len(sequences), width), padding_value, dtype=np.int64)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return out


def left_padding(sequences: list[np.ndarray], padding_value: int) -> np.ndarray:
    """Stack 1-D int arrays into ``[batch, max_len]``, padding on the left."""
    width = max(len(seq) for seq in sequences)
    out = np.full((len(sequences), width), padding_value, dtype=np.int64)
    for row, seq in enumerate(sequences):
        if len(seq):
            out[row, width - len(seq) :] = seq
    return out


class RawSample(TypedDict, total=False):
    """Raw sample type.

    For SupervisedDataset, should provide (input, answer) or (dialogue).
    For PreferenceDataset, should provide (input, answer, other_answer, better).
    For SafetyPreferenceDataset, should provide (input, answer, other_answer, safer, is_safe, is_other_safe).
    For PromptOnlyDataset, should provide (input).

    When input is a list, it would be processed as a dialogue.
    """

    # Texts
    input: NotRequired[str | list[str]]  # either `input` or `dialogue` should be provided
    """User input text."""
    answer: NotRequired[str]
    """Assistant answer text."""
    other_answer: NotRequired[str]
    """Other assistant answer text via resampling."""
    dialogue: NotRequired[list[str]]  # either `input` or `dialogue` should be provided
    """Dialogue history."""

    # Flags
    better: NotRequired[bool]
    """Whether ``answer`` is better than ``other_answer``."""
    safer: NotRequired[bool]
    """Whether ``answer`` is safer than ``other_answer``."""
    is_safe: NotRequired[bool]
    """Whether ``answer`` is safe."""
    is_other_safe: NotRequired[bool]
    """Whether ``other_answer`` is safe."""


class RawDataset(paddle.io.Dataset, abc.ABC):
    """Base class of every raw dataset; subclasses with a ``NAME`` register themselves.

    ``ALIASES`` (an iterable of strings, not inherited) are other names for the same class; every
    place that accepts a NAME accepts an alias too. ``RawDataset.load(name, **kwargs)`` builds one.
    """

    NAME: ClassVar[str]
    ALIASES: ClassVar[Iterable[str]]

    _registry: ClassVar[dict[str, type[RawDataset]]] = {}
    _aliases: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("NAME")
        if name is None:  # abstract intermediate class
            return
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{cls.__qualname__}.NAME must be a non-empty string, got {name!r}")
        aliases = cls.__dict__.get("ALIASES", ())
        if isinstance(aliases, str):
            aliases = (aliases,)
        for key in (name, *aliases):
            if not isinstance(key, str) or not key.strip():
                raise DatasetError(f"{cls.__qualname__}.ALIASES entries must be non-empty strings, got {key!r}")
            owner = RawDataset._registry.get(RawDataset._aliases.get(key, key))
            if owner is not None and not _same_class(owner, cls):
                raise DatasetError(
                    f"dataset name {key!r} of {cls.__module__}.{cls.__qualname__} is already registered by "
                    f"{owner.__module__}.{owner.__qualname__}"
                )
        RawDataset._registry[name] = cls
        for alias in aliases:
            RawDataset._aliases[alias] = name

    @staticmethod
    def names(include_aliases: bool = False) -> list[str]:
        """Registered dataset names (sorted), optionally with their aliases."""
        names = list(RawDataset._registry)
        if include_aliases:
            names += list(RawDataset._aliases)
        return sorted(names)

    @staticmethod
    def resolve(name: str) -> type[RawDataset]:
        """The class registered under ``name`` or one of its aliases."""
        key = RawDataset._aliases.get(name, name)
        try:
            return RawDataset._registry[key]
        except KeyError:
            known = ", ".join(RawDataset.names(include_aliases=True))
            raise DatasetError(
                f"Unknown dataset name {name!r}. Available datasets are: {known}. "
                "Custom datasets must be imported first (see `custom_dataset_modules`)."
            ) from None

    @staticmethod
    def load(name: str, /, *args: Any, **kwargs: Any) -> RawDataset:
        """Instantiate the dataset registered under ``name`` (or an alias)."""
        return RawDataset.resolve(name)(*args, **kwargs)

    make = load

    @abc.abstractmethod
    def __getitem__(self, index: int) -> RawSample:
        """Sample ``index`` as a ``RawSample``."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    def __iter__(self) -> Iterator[RawSample]:
        return (self[index] for index in range(len(self)))

    def split_train_test(
        self, split_ratio: float = 0.2, shuffle: bool = True, seed: int = 42
    ) -> tuple[paddle.io.Subset, paddle.io.Subset]:
        """Split into (train, test) subsets; ``split_ratio`` is the test share."""
        train_indices, test_indices = _split_indices(len(self), split_ratio, shuffle, seed)
        return paddle.io.Subset(self, train_indices), paddle.io.Subset(self, test_indices)


def _same_class(a: type, b: type) -> bool:
    # Re-importing a module (e.g. a script run twice in one process) re-creates its classes;
    # that is the same dataset, not a clash.
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__)


def _record_location(raw: Any, index: int) -> str | None:
    """Where record ``index`` of a raw dataset came from (``"train.jsonl line 3"``), when its rows were
    read from a local file (:class:`alignment.data.files.LocatedRows`); else None."""
    rows = getattr(raw, "data", None)
    locate = getattr(rows, "locate", None)
    if locate is None:
        return None
    try:
        return locate(index)
    except IndexError:
        return None


def _split_indices(size: int, split_ratio: float, shuffle: bool, seed: int | None) -> tuple[list[int], list[int]]:
    if not 0.0 < split_ratio < 1.0:
        raise DatasetError(f"split_ratio must be in (0, 1), got {split_ratio}")
    indices = np.arange(size)
    if shuffle:
        indices = np.random.default_rng(seed).permutation(size)
    num_test = int(round(size * split_ratio))
    num_test = min(max(num_test, 1), size - 1) if size >= 2 else 0
    test, train = indices[:num_test], indices[num_test:]
    return sorted(train.tolist()), sorted(test.tolist())


# --------------------------------------------------------------------------------------------------
# Dataset specifications: "name[:proportion[:path]]" strings and {name: proportion | {...}} dicts
# --------------------------------------------------------------------------------------------------

Proportion = float | Fraction


class DatasetSpec(dict):
    """Normalised specification of one dataset in a mix: ``{"proportion": p, **load_kwargs}``.

    ``proportion`` is a float (share of the dataset, > 1 repeats it) or a negative-denominator
    ``Fraction`` meaning an exact sample count (``"k/-1"`` -> exactly k samples).
    """


def _parse_proportion(value: Any, where: str) -> Proportion:
    if isinstance(value, bool):
        raise DatasetError(f"{where}: proportion must be a number, got {value!r}")
    if isinstance(value, Fraction):
        proportion: Proportion = value
    elif isinstance(value, (int, float, np.integer, np.floating)):
        proportion = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return 1.0
        try:
            if "/" in text:
                numerator, denominator = (part.strip() for part in text.split("/", 1))
                if denominator == "-1":
                    count = int(numerator)
                    if count < 0:
                        raise ValueError
                    return Fraction(-count) if count else 0.0
                proportion = float(numerator) / float(denominator)
            else:
                proportion = float(text)
        except (ValueError, ZeroDivisionError):
            raise DatasetError(
                f"{where}: cannot parse proportion {value!r}; use a number such as 0.5, a ratio such as "
                "1/4, or 'k/-1' for exactly k samples"
            ) from None
    else:
        raise DatasetError(f"{where}: proportion must be a number or string, got {type(value).__name__}")
    if isinstance(proportion, Fraction):
        if proportion.denominator != 1 or proportion > 0:
            raise DatasetError(f"{where}: an exact count is written 'k/-1' (k >= 0), got {value!r}")
    elif not np.isfinite(proportion) or proportion < 0:
        raise DatasetError(f"{where}: proportion must be a finite number >= 0, got {value!r}")
    return proportion


def parse_dataset(string: str) -> tuple[str, DatasetSpec]:
    """Parse ``"name[:proportion[:path]]"`` into ``(name, {"proportion": p[, "path": path]})``.

    ``proportion`` is a float (``0.75``), a ratio (``1/4``) or an exact count (``"1000/-1"``);
    empty means 1.0. ``path`` goes to the raw dataset's constructor (``~`` is expanded).
    """
    if not isinstance(string, str) or not string.strip():
        raise DatasetError(f"empty dataset specification {string!r}")
    # The path may itself contain ':' on some systems only after the second separator.
    parts = string.strip().split(":", 2)
    name = parts[0].strip()
    if not name:
        raise DatasetError(f"dataset specification {string!r} has no name")
    spec = DatasetSpec(proportion=_parse_proportion(parts[1] if len(parts) > 1 else "", f"dataset {string!r}"))
    if len(parts) > 2 and parts[2].strip():
        spec["path"] = os.path.expanduser(parts[2].strip())
    return name, spec


def parse_datasets(
    datasets: str | Mapping[str, Any] | Iterable[str | tuple[str, Any]] | None,
) -> list[tuple[str, DatasetSpec]]:
    """Normalise any accepted dataset mix into ``[(name, DatasetSpec), ...]``.

    Accepted forms: ``"a:0.5,b"`` (comma-separated specs), ``{"a": 0.5, "b": {"proportion": 2,
    "path": "..."}}``, or an iterable of spec strings / ``(name, proportion_or_dict)`` pairs. A name
    may be a registered NAME or alias; repeating a dataset is an error (use a proportion > 1).
    """
    if datasets is None:
        return []
    items: list[tuple[str, DatasetSpec]] = []
    if isinstance(datasets, str):
        entries: Iterable[Any] = [part for part in datasets.split(",") if part.strip()]
    elif isinstance(datasets, Mapping):
        entries = list(datasets.items())
    else:
        entries = list(datasets)
    for entry in entries:
        if isinstance(entry, str):
            items.append(parse_dataset(entry))
            continue
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DatasetError(f"cannot understand dataset entry {entry!r}; expected 'name[:p[:path]]' or (name, p)")
        name, attributes = entry[0].strip(), entry[1]
        if isinstance(attributes, Mapping):
            spec = DatasetSpec({key: value for key, value in attributes.items() if key != "proportion"})
            spec["proportion"] = _parse_proportion(attributes.get("proportion", 1.0), f"dataset {name!r}")
            if "path" in spec and isinstance(spec["path"], str):
                spec["path"] = os.path.expanduser(spec["path"])
        else:
            spec = DatasetSpec(proportion=_parse_proportion(attributes, f"dataset {name!r}"))
        items.append((name, spec))
    seen: dict[str, str] = {}
    for name, _ in items:
        canonical = RawDataset.resolve(name).NAME
        if canonical in seen:
            raise DatasetError(
                f"dataset {name!r} appears twice in the mix (also as {seen[canonical]!r}); "
                "use one entry with a proportion > 1 to repeat it"
            )
        seen[canonical] = name
    return items


def mix_indices(size: int, proportion: Proportion, rng: np.random.Generator) -> np.ndarray:
    """Indices selecting ``proportion`` of a dataset of ``size`` samples.

    Whole in-order copies while the wanted count is >= size, then the remainder drawn without
    replacement. A float p asks for round(size * p) samples; ``Fraction(-k)`` asks for exactly k.
    """
    count = abs(int(proportion)) if isinstance(proportion, Fraction) else int(round(size * proportion))
    if size == 0 or count == 0:
        return np.zeros(0, dtype=np.int64)
    chunks = []
    while count >= size:
        chunks.append(np.arange(size))
        count -= size
    if count:
        chunks.append(rng.choice(size, size=count, replace=False))
    return np.concatenate(chunks).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Tokenized datasets
# --------------------------------------------------------------------------------------------------


class TokenizedDataset(paddle.io.Dataset):
    """A seeded mix of raw datasets, validated and tokenized for one training stage.

    Args:
        dataset_names_and_attributes: any form accepted by :func:`parse_datasets`.
        tokenizer: a PaddleNLP tokenizer (its ``eos_token_id`` ends every answer).
        max_length: token budget of one example; defaults to ``tokenizer.model_max_length``.
        lazy_tokenization: tokenize on first access instead of up front. Up front (the default)
            reports bad records and counts skipped/truncated examples before training starts.
        seed: seed of the mixing draw (numpy ``SeedSequence(seed).spawn``, as safe-rlhf).

    Subclasses implement :meth:`preprocess` (``RawSample`` -> dict of numpy int arrays, or ``None``
    to skip the sample, with the reason counted via :meth:`skip`) and :meth:`get_collator`.
    """

    #: RawSample fields every record must provide for this dataset type.
    REQUIRED_FIELDS: ClassVar[tuple[str, ...]] = ()
    #: fields that must be booleans when present.
    BOOL_FIELDS: ClassVar[tuple[str, ...]] = ("better", "safer", "is_safe", "is_other_safe")

    def __init__(
        self,
        dataset_names_and_attributes: Any,
        tokenizer: Any,
        max_length: int | None = None,
        lazy_tokenization: bool = False,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = int(max_length or getattr(tokenizer, "model_max_length", 0) or 0)
        if self.max_length <= 0 or self.max_length > 10**8:
            raise DatasetError(
                f"{type(self).__name__}: max_length must be a positive token count, got {max_length!r} "
                f"(tokenizer.model_max_length={getattr(tokenizer, 'model_max_length', None)!r})"
            )
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise DatasetError(f"{type(self).__name__}: the tokenizer has no eos_token; set one before building data")
        self.seed = seed
        self.lazy_tokenization = lazy_tokenization
        self.specs = parse_datasets(dataset_names_and_attributes)
        if not self.specs:
            raise DatasetError(f"{type(self).__name__}: no dataset given")
        self.skipped: dict[str, int] = {}
        self.truncated = 0

        self.raw_datasets: list[tuple[str, RawDataset]] = []
        for name, spec in self.specs:
            load_kwargs = {key: value for key, value in spec.items() if key != "proportion"}
            self.raw_datasets.append((name, RawDataset.load(name, **load_kwargs)))

        # (dataset position, raw index) of every example of the mix, in order.
        self.index: list[tuple[int, int]] = self._merge_raw_datasets()
        if not self.index:
            raise DatasetError(f"{type(self).__name__}: the dataset mix {self._describe()} is empty after mixing")
        self.data: list[dict[str, np.ndarray] | None] = [None] * len(self.index)
        if not lazy_tokenization:
            self._tokenize_all()

    # ----------------------------------------------------------------------------------------
    def _describe(self) -> str:
        return ", ".join(f"{name}:{spec['proportion']}" for name, spec in self.specs)

    def _merge_raw_datasets(self) -> list[tuple[int, int]]:
        children = np.random.SeedSequence(self.seed).spawn(len(self.raw_datasets))
        merged: list[tuple[int, int]] = []
        for position, ((name, spec), (_, raw), child) in enumerate(zip(self.specs, self.raw_datasets, children)):
            indices = mix_indices(len(raw), spec["proportion"], np.random.default_rng(child))
            merged.extend((position, int(index)) for index in indices)
        return merged

    def raw_sample(self, index: int) -> RawSample:
        """The validated raw sample behind example ``index`` of the mix."""
        position, raw_index = self.index[index]
        name, raw = self.raw_datasets[position]
        sample = raw[raw_index]
        self.check_sample(sample, name, raw_index, raw)
        return sample

    def check_sample(self, sample: Any, name: str, raw_index: int, raw: Any = None) -> None:
        """Raise a DatasetError naming dataset, record (with ``raw``, the raw dataset, also the file and
        line it came from when read from a local file) and field if ``sample`` is unusable here."""
        location = _record_location(raw, raw_index)
        where = f"dataset {name!r} record {raw_index}" + (f" ({location})" if location else "")
        if not isinstance(sample, Mapping):
            raise DatasetError(f"{where}: expected a RawSample dict, got {type(sample).__name__}")
        for field in self.REQUIRED_FIELDS:
            if "|" in field:  # alternatives, e.g. "input|dialogue"
                if not any(sample.get(option) is not None for option in field.split("|")):
                    raise DatasetError(
                        f"{where}: {type(self).__name__} needs one of {field.split('|')} but the sample has "
                        f"fields {sorted(sample)}"
                    )
            elif sample.get(field) is None:
                raise DatasetError(
                    f"{where}: {type(self).__name__} needs field {field!r} but the sample has fields {sorted(sample)}"
                )
        for field in self.BOOL_FIELDS:
            if field in sample and sample[field] is not None and not isinstance(sample[field], (bool, np.bool_)):
                raise DatasetError(
                    f"{where}: field {field!r} must be a boolean, got {sample[field]!r} ({type(sample[field]).__name__})"
                )
        for field in ("answer", "other_answer"):
            if field in sample and sample[field] is not None and not isinstance(sample[field], str):
                raise DatasetError(
                    f"{where}: field {field!r} must be a string, got {type(sample[field]).__name__} {sample[field]!r:.60}"
                )
        for field in ("input", "dialogue"):
            value = sample.get(field)
            texts = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(isinstance(text, str) for text in texts):
                kind = "a string or a list of strings" if field == "input" else "a list of strings"
                raise DatasetError(f"{where}: field {field!r} must be {kind}, got {type(value).__name__} {value!r:.60}")

    def _tokenize_all(self) -> None:
        from tqdm.auto import tqdm

        keep: list[int] = []
        disable = len(self.index) < 2000 or not _is_main_process()
        for index in tqdm(range(len(self.index)), desc=f"Tokenizing {type(self).__name__}", disable=disable):
            example = self._build(index)
            if example is not None:
                self.data[index] = example
                keep.append(index)
        if len(keep) < len(self.index):
            self.index = [self.index[i] for i in keep]
            self.data = [self.data[i] for i in keep]
        self.log_summary()
        if not self.index:
            raise DatasetError(
                f"{type(self).__name__}: every example of {self._describe()} was skipped ({self.skipped}); "
                f"check max_length={self.max_length} and the data"
            )

    def _build(self, index: int) -> dict[str, np.ndarray] | None:
        return self.preprocess(self.raw_sample(index))

    def log_summary(self) -> None:
        """Log how many examples were kept, skipped (by reason) and truncated."""
        message = f"{type(self).__name__}: {len(self.index)} examples from {self._describe()}"
        if self.skipped:
            message += "; skipped " + ", ".join(f"{count} ({reason})" for reason, count in self.skipped.items())
        if self.truncated:
            message += f"; truncated {self.truncated} to max_length={self.max_length}"
        (logger.warning if self.skipped else logger.info)(message)

    def skip(self, reason: str) -> None:
        """Count a skipped example (returned as ``None`` from :meth:`preprocess`)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    # ----------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> np.ndarray:
        """Token ids of ``text`` (with BOS if the tokenizer adds one), cut to ``max_length``."""
        limit = self.max_length if max_length is None else max_length
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if len(ids) > limit:
            ids = ids[:limit]
        return np.asarray(ids, dtype=np.int64)

    def tokenize_with_eos(self, text: str) -> tuple[np.ndarray, bool]:
        """Ids of ``text`` followed by EOS; returns ``(ids, truncated)``.

        A text longer than ``max_length`` is cut and loses its EOS (the model must not learn to
        stop where the data did not), and the cut is counted.
        """
        ids = self.tokenize(text, max_length=self.max_length + 1)
        if len(ids) >= self.max_length:
            self.truncated += 1
            return ids[: self.max_length], True
        return np.append(ids, self.tokenizer.eos_token_id).astype(np.int64), False

    @property
    def eos_token(self) -> str:
        return self.tokenizer.eos_token

    @abc.abstractmethod
    def preprocess(self, raw_sample: RawSample) -> dict[str, np.ndarray] | None:
        """Tokenize one raw sample; ``None`` skips it (call :meth:`skip` with the reason)."""

    @abc.abstractmethod
    def get_collator(self) -> Callable[[list[dict[str, np.ndarray]]], dict[str, paddle.Tensor]]:
        """The collator that pads a list of examples into a batch."""

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        example = self.data[index]
        if example is None:
            example = self._build(index)
            if example is None:
                raise DatasetError(
                    f"{type(self).__name__} example {index} was skipped ({self.skipped}); "
                    "build the dataset with lazy_tokenization=False to filter such examples up front"
                )
            self.data[index] = example
        return example

    def __len__(self) -> int:
        return len(self.index)

    def resize(self, size: int) -> None:
        """Repeat or truncate the examples to exactly ``size``."""
        if size <= 0:
            raise DatasetError(f"resize: size must be positive, got {size}")
        repeats = -(-size // len(self.index))
        self.index = (self.index * repeats)[:size]
        self.data = (self.data * repeats)[:size]

    def split_train_test(
        self, split_ratio: float = 0.2, shuffle: bool = True, seed: int | None = 42
    ) -> tuple[TokenizedDataset, TokenizedDataset]:
        """Split into (train, test) copies of this dataset; ``split_ratio`` is the test share."""
        train_indices, test_indices = _split_indices(len(self), split_ratio, shuffle, seed)
        parts = []
        for indices in (train_indices, test_indices):
            part = copy.copy(self)
            part.index = [self.index[i] for i in indices]
            part.data = [self.data[i] for i in indices]
            parts.append(part)
        return parts[0], parts[1]


class CollatorBase(metaclass=abc.ABCMeta):
    """Pads a list of examples into a batch of paddle tensors."""

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None:
            raise DatasetError("the collator needs a pad_token_id (set tokenizer.pad_token, e.g. to eos)")
        self.pad_token_id = int(pad_token_id)

    @abc.abstractmethod
    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, paddle.Tensor]:
        """Collate ``samples`` into a batch."""


def length_mask(sequences: list[np.ndarray], left: bool) -> np.ndarray:
    """``[batch, max_len]`` bool mask of real tokens (from lengths, so a pad id equal to EOS is safe)."""
    lengths = [len(seq) for seq in sequences]
    width = max(lengths)
    positions = np.arange(width)[None, :]
    lengths_col = np.asarray(lengths)[:, None]
    return positions >= width - lengths_col if left else positions < lengths_col


def _is_main_process() -> bool:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0")) == 0
