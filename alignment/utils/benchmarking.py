"""What the benchmark scripts share: the model-shape flags and the random Llama config they describe, and
the arithmetic their reports are built from (FLOPs per phase, parameter counts, a memory lower bound,
the machine's fp32 GEMM peak).

The FLOP functions count multiply-adds of the matrix products only, as 2 FLOPs each: the weight
matmuls (q, k, v, o, gate, up, down, LM/score head) and the two attention products (Q.K^T and
attention.V). Embedding lookups, RMSNorm, RoPE, softmax, SiLU, the loss and AdamW are left out (they
are O(tokens x hidden), a few percent at these shapes). Nothing here imports paddle at module level.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "ModelShape",
    "add_shape_arguments",
    "add_step_arguments",
    "check_shape_arguments",
    "forward_flops",
    "llama_config",
    "llama_param_count",
    "measure_gemm_peak",
    "memory_lower_bound_bytes",
    "ppo_phase_flops",
]


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


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """``--steps`` (timed steps, default 5) and ``--warmup`` (untimed steps before them, default 1) of the
    step benchmarks; :func:`check_shape_arguments` checks them."""
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones (default 1)")


def check_shape_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, positive: Sequence[str] = ()) -> None:
    """``parser.error`` for a non-positive size (the shape flags plus ``positive``), heads not dividing
    hidden, or a negative ``--warmup``."""
    if getattr(args, "warmup", 0) < 0:
        parser.error("--warmup must be >= 0")
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


@dataclass(frozen=True)
class ModelShape:
    """A Llama decoder's sizes: ``vocab`` tokens, ``hidden`` model width, ``intermediate`` MLP width,
    ``layers`` decoder layers, ``heads`` query heads and ``kv_heads`` key/value heads (GQA; = heads for MHA)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelShape":
        """The shape of the :func:`add_shape_arguments` flags."""
        return cls(args.vocab_size, args.hidden_size, args.intermediate_size, args.num_layers, args.num_heads,
                   args.num_kv_heads or args.num_heads)  # fmt: skip

    @property
    def kv_width(self) -> int:
        """Width of the key (and of the value) projection: ``kv_heads * hidden / heads``."""
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matmuls: q and o ``hidden^2`` each, k and v ``hidden x kv_width`` each,
        gate, up and down ``hidden x intermediate`` each (no biases in Llama)."""
        return 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_width + 3 * self.hidden * self.intermediate


def llama_param_count(shape: ModelShape, head: str = "lm") -> int:
    """Parameters of a Llama model of ``shape``: token embedding ``vocab x hidden``, per layer the matmul
    weights (:attr:`ModelShape.layer_matmul_params`) and two RMSNorm scales, the final RMSNorm, and the head:
    ``"lm"`` an untied LM head ``hidden x vocab`` (``LlamaForCausalLM``), ``"score"`` a ``hidden x 1`` score
    head with a bias (``LlamaModelForScore``), ``"none"`` the bare backbone."""
    heads = {"lm": shape.hidden * shape.vocab, "score": shape.hidden + 1, "none": 0}
    if head not in heads:
        raise ValueError(f"head must be one of {sorted(heads)}, got {head!r}")
    per_layer = shape.layer_matmul_params + 2 * shape.hidden
    return shape.vocab * shape.hidden + shape.layers * per_layer + shape.hidden + heads[head]


def forward_flops(shape: ModelShape, rows: int, seq_len: int, head_positions: int, head_out: int | None = None,
                  context_len: int | None = None) -> int:  # fmt: skip
    """FLOPs of one forward pass of ``rows`` sequences of ``seq_len`` new tokens each.

    * weight matmuls: ``2 * rows * seq_len * layers * layer_matmul_params``;
    * attention: each of the ``seq_len`` queries against ``context_len`` keys (default ``seq_len``), per
      layer ``2 * rows * seq_len * context_len * hidden`` for Q.K^T and the same for attention.V. This is
      the **full** ``seq_len x context_len`` product, what the kernels compute (the causal mask is
      applied to the full score matrix), not the causal half;
    * head: ``2 * rows * head_positions * hidden * head_out`` (``head_out`` defaults to ``vocab``: an LM
      head on ``head_positions`` positions per row; pass 1 for a score head).

    A decode step with a KV cache is ``seq_len=1, context_len=<cache columns attended>``.
    """
    context_len = seq_len if context_len is None else context_len
    head_out = shape.vocab if head_out is None else head_out
    tokens = rows * seq_len
    matmuls = 2 * tokens * shape.layers * shape.layer_matmul_params
    attention = shape.layers * 2 * (2 * tokens * context_len * shape.hidden)
    head = 2 * rows * head_positions * shape.hidden * head_out
    return matmuls + attention + head


def ppo_phase_flops(shape: ModelShape, rows: int, prompt_len: int, new_tokens: int, critic: bool = True,
                    decode_context: str = "full", actor_experience: bool = True,
                    reused_actor_forward: bool = False) -> dict[str, int]:  # fmt: skip
    """FLOPs of one PPO step's phases on ``rows`` sequences of ``prompt_len`` + ``new_tokens`` tokens,
    all four models (actor, reference, critic, reward) of the same ``shape``.

    * ``generation``: prefill (``prompt_len`` tokens, LM head on the last position) plus
      ``new_tokens - 1`` decode steps (one token each, LM head on it; the first new token comes from the
      prefill). ``decode_context="full"`` counts each decode step's attention over all
      ``prompt_len + new_tokens`` cache columns (our KV decoder attends over the whole preallocated
      cache under a mask); ``"causal"`` over the columns written so far (``prompt_len + t + 1`` at
      step ``t``, what Hugging Face's dynamic cache computes).
    * ``experience``: actor and reference forwards with the LM head on the ``new_tokens`` response
      positions only, reward (and with ``critic``, critic) forwards with a score head on every position;
      ``actor_experience=False`` (``rollout_log_probs``: the rollout's own log-probs) drops the actor's.
      ``reused_actor_forward`` (``first_update_reuses_experience``): the actor's experience forward is
      also its update forward, so training counts only its backward (2x the forward) for the actor.
    * ``training``: forward + backward = 3x the forward FLOPs (the backward computes gradients for the
      activations and for the weights, each as costly as the forward) for the actor (LM head on the
      response positions) and with ``critic`` for the critic; critic-free algorithms train the actor only.
    """
    if decode_context not in ("full", "causal"):
        raise ValueError(f"decode_context must be 'full' or 'causal', got {decode_context!r}")
    total = prompt_len + new_tokens
    generation = forward_flops(shape, rows, prompt_len, head_positions=1)
    for step in range(1, new_tokens):
        context = total if decode_context == "full" else prompt_len + step + 1
        generation += forward_flops(shape, rows, 1, head_positions=1, context_len=context)
    actor = forward_flops(shape, rows, total, head_positions=new_tokens)
    scorer = forward_flops(shape, rows, total, head_positions=total, head_out=1)
    experience = (2 if actor_experience else 1) * actor + (2 if critic else 1) * scorer
    training = (2 if reused_actor_forward else 3) * actor + (3 * scorer if critic else 0)
    return {"generation": generation, "experience": experience, "training": training}


def memory_lower_bound_bytes(n_trained_params: int, n_frozen_params: int) -> int:
    """Bytes a step cannot do without, fp32: every trained parameter holds its weight, its gradient and
    AdamW's two moments (4 x 4 bytes), every frozen one its weight (4 bytes). Activations, the KV cache,
    the runtime and allocator slack come on top, so peak RSS / this bound >= 1."""
    return 16 * n_trained_params + 4 * n_frozen_params


def measure_gemm_peak(threads: int | None = None, size: int = 2048, repeats: int = 3) -> float:
    """The best fp32 GFLOP/s of a ``size x size @ size x size`` ``paddle.matmul`` over ``repeats`` timed
    runs after one warm-up: ``2 * size^3 / seconds``. ``threads`` sets Paddle's CPU math threads first
    (``paddle.base.core.set_num_threads``); None keeps the current setting. Run it after
    ``setup_cpu_runtime`` so the same MKL code path as the benchmark is measured."""
    import paddle

    if threads is not None:
        from paddle.base import core

        core.set_num_threads(threads)
    a = paddle.randn([size, size], dtype="float32")
    b = paddle.randn([size, size], dtype="float32")
    paddle.matmul(a, b).numpy()  # warm-up (and, on CPU, a synchronous result)
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        paddle.matmul(a, b)  # CPU kernels run synchronously: the product is done when the call returns
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
