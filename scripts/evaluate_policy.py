"""Score a policy's generations on held-out prompts with a reward model and/or reward functions (and the example task).

    python scripts/evaluate_policy.py --policy quickstart_output/ppo/policy \\
        --reward-model quickstart_output/rm --prompts PKU-SafeRLHF/test:1:data/safe_rlhf/test.jsonl \\
        --output quickstart_output/eval_ppo.json
    python scripts/evaluate_policy.py --policy quickstart_output/grpo/policy --reward-functions task_score \\
        --prompts PKU-SafeRLHF/test:1:data/safe_rlhf/test.jsonl --output quickstart_output/eval_ppo.json

For every prompt it samples ``--samples`` responses (temperature ``--temperature``; 0 = greedy),
scores each with the reward model (``--reward-model``) plus the weighted registered reward functions
(``--reward-functions "name[:weight],..."``, see alignment/rewards/functions.py; at least one of the two
unless the prompts are the example task's) and, when the prompts come from the repository's example
task, with its ground truth (``alignment.data.example_task.task_score``). Writes one JSON file with
the means and every generation (``reward_mean`` only when a reward was given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from alignment.evaluate.arena import add_sampling_arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="causal-LM checkpoint directory")
    parser.add_argument("--reward-model", default=None, help="score-model checkpoint directory (optional)")
    parser.add_argument("--reward-functions", default=None, help="registered reward functions 'name[:weight],...' (optional)")
    parser.add_argument("--custom-reward-modules", default=None, help="modules or .py files registering reward functions")
    add_sampling_arguments(parser, samples_help="responses per prompt")
    parser.add_argument(
        "--chat-template", default="beaver", help="beaver, tokenizer (the policy tokenizer's jinja template) or a jinja file"
    )
    parser.add_argument("--system-prompt", default=None, help="system message (jinja templates only)")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    import numpy as np
    import paddle
    from paddlenlp.transformers import AutoModelForCausalLM

    from alignment.data import PromptOnlyDataset, load_tokenizer
    from alignment.data.example_task import task_score
    from alignment.models import AutoModelForScore
    from alignment.models.hf_convert import resolve_pretrained_dir
    from alignment.models.ppo_model_utils import make_rollout_attention_mask
    from alignment.ppo.eval_utils import decode_prompt_responses, score_sequences
    from alignment.ppo.infer_utils import generate_rollout

    paddle.seed(args.seed)
    policy_dir, reward_dir = resolve_pretrained_dir(args.policy), resolve_pretrained_dir(args.reward_model)
    tokenizer = load_tokenizer(policy_dir, padding_side="left")
    reward_model = reward_tokenizer = reward_source = None
    if args.reward_functions:
        from alignment.rewards import build_reward_source

        reward_source = build_reward_source(args.reward_functions, custom_reward_modules=args.custom_reward_modules)
    if reward_dir:
        reward_tokenizer = load_tokenizer(reward_dir, padding_side="right")
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    policy.eval()
    if reward_dir:
        reward_model = AutoModelForScore.from_pretrained(reward_dir, score_type="reward")
        reward_model.eval()
    prompts = PromptOnlyDataset(
        args.prompts, tokenizer, max_length=args.max_length, chat_template=args.chat_template, system_prompt=args.system_prompt
    )
    collator = prompts.get_collator()
    rows = []
    from tqdm.auto import tqdm

    for begin in tqdm(range(0, len(prompts), args.batch_size), desc=f"evaluating {args.policy}", leave=False):
        indices = list(range(begin, min(begin + args.batch_size, len(prompts))))
        batch = collator([prompts[i] for i in indices])
        samples = args.samples if args.temperature > 0 else 1
        with paddle.no_grad():
            sequences = generate_rollout(
                policy, batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-6), top_p=args.top_p,
                num_return_sequences=samples,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, backend=args.backend,
            )  # fmt: skip
            width = batch["input_ids"].shape[1]
            mask = make_rollout_attention_mask(batch["attention_mask"], sequences, tokenizer.eos_token_id)
            rewards = np.zeros(sequences.shape[0], dtype=np.float32)
            if reward_model is not None:
                rewards += score_sequences(reward_model, sequences, mask, tokenizer, reward_tokenizer).numpy()
        entries = []
        for user, response in decode_prompt_responses(tokenizer, sequences, mask, width):
            entry = {"prompt": user, "response": response}
            try:
                entry["task_score"] = task_score(user, response)
            except ValueError:  # not a prompt of the example task
                pass
            entries.append(entry)
        if reward_source is not None:
            raw = [prompts.raw_sample(i) for i in indices for _ in range(samples)]
            extras = [{k: v for k, v in sample.items() if k != "input"} for sample in raw]
            rewards += reward_source.score([e["prompt"] for e in entries], [e["response"] for e in entries], extras)
        if reward_model is not None or reward_source is not None:
            for entry, reward in zip(entries, rewards.tolist()):
                entry["reward"] = float(reward)
        rows.extend(entries)
    result = {
        "policy": args.policy,
        "num_prompts": len(prompts),
        "num_generations": len(rows),
        "generations": rows,
    }
    if rows and "reward" in rows[0]:
        result["reward_mean"] = float(np.mean([r["reward"] for r in rows]))
    scores = [r["task_score"] for r in rows if "task_score" in r]
    if scores:
        result["task_score_mean"] = float(np.mean(scores))
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    from alignment.utils.env import setup_cpu_runtime

    setup_cpu_runtime()
    result = evaluate(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as file:
        json.dump(result, file, indent=2, ensure_ascii=False)
    summary = {k: v for k, v in result.items() if k != "generations"}
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
