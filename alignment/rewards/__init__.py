"""Rewards computed from texts: rule-based reward functions and remote reward services.

Every reward that does not come from a score model goes through ONE callable interface,
:class:`RewardSource`::

    source(prompts: list[str], responses: list[str], extras: list[dict]) -> np.ndarray  # float32 [B]

``prompts[i]`` is the user's prompt text (the dataset row's ``input``, without the chat template),
``responses[i]`` the decoded response (up to its EOS, special tokens removed) and ``extras[i]`` the
dataset row's other fields (e.g. a reference answer). A source returns one finite float per row or
raises :class:`RewardError` with a clear message; it never returns a silent default.

Sources (selected in the PPO JSON, see ``alignment/ppo/run_ppo.py`` and docs/critic_free.md):

* ``reward_functions: "task_score:1.0,length:0.1"`` -- a weighted sum of registered reward
  functions (:mod:`alignment.rewards.functions`, registry like ``RawDataset``'s; user modules listed in
  ``custom_reward_modules`` register more with ``@register_reward_function("name")``);
* ``reward_server: "http://host:port"`` -- a remote reward service (``alignment.rewards.remote``);
* both, and/or a reward model (``reward_model_name_or_path``): the trainer adds the scores.

:func:`build_reward_source` turns those arguments into one source (or ``None``).
"""

from __future__ import annotations

import abc
import math
from typing import Any, Sequence

import numpy as np

__all__ = ["RewardError", "RewardSource", "SumOfRewardSources", "build_reward_source", "check_rewards"]


class RewardError(RuntimeError):
    """A reward source failed or answered something that is not one finite float per row."""


def check_rewards(name: str, values: Any, rows: int) -> np.ndarray:
    """``values`` as float32 ``[rows]``; :class:`RewardError` naming ``name`` if it is not that."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise RewardError(f"reward source {name!r} returned non-numeric rewards: {error}") from None
    if array.shape != (rows,):
        raise RewardError(f"reward source {name!r} returned shape {list(array.shape)}, expected [{rows}] (one float per response)")
    bad = [i for i, value in enumerate(array.tolist()) if not math.isfinite(value)]
    if bad:
        raise RewardError(f"reward source {name!r} returned non-finite rewards at rows {bad[:5]}: {array[bad[:5]].tolist()}")
    return array.astype(np.float32)


class RewardSource(abc.ABC):
    """Scores (prompt, response, extras) triples; see the module docstring for the contract."""

    #: Short name used in metrics (``train/reward/<name>``) and error messages.
    name: str = "reward"

    @abc.abstractmethod
    def __call__(self, prompts: list[str], responses: list[str], extras: list[dict]) -> np.ndarray:
        """``[B]`` float32 rewards of ``B`` responses."""

    def score(self, prompts: Sequence[str], responses: Sequence[str], extras: Sequence[dict] | None = None) -> np.ndarray:
        """:meth:`__call__` with the arguments and the result checked (lengths, float32, finite)."""
        prompts, responses = list(prompts), list(responses)
        extras = [dict(e) for e in extras] if extras is not None else [{} for _ in prompts]
        if not len(prompts) == len(responses) == len(extras):
            raise ValueError(f"prompts ({len(prompts)}), responses ({len(responses)}) and extras ({len(extras)}) must have one entry per row")
        return check_rewards(self.name, self(prompts, responses, extras), len(prompts))

    def parts(self) -> dict[str, np.ndarray]:
        """Per-component rewards of the last call (for metrics); the source itself by default."""
        return {}


class SumOfRewardSources(RewardSource):
    """The sum of several sources (e.g. rule functions + a remote service)."""

    name = "sum"

    def __init__(self, sources: Sequence[RewardSource]) -> None:
        if not sources:
            raise ValueError("SumOfRewardSources needs at least one source")
        self.sources = list(sources)
        self._parts: dict[str, np.ndarray] = {}

    def __call__(self, prompts: list[str], responses: list[str], extras: list[dict]) -> np.ndarray:
        total = np.zeros(len(prompts), dtype=np.float32)
        self._parts = {}
        for source in self.sources:
            values = source.score(prompts, responses, extras)
            self._parts.update(source.parts() or {source.name: values})
            total += values
        return total

    def parts(self) -> dict[str, np.ndarray]:
        return dict(self._parts)


def build_reward_source(
    reward_functions: str | None = None,
    reward_server: str | None = None,
    custom_reward_modules: str | None = None,
    **server_options: Any,
) -> RewardSource | None:
    """One :class:`RewardSource` from the PPO arguments, or ``None`` when neither is given.

    ``reward_functions``: ``"name[:weight],..."`` of registered functions (user modules in
    ``custom_reward_modules`` are imported first). ``reward_server``: URL of a remote reward service;
    ``server_options`` are passed to ``alignment.rewards.remote.RemoteRewardSource``.
    """
    sources: list[RewardSource] = []
    if reward_functions:
        from alignment.rewards.functions import RewardFunctions, import_custom_reward_modules

        import_custom_reward_modules(custom_reward_modules)
        sources.append(RewardFunctions(reward_functions))
    if reward_server:
        from alignment.rewards.remote import RemoteRewardSource  # the remote protocol lives there

        sources.append(RemoteRewardSource(reward_server, **server_options))
    if not sources:
        return None
    return sources[0] if len(sources) == 1 else SumOfRewardSources(sources)
