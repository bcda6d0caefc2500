"""Time a whole PPO step split into generation, experience and training, plus peak memory.

Random-weight actor/reference (``LlamaForCausalLM``) and critic/reward (``LlamaModelForScore``) of
the given shape; ``--batch-size`` prompts of ``--prompt-len`` tokens per step, one sample per
prompt, exactly ``--new-tokens`` generated (the EOS id is outside the vocabulary), ``update_iters``
1, one optimizer step for the actor and one for the critic per PPO step. The first step is a
warm-up; the medians of the next ``--steps`` are reported. Example (docs/benchmarks.md):

    python scripts/benchmark_ppo.py --vocab-size 8000 --hidden-size 256 --intermediate-size 688 \\
        --num-layers 4 --num-heads 4 --batch-size 8 --prompt-len 32 --new-tokens 64 --steps 5 --json

``--algorithm grpo`` (or another critic-free ``rl_algorithm``) times the same step without a critic:
``--batch-size`` rows are ``--batch-size / --samples`` prompts x ``--samples`` responses (default 2 for
the group estimators), scored by the random reward model; one optimizer step for the actor only.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from types import SimpleNamespace

from alignment.utils.benchmarking import add_shape_arguments, check_shape_arguments, llama_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backend", default="auto", choices=["auto", "fast", "plain", "fused"], help="rollout backend")
    parser.add_argument(
        "--algorithm", default="ppo", choices=["ppo", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"],
        help="rl_algorithm: ppo trains a critic, the others do not",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=None, help="responses per prompt (default 1; 2 for grpo/rloo)")
    args = parser.parse_args(argv)
    check_shape_arguments(parser, args, positive=("steps",))
    if args.samples is None:
        args.samples = 2 if args.algorithm in ("grpo", "rloo") else 1
    if args.samples < 1 or args.batch_size % args.samples:
        parser.error(f"--samples must be >= 1 and divide --batch-size ({args.batch_size}), got {args.samples}")
    if args.algorithm in ("grpo", "rloo") and args.samples < 2:
        parser.error(f"--algorithm {args.algorithm} needs --samples >= 2 (a group of one has no baseline)")
    return args


class RandomPrompts:
    """``size`` random prompts of ``length`` tokens with a PromptOnlyDataset-like collator."""

    def __init__(self, size: int, length: int, vocab_size: int, seed: int) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        self.rows = [rng.integers(3, vocab_size, size=length) for _ in range(size)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.rows[index]}

    def get_collator(self):
        from alignment.data import PromptOnlyCollator

        return PromptOnlyCollator(pad_token_id=0)


def build_trainer(args: argparse.Namespace, output_dir: str):
    import paddle
    from paddlenlp.transformers import LlamaForCausalLM

    from alignment.models import LlamaModelForScore
    from alignment.ppo.ppo_trainer import PPOTrainer
    from alignment.ppo.rl_trainer import RolloutSettings
    from alignment.ppo.run_ppo import TrainingArguments
    from alignment.ppo.trainer_utils import StepTrainer

    config = llama_config(args, tensor_parallel_output=False)
    paddle.seed(args.seed)
    actor = LlamaForCausalLM(config)
    reference = LlamaForCausalLM(config)
    reference.set_state_dict(actor.state_dict())
    critic = LlamaModelForScore(config, score_type="critic") if args.algorithm == "ppo" else None
    reward = LlamaModelForScore(config, score_type="reward")
    prompts_per_step = args.batch_size // args.samples
    training_args = TrainingArguments(
        output_dir=output_dir,
        rl_algorithm=args.algorithm,
        num_return_sequences=args.samples,
        per_device_prompt_batch_size=prompts_per_step,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        max_steps=args.steps + 1,
        learning_rate=1e-6,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=args.seed,
    )
    # An EOS id outside the vocabulary is never sampled: every rollout has exactly --new-tokens.
    tokenizer = SimpleNamespace(eos_token_id=args.vocab_size, pad_token_id=0)
    rollout = RolloutSettings(max_new_tokens=args.new_tokens, top_p=1.0, backend=args.backend, num_return_sequences=args.samples)
    prompts = RandomPrompts(prompts_per_step * (args.steps + 1), args.prompt_len, args.vocab_size, args.seed)
    if critic is None:
        from alignment.ppo.critic_free_trainer import CriticFreeTrainer

        return CriticFreeTrainer(
            training_args, StepTrainer(actor, training_args, name="actor"), reference_model=reference, reward_model=reward,
            tokenizer=tokenizer, reward_tokenizer=tokenizer, train_dataset=prompts, rollout=rollout,
        )  # fmt: skip
    return PPOTrainer(
        training_args,
        StepTrainer(actor, training_args, name="actor"),
        StepTrainer(critic, training_args, name="critic"),
        reference_model=reference,
        reward_model=reward,
        tokenizer=tokenizer,
        reward_tokenizer=tokenizer,
        train_dataset=prompts,
        rollout=rollout,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    from alignment.utils.env import setup_cpu_runtime

    threads = setup_cpu_runtime(args.threads)
    import logging

    logging.getLogger("alignment").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(args, output_dir)
        records = []
        trainer.flush_logs = lambda force=False: None  # keep the per-step records for us
        for _ in range(args.steps + 1):
            batch = next(iter(trainer.prompt_loader))
            trainer.train_on_rollout(batch)
            trainer.state.rollouts += 1
            records.append(trainer._pending.pop())
    measured = records[1:]  # the first step warms up caches and kernels

    def median(key: str) -> float:
        return statistics.median(r[key] for r in measured)

    generation, experience, train = (
        median("train/generation_seconds"), median("train/experience_seconds"), median("train/update_seconds")
    )  # fmt: skip
    steps = [r["train/generation_seconds"] + r["train/experience_seconds"] + r["train/update_seconds"] for r in measured]
    result = {
        "median_step_s": statistics.median(steps),
        "generation_s": generation,
        "experience_s": experience,
        "train_s": train,
        "generation_share": generation / statistics.median(steps),
        "rollout_tokens_per_s": args.batch_size * args.new_tokens / generation,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": threads,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "config":
                print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
