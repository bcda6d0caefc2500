"""Data parallel and sharding stage 1 on 2 CPU processes == one process on the same global batch."""

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

LR, ADAM_EPS = 1e-2, 1e-4  # must match parallel_data.py
STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Checkpoint, a global batch of 4 rows and the single-process reference (3 AdamW steps)."""
    root = tmp_path_factory.mktemp("data_parallel")
    paddle.seed(3)
    LlamaForCausalLM(common.tiny_llama_config()).save_pretrained(str(root / "ckpt"), safe_serialization=True)
    # No padding: every row has 7 labelled tokens, so the token-mean loss of the global batch equals the
    # mean of the two ranks' half-batch losses, and averaged gradients equal the global-batch gradient.
    batch_np = common.make_lm_batch(0, 4, 8, common.TINY_LLAMA["vocab_size"], pad_tail=False)
    np.savez(root / "data.npz", **batch_np)

    model = LlamaForCausalLM.from_pretrained(str(root / "ckpt"), tensor_parallel_output=False)
    optimizer = paddle.optimizer.AdamW(learning_rate=LR, epsilon=ADAM_EPS, parameters=model.parameters())
    batch = common.to_paddle(batch_np)
    batch["attention_mask"] = batch["attention_mask"].astype("bool")
    losses = []
    for _ in range(STEPS):
        loss = model(**batch, return_dict=False)[0]
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    return dict(root=root, losses=losses, weights=weights)


@pytest.mark.distributed
@pytest.mark.parametrize("mode, optimizer", [("dp", "AdamW"), ("sharding1", "DygraphShardingOptimizer")])
def test_two_process_training_matches_single_process(setup, tmp_path, mode, optimizer):
    out = tmp_path / "out"
    out.mkdir()
    launch_distributed(
        SCRIPTS / "parallel_data.py",
        [mode, setup["root"] / "ckpt", setup["root"] / "data.npz", out, STEPS],
        nproc=2,
        log_dir=tmp_path / "logs",
        timeout=90,
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1"},
    )
    records = common.read_rank_results(str(out), 2)
    assert setup["losses"][-1] < setup["losses"][0]
    for record in records:
        assert record["optimizer"] == optimizer
        np.testing.assert_allclose(record["losses"], setup["losses"], rtol=1e-5)
    if mode == "sharding1":  # optimizer state really is split: each rank owns half of the 30 parameters
        assert [r["owned_params"] for r in records] == [15, 15]
    weights = dict(np.load(out / "weights.npz"))
    for name, value in setup["weights"].items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
