"""Rollout speed: paddlenlp ``generate`` ("plain") vs our accelerated backend, side by side in one process.

A random-weight Llama, a random left-padded prompt batch, sampling with top_p = 1 / top_k = 0, exactly
``--new-tokens`` new tokens per row (``stop_at_eos=False``). One warm-up run of each backend, then
``--repeats`` rounds alternating the two; tokens/s = batch * new tokens / seconds of the best round
(new tokens only; also reported per process-CPU-second). ``--cpu-path both`` adds the accelerated backend
with the portable CPU kernels forced (``ALIGNMENT_PORTABLE_CPU``, what an AVX2-only CPU runs) to the same
rounds; ``--cpu-path portable`` forces them for everything. Example (the reference configuration of
docs/benchmarks.md):

    python scripts/benchmark_rollout.py --vocab-size 8000 --hidden-size 256 --intermediate-size 688 \\
        --num-layers 4 --num-heads 4 --batch-size 8 --prompt-len 32 --new-tokens 64 --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from alignment.utils.benchmarking import add_shape_arguments, check_shape_arguments, llama_config
from alignment.utils.env import (
    PORTABLE_CPU_ENV,
    configure_cpu_threads,
    cpu_path_summary,
    cpu_supports_avx512f,
    enable_fast_mkl_on_amd,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "fast", "fused"], help="accelerated backend to compare"
    )
    parser.add_argument(
        "--cpu-path",
        default="auto",
        choices=["auto", "portable", "both"],
        help="CPU kernels: auto (AVX-512 ones where the CPU has them), portable (forced everywhere), or both "
        "(the accelerated backend once with each, side by side)",
    )
    parser.add_argument(
        "--no-mkl-avx2",
        action="store_true",
        help="do not set MKL_DEBUG_CPU_TYPE on AMD CPUs (both backends then use MKL's slow generic sgemm)",
    )
    args = parser.parse_args(argv)
    check_shape_arguments(parser, args, positive=("repeats",))
    return args


def build_inputs(args):
    """Random-weight LlamaForCausalLM and a left-padded prompt batch (row b has b % 4 pads)."""
    import paddle
    from paddlenlp.transformers import LlamaForCausalLM

    paddle.seed(args.seed)
    model = LlamaForCausalLM(llama_config(args))
    model.eval()
    pads = paddle.arange(args.batch_size).unsqueeze(1) % min(4, args.prompt_len)
    attention_mask = (paddle.arange(args.prompt_len).unsqueeze(0) >= pads).astype("int64")
    input_ids = paddle.randint(3, args.vocab_size, [args.batch_size, args.prompt_len])
    input_ids = paddle.where(attention_mask > 0, input_ids, paddle.zeros_like(input_ids))
    num_params = sum(int(p.numel()) for p in model.parameters())
    return model, input_ids, attention_mask, num_params


def run(args) -> dict:
    if args.cpu_path == "portable":  # before MKL's kernels are chosen: the portable path uses its AVX2 ones
        os.environ[PORTABLE_CPU_ENV] = "1"
    # MKL's kernels are fixed for the process at its first matmul: under --cpu-path both the portable
    # variant differs in the RMSNorm kernel only (run --cpu-path portable for MKL's AVX2 path too).
    mkl_avx2 = False if args.no_mkl_avx2 else enable_fast_mkl_on_amd()  # before the first matmul
    threads = configure_cpu_threads(args.threads)
    from alignment.ppo.infer_utils import generate_rollout

    model, input_ids, attention_mask, num_params = build_inputs(args)
    new_tokens = args.batch_size * args.new_tokens

    # name -> (backend, portable kernels forced for this variant)
    variants = {"plain": ("plain", False), "accelerated": (args.backend, False)}
    if args.cpu_path == "both":
        variants["accelerated_portable"] = (args.backend, True)

    def timed(variant: str) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one rollout."""
        backend, portable = variants[variant]
        if args.cpu_path != "portable":
            os.environ[PORTABLE_CPU_ENV] = "1" if portable else "0"
        start, start_cpu = time.perf_counter(), time.process_time()
        out = generate_rollout(
            model, input_ids, attention_mask, max_new_tokens=args.new_tokens, do_sample=True,
            eos_token_id=2, pad_token_id=0, backend=backend, stop_at_eos=False,
        )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        assert out.shape == [args.batch_size, args.prompt_len + args.new_tokens], out.shape
        return seconds, cpu_seconds

    for variant in variants:
        timed(variant)  # warm-up
    seconds = {variant: [] for variant in variants}
    cpu_seconds = {variant: [] for variant in variants}
    for _ in range(args.repeats):
        for variant in variants:
            wall, cpu = timed(variant)
            seconds[variant].append(wall)
            cpu_seconds[variant].append(cpu)
    plain_tps = new_tokens / min(seconds["plain"])
    fast_tps = new_tokens / min(seconds["accelerated"])
    result = {
        "config": {
            "vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size, "num_layers": args.num_layers,
            "num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads or args.num_heads,
            "batch_size": args.batch_size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "threads": threads, "seed": args.seed, "mkl_avx2": mkl_avx2,
            "mkl_cpu_type": os.environ.get("MKL_DEBUG_CPU_TYPE"),
            "num_params": num_params, "backend": args.backend, "cpu_path": args.cpu_path,
            "cpu_has_avx512f": cpu_supports_avx512f(),
            "accelerated_cpu_kernels": cpu_path_summary() if args.cpu_path != "both" else None,
        },
        "plain_tokens_per_s": round(plain_tps, 1),
        "accelerated_tokens_per_s": round(fast_tps, 1),
        "plain_tokens_per_s_median": round(new_tokens / statistics.median(seconds["plain"]), 1),
        "accelerated_tokens_per_s_median": round(new_tokens / statistics.median(seconds["accelerated"]), 1),
        "speedup": round(fast_tps / plain_tps, 2),
        # New tokens per process-CPU-second: less sensitive to other load on a shared machine.
        "plain_tokens_per_cpu_s": round(new_tokens / min(cpu_seconds["plain"]), 1),
        "accelerated_tokens_per_cpu_s": round(new_tokens / min(cpu_seconds["accelerated"]), 1),
    }
    if "accelerated_portable" in variants:
        portable_tps = new_tokens / min(seconds["accelerated_portable"])
        result["accelerated_portable_tokens_per_s"] = round(portable_tps, 1)
        result["accelerated_portable_tokens_per_cpu_s"] = round(new_tokens / min(cpu_seconds["accelerated_portable"]), 1)
        result["portable_speedup"] = round(portable_tps / plain_tps, 2)
        result["portable_over_default"] = round(portable_tps / fast_tps, 3)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        config = result["config"]
        print(" ".join(f"{key}={value}" for key, value in config.items()))
        print(f"plain (paddlenlp generate): {result['plain_tokens_per_s']:10.1f} new tokens/s")
        print(f"accelerated ({config['backend']}):      {result['accelerated_tokens_per_s']:10.1f} new tokens/s")
        print(f"speedup: {result['speedup']:.2f}x")
        if "portable_speedup" in result:
            print(f"accelerated, portable kernels: {result['accelerated_portable_tokens_per_s']:10.1f} new tokens/s "
                  f"(speedup {result['portable_speedup']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
