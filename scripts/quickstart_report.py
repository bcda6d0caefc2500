"""Summarize a quick-start run: report.json, PNG curves, and generations before/after PPO.

    python scripts/quickstart_report.py --output-dir quickstart_output

Reads ``sft/``, ``rm/`` and ``<algorithm>/`` metrics (``metrics.jsonl``; ``ppo/`` for PPO, ``grpo/`` etc. for
the critic-free algorithms, which have no reward model), ``eval_sft.json`` and ``eval_ppo.json`` (the trained
policy's, whatever the algorithm; scripts/evaluate_policy.py) and ``stage_seconds.json`` (scripts/quickstart.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PLOTS = {
    "ppo_training.png": (
        "ppo",
        ["train/reward", "eval/reward", "train/kl_divergence", "train/mean_generated_length",
         "train/actor_loss", "train/reward_critic_loss", "train/ptx_loss", "train/reward_with_kl_penalty"],
        "PPO",
    ),
    "reward_model_training.png": ("rm", ["loss", "accuracy", "eval_accuracy", "eval_loss", "eval_rewards_mean"], "Reward model"),
    "sft_training.png": ("sft", ["loss", "eval_loss", "eval_ppl"], "SFT"),
}  # fmt: skip
#: Curves of a critic-free stage (``<algorithm>/metrics.jsonl``), drawn as ``<algorithm>_training.png``.
CRITIC_FREE_KEYS = [
    "train/reward", "eval/reward", "train/group_reward_std", "train/zero_variance_groups", "train/kl_divergence",
    "train/entropy", "train/clip_fraction", "train/mean_generated_length", "train/actor_loss", "train/ptx_loss",
]  # fmt: skip


def last_value(records: list[dict], key: str):
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def sample_table(before: dict, after: dict, rows: int = 8) -> list[dict]:
    """The first generation of each of the first ``rows`` prompts, before and after PPO."""
    first_after = {}
    for generation in after["generations"]:
        first_after.setdefault(generation["prompt"], generation)
    table, seen = [], set()
    for generation in before["generations"]:
        prompt = generation["prompt"]
        if prompt in seen or prompt not in first_after:
            continue
        seen.add(prompt)
        table.append(
            {
                "prompt": prompt,
                "sft_response": generation["response"],
                "sft_reward": generation.get("reward"),
                "ppo_response": first_after[prompt]["response"],
                "ppo_reward": first_after[prompt].get("reward"),
            }
        )
        if len(table) == rows:
            break
    return table


def build_report(output_dir: str) -> dict:
    from alignment.utils.metrics import read_metrics
    from alignment.utils.plotting import plot_metrics

    def load(name: str) -> dict:
        with open(os.path.join(output_dir, name), encoding="utf-8") as file:
            return json.load(file)

    run = load("quickstart.json") if os.path.isfile(os.path.join(output_dir, "quickstart.json")) else {}
    algorithm = run.get("algorithm", "ppo")
    before, after = load("eval_sft.json"), load("eval_ppo.json")
    has_rm = os.path.isdir(os.path.join(output_dir, "rm"))
    rm_records = read_metrics(os.path.join(output_dir, "rm")) if has_rm else []
    plots = {}
    stages = dict(PLOTS)
    if algorithm != "ppo":
        stages = {f"{algorithm}_training.png": (algorithm, CRITIC_FREE_KEYS, algorithm.upper()), **PLOTS}
    for filename, (stage, keys, title) in stages.items():
        path = os.path.join(output_dir, stage, "metrics.jsonl")
        if os.path.isfile(path):
            target = os.path.join(output_dir, "plots", filename)
            if plot_metrics(path, keys, target, title=title):
                plots[stage] = target
    policy_stage = "ppo" if algorithm == "ppo" else algorithm
    checkpoints = {"sft": run.get("sft", os.path.join(output_dir, "sft")), "policy": os.path.join(output_dir, policy_stage, "policy")}
    if has_rm:
        checkpoints["reward_model"] = os.path.join(output_dir, "rm")
    if os.path.isdir(os.path.join(output_dir, policy_stage, "value")):
        checkpoints["value"] = os.path.join(output_dir, policy_stage, "value")
    report = {
        "algorithm": algorithm,
        "rm_eval_accuracy": last_value(rm_records, "eval_accuracy"),
        "sft_reward_mean": before.get("reward_mean"),
        "ppo_reward_mean": after.get("reward_mean"),
        "sft_task_score": before.get("task_score_mean"),
        "ppo_task_score": after.get("task_score_mean"),
        "num_eval_prompts": before["num_prompts"],
        "num_eval_generations": before["num_generations"],
        "stage_seconds": load("stage_seconds.json"),
        "plots": plots,
        "checkpoints": checkpoints,
        "visualdl_logdirs": [
            os.path.join(output_dir, stage) for stage in ("sft", "rm", policy_stage) if os.path.isdir(os.path.join(output_dir, stage))
        ],
        "samples": sample_table(before, after),
    }
    return report


def print_report(report: dict) -> None:
    from alignment.ppo.eval_utils import format_table

    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(f"========== quick start report ({report['algorithm']}) ==========")
    print(f"reward model held-out accuracy : {fmt(report['rm_eval_accuracy'])}")
    name = report["algorithm"].upper()
    print(f"mean reward      SFT -> {name:<6} : {fmt(report['sft_reward_mean'])} -> {fmt(report['ppo_reward_mean'])}")
    print(f"task score       SFT -> {name:<6} : {fmt(report['sft_task_score'])} -> {fmt(report['ppo_task_score'])}")
    print(f"({report['num_eval_generations']} sampled generations on {report['num_eval_prompts']} held-out prompts)")
    print("seconds per stage: " + ", ".join(f"{k} {v}" for k, v in report["stage_seconds"].items()))
    print()
    print(format_table(report["samples"], columns=("prompt", "sft_response", "sft_reward", "ppo_response", "ppo_reward"), width=40))
    print()
    for stage, path in report["plots"].items():
        print(f"plot ({stage}): {path}")
    for name, path in report["checkpoints"].items():
        print(f"checkpoint ({name}): {path}")
    print("VisualDL: visualdl --logdir " + " ".join(report["visualdl_logdirs"]))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="quickstart_output")
    args = parser.parse_args(argv)
    report = build_report(args.output_dir)
    with open(os.path.join(args.output_dir, "report.json"), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2, ensure_ascii=False)
    print_report(report)
    print(f"report: {os.path.join(args.output_dir, 'report.json')}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
