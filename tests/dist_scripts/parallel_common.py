"""Helpers shared by the ``parallel_*.py`` worker scripts and ``tests/test_parallel_*.py``.

Scripts are launched with ``python -m paddle.distributed.launch``; every rank writes ``rank<r>.json``
(``rank``, ``world_size`` and its numbers) into the output directory so the test can check that the
launcher really started all ranks.
"""

from __future__ import annotations

import json
import os

import numpy as np

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: exercises the k/v split rules of tensor parallel
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)


def tiny_llama_config(**overrides):
    from paddlenlp.transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def make_lm_batch(seed: int, batch_size: int, seq_len: int, vocab_size: int, pad_tail: bool = True) -> dict:
    """Random causal-LM batch (numpy): ``input_ids``/``labels`` ``[B, L]`` int64, ``attention_mask`` ``[B, L]``.

    With ``pad_tail`` the last sample ends with two padding tokens (mask 0, label -100 / ignore).
    """
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, vocab_size, size=(batch_size, seq_len), dtype=np.int64)
    labels = np.concatenate([input_ids[:, 1:], np.full((batch_size, 1), -100, np.int64)], axis=1)
    attention_mask = np.ones((batch_size, seq_len), dtype=np.int64)
    if pad_tail:
        attention_mask[-1, -2:] = 0
        input_ids[-1, -2:] = 0
        labels[-1, -3:] = -100
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask)


def to_paddle(batch: dict) -> dict:
    import paddle

    return {k: paddle.to_tensor(v) for k, v in batch.items()}


def write_rank_result(out_dir: str, payload: dict) -> None:
    """``out_dir/rank<r>.json`` with the rank, world size and ``payload``."""
    import paddle.distributed as dist

    rank = dist.get_rank()
    record = dict(rank=rank, world_size=dist.get_world_size(), **payload)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


def read_rank_results(out_dir: str, world_size: int) -> list[dict]:
    """All ranks' records; asserts that exactly ``world_size`` ranks of a ``world_size`` job reported."""
    records = []
    for rank in range(world_size):
        path = os.path.join(out_dir, f"rank{rank}.json")
        assert os.path.isfile(path), f"rank {rank} wrote no result: the launcher did not start {world_size} ranks"
        with open(path) as f:
            records.append(json.load(f))
    assert [r["rank"] for r in records] == list(range(world_size))
    assert all(r["world_size"] == world_size for r in records), records
    assert not os.path.exists(os.path.join(out_dir, f"rank{world_size}.json"))
    return records
