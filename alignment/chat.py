"""Chat with a policy: ``python -m alignment.chat --model_name_or_path output_dir/policy``.

Interactive by default: each line read from standard input is a user turn; the conversation so far is
rendered with the chat template (``--chat_template``, the same one the stages train with) and answered
with the fast rollout (``alignment.ppo.infer_utils.generate_rollout``). ``/reset`` starts a new
conversation, ``/exit`` (or end of input) quits. Batch mode: ``--prompt TEXT`` (repeatable) and/or
``--file prompts.jsonl|.txt`` answer each prompt as a one-turn conversation and write one JSON line per
answer to ``--output`` (default standard output). ``--reward_model`` / ``--cost_model`` score every
answer and print the scores next to it (JSON fields ``reward`` / ``cost``).

Models may be our checkpoints or Hugging Face directories (converted once, see docs/models.md).
Every argument is checked before any weights load; a problem is reported as one message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, TextIO

__all__ = ["parse_args", "ChatSession", "load_session", "respond", "read_prompt_file", "run_batch", "run_interactive", "main"]

RESET_COMMAND, EXIT_COMMANDS = "/reset", ("/exit", "/quit")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m alignment.chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_name_or_path", required=True, help="policy (causal LM) directory, ours or Hugging Face")
    parser.add_argument("--tokenizer_name_or_path", default=None, help="tokenizer directory (default: the model's)")
    parser.add_argument("--chat_template", default="beaver", help="beaver, tokenizer or a jinja file (as the stages)")
    parser.add_argument("--system_prompt", default=None, help="system message (jinja templates only)")
    parser.add_argument("--prompt", action="append", default=[], help="batch mode: a prompt (repeatable)")
    parser.add_argument("--file", default=None, help="batch mode: .jsonl (field 'prompt' or 'input') or .txt (one per line)")
    parser.add_argument("--output", default=None, help="JSONL file for the answers (batch: default standard output)")
    parser.add_argument("--reward_model", default=None, help="score model: print its reward next to each answer")
    parser.add_argument("--cost_model", default=None, help="score model: print its cost next to each answer")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=8, help="batch mode: prompts per generation call")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--backend", default="auto", choices=["auto", "fast", "plain", "fused"], help="rollout backend")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check every argument (paths, ranges, template) before anything heavy is imported."""
    parser = _parser()
    args = parser.parse_args(argv)
    from alignment.data.chat_template import check_chat_template_argument
    from alignment.utils.config import Problems

    problems = Problems()
    for name in ("model_name_or_path", "tokenizer_name_or_path", "reward_model", "cost_model"):
        value = getattr(args, name)
        if value is not None and not os.path.isdir(os.path.expanduser(value)):
            problems.add(name, f"no such directory: {value!r}")
    if args.file is not None and not os.path.isfile(args.file):
        problems.add("file", f"no such file: {args.file!r}")
    problems.check(args.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {args.max_new_tokens}")
    problems.check(args.temperature >= 0, "temperature", f"must be >= 0, got {args.temperature}")
    problems.check(0 < args.top_p <= 1, "top_p", f"must be in (0, 1], got {args.top_p}")
    problems.check(args.top_k >= 0, "top_k", f"must be >= 0, got {args.top_k}")
    problems.check(args.repetition_penalty > 0, "repetition_penalty", f"must be > 0, got {args.repetition_penalty}")
    problems.check(args.batch_size >= 1, "batch_size", f"must be >= 1, got {args.batch_size}")
    check_chat_template_argument(problems, args.chat_template, args.system_prompt)
    if problems:
        parser.error("; ".join(problems.items))
    return args


@dataclass
class ChatSession:
    """A loaded policy with its tokenizer, template and generation settings, plus optional scorers."""

    model: Any
    tokenizer: Any
    template: Any
    generation: dict[str, Any]
    scorers: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # "reward"/"cost" -> (model, tokenizer)
    max_positions: Optional[int] = None


def load_session(args: argparse.Namespace) -> ChatSession:
    """Load the policy (and scorers); Hugging Face directories are converted first."""
    import paddle
    from paddlenlp.transformers import AutoModelForCausalLM

    from alignment.data import load_chat_template, load_tokenizer
    from alignment.models import AutoModelForScore
    from alignment.models.hf_convert import resolve_pretrained_dir

    paddle.seed(args.seed)
    model_dir = resolve_pretrained_dir(os.path.expanduser(args.model_name_or_path))
    tokenizer = load_tokenizer(resolve_pretrained_dir(args.tokenizer_name_or_path) or model_dir, padding_side="left")
    template = load_chat_template(args.chat_template, tokenizer, args.system_prompt)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    scorers = {}
    for kind, path in (("reward", args.reward_model), ("cost", args.cost_model)):
        if path:
            score_dir = resolve_pretrained_dir(os.path.expanduser(path))
            scorer = AutoModelForScore.from_pretrained(score_dir, score_type=kind)
            scorer.eval()
            scorers[kind] = (scorer, load_tokenizer(score_dir, padding_side="right"))
    generation = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=max(args.temperature, 1e-6),
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        backend=args.backend,
    )
    return ChatSession(model, tokenizer, template, generation, scorers, getattr(model.config, "max_position_embeddings", None))


