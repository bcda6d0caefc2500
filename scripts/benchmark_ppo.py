"""Time a whole PPO step split into generation, experience and training, plus peak memory.

Random-weight actor/reference (``LlamaForCausalLM``) and critic/reward (``LlamaModelForScore``) of
the given shape; ``--batch-size`` prompts of ``--prompt-len`` tokens per step, one sample per
prompt, exactly ``--new-tokens`` generated (the EOS id is outside the vocabulary), ``update_iters``
1, one optimizer step for the actor and one for the critic per PPO step. The first ``--warmup`` steps
(default 1) are untimed; the medians of the next ``--steps`` are reported. Example (docs/benchmarks.md):

    python scripts/benchmark_ppo.py --vocab-size 8000 --hidden-size 256 --intermediate-size 688 \\
        --num-layers 4 --num-heads 4 --batch-size 8 --prompt-len 32 --new-tokens 64 --steps 5 --json

``--algorithm grpo`` (or another critic-free ``rl_algorithm``) times the same step without a critic:
``--batch-size`` rows are ``--batch-size / --samples`` prompts x ``--samples`` responses (default 2 for
the group estimators), scored by the random reward model; one optimizer step for the actor only.

Next to the times the report has the achieved GFLOP/s of each phase (``alignment.utils.benchmarking.
ppo_phase_flops`` / seconds) and the machine's fp32 GEMM peak (``gemm_peak_gflops``), the parameter
counts, the fp32 memory lower bound (weights, gradients and AdamW moments of the trained models,
weights of the frozen ones) and peak RSS over it. ``--warmup N`` untimed steps come first (default 1).

``--compare-trl`` then runs ``scripts/benchmark_trl_ppo.py`` (Hugging Face TRL 0.11.4's
``PPOv2Trainer``, PyTorch) in a subprocess on the same shape, steps and threads and adds its JSON as
``trl`` and ``ours_over_trl`` (our median step / TRL's; also without TRL's per-step ``gc.collect()``
time, and per phase). ``--cpu-path portable`` runs ours with
``ALIGNMENT_PORTABLE_CPU=1`` and TRL with ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
DNNL_MAX_CPU_ISA=AVX2``, so both sides run AVX2-only code:

    python scripts/benchmark_ppo.py --num-heads 8 --steps 3 --compare-trl --cpu-path portable --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from types import SimpleNamespace

from alignment.utils.benchmarking import (
    ModelShape,
    add_shape_arguments,
    add_step_arguments,
    check_shape_arguments,
    llama_config,
    measure_gemm_peak,
    memory_lower_bound_bytes,
    ppo_phase_flops,
)
from alignment.utils.env import PORTABLE_CPU_ENV  # alignment.utils.env imports paddle lazily

TRL_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_trl_ppo.py")
TRL_MISSING = "--compare-trl needs trl and torch in {python}: pip install trl==0.11.4 torch"
# What makes PyTorch (ATen's dispatch, MKL's sgemm, oneDNN) run AVX2 code only: --cpu-path portable.
TORCH_AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    add_step_arguments(parser)
    parser.add_argument("--backend", default="auto", choices=["auto", "fast", "plain", "fused"], help="rollout backend")
    parser.add_argument(
        "--algorithm", default="ppo", choices=["ppo", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"],
        help="rl_algorithm: ppo trains a critic, the others do not",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=None, help="responses per prompt (default 1; 2 for grpo/rloo)")
    parser.add_argument(
        "--rollout-log-probs", action="store_true",
        help="rollout_log_probs: old_log_probs from the rollout decoder, no actor forward in the experience phase",
    )  # fmt: skip
    parser.add_argument(
        "--compare-trl", action="store_true",
        help="also time TRL 0.11.4's PPOv2Trainer on the same shape (scripts/benchmark_trl_ppo.py, needs trl + torch)",
    )  # fmt: skip
    parser.add_argument(
        "--cpu-path", default="auto", choices=["auto", "portable"],
        help="portable: ALIGNMENT_PORTABLE_CPU=1 for ours and AVX2-only PyTorch for TRL",
    )  # fmt: skip
    parser.add_argument("--gemm-size", type=int, default=2048, help="square fp32 matmul timed for gemm_peak_gflops (0: skip)")
    parser.add_argument("--trl-python", default=sys.executable, help=argparse.SUPPRESS)  # interpreter for the TRL run
    args = parser.parse_args(argv)
    check_shape_arguments(parser, args, positive=("steps",))
    if args.gemm_size < 0:
        parser.error("--gemm-size must be >= 0")
    if args.compare_trl and args.algorithm != "ppo":
        parser.error("--compare-trl times TRL's PPOv2Trainer: it needs --algorithm ppo")
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
    """``(trainer, models)``: the PPO (or critic-free) trainer and ``{"actor", "reference", "critic",
    "reward"}`` models (``critic`` None for critic-free algorithms)."""
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
        rollout_log_probs=args.rollout_log_probs,
        num_return_sequences=args.samples,
        per_device_prompt_batch_size=prompts_per_step,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
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
    prompts = RandomPrompts(prompts_per_step * (args.warmup + args.steps), args.prompt_len, args.vocab_size, args.seed)
    models = {"actor": actor, "reference": reference, "critic": critic, "reward": reward}
    if critic is None:
        from alignment.ppo.critic_free_trainer import CriticFreeTrainer

        return CriticFreeTrainer(
            training_args, StepTrainer(actor, training_args, name="actor"), reference_model=reference, reward_model=reward,
            tokenizer=tokenizer, reward_tokenizer=tokenizer, train_dataset=prompts, rollout=rollout,
        ), models  # fmt: skip
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
    ), models


def parameter_count(model) -> int:
    """Number of scalars in ``model.parameters()`` (0 for None)."""
    import numpy as np

    return 0 if model is None else int(sum(np.prod(p.shape) for p in model.parameters()))


def trl_available(python: str) -> bool:
    """Whether ``python`` can import torch, transformers and trl (find_spec in that interpreter)."""
    code = ("import importlib.util, sys; "
            "sys.exit(0 if all(importlib.util.find_spec(m) for m in ('torch', 'transformers', 'trl')) else 3)")  # fmt: skip
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_trl(args: argparse.Namespace, threads: int) -> dict:
    """The JSON of scripts/benchmark_trl_ppo.py on our shape, steps, warm-up and threads."""
    shape = ["--vocab-size", args.vocab_size, "--hidden-size", args.hidden_size, "--intermediate-size",
             args.intermediate_size, "--num-layers", args.num_layers, "--num-heads", args.num_heads,
             "--batch-size", args.batch_size, "--prompt-len", args.prompt_len, "--new-tokens", args.new_tokens,
             "--steps", args.steps, "--warmup", args.warmup, "--threads", threads, "--seed", args.seed]  # fmt: skip
    if args.num_kv_heads:
        shape += ["--num-kv-heads", args.num_kv_heads]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if args.cpu_path == "portable":
        env.update(TORCH_AVX2_ENV)
    result = subprocess.run(
        [args.trl_python, TRL_SCRIPT, *map(str, shape), "--json"], capture_output=True, text=True, env=env
    )  # fmt: skip
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-5000:])
        raise SystemExit(f"benchmark_ppo.py: the TRL run failed (exit {result.returncode}), its stderr is above")
    trl = json.loads(result.stdout.strip().splitlines()[-1])
    if args.cpu_path == "portable":
        trl["env"] = dict(TORCH_AVX2_ENV)
    return trl


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cpu_path == "portable":
        os.environ[PORTABLE_CPU_ENV] = "1"  # before any alignment kernel is chosen
    if args.compare_trl and not trl_available(args.trl_python):
        print(f"benchmark_ppo.py: {TRL_MISSING.format(python=args.trl_python)}", file=sys.stderr)
        raise SystemExit(2)
    from alignment.utils.env import avx512_kernels_enabled, cpu_path_summary, setup_cpu_runtime

    threads = setup_cpu_runtime(args.threads)
    import logging

    logging.getLogger("alignment").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, models = build_trainer(args, output_dir)
        # the actor's experience forward doubles as its update forward (one pass, one micro-batch)
        reused = not args.rollout_log_probs and trainer.first_update_reuses_experience(args.batch_size)
        records = []
        trainer.flush_logs = lambda force=False: None  # keep the per-step records for us
        for _ in range(args.warmup + args.steps):
            batch = next(iter(trainer.prompt_loader))
            trainer.train_on_rollout(batch)
            trainer.state.rollouts += 1
            records.append(trainer._pending.pop())
    measured = records[args.warmup :]  # warm-up steps fill caches and pick kernels
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def median(key: str) -> float:
        return statistics.median(r[key] for r in measured)

    generation, experience, train = (
        median("train/generation_seconds"), median("train/experience_seconds"), median("train/update_seconds")
    )  # fmt: skip
    steps = [r["train/generation_seconds"] + r["train/experience_seconds"] + r["train/update_seconds"] for r in measured]
    step = statistics.median(steps)
    counts = {name: parameter_count(model) for name, model in models.items() if model is not None}
    trained = counts["actor"] + counts.get("critic", 0)
    bound_mb = memory_lower_bound_bytes(trained, sum(counts.values()) - trained) / 2**20
    flops = ppo_phase_flops(ModelShape.from_args(args), args.batch_size, args.prompt_len, args.new_tokens,
                            critic=models["critic"] is not None, actor_experience=not args.rollout_log_probs,
                            reused_actor_forward=reused)  # fmt: skip
    result = {
        "median_step_s": step,
        "generation_s": generation,
        "experience_s": experience,
        "train_s": train,
        "generation_share": generation / step,
        "rollout_tokens_per_s": args.batch_size * args.new_tokens / generation,
        "phase_gflop": {phase: value / 1e9 for phase, value in flops.items()},
        "generation_gflops": flops["generation"] / 1e9 / generation,
        "experience_gflops": flops["experience"] / 1e9 / experience,
        "train_gflops": flops["training"] / 1e9 / train,
        "step_gflops": sum(flops.values()) / 1e9 / step,
        "gemm_peak_gflops": measure_gemm_peak(threads, size=args.gemm_size) if args.gemm_size else None,
        "peak_rss_mb": peak_rss_mb,
        "param_counts": counts,
        "memory_lower_bound_mb": bound_mb,
        "peak_rss_over_bound": peak_rss_mb / bound_mb,
        "threads": threads,
        "reused_actor_forward": reused,
        "cpu_path": args.cpu_path,
        "avx512_kernels_enabled": avx512_kernels_enabled(),
        "cpu_kernels": cpu_path_summary(),
        "mkl_cpu_type": os.environ.get("MKL_DEBUG_CPU_TYPE"),  # MKL's kernels on AMD: 7 AVX-512, 5 AVX2
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "trl_python")},
    }
    deviations = [r["train/rollout_ratio_deviation"] for r in measured if "train/rollout_ratio_deviation" in r]
    if deviations:  # --rollout-log-probs: how far the first update's PPO ratio is from 1
        result["rollout_ratio_deviation_max"] = max(deviations)
    if args.compare_trl:
        result["trl"] = run_trl(args, threads)
        trl = result["trl"]
        result["ours_over_trl"] = step / trl["median_step_s"]
        # TRL spends part of every step in gc.collect() (see benchmark_trl_ppo.py); its phases exclude it
        result["ours_over_trl_without_gc"] = step / (trl["median_step_s"] - trl.get("gc_collect_s", 0.0))
        result["ours_over_trl_phases"] = {
            phase: result[key] / trl[key] for phase, key in
            (("generation", "generation_s"), ("experience", "experience_s"), ("train", "train_s")) if trl.get(key)
        }  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key == "config":
                continue
            if isinstance(value, dict):
                value = json.dumps(value)
            print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
