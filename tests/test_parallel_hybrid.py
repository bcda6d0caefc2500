"""Tensor parallel 2 x pipeline parallel 2 (4 CPU processes) == one process, after 2 training steps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import LlamaForCausalLM

from alignment.parallel.launch import launch_distributed

SCRIPTS = Path(__file__).parent / "dist_scripts"
REPO = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("parallel_common", SCRIPTS / "parallel_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

LR, ADAM_EPS = 1e-2, 1e-4  # must match parallel_hybrid.py
STEPS, MICRO = 2, 2


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_pp2_training_matches_single_process(tmp_path):
    paddle.seed(3)
    LlamaForCausalLM(common.tiny_llama_config()).save_pretrained(str(tmp_path / "ckpt"), safe_serialization=True)
    batch_np = common.make_lm_batch(0, 4, 8, common.TINY_LLAMA["vocab_size"])
    np.savez(tmp_path / "data.npz", **batch_np)
    out = tmp_path / "out"
    out.mkdir()
    launch_distributed(
        SCRIPTS / "parallel_hybrid.py",
        [tmp_path / "ckpt", tmp_path / "data.npz", out, STEPS, MICRO],
        nproc=4,
        log_dir=tmp_path / "logs",
        timeout=150,
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1"},
    )
    records = common.read_rank_results(str(out), 4)
    # fleet's rank order: mp varies fastest, then pp
    assert [(r["stage_id"], r["mp_rank"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["pp_group"] for r in records] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["mp_group"] for r in records] == [[0, 1], [0, 1], [2, 3], [2, 3]]

    # single process: stock forward with the loss, gradient accumulation over MICRO micro-batches
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "ckpt"), tensor_parallel_output=False)
    optimizer = paddle.optimizer.AdamW(learning_rate=LR, epsilon=ADAM_EPS, parameters=model.parameters())
    batch = common.to_paddle(batch_np)
    batch["attention_mask"] = batch["attention_mask"].astype("bool")
    size = 4 // MICRO
    losses = []
    for _ in range(STEPS):
        step = []
        for i in range(MICRO):
            loss = model(**{k: v[i * size : (i + 1) * size] for k, v in batch.items()}, return_dict=False)[0]
            (loss / MICRO).backward()
            step.append(float(loss))
        optimizer.step()
        optimizer.clear_grad()
        losses.append(np.mean(step))
    with paddle.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=False)[0].numpy()

    for record in records:
        np.testing.assert_allclose(record["losses"], losses, rtol=1e-5)
    for rank in range(4):
        np.testing.assert_allclose(np.load(out / f"rank{rank}_logits.npy"), logits, rtol=1e-5, atol=1e-5)
    gathered = dict(np.load(out / "gathered.npz"))
    reference = model.state_dict()
    assert set(gathered) == set(reference)
    for name, value in reference.items():
        np.testing.assert_allclose(gathered[name], value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
