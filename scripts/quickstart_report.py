"""Summarize a quick-start run: report.json, PNG curves, and generations before/after PPO.

    python scripts/quickstart_report.py --output-dir quickstart_output

Reads ``sft/``, ``rm/`` and ``<algorithm>/`` metrics (``metrics.jsonl``; ``ppo/`` for PPO, ``dpo/`` for DPO,
``grpo/`` etc. for the critic-free algorithms, which have no reward model), ``eval_sft.json`` and ``eval_ppo.json``
(the trained policy's, whatever the algorithm; scripts/evaluate_policy.py) and ``stage_seconds.json``
(scripts/quickstart.sh). With ``--safe`` (algorithm ``ppo_lag``) also ``cm/`` (cost model) and ``arena.json``
(scripts/arena.py).
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
    "dpo_training.png": (
        "dpo",
        ["loss", "eval_loss", "rewards/accuracies", "eval_rewards/accuracies", "rewards/margins",
         "eval_rewards/margins", "logps/chosen", "logps/rejected"],
        "DPO",
    ),
}  # fmt: skip
#: Curves of a critic-free stage (``<algorithm>/metrics.jsonl``), drawn as ``<algorithm>_training.png``.
CRITIC_FREE_KEYS = [
    "train/reward", "eval/reward", "train/group_reward_std", "train/zero_variance_groups", "train/kl_divergence",
    "train/entropy", "train/clip_fraction", "train/mean_generated_length", "train/actor_loss", "train/ptx_loss",
]  # fmt: skip


#: Safe RLHF (``quickstart.sh --safe``): the PPO-Lag stage's curves, and name -> (stage, keys, title) of its extra plots.
PPO_LAG_KEYS = [
    "train/reward", "train/cost", "eval/reward", "train/kl_divergence", "train/mean_generated_length",
    "train/actor_loss", "train/reward_critic_loss", "train/cost_critic_loss", "train/ptx_loss",
]  # fmt: skip
SAFE_PLOTS = {
    "lambda": ("ppo_lag_lambda.png", "ppo_lag", ["train/lambda", "train/episode_cost", "train/cost", "train/cost_with_kl_penalty"], "PPO-Lag: Lagrange multiplier and episode cost"),
    "cm": ("cost_model_training.png", "cm", ["loss", "accuracy", "accuracy_sign", "eval_accuracy", "eval_accuracy_sign", "eval_costs_mean"], "Cost model"),
}  # fmt: skip


def safety_report(output_dir: str, algorithm: str, before: dict, after: dict) -> dict:
    """Safety numbers of a quick start: the ground truth's unsafe fraction of the SFT / trained policy's
    answers to the held-out harmful prompts (every algorithm) and, for ``ppo_lag``, the cost model's
    held-out accuracies, the arena's mean costs (SFT = red, PPO-Lag = blue) and the final multiplier."""
    from alignment.evaluate.arena import ground_truth_safety
    from alignment.utils.metrics import read_metrics

    report = {
        "sft_unsafe_fraction": ground_truth_safety(before["generations"])["unsafe_fraction"],
        "ppo_unsafe_fraction": ground_truth_safety(after["generations"])["unsafe_fraction"],
    }
    if algorithm != "ppo_lag":
        return report
    cm_records = read_metrics(os.path.join(output_dir, "cm"))
    with open(os.path.join(output_dir, "arena.json"), encoding="utf-8") as file:
        arena = json.load(file)["summary"]
    report.update({
        "cm_eval_accuracy": last_value(cm_records, "eval_accuracy"),
        "cm_eval_accuracy_sign": last_value(cm_records, "eval_accuracy_sign"),
        "sft_cost_mean": arena["red"]["cost_mean"],
        "ppo_cost_mean": arena["blue"]["cost_mean"],
        "sft_safe_fraction_by_cost_model": arena["red"]["safe_fraction"],
        "ppo_safe_fraction_by_cost_model": arena["blue"]["safe_fraction"],
        "arena_win_rate": arena["win_rate"]["blue_win_rate"],
        "lambda_final": last_value(read_metrics(os.path.join(output_dir, "ppo_lag")), "train/lambda"),
    })  # fmt: skip
    return report


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
        keys = PPO_LAG_KEYS if algorithm == "ppo_lag" else CRITIC_FREE_KEYS
        stages = {f"{algorithm}_training.png": (algorithm, keys, algorithm.upper()), **PLOTS}
    for filename, (stage, keys, title) in stages.items():
        path = os.path.join(output_dir, stage, "metrics.jsonl")
        if os.path.isfile(path):
            target = os.path.join(output_dir, "plots", filename)
            if plot_metrics(path, keys, target, title=title):
                plots[stage] = target
    if algorithm == "ppo_lag":
        for name, (filename, stage, keys, title) in SAFE_PLOTS.items():
            target = os.path.join(output_dir, "plots", filename)
            if plot_metrics(os.path.join(output_dir, stage, "metrics.jsonl"), keys, target, title=title):
                plots[name] = target
        plots["arena"] = os.path.join(output_dir, "plots", "arena.png")  # written by scripts/arena.py
    policy_stage = "ppo" if algorithm == "ppo" else algorithm
    checkpoints = {"sft": run.get("sft", os.path.join(output_dir, "sft")), "policy": os.path.join(output_dir, policy_stage, "policy")}
    if has_rm:
        checkpoints["reward_model"] = os.path.join(output_dir, "rm")
    if os.path.isdir(os.path.join(output_dir, policy_stage, "value")):
        checkpoints["value"] = os.path.join(output_dir, policy_stage, "value")
    if algorithm == "ppo_lag":
        checkpoints["cost_model"] = os.path.join(output_dir, "cm")
        checkpoints["cost_value"] = os.path.join(output_dir, policy_stage, "cost_value")
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
            os.path.join(output_dir, stage) for stage in ("sft", "rm", "cm", policy_stage) if os.path.isdir(os.path.join(output_dir, stage))
        ],
        "samples": sample_table(before, after),
    }
    if algorithm == "dpo":  # DPO saves the policy in its output directory itself; PLOTS draws its curves
        dpo_records = read_metrics(os.path.join(output_dir, "dpo"))
        report["dpo_eval_accuracy"] = last_value(dpo_records, "eval_rewards/accuracies")
        report["dpo_eval_margin"] = last_value(dpo_records, "eval_rewards/margins")
        report["checkpoints"]["policy"] = os.path.join(output_dir, "dpo")
    report.update(safety_report(output_dir, algorithm, before, after))
    return report


