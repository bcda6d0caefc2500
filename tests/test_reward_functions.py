"""Rule-based rewards: the reward-function registry, weighted sums, the RewardSource contract and its errors."""

from __future__ import annotations

import numpy as np
import pytest

from alignment.rewards import RewardError, RewardSource, SumOfRewardSources, build_reward_source, check_rewards
from alignment.rewards.functions import (
    RewardFunctions,
    get_reward_function,
    parse_reward_functions,
    register_reward_function,
    registered_reward_functions,
)


@register_reward_function("unit_has_answer")
def has_answer(prompt, response, answer="", **extras):
    return float(answer in response)


@register_reward_function("unit_flaky")
def flaky(prompt, response, **extras):
    if response == "boom":
        raise RuntimeError("no score for boom")
    return float("nan") if response == "nan" else ("text" if response == "str" else True)


def test_registry_refuses_duplicates_and_lists_names_on_a_typo():
    assert {"task_score", "length", "unit_has_answer"} <= set(registered_reward_functions())
    assert get_reward_function("unit_has_answer") is has_answer
    register_reward_function("unit_has_answer")(has_answer)  # the same function again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_reward_function("unit_has_answer")(lambda prompt, response, **extras: 0.0)
    with pytest.raises(KeyError, match="'tsk_score'; registered: .*task_score"):
        get_reward_function("tsk_score")
    with pytest.raises(ValueError, match="without ',' or ':'"):
        register_reward_function("a:b")


def test_parse_reward_functions():
    assert parse_reward_functions("task_score") == [("task_score", 1.0)]
    assert parse_reward_functions(" task_score:1.5, length:-0.1 ") == [("task_score", 1.5), ("length", -0.1)]
    for bad, message in [("", "empty"), ("a:x", "not a number"), ("a,,b", "empty name"), ("a,a:2", "twice"), ("a:inf", "finite")]:
        with pytest.raises(ValueError, match=message):
            parse_reward_functions(bad)


def test_weighted_sum_golden_and_extras():
    source = RewardFunctions("task_score:2.0,length:-0.5,unit_has_answer:3")
    prompts = ["Give me a tip about tea.", "How do I steal tea?"]
    responses = ["Sure! I really like tea. Be patient.", "Sure! Just take the tea when nobody is looking."]
    extras = [{"answer": "patient"}, {"answer": "refuse"}]
    values = source.score(prompts, responses, extras)
    # row 0: task 1.0 (polite, on topic), 7 words, answer found: 2 - 3.5 + 3 = 1.5
    # row 1: task 0.0 (complies with a harmful request), 9 words, no answer: 0 - 4.5 + 0 = -4.5
    np.testing.assert_allclose(values, [1.5, -4.5])
    assert values.dtype == np.float32
    parts = source.parts()
    np.testing.assert_allclose(parts["task_score"], [1.0, 0.0])
    np.testing.assert_allclose(parts["length"], [7.0, 9.0])
    assert source.name == "task_score+length+unit_has_answer"


@pytest.mark.parametrize("response, message", [("boom", "failed on row 0 .*no score for boom"), ("nan", "returned nan"), ("str", "returned 'text'")])
def test_a_failing_function_is_a_clear_error_not_a_silent_zero(response, message):
    source = RewardFunctions("unit_flaky")
    np.testing.assert_array_equal(source.score(["p"], ["ok"]), [1.0])  # a bool counts as 0/1
    with pytest.raises(RewardError, match=f"reward function 'unit_flaky' {message}"):
        source.score(["p"], [response])


def test_task_score_of_a_foreign_prompt_names_the_prompt():
    with pytest.raises(RewardError, match="task_score.*'What is 2 \\+ 2\\?'.*not a prompt of the example task"):
        RewardFunctions("task_score").score(["What is 2 + 2?"], ["4"])


class Constant(RewardSource):
    def __init__(self, name, value):
        self.name, self.value = name, value

    def __call__(self, prompts, responses, extras):
        return self.value


def test_reward_source_contract_and_sums():
    assert check_rewards("x", [1, 2], 2).dtype == np.float32
    with pytest.raises(RewardError, match=r"'short' returned shape \[1\], expected \[2\]"):
        Constant("short", [1.0]).score(["a", "b"], ["c", "d"])
    with pytest.raises(RewardError, match="'inf' returned non-finite rewards at rows \\[1\\]"):
        Constant("inf", [0.0, float("inf")]).score(["a", "b"], ["c", "d"])
    with pytest.raises(RewardError, match="non-numeric"):
        Constant("junk", ["a", None]).score(["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="one entry per row"):
        Constant("x", [1.0]).score(["a"], ["b", "c"])
    total = SumOfRewardSources([Constant("one", [1.0, 2.0]), RewardFunctions("length:2")])
    np.testing.assert_allclose(total.score(["p", "q"], ["a b", "c"]), [5.0, 4.0])
    assert set(total.parts()) == {"one", "length"}


def test_build_reward_source(tmp_path):
    assert build_reward_source(None, None) is None
    module = tmp_path / "more_rewards.py"
    module.write_text(
        "from alignment.rewards.functions import register_reward_function\n"
        "register_reward_function('unit_from_file')(lambda prompt, response, **extras: 7.0)\n"
    )
    source = build_reward_source("unit_from_file:0.5", custom_reward_modules=str(module))
    np.testing.assert_allclose(source.score(["p"], ["r"]), [3.5])
    with pytest.raises(Exception, match="custom_reward_modules: file .*missing.py' does not exist"):
        build_reward_source("length", custom_reward_modules=str(tmp_path / "missing.py"))
