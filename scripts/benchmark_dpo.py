"""Time one DPO step (reference forward, policy forward + backward, AdamW update) and peak memory.

Random-weight policy and reference (``LlamaForCausalLM``, same weights) of the given shape;
``--batch-size`` pairs per step, each side ``--prompt-len`` prompt tokens plus ``--new-tokens``
response tokens (the two answers share the prompt and differ in every response token), the
``sigmoid`` loss with beta 0.1. It runs ``DPOTrainer.training_step`` (what ``Trainer.train`` calls
per micro-batch) and then the optimizer step. The first ``--warmup`` steps (default 1) warm up; the
medians of the next ``--steps`` are reported (wall clock, and process CPU time ``step_cpu_s``, which a loaded machine
distorts less). Example (docs/benchmarks.md, the PPO benchmark's reference shape):

    python scripts/benchmark_dpo.py --vocab-size 8000 --hidden-size 256 --intermediate-size 688 \\
        --num-layers 4 --num-heads 4 --batch-size 8 --prompt-len 32 --new-tokens 64 --steps 5 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time

from alignment.utils.benchmarking import add_shape_arguments, add_step_arguments, check_shape_arguments, llama_config, memory_lower_bound_bytes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    add_step_arguments(parser)
    parser.add_argument("--loss-type", default="sigmoid", help="registered preference loss")
    parser.add_argument(
        "--precompute", action="store_true", help="reference log-probs precomputed (no reference forward in the step)"
    )
    args = parser.parse_args(argv)
    check_shape_arguments(parser, args, positive=("steps",))
    return args


def random_batch(args: argparse.Namespace, rng) -> dict:
    """A DPOCollator batch of ``batch_size`` pairs of prompt + response tokens (no padding)."""
    import numpy as np

    from alignment.dpo.data import DPOCollator

    samples = []
    for _ in range(args.batch_size):
        prompt = rng.integers(3, args.vocab_size, size=args.prompt_len)
        better, worse = (np.concatenate([prompt, rng.integers(3, args.vocab_size, size=args.new_tokens)]) for _ in range(2))
        samples.append({"better_input_ids": better, "worse_input_ids": worse,
                        "better_prompt_length": args.prompt_len, "worse_prompt_length": args.prompt_len})  # fmt: skip
    return DPOCollator(pad_token_id=0)(samples)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from alignment.utils.env import setup_cpu_runtime

    threads = setup_cpu_runtime(args.threads)
    import logging

    import numpy as np
    import paddle
    from paddlenlp.transformers import LlamaForCausalLM

    from alignment.dpo.dpo_trainer import DPOTrainer, DPOTrainingArguments, pair_log_probs

    logging.getLogger("alignment").setLevel(logging.WARNING)
    config = llama_config(args, tensor_parallel_output=False)
    paddle.seed(args.seed)
    policy = LlamaForCausalLM(config)
    reference = LlamaForCausalLM(config)
    reference.set_state_dict(policy.state_dict())
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = DPOTrainingArguments(
            output_dir=output_dir, loss_type=args.loss_type, per_device_train_batch_size=args.batch_size,
            learning_rate=1e-6, max_steps=args.warmup + args.steps, report_to=[], disable_tqdm=True, seed=args.seed,
        )  # fmt: skip
        trainer = DPOTrainer(model=policy, args=training_args, reference_model=None if args.precompute else reference)
        trainer.create_optimizer_and_scheduler(num_training_steps=args.warmup + args.steps)
        model = trainer._wrap_model(trainer.model)
        records = []
        for _ in range(args.warmup + args.steps):
            batch = random_batch(args, rng)
            if args.precompute:
                with paddle.no_grad():
                    logps = pair_log_probs(reference, batch)
                batch["reference_chosen_logps"], batch["reference_rejected_logps"] = logps.chosen, logps.rejected
            start, cpu_start = time.perf_counter(), time.process_time()
            trainer.training_step(model, batch)
            backward_done = time.perf_counter()
            trainer.optimizer.step()
            trainer.optimizer.clear_grad()
            records.append((backward_done - start, time.perf_counter() - backward_done, time.process_time() - cpu_start))
    measured = records[args.warmup :]  # warm-up steps fill caches and pick kernels
    steps = [a + b for a, b, _ in measured]
    counts = {"policy": int(sum(np.prod(p.shape) for p in policy.parameters()))}
    if not args.precompute:
        counts["reference"] = int(sum(np.prod(p.shape) for p in reference.parameters()))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bound_mb = memory_lower_bound_bytes(counts["policy"], counts.get("reference", 0)) / 2**20
    result = {
        "median_step_s": statistics.median(steps),
        "forward_backward_s": statistics.median(a for a, _, _ in measured),
        "optimizer_s": statistics.median(b for _, b, _ in measured),
        "step_cpu_s": statistics.median(c for _, _, c in measured),  # process CPU time: less sensitive to load
        "pairs_per_s": args.batch_size / statistics.median(steps),
        "tokens_per_s": 2 * args.batch_size * (args.prompt_len + args.new_tokens) / statistics.median(steps),
        "peak_rss_mb": peak_rss_mb,
        "param_counts": counts,
        "memory_lower_bound_mb": bound_mb,
        "peak_rss_over_bound": peak_rss_mb / bound_mb,
        "threads": threads,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "config":
                value = json.dumps(value) if isinstance(value, dict) else value
                print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
