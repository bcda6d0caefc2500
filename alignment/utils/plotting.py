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
        if len(points) >= 12:  # noisy per-step values: faint raw curve plus a moving average
            window = max(3, len(points) // 10)
            axis.plot(steps, values, alpha=0.3, linewidth=1)
            axis.plot(steps[window - 1 :], _moving_average(values, window), linewidth=2, label=f"mean of {window}")
            axis.legend(fontsize=7, loc="best")
        else:
            axis.plot(steps, values, marker="o", markersize=3)
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


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i] - sums[i - window]) / window for i in range(window, len(sums))]


def _flat(axes) -> Iterable:
    for row in axes:
        yield from row
