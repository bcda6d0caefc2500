"""Metric logging shared by every stage: a plain JSONL file, VisualDL, and the console.

Each record of ``metrics.jsonl`` is one JSON object ``{"step": int, "time": float, <name>: value}``
so curves can be plotted without VisualDL (see :mod:`alignment.utils.plotting`). Only the main
process writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

__all__ = ["MetricsLogger", "JsonlLoggingCallback", "is_main_process", "read_metrics", "truncate_metrics"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def is_main_process() -> bool:
    """True on global rank 0 (or when not launched distributed)."""
    return int(os.environ.get("PADDLE_TRAINER_ID", "0")) == 0


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than dropping them
    return value


class MetricsLogger:
    """Append metrics to ``output_dir/metrics.jsonl`` and, optionally, a VisualDL log directory.

    Args:
        output_dir: where ``metrics.jsonl`` goes.
        visualdl_dir: VisualDL ``logdir`` (``visualdl --logdir <dir>`` opens it); ``None`` disables.
        enabled: defaults to "main process only".
    """

    def __init__(self, output_dir: str, visualdl_dir: str | None = None, enabled: bool | None = None) -> None:
        self.enabled = is_main_process() if enabled is None else enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._writer = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if visualdl_dir:
            try:
                from visualdl import LogWriter

                self._writer = LogWriter(logdir=visualdl_dir)
            except Exception as error:  # VisualDL is optional for the run itself
                logger.warning("VisualDL logging disabled: %s", error)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({key: _jsonable(value) for key, value in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(tag=key, value=float(value), step=int(step))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def truncate_metrics(path: str, step: int) -> int:
    """Drop the records of ``path`` (a metrics.jsonl) logged after ``step``; returns how many.

    A run resumed from the checkpoint of ``step`` logs the later steps again: without this the file
    would hold them twice. A missing file is left missing.
    """
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as file:
        lines = [line for line in file if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        with open(path, "w", encoding="utf-8") as file:
            file.writelines(kept)
    return len(lines) - len(kept)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (or of ``<dir>/metrics.jsonl``)."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _callback_base():
    from paddlenlp.trainer import TrainerCallback

    return TrainerCallback


class JsonlLoggingCallback(_callback_base()):
    """PaddleNLP ``TrainerCallback`` that mirrors every ``Trainer.log`` call into metrics.jsonl."""

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self._logger: MetricsLogger | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401 - paddlenlp hook
        # state.is_world_process_zero is only set once training starts; an evaluation before
        # training would otherwise be written by every rank.
        if not logs or not is_main_process():
            return
        if self._logger is None:
            self._logger = MetricsLogger(self.output_dir or args.output_dir, visualdl_dir=None, enabled=True)
        self._logger.log(logs, step=state.global_step)
