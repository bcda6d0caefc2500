"""The README's quick start, end to end: SFT -> reward model -> PPO on the example task.

This is also the PPO learning test: from the tiny SFT and reward checkpoints the pipeline just
built, PPO must raise both the reward-model score and the ground-truth task score of sampled
generations on held-out prompts (docs/benchmarks.md records the numbers of full-length runs).
"""

from __future__ import annotations

import json
import os
import struct

import pytest



def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as file:
        header = file.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.mark.slow
def test_quickstart_trains_every_stage_and_ppo_improves_the_policy(quickstart_run):
    output, result = quickstart_run  # the README's run, shared with the other algorithms' tests
    assert "quick start report (ppo)" in result.stdout

    report = json.loads((output / "report.json").read_text())
    assert report["algorithm"] == "ppo"
    for key in ["rm_eval_accuracy", "sft_reward_mean", "ppo_reward_mean", "sft_task_score", "ppo_task_score", "stage_seconds"]:
        assert report[key] is not None, key
    assert set(report["stage_seconds"]) >= {"sft", "reward_model", "ppo"}
    # The reward model learned the preference rule (chance is 0.5).
    assert report["rm_eval_accuracy"] > 0.75
    # PPO improved on the SFT policy by the reward model's measure and by the ground truth.
    assert report["ppo_reward_mean"] > report["sft_reward_mean"] + 0.5, report
    assert report["ppo_task_score"] > report["sft_task_score"] + 0.05, report
    assert report["samples"] and {"prompt", "sft_response", "ppo_response"} <= set(report["samples"][0])

    # Every stage produced a loadable checkpoint.
    from paddlenlp.transformers import AutoModelForCausalLM

    from alignment.models import AutoModelForScore

    for path in (report["checkpoints"]["sft"], report["checkpoints"]["policy"]):
        AutoModelForCausalLM.from_pretrained(path)
    for path in (report["checkpoints"]["reward_model"], report["checkpoints"]["value"]):
        AutoModelForScore.from_pretrained(path)

    # Pictures: valid PNGs of a sensible size for each stage.
    assert set(report["plots"]) == {"sft", "rm", "ppo"}
    for path in report["plots"].values():
        width, height = png_size(path)
        assert width >= 400 and height >= 250

    # VisualDL can read the logs of every stage.
    from visualdl import LogReader

    for stage, tag in (("sft", "train/loss"), ("rm", "train/accuracy"), ("ppo", "train/reward")):
        logs = [os.path.join(root, name) for root, _, names in os.walk(output / stage) for name in names if name.startswith("vdlrecords")]
        assert logs, f"no VisualDL log for {stage}"
        reader = LogReader(file_path=logs[0])
        assert tag in reader.get_tags()["scalar"], (stage, reader.get_tags()["scalar"])
        assert len(reader.get_data("scalar", tag)) >= 2
