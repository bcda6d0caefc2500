"""Importing user modules that define custom ``RawDataset`` subclasses.

A custom dataset registers itself when its module is imported. Argument files name such modules in
``custom_dataset_modules`` (comma-separated): dotted module names importable on ``sys.path``
(e.g. ``my_project.datasets``) or paths to ``.py`` files (e.g. ``./my_dataset.py``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Iterable

from alignment.data.base import DatasetError

__all__ = ["import_custom_dataset_modules"]


def import_custom_dataset_modules(modules: str | Iterable[str] | None, argument: str = "custom_dataset_modules") -> list[ModuleType]:
    """Import every module or ``.py`` file in ``modules``; returns the imported modules.

    ``argument`` names the field in error messages (``custom_reward_modules`` reuses this importer)."""
    if not modules:
        return []
    entries = [m.strip() for m in modules.split(",")] if isinstance(modules, str) else [m.strip() for m in modules]
    imported = []
    for entry in filter(None, entries):
        if entry.endswith(".py") or os.sep in entry:
            imported.append(_import_file(entry, argument))
        else:
            try:
                imported.append(importlib.import_module(entry))
            except ImportError as error:
                raise DatasetError(
                    f"{argument}: cannot import {entry!r}: {error}. Give a module importable from "
                    "the current directory / PYTHONPATH, or a path to a .py file"
                ) from error
    return imported


def _import_file(path: str, argument: str = "custom_dataset_modules") -> ModuleType:
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise DatasetError(f"{argument}: file {path!r} does not exist")
    digest = hashlib.sha1(full.encode()).hexdigest()[:10]
    name = f"alignment_custom_{os.path.splitext(os.path.basename(full))[0]}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module