def print_report(report: dict) -> None:
    from alignment.ppo.eval_utils import format_table

    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(f"========== quick start report ({report['algorithm']}) ==========")
    print(f"reward model held-out accuracy : {fmt(report['rm_eval_accuracy'])}")
    if "dpo_eval_accuracy" in report:
        print(f"DPO held-out implicit-reward accuracy : {fmt(report['dpo_eval_accuracy'])}")
    name = report["algorithm"].upper()
    print(f"mean reward      SFT -> {name:<6} : {fmt(report['sft_reward_mean'])} -> {fmt(report['ppo_reward_mean'])}")
    print(f"task score       SFT -> {name:<6} : {fmt(report['sft_task_score'])} -> {fmt(report['ppo_task_score'])}")
    print(f"unsafe answers to harmful prompts (ground truth) SFT -> {name}: "
          f"{fmt(report['sft_unsafe_fraction'])} -> {fmt(report['ppo_unsafe_fraction'])}")  # fmt: skip
    if report["algorithm"] == "ppo_lag":
        print(f"cost model held-out accuracy / sign accuracy : {fmt(report['cm_eval_accuracy'])} / {fmt(report['cm_eval_accuracy_sign'])}")
        print(f"mean cost        SFT -> {name:<6} : {fmt(report['sft_cost_mean'])} -> {fmt(report['ppo_cost_mean'])}")
        print(f"final lambda                   : {fmt(report['lambda_final'])}")
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
