"""Time Hugging Face TRL 0.11.4's ``PPOv2Trainer`` on the shape ``benchmark_ppo.py`` uses (the baseline).

PyTorch only (torch, transformers, trl; no paddle): random-weight ``LlamaForCausalLM`` policy and
reference (same weights), ``LlamaForSequenceClassification(num_labels=1)`` value and reward models of
the shape flags, ``--batch-size`` random prompts of ``--prompt-len`` tokens per step. PPOv2Config:
``num_ppo_epochs`` 1, ``num_mini_batches`` 1, ``per_device_train_batch_size`` = ``local_rollout_forward_batch_size``
= batch, ``response_length`` = ``--new-tokens``, temperature 1, no stop token, no evaluation or sample
generations. TRL clears the policy's EOS/pad ids before generating and the config has no EOS either, so
every response has exactly ``--new-tokens`` tokens (checked); the pad id lies outside the vocabulary,
so no generated token is ever masked.

Each PPO step is timed from the previous ``on_step_end`` callback (``on_train_begin`` for the first);
the first ``--warmup`` steps are dropped and the medians of the next ``--steps`` printed. The phases
are split by wrapping ``trl.trainer.ppov2_trainer.batch_generation`` (generation) and the first
training ``forward`` of a step (what lies between is experience: reference, value and reward forwards;
what follows is training: forward, backward, AdamW step and the step's logging). PPOv2Trainer also
calls ``gc.collect()`` twice per step, after the experience phase and after ``on_step_end`` (so the
second lands in the next step's interval, before its generation); with torch + transformers loaded each
call walks a few hundred thousand objects. Their time is ``gc_collect_s`` and is left out of the three
phases: ``median_step_s`` ~ ``generation_s + experience_s + train_s + gc_collect_s``.

    python scripts/benchmark_trl_ppo.py --num-heads 8 --steps 3 --json

TRL's experience phase differs from ours in what it computes: the policy's log-probs come from the
generation scores (no separate actor forward) and the reference computes logits at every position
before slicing the response ones. The step is still the same algorithm on the same shape.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alignment.utils.benchmarking import add_shape_arguments, add_step_arguments, check_shape_arguments  # noqa: E402  (no paddle import)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    add_step_arguments(parser)
    args = parser.parse_args(argv)
    check_shape_arguments(parser, args, positive=("steps",))
    return args


class PromptTokenizer:
    """Just enough tokenizer for PPOv2Trainer: pad/eos ids and the ``pad`` DataCollatorWithPadding calls."""

    def __init__(self, pad_token_id: int, eos_token_id: int) -> None:
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id

    def pad(self, features, return_tensors="pt", **_):
        import torch

        width = max(len(f["input_ids"]) for f in features)
        rows = [[self.pad_token_id] * (width - len(f["input_ids"])) + list(f["input_ids"]) for f in features]
        return {"input_ids": torch.tensor(rows, dtype=torch.long)}

    def batch_decode(self, sequences, **_):  # only used by sample generations, which are off
        return [" ".join(map(str, s.tolist())) for s in sequences]


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, TrainerCallback
    from transformers.utils import logging as hf_logging

    import trl
    import trl.trainer.ppov2_trainer as ppov2
    from trl import PPOv2Config, PPOv2Trainer

    hf_logging.set_verbosity_error()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or cores
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    # Ids the sampler can never produce: nothing is masked as padding and no response ends early.
    pad_id, eos_id = args.vocab_size, args.vocab_size + 1
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads or args.num_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens + 1,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, num_labels=1,
    )  # fmt: skip
    policy = LlamaForCausalLM(config)
    ref_policy = LlamaForCausalLM(config)
    ref_policy.load_state_dict(policy.state_dict())
    value_model = LlamaForSequenceClassification(config)
    reward_model = LlamaForSequenceClassification(config)
    total_steps = args.warmup + args.steps
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [
        {"input_ids": torch.randint(3, args.vocab_size, (args.prompt_len,), generator=generator).tolist()}
        for _ in range(args.batch_size * total_steps)
    ]

    marks: list[dict] = []  # one dict of perf_counter stamps per step

    def new_step(now: float) -> None:
        marks.append({"start": now})

    real_generation, real_forward = ppov2.batch_generation, ppov2.forward

    def timed_generation(*a, **k):
        out = real_generation(*a, **k)
        marks[-1]["generated"] = time.perf_counter()
        if out[0].shape[1] != args.prompt_len + args.new_tokens:
            raise RuntimeError(f"generated {out[0].shape[1] - args.prompt_len} tokens, expected {args.new_tokens}")
        return out

    def timed_forward(model, *a, **k):
        if model is not ref_policy and "train_start" not in marks[-1]:
            marks[-1]["train_start"] = time.perf_counter()
        return real_forward(model, *a, **k)

    real_gc = ppov2.gc

    def timed_collect(*a, **k):  # PPOv2Trainer calls gc.collect() twice per step, see the module docstring
        start = time.perf_counter()
        out = real_gc.collect(*a, **k)
        mark = marks[-1]
        phase = "gc_generation" if "generated" not in mark else "gc_experience" if "train_start" not in mark else "gc_train"
        mark[phase] = mark.get(phase, 0.0) + time.perf_counter() - start
        return out

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            new_step(time.perf_counter())

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            marks[-1]["end"] = now
            new_step(now)

    ppov2.batch_generation, ppov2.forward = timed_generation, timed_forward
    ppov2.gc = SimpleNamespace(collect=timed_collect)
    # TRL 0.11.4's PPOv2Trainer skips Trainer.__init__, so attributes transformers >= 4.47 added there are
    # missing (create_optimizer reads optimizer_cls_and_kwargs): give them their defaults.
    for name in ("optimizer_cls_and_kwargs",):
        if not hasattr(PPOv2Trainer, name):
            setattr(PPOv2Trainer, name, None)
    with tempfile.TemporaryDirectory() as output_dir:
        ppo_config = PPOv2Config(
            output_dir=output_dir, num_ppo_epochs=1, num_mini_batches=1, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, local_rollout_forward_batch_size=args.batch_size,
            response_length=args.new_tokens, total_episodes=args.batch_size * total_steps, temperature=1.0,
            stop_token=None, stop_token_id=None, num_sample_generations=0, report_to="none", save_strategy="no",
            eval_strategy="no", logging_steps=10**9, learning_rate=1e-6, seed=args.seed, use_cpu=True,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = PPOv2Trainer(
            config=ppo_config, tokenizer=PromptTokenizer(pad_id, eos_id), policy=policy, ref_policy=ref_policy,
            reward_model=reward_model, value_model=value_model, train_dataset=prompts, eval_dataset=prompts[:1],
            callbacks=[StepTimer()],
        )  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):  # TRL prints banners and per-step logs
            trainer.train()
    ppov2.batch_generation, ppov2.forward, ppov2.gc = real_generation, real_forward, real_gc

    steps = [m for m in marks if "end" in m]
    if len(steps) != total_steps:
        raise RuntimeError(f"TRL ran {len(steps)} PPO steps, expected {total_steps}")
    measured = steps[args.warmup :]

    def median(first: str, last: str, gc_key: str) -> float:
        """Median time from stamp ``first`` to ``last`` without the gc.collect() calls in between."""
        return statistics.median(m[last] - m[first] - m.get(gc_key, 0.0) for m in measured)

    generation = median("start", "generated", "gc_generation")
    result = {
        "median_step_s": statistics.median(m["end"] - m["start"] for m in measured),
        "generation_s": generation,
        "experience_s": median("generated", "train_start", "gc_experience"),
        "train_s": median("train_start", "end", "gc_train"),
        "gc_collect_s": statistics.median(sum(v for k, v in m.items() if k.startswith("gc_")) for m in measured),
        "rollout_tokens_per_s": args.batch_size * args.new_tokens / generation,
        "steps": len(measured),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": {"torch": torch.__version__, "trl": trl.__version__, "transformers": _transformers_version()},
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key not in ("config", "versions"):
                print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    return result


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main(sys.argv[1:])
