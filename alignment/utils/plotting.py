"""PNG curves from ``metrics.jsonl`` files (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

from alignment.utils.metrics import read_metrics

__all__ = ["plot_metrics"]


def plot_metrics(
    metrics_path: str,
    keys: Sequence[str],
    output_png: str,
    title: str | None = None,
    columns: int = 2,
) -> list[str]:
    """One subplot per metric in ``keys`` (those present), against ``step``; returns keys drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    present = [key for key in keys if any(isinstance(r.get(key), (int, float)) for r in records)]
    if not present:
        raise ValueError(f"none of {list(keys)} appear in {metrics_path}")
    rows = math.ceil(len(present) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    for axis, key in zip(_flat(axes), present):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(_flat(axes))[len(present) :]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output_png)), exist_ok=True)
    figure.savefig(output_png, dpi=90)
    plt.close(figure)
    return present


def _flat(axes) -> Iterable:
    for row in axes:
        yield from row