def _fit_context(session: ChatSession, turns: list[str]) -> list[str]:
    """Drop the oldest exchanges until prompt + max_new_tokens fits the model's positions."""
    from alignment.data.chat_template import encode_prompt

    limit, budget = session.max_positions, session.generation["max_new_tokens"]
    while limit and len(turns) > 1 and len(encode_prompt(session.template, session.tokenizer, turns)) + budget > limit:
        turns = turns[2:]
    return turns


def respond(session: ChatSession, conversations: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """Answer each conversation (odd number of turns, user last) in one generation call.

    Returns per conversation ``{"response", "num_tokens"}`` plus ``"reward"`` / ``"cost"`` when scorers
    are loaded. A prompt longer than the model's positions gets ``"error"`` instead.
    """
    import numpy as np
    import paddle

    from alignment.data.base import left_padding, length_mask
    from alignment.data.chat_template import encode_prompt
    from alignment.models.ppo_model_utils import make_rollout_attention_mask
    from alignment.ppo.eval_utils import score_sequences
    from alignment.ppo.infer_utils import generate_rollout

    tokenizer = session.tokenizer
    results: list[Optional[dict[str, Any]]] = [None] * len(conversations)
    prompts, rows = [], []
    for index, turns in enumerate(conversations):
        ids = encode_prompt(session.template, tokenizer, list(turns))
        if session.max_positions and len(ids) + session.generation["max_new_tokens"] > session.max_positions:
            results[index] = {
                "error": f"prompt of {len(ids)} tokens + max_new_tokens {session.generation['max_new_tokens']} exceeds "
                f"the model's {session.max_positions} positions"
            }
            continue
        prompts.append(ids)
        rows.append(index)
    if prompts:
        input_ids = paddle.to_tensor(left_padding(prompts, tokenizer.pad_token_id))
        attention_mask = paddle.to_tensor(length_mask(prompts, left=True))
        with paddle.no_grad():
            sequences = generate_rollout(
                session.model, input_ids, attention_mask, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **session.generation,
            )  # fmt: skip
            mask = make_rollout_attention_mask(attention_mask, sequences, tokenizer.eos_token_id)
            scores = {
                kind: score_sequences(scorer, sequences, mask, tokenizer, scorer_tokenizer).numpy()
                for kind, (scorer, scorer_tokenizer) in session.scorers.items()
            }
        width = input_ids.shape[1]
        ids_np, mask_np = sequences.numpy(), mask.numpy().astype(bool)
        for position, index in enumerate(rows):
            response_ids = ids_np[position, width:][mask_np[position, width:]]
            result: dict[str, Any] = {
                "response": tokenizer.decode(response_ids.tolist(), skip_special_tokens=True).strip(),
                "num_tokens": int(len(response_ids)),
            }
            for kind, values in scores.items():
                result[kind] = float(np.asarray(values)[position])
            results[index] = result
    return results  # type: ignore[return-value]


def _score_suffix(result: dict[str, Any]) -> str:
    parts = [f"{kind}={result[kind]:+.4f}" for kind in ("reward", "cost") if kind in result]
    return f"  [{' '.join(parts)}]" if parts else ""


def read_prompt_file(path: str) -> list[str]:
    """Prompts of a ``.jsonl`` file (field ``prompt`` or ``input``, one object a line) or a text file."""
    prompts = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: invalid JSON ({error.msg})") from None
                prompt = row.get("prompt", row.get("input")) if isinstance(row, dict) else None
                if not isinstance(prompt, str):
                    raise ValueError(f"{path}:{number}: expected an object with a string 'prompt' or 'input'")
                prompts.append(prompt)
            else:
                prompts.append(line.rstrip("\n"))
    return prompts


def run_batch(
    session: ChatSession, prompts: Sequence[str], output: TextIO, batch_size: int = 8, display: Optional[TextIO] = None
) -> list[dict[str, Any]]:
    """Answer every prompt as a one-turn conversation; one JSON line per prompt to ``output`` (and a
    readable ``USER> / ASSISTANT>`` pair with the scores to ``display``, if given)."""
    rows = []
    for begin in range(0, len(prompts), batch_size):
        chunk = prompts[begin : begin + batch_size]
        for prompt, result in zip(chunk, respond(session, [[prompt] for prompt in chunk])):
            row = {"prompt": prompt, **result}
            output.write(json.dumps(row, ensure_ascii=False) + "\n")
            output.flush()
            if display is not None:
                answer = f"(error: {result['error']})" if "error" in result else result["response"] + _score_suffix(result)
                display.write(f"USER> {prompt}\nASSISTANT> {answer}\n")
            rows.append(row)
    return rows


def run_interactive(session: ChatSession, stdin: TextIO, stdout: TextIO, log: Optional[TextIO] = None) -> list[dict[str, Any]]:
    """Read user turns from ``stdin`` until EOF or ``/exit``; print answers (and scores) to ``stdout``.

    The whole conversation is the context of each answer (oldest exchanges dropped when it no longer
    fits); ``/reset`` clears it. ``log`` gets one JSON line per answer with its context turns.
    """
    turns: list[str] = []
    rows = []
    stdout.write("Chat started: /reset clears the conversation, /exit quits.\n")
    while True:
        stdout.write("USER> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            break
        text = line.rstrip("\n")
        if text.strip() in EXIT_COMMANDS:
            break
        if text.strip() == RESET_COMMAND:
            turns = []
            stdout.write("(conversation cleared)\n")
            continue
        if not text.strip():
            continue
        context = _fit_context(session, turns + [text])
        result = respond(session, [context])[0]
        if "error" in result:
            stdout.write(f"(error: {result['error']})\n")
            continue
        stdout.write(f"ASSISTANT> {result['response']}{_score_suffix(result)}\n")
        stdout.flush()
        turns = context + [result["response"]]
        row = {"context": context, **result}
        rows.append(row)
        if log is not None:
            log.write(json.dumps(row, ensure_ascii=False) + "\n")
            log.flush()
    return rows


def main(argv: Optional[Sequence[str]] = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> list[dict[str, Any]]:
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.file:
        try:
            prompts += read_prompt_file(args.file)
        except ValueError as error:
            _parser().error(f"file: {error}")
    from alignment.utils.env import setup_cpu_runtime

    setup_cpu_runtime()
    session = load_session(args)
    output = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        if prompts:
            return run_batch(
                session, prompts, output or stdout, batch_size=args.batch_size, display=stdout if output else None
            )
        return run_interactive(session, stdin, stdout, log=output)
    finally:
        if output is not None:
            output.close()


if __name__ == "__main__":
    main()
