"""Loading raw tables from the Hugging Face hub or from local files, without pickle.

Built-in datasets load ``datasets.load_dataset(hub_path, split=...)`` by default, exactly like
upstream. Passing ``path`` (the third field of ``name:proportion:path``) reads a local copy instead:

* a ``.jsonl`` file (one JSON object per line), a ``.json`` file (a list of objects, or an object
  with a ``"data"``/``"train"``... list) or a ``.parquet`` file with the hub's columns;
* a directory holding ``{split}.jsonl|json|parquet`` (also under ``data/``), a dataset saved with
  ``datasets.Dataset.save_to_disk``, or anything ``datasets.load_dataset(directory)`` understands.

Every record is checked for the required columns; errors name the file and line.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from alignment.data.base import DatasetError

__all__ = ["load_table", "read_local_table", "LocatedRows"]

_EXTENSIONS = (".jsonl", ".json", ".parquet")


def load_table(
    dataset_name: str,
    hub_path: str,
    split: str,
    path: str | None,
    columns: Sequence[str],
) -> Sequence[dict[str, Any]]:
    """Rows of ``split`` as dicts, from ``path`` if given, else from the hub dataset ``hub_path``."""
    if path is None:
        return _load_hub(dataset_name, hub_path, split, columns)
    return read_local_table(dataset_name, path, split, columns)


def _load_hub(dataset_name: str, hub_path: str, split: str, columns: Sequence[str]) -> Sequence[dict[str, Any]]:
    import datasets

    try:
        table = datasets.load_dataset(hub_path, split=split)
    except Exception as error:  # network, auth, missing split...
        raise DatasetError(
            f"dataset {dataset_name!r}: could not load {hub_path!r} (split {split!r}) from the Hugging Face hub: "
            f"{type(error).__name__}: {error}. Offline? Give a local copy as "
            f"'{dataset_name}:1:/path/to/{split}.jsonl' (or .json/.parquet/a directory)."
        ) from error
    _check_columns(dataset_name, hub_path, list(table.column_names), columns)
    return table


def read_local_table(dataset_name: str, path: str, split: str, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a local file or directory (see module docstring), checked for ``columns``."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise DatasetError(f"dataset {dataset_name!r}: path {path!r} does not exist")
    if os.path.isdir(path):
        file = _find_split_file(path, split)
        if file is None:
            return _load_directory(dataset_name, path, split, columns)
        path = file
    lower = path.lower()
    if lower.endswith(".parquet"):
        rows = _read_parquet(dataset_name, path)
    elif lower.endswith((".jsonl", ".json")):
        rows = _read_json(dataset_name, path)
    else:
        raise DatasetError(
            f"dataset {dataset_name!r}: unsupported file type {path!r}; use .jsonl, .json, .parquet or a directory"
        )
    for number, row in rows:
        missing = [column for column in columns if column not in row]
        if missing:
            raise DatasetError(
                f"dataset {dataset_name!r}: {path} {number}: record lacks column(s) {missing} "
                f"(has {sorted(row)}); the file must use the hub dataset's columns {list(columns)}"
            )
    if not rows:
        raise DatasetError(f"dataset {dataset_name!r}: {path} holds no records")
    return LocatedRows(path, rows)


class LocatedRows(list):
    """The records of a local file (a list of dicts) that remember where each came from, so that an
    error about record ``i`` can name the file and line: ``rows.locate(i)`` -> ``"train.jsonl line 3"``."""

    def __init__(self, path: str, numbered_rows: Sequence[tuple[str, dict[str, Any]]]) -> None:
        super().__init__(row for _, row in numbered_rows)
        self.path = path
        self.locations = [where for where, _ in numbered_rows]

    def locate(self, index: int) -> str:
        return f"{self.path} {self.locations[index]}"


def _find_split_file(directory: str, split: str) -> str | None:
    for folder in (directory, os.path.join(directory, "data")):
        for extension in _EXTENSIONS:
            candidate = os.path.join(folder, split + extension)
            if os.path.isfile(candidate):
                return candidate
    return None


def _load_directory(dataset_name: str, path: str, split: str, columns: Sequence[str]) -> Sequence[dict[str, Any]]:
    import datasets

    try:
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "state.json")):
            table = datasets.load_from_disk(path)
        elif os.path.exists(os.path.join(path, "dataset_dict.json")):
            table = datasets.load_from_disk(path)[split]
        else:
            table = datasets.load_dataset(path, split=split)
    except Exception as error:
        raise DatasetError(
            f"dataset {dataset_name!r}: directory {path!r} has no {split}.jsonl/.json/.parquet and could not be "
            f"read by `datasets`: {type(error).__name__}: {error}"
        ) from error
    _check_columns(dataset_name, path, list(table.column_names), columns)
    return table


def _check_columns(dataset_name: str, source: str, present: list[str], columns: Sequence[str]) -> None:
    missing = [column for column in columns if column not in present]
    if missing:
        raise DatasetError(f"dataset {dataset_name!r}: {source} lacks column(s) {missing} (has {present})")


def _read_json(dataset_name: str, path: str) -> list[tuple[str, dict[str, Any]]]:
    """``(line number, record)`` pairs of a JSON-lines file or of a JSON document holding a list."""
    with open(path, "rb") as file:
        raw = file.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise DatasetError(
            f"dataset {dataset_name!r}: {path} line {line}, column {column}: byte 0x{raw[error.start]:02x} is not "
            "UTF-8 text; save the file as UTF-8"
        ) from None
    if path.lower().endswith(".json") or text.lstrip().startswith("["):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if text.lstrip().startswith("["):
                raise DatasetError(
                    f"dataset {dataset_name!r}: {path} line {error.lineno}: invalid JSON ({error.msg})"
                ) from None
            document = None  # maybe JSON lines in a .json file
        if document is not None:
            return _records_from_json_document(dataset_name, path, document)
    rows: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"dataset {dataset_name!r}: {path} line {number}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"dataset {dataset_name!r}: {path} line {number}: expected one JSON object per line")
        rows.append((f"line {number}", record))
    return rows


def _records_from_json_document(dataset_name: str, path: str, document: Any) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(document, dict):
        lists = [value for value in document.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DatasetError(
                f"dataset {dataset_name!r}: {path}: a JSON object must hold exactly one list of records"
            )
        document = lists[0]
    if not isinstance(document, list):
        raise DatasetError(f"dataset {dataset_name!r}: {path}: expected a list of records")
    rows = []
    for number, record in enumerate(document):
        if not isinstance(record, dict):
            raise DatasetError(f"dataset {dataset_name!r}: {path}: record {number} is not a JSON object")
        rows.append((f"record {number}", record))
    return rows


def _read_parquet(dataset_name: str, path: str) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:
        raise DatasetError(f"dataset {dataset_name!r}: cannot read parquet file {path}: {error}") from error
    return [(f"row {number}", row) for number, row in enumerate(table.to_pylist())]
