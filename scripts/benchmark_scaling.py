"""Run benchmark_ppo.py / benchmark_dpo.py over a grid of model sizes, response lengths, batch sizes and
algorithms, one fresh process per configuration (so each row's ``peak_rss_mb`` is its own), and write
one JSON line per configuration to ``--out`` as soon as it finishes (a partial run keeps its rows).
At the end a markdown table of the rows of this run is printed.

Model size presets (parameters of one ``LlamaForCausalLM``; the critic/reward models have a score head
instead of the LM head, ``alignment.utils.benchmarking.llama_param_count``):

* ``7M``: the reference shape, vocab 8000, hidden 256, intermediate 688, 4 layers, 8 heads: 7,260,416;
* ``30M``: vocab 8000, hidden 512, intermediate 1376, 7 layers, 8 heads: 30,334,464;
* ``110M``: vocab 16000, hidden 768, intermediate 2048, 12 layers, 12 heads: 109,529,856.

Algorithms: ``ppo`` and ``grpo`` (and the other critic-free ones) run ``benchmark_ppo.py --algorithm``;
``dpo`` runs ``benchmark_dpo.py`` (``--batch-size`` pairs of prompt + ``--new-tokens`` response tokens).

    python scripts/benchmark_scaling.py --sizes 7M,30M --new-tokens 64,256 --batches 8 \\
        --algorithms ppo,grpo,dpo --steps 3 --out scaling.jsonl

Big configurations (110M, 1024 tokens) take minutes per step on 2 cores: use ``--steps 1 --warmup 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alignment.utils.benchmarking import ModelShape, llama_param_count  # noqa: E402  (no paddle import)

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
# name -> (vocab, hidden, intermediate, layers, heads); "tiny" is for the tests and not advertised.
PRESETS = {
    "tiny": (300, 32, 64, 2, 4),
    "7M": (8000, 256, 688, 4, 8),
    "30M": (8000, 512, 1376, 7, 8),
    "110M": (16000, 768, 2048, 12, 12),
}
PPO_FAMILY = ("ppo", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")


def csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=csv(str), default=["7M", "30M", "110M"], help="comma list of 7M, 30M, 110M")
    parser.add_argument("--new-tokens", type=csv(int), default=[64, 256, 1024], help="comma list of response lengths")
    parser.add_argument("--batches", type=csv(int), default=[8], help="comma list of batch sizes (rows per step)")
    parser.add_argument("--algorithms", type=csv(str), default=["ppo", "grpo", "dpo"],
                        help="comma list of ppo, grpo (other critic-free rl_algorithms too) and dpo")  # fmt: skip
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration (0 for big ones)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gemm-size", type=int, default=2048, help="passed to benchmark_ppo.py (gemm_peak_gflops)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per configuration (default: none)")
    parser.add_argument("--out", default="benchmark_scaling.jsonl", help="JSONL file the rows are appended to")
    parser.add_argument("--table", action="store_true", help="only print the markdown table of the rows in --out")
    args = parser.parse_args(argv)
    for size in args.sizes:
        if size not in PRESETS:
            parser.error(f"--sizes: unknown preset {size!r} (choose from 7M, 30M, 110M)")
    for algorithm in args.algorithms:
        if algorithm not in PPO_FAMILY + ("dpo",):
            parser.error(f"--algorithms: unknown {algorithm!r} (choose from {', '.join(PPO_FAMILY + ('dpo',))})")
    if min(args.new_tokens + args.batches + [args.steps, args.prompt_len]) < 1 or args.warmup < 0:
        parser.error("--new-tokens, --batches, --steps and --prompt-len must be >= 1, --warmup >= 0")
    return args


def command(args: argparse.Namespace, size: str, new_tokens: int, batch: int, algorithm: str) -> list[str]:
    vocab, hidden, intermediate, layers, heads = PRESETS[size]
    flags = ["--vocab-size", vocab, "--hidden-size", hidden, "--intermediate-size", intermediate, "--num-layers", layers,
             "--num-heads", heads, "--batch-size", batch, "--prompt-len", args.prompt_len, "--new-tokens", new_tokens,
             "--steps", args.steps, "--warmup", args.warmup, "--json"]  # fmt: skip
    if args.threads:
        flags += ["--threads", args.threads]
    if algorithm == "dpo":
        script = "benchmark_dpo.py"
    else:
        script = "benchmark_ppo.py"
        flags += ["--algorithm", algorithm, "--gemm-size", args.gemm_size]
    return [sys.executable, os.path.join(SCRIPTS, script), *map(str, flags)]


def run_one(args: argparse.Namespace, size: str, new_tokens: int, batch: int, algorithm: str) -> dict:
    """One configuration in a fresh process: the row written to ``--out``."""
    shape = ModelShape(*PRESETS[size][:4], PRESETS[size][4], PRESETS[size][4])
    row = {"size": size, "params_per_model": llama_param_count(shape), "new_tokens": new_tokens, "batch": batch,
           "algorithm": algorithm, "prompt_len": args.prompt_len}  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(command(args, size, new_tokens, batch, algorithm), capture_output=True, text=True,
                              timeout=args.timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        row.update(ok=False, error=f"timed out after {args.timeout} s")
    else:
        if done.returncode == 0:
            row.update(ok=True, result=json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            row.update(ok=False, error=f"exit {done.returncode}: " + done.stderr.strip()[-1500:])
    row["wall_s"] = time.perf_counter() - start
    return row


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (failed configurations show their error's last line)."""
    lines = [
        "| size (params/model) | new tokens | batch | algorithm | step s | gen / exp / train s | GFLOP/s gen / exp / train "
        "| peak RSS MB | lower bound MB | RSS / bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        params = row["params_per_model"]
        params = f"{params / 1e6:.1f}M" if params >= 1e6 else f"{params:,}"
        head = f"| {row['size']} ({params}) | {row['new_tokens']} | {row['batch']} | {row['algorithm']}"
        if not row.get("ok"):
            lines.append(f"{head} | failed: {row['error'].splitlines()[-1][:80]} | | | | | |")
            continue
        r = row["result"]
        if row["algorithm"] == "dpo":  # no generation or experience phase; forward + backward + AdamW is training
            times, gflops = f"- / - / {_fmt(r['median_step_s'])}", "- / - / -"
        else:
            times = " / ".join(_fmt(r[key]) for key in ("generation_s", "experience_s", "train_s"))
            gflops = " / ".join(_fmt(r[key], 1) for key in ("generation_gflops", "experience_gflops", "train_gflops"))
        lines.append(f"{head} | {_fmt(r['median_step_s'])} | {times} | {gflops} | {r['peak_rss_mb']:.0f} "
                     f"| {r['memory_lower_bound_mb']:.0f} | {_fmt(r['peak_rss_over_bound'])} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.table:
        with open(args.out, encoding="utf-8") as out:
            rows = [json.loads(line) for line in out if line.strip()]
        print(markdown_table(rows))
        return rows
    rows = []
    grid = [(s, n, b, a) for s in args.sizes for n in args.new_tokens for b in args.batches for a in args.algorithms]
    for index, config in enumerate(grid, 1):
        print(f"[{index}/{len(grid)}] size {config[0]}, {config[1]} new tokens, batch {config[2]}, {config[3]}",
              file=sys.stderr, flush=True)  # fmt: skip
        row = run_one(args, *config)
        with open(args.out, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")
        rows.append(row)
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
