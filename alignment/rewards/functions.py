"""Rule-based reward functions, registered by name (like ``RawDataset``'s registry).

A reward function is ``fn(prompt: str, response: str, **extras) -> float``: the user's prompt text,
the decoded response and the dataset row's other fields (keyword arguments it may ignore: accept
``**extras``). Register one with::

    from alignment.rewards import functions

    @functions.register_reward_function("exact_answer")
    def exact_answer(prompt, response, answer=None, **extras):
        return float(response.strip() == answer)

and select it in the PPO JSON with ``"reward_functions": "exact_answer"`` (its module listed in
``custom_reward_modules``: dotted names or ``.py`` paths, as ``custom_dataset_modules``). Several
functions combine with weights: ``"task_score:1.0,length:-0.01"`` is
``1.0 * task_score + (-0.01) * length``.

Shipped: ``task_score`` (the example task's ground truth, :func:`alignment.data.example_task.task_score`)
and ``length`` (words in the response).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

from alignment.rewards import RewardError, RewardSource

__all__ = [
    "RewardFunction",
    "register_reward_function",
    "get_reward_function",
    "registered_reward_functions",
    "parse_reward_functions",
    "RewardFunctions",
    "import_custom_reward_modules",
]

RewardFunction = Callable[..., float]
_REGISTRY: dict[str, RewardFunction] = {}


def register_reward_function(name: str) -> Callable[[RewardFunction], RewardFunction]:
    """Decorator registering ``fn(prompt, response, **extras) -> float`` under ``name``."""
    if not isinstance(name, str) or not name.strip() or any(c in name for c in ",:"):
        raise ValueError(f"reward function name must be a non-empty string without ',' or ':', got {name!r}")

    def decorator(fn: RewardFunction) -> RewardFunction:
        if not callable(fn):
            raise TypeError(f"reward function {name!r} must be callable, got {type(fn).__name__}")
        owner = _REGISTRY.get(name)
        if owner is not None and _qualified(owner) != _qualified(fn):
            raise ValueError(f"reward function name {name!r} of {_qualified(fn)} is already registered by {_qualified(owner)}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def _qualified(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def registered_reward_functions() -> list[str]:
    return sorted(_REGISTRY)


def get_reward_function(name: str) -> RewardFunction:
    """The function registered as ``name``; an unknown name lists the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown reward function {name!r}; registered: {registered_reward_functions()} "
            "(register more with @register_reward_function in a module listed in custom_reward_modules)"
        ) from None


def parse_reward_functions(spec: str) -> list[tuple[str, float]]:
    """``"a:1.0,b:0.1"`` -> ``[("a", 1.0), ("b", 0.1)]`` (weight 1 when omitted); names not checked."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("reward_functions: expected 'name[:weight],...', got an empty value")
    result = []
    for item in spec.split(","):
        item = item.strip()
        name, _, weight = item.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"reward_functions: empty name in {spec!r} (expected 'name[:weight],...')")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"reward_functions: weight {weight!r} of {name!r} is not a number (in {spec!r})") from None
        if not math.isfinite(value):
            raise ValueError(f"reward_functions: weight of {name!r} must be finite, got {weight!r}")
        if name in (n for n, _ in result):
            raise ValueError(f"reward_functions: {name!r} is listed twice in {spec!r}")
        result.append((name, value))
    return result


def import_custom_reward_modules(modules: str | Iterable[str] | None) -> list:
    """Import the user modules that register reward functions (same rules as ``custom_dataset_modules``)."""
    from alignment.data.custom import import_custom_dataset_modules

    return import_custom_dataset_modules(modules, argument="custom_reward_modules")


class RewardFunctions(RewardSource):
    """A weighted sum of registered reward functions: a :class:`~alignment.rewards.RewardSource`.

    ``spec``: ``"name[:weight],..."``. Every name must be registered when this is built (so a typo
    fails before any model loads). Each function's per-row values are kept for metrics (:meth:`parts`).
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.terms = [(name, weight, get_reward_function(name)) for name, weight in parse_reward_functions(spec)]
        self.name = "+".join(name for name, _, _ in self.terms)
        self._parts: dict[str, np.ndarray] = {}

    def __call__(self, prompts: list[str], responses: list[str], extras: list[dict]) -> np.ndarray:
        total = np.zeros(len(prompts), dtype=np.float64)
        self._parts = {}
        for name, weight, fn in self.terms:
            values = np.empty(len(prompts), dtype=np.float64)
            for row, (prompt, response, extra) in enumerate(zip(prompts, responses, extras)):
                try:
                    value = fn(prompt, response, **extra)
                except Exception as error:
                    raise RewardError(f"reward function {name!r} failed on row {row} (prompt {prompt[:80]!r}): {error}") from error
                if not isinstance(value, (int, float, np.floating, np.integer, np.bool_)) or not math.isfinite(value):
                    raise RewardError(f"reward function {name!r} returned {value!r} on row {row} (prompt {prompt[:80]!r}): expected a finite float")
                values[row] = float(value)
            self._parts[name] = values.astype(np.float32)
            total += weight * values
        return total.astype(np.float32)

    def parts(self) -> dict[str, np.ndarray]:
        return dict(self._parts)


# ---------------------------------------------------------------------------------------- shipped
@register_reward_function("task_score")
def task_score_reward(prompt: str, response: str, **extras) -> float:
    """The example task's ground truth in [0, 1] (``alignment.data.example_task.task_score``)."""
    from alignment.data.example_task import task_score

    return task_score(prompt, response)


@register_reward_function("length")
def length_reward(prompt: str, response: str, **extras) -> float:
    """Number of whitespace-separated words of the response (weight it negatively to penalise length)."""
    return float(len(response.split()))
