"""Policy evaluation: generate for held-out prompts, score with the reward (model and/or reward source), keep the texts."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist
from tqdm.auto import tqdm

from alignment.data.base import PROMPT_ASSISTANT, PROMPT_BEGIN, PROMPT_USER
from alignment.models.ppo_model_utils import make_rollout_attention_mask
from alignment.ppo.trainer_utils import all_reduce_sum
from alignment.utils.metrics import is_main_process

__all__ = ["evaluate_policy", "score_sequences", "split_prompt_response", "decode_prompt_responses", "format_table"]

logger = logging.getLogger(__name__)

_USER_PREFIX = PROMPT_BEGIN + PROMPT_USER.split("{input}")[0]
_USER_SUFFIX = PROMPT_USER.split("{input}")[1] + PROMPT_ASSISTANT


def score_sequences(
    reward_model: paddle.nn.Layer,
    input_ids: paddle.Tensor,
    attention_mask: paddle.Tensor,
    tokenizer: Any,
    reward_tokenizer: Any,
    batch_size: int | None = None,
) -> paddle.Tensor:
    """``[B]`` float32 reward-model end scores of ``[B, L]`` sequences written with ``tokenizer``.

    When the reward model's tokenizer differs, rows are decoded and re-encoded for it (with a mask
    from the new lengths). ``batch_size`` bounds the rows per forward pass.
    """
    from alignment.data.tokenizer import batch_retokenize, is_same_tokenizer
    from alignment.models.ppo_model_utils import make_position_ids

    if not is_same_tokenizer(tokenizer, reward_tokenizer):
        input_ids, attention_mask = batch_retokenize(input_ids, attention_mask, tokenizer, reward_tokenizer)
    position_ids = make_position_ids(attention_mask)
    rows = input_ids.shape[0]
    size = batch_size or rows
    scores = []
    for begin in range(0, rows, size):
        end = min(begin + size, rows)
        output = reward_model(
            input_ids[begin:end],
            attention_mask=attention_mask[begin:end],
            position_ids=position_ids[begin:end],
            return_dict=True,
        )
        scores.append(output.end_scores[:, 0].astype("float32"))
    return scores[0] if len(scores) == 1 else paddle.concat(scores, axis=0)


def split_prompt_response(prompt_text: str, full_text: str) -> tuple[str, str]:
    """``(user input, response)`` from the decoded prompt and prompt+response texts."""
    user = prompt_text
    if user.startswith(_USER_PREFIX) and user.endswith(_USER_SUFFIX):
        user = user[len(_USER_PREFIX) : len(user) - len(_USER_SUFFIX)]
    response = full_text[len(prompt_text) :] if full_text.startswith(prompt_text) else full_text
    return user, response.strip()


def decode_prompt_responses(tokenizer: Any, sequences: paddle.Tensor, attention_mask: paddle.Tensor, prompt_width: int) -> list[tuple[str, str]]:
    """``(user input, response)`` texts of every row of ``sequences [B, L]``, whose first ``prompt_width``
    columns hold the (left-padded) prompt; ``attention_mask [B, L]`` marks the real tokens."""
    ids, mask = sequences.numpy(), attention_mask.numpy().astype(bool)
    pairs = []
    for row in range(ids.shape[0]):
        prompt_text = tokenizer.decode(ids[row, :prompt_width][mask[row, :prompt_width]].tolist(), skip_special_tokens=True)
        full_text = tokenizer.decode(ids[row][mask[row]].tolist(), skip_special_tokens=True)
        pairs.append(split_prompt_response(prompt_text, full_text))
    return pairs


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = ("prompt", "response", "reward"), width: int = 48) -> str:
    """A plain-text table (no rich dependency), cells cut to ``width`` characters."""

    def cell(value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        text = text.replace("\n", " ")
        return text if len(text) <= width else text[: width - 1] + "…"

    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line, "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |", line]
    for row in rows:
        out.append("| " + " | ".join(cell(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)) + " |")
    out.append(line)
    return "\n".join(out)


@paddle.no_grad()
def evaluate_policy(trainer: Any, dataset: Any, step: int, num_table_rows: int = 5) -> dict[str, float]:
    """Evaluate ``trainer``'s actor on every prompt of ``dataset`` (sharded across ranks).

    Writes ``output_dir/eval_generations/step-<step>-rank<r>.jsonl`` (prompt, response, reward,
    length) and returns ``eval/reward``, ``eval/reward_std``, ``eval/mean_generated_length``.
    """
    args = trainer.args
    rank, world = trainer.dp_rank, trainer.dp_world
    indices = list(range(rank, len(dataset), world))
    collator = dataset.get_collator()
    batch_size = args.per_device_eval_batch_size
    rows: list[dict[str, Any]] = []
    batches = range(0, len(indices), batch_size)
    for begin in tqdm(batches, desc="evaluation", leave=False, disable=args.disable_tqdm or not is_main_process()):
        batch_indices = indices[begin : begin + batch_size]
        batch = collator([dataset[i] for i in batch_indices])
        sequences = trainer.generate(batch["input_ids"], batch["attention_mask"], do_sample=args.eval_do_sample, num_return_sequences=1)
        attention_mask = make_rollout_attention_mask(batch["attention_mask"], sequences, trainer.tokenizer.eos_token_id)
        prompt_width = batch["input_ids"].shape[1]
        rewards, parts = trainer.sequence_rewards(sequences, attention_mask, prompt_width, batch_indices, dataset)
        rewards = rewards.numpy()
        lengths = attention_mask[:, prompt_width:].astype("int64").sum(axis=-1).numpy()
        texts = decode_prompt_responses(trainer.tokenizer, sequences, attention_mask, prompt_width)
        for row, (user, response) in enumerate(texts):
            entry = {"prompt": user, "response": response, "reward": float(rewards[row]), "length": int(lengths[row])}
            entry.update({f"reward_{name}": float(values[row]) for name, values in parts.items()})
            rows.append(entry)

    directory = os.path.join(args.output_dir, "eval_generations")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"step-{step}-rank{dist.get_rank()}.jsonl"), "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")

    rewards = np.asarray([r["reward"] for r in rows], dtype=np.float64)
    part_names = sorted(k for k in (rows[0] if rows else {}) if k.startswith("reward_"))
    count, total, squares, length_total, *part_totals = all_reduce_sum(
        [len(rows), rewards.sum(), np.square(rewards).sum(), float(sum(r["length"] for r in rows))]
        + [float(sum(r[name] for r in rows)) for name in part_names]
    )
    mean = total / max(count, 1)
    variance = max(squares / max(count, 1) - mean**2, 0.0)
    if is_main_process() and rows:
        logger.info("evaluation at step %d (%d prompts):\n%s", step, int(count), format_table(rows[:num_table_rows]))
    return {
        "eval/reward": mean,
        "eval/reward_std": float(np.sqrt(variance)),
        "eval/mean_generated_length": length_total / max(count, 1),
        **{f"eval/{name}": value / max(count, 1) for name, value in zip(part_names, part_totals)},
    }
