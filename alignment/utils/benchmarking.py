"""What the benchmark scripts share: the model-shape flags and the random Llama config they describe."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

__all__ = ["add_shape_arguments", "check_shape_arguments", "llama_config"]


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """``--vocab-size --hidden-size --intermediate-size --num-layers --num-heads --num-kv-heads
    --batch-size --prompt-len --new-tokens --threads --seed --json`` (defaults: the issue-6 reference shape)."""
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=None, help="GQA key/value heads (default: num-heads)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="CPU math threads (default: all cores owned)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def check_shape_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, positive: Sequence[str] = ()) -> None:
    """``parser.error`` for a non-positive size (the shape flags plus ``positive``) or heads not dividing hidden."""
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "batch_size",
             "prompt_len", "new_tokens", *positive)  # fmt: skip
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.hidden_size % args.num_heads:
        parser.error("--hidden-size must be a multiple of --num-heads")
    if args.num_kv_heads is not None and (args.num_kv_heads < 1 or args.num_heads % args.num_kv_heads):
        parser.error("--num-kv-heads must be >= 1 and divide --num-heads")


def llama_config(args: argparse.Namespace, **overrides: Any):
    """The ``LlamaConfig`` of the shape flags (positions for prompt + new tokens)."""
    from paddlenlp.transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads or args.num_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens + 1,
        **overrides,
    )
