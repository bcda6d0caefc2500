"""Pipeline parallel: pure helpers and stage wiring in-process; a 2-stage training run (2 processes) vs PP=1."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import LlamaForCausalLM
from paddlenlp.transformers.llama.modeling import LlamaPretrainingCriterion

from alignment.parallel.launch import launch_distributed
from alignment.parallel.pipeline import PipelineEngine, PipelineStage, partition_layers, split_micro_batches

SCRIPTS = Path(__file__).parent / "dist_scripts"
REPO = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("parallel_common", SCRIPTS / "parallel_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

LR, ADAM_EPS = 1e-2, 1e-4  # must match parallel_pipeline.py
STEPS, MICRO = 2, 2
SINGLE_RANK_GROUP = SimpleNamespace(nranks=1, rank=0, ranks=[0])  # PP=1: the engine never communicates


def _tiny_model(seed=3, **overrides):
    paddle.seed(seed)
    return LlamaForCausalLM(common.tiny_llama_config(tensor_parallel_output=False, **overrides))


def _batch(pad_tail=True):
    batch = common.to_paddle(common.make_lm_batch(0, 4, 8, common.TINY_LLAMA["vocab_size"], pad_tail=pad_tail))
    batch["attention_mask"] = batch["attention_mask"].astype("bool")
    return batch


# ------------------------------------------------------------------------------------ pure helpers
@pytest.mark.parametrize(
    "num_layers, num_stages, expected",
    [
        (4, 2, [(0, 2), (2, 4)]),
        (5, 2, [(0, 2), (2, 5)]),  # 5 // 2 = 2 each, the extra layer goes to the last stage
        (7, 3, [(0, 2), (2, 4), (4, 7)]),
        (8, 3, [(0, 2), (2, 5), (5, 8)]),  # two extra layers: stages 1 and 2
        (3, 1, [(0, 3)]),
    ],
)
def test_partition_layers_uniform_rule(num_layers, num_stages, expected):
    assert partition_layers(num_layers, num_stages) == expected


def test_partition_layers_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_stages"):
        partition_layers(4, 0)
    with pytest.raises(ValueError, match="num_layers"):
        partition_layers(2, 3)


def test_split_micro_batches_splits_tensors_and_passes_other_values():
    batch = {"a": paddle.arange(6).reshape([6, 1]), "b": paddle.ones([6, 2]), "flag": None}
    parts = split_micro_batches(batch, 3)
    assert [p["a"].flatten().tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert all(p["b"].shape == [2, 2] and p["flag"] is None for p in parts)


def test_split_micro_batches_names_the_bad_key():
    with pytest.raises(ValueError, match="'b'"):
        split_micro_batches({"a": paddle.ones([4]), "b": paddle.ones([3])}, 2)
    with pytest.raises(ValueError, match="divisible"):
        split_micro_batches({"a": paddle.ones([5])}, 2)
    with pytest.raises(ValueError, match="num_micro_batches"):
        split_micro_batches({"a": paddle.ones([4])}, 0)


# --------------------------------------------------------------------------- stages in one process
def test_stages_partition_the_state_dict_with_standard_names():
    model = _tiny_model()
    full_keys = set(model.state_dict())
    stages = [PipelineStage(model, s, 2) for s in range(2)]
    keys = [set(stage.state_dict()) for stage in stages]
    assert keys[0] | keys[1] == full_keys
    assert not keys[0] & keys[1]
    assert "llama.embed_tokens.weight" in keys[0] and "llama.layers.0.mlp.up_proj.weight" in keys[0]
    assert {"llama.layers.2.mlp.up_proj.weight", "llama.norm.weight", "lm_head.weight"} <= keys[1]
    assert stages[0].layer_range == (0, 1) and stages[1].layer_range == (1, 3)


def test_chained_stages_reproduce_the_full_model_logits():
    model = _tiny_model()
    batch = _batch()
    with paddle.no_grad():
        expected = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=False)[0]
        stages = [PipelineStage(model, s, 3) for s in range(3)]
        hidden = None
        for stage in stages:
            hidden = stage(batch, hidden)
    np.testing.assert_allclose(hidden.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_score_model_stages_carry_head_and_normalizer():
    from alignment.models import LlamaModelForScore

    paddle.seed(5)
    model = LlamaModelForScore(common.tiny_llama_config())
    batch = _batch()
    stages = [PipelineStage(model, s, 2, head_name="score_head") for s in range(2)]
    assert set(stages[0].state_dict()) | set(stages[1].state_dict()) == set(model.state_dict())
    with paddle.no_grad():
        expected = model.score_head(model.llama(batch["input_ids"], attention_mask=batch["attention_mask"])[0])
        scores = stages[1](batch, stages[0](batch))
    np.testing.assert_allclose(scores.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_stage_rejects_bad_arguments():
    model = _tiny_model()
    with pytest.raises(ValueError, match="stage_id"):
        PipelineStage(model, 2, 2)
    with pytest.raises(ValueError, match="head_name"):
        PipelineStage(model, 1, 2, head_name="value_head")
    with pytest.raises(NotImplementedError, match="tie_word_embeddings"):
        PipelineStage(_tiny_model(tie_word_embeddings=True), 0, 2)
    with pytest.raises(ValueError, match="does not match"):
        PipelineEngine(PipelineStage(model, 0, 2), loss_fn=None, group=SINGLE_RANK_GROUP)


def _reference_training(ckpt: str, batch: dict) -> dict:
    """PP=1 without the engine: stock ``LlamaForCausalLM.forward`` (loss inside), gradient accumulation over
    ``MICRO`` micro-batches with loss/MICRO, AdamW steps. Returns losses, micro losses, logits, weights."""
    model = LlamaForCausalLM.from_pretrained(ckpt, tensor_parallel_output=False)
    optimizer = paddle.optimizer.AdamW(learning_rate=LR, epsilon=ADAM_EPS, parameters=model.parameters())
    size = batch["input_ids"].shape[0] // MICRO
    micro_batches = [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(MICRO)]
    losses, micro_losses = [], []
    for _ in range(STEPS):
        step_losses = []
        for micro_batch in micro_batches:
            loss = model(**micro_batch, return_dict=False)[0]
            (loss / MICRO).backward()
            step_losses.append(float(loss))
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(np.mean(step_losses)))
        micro_losses.append(step_losses)
    with paddle.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=False)[0]
        eval_loss = np.mean([float(model(**mb, return_dict=False)[0]) for mb in micro_batches])
    return dict(
        losses=losses,
        micro_losses=micro_losses,
        logits=logits.numpy(),
        eval_loss=eval_loss,
        weights={k: v.numpy() for k, v in model.state_dict().items()},
    )


def test_single_stage_engine_matches_plain_gradient_accumulation(tmp_path):
    """num_stages=1 runs the same schedule (loss inside, 1/MICRO scaling) without communication."""
    _tiny_model().save_pretrained(str(tmp_path / "ckpt"), safe_serialization=True)
    batch = _batch()
    reference = _reference_training(str(tmp_path / "ckpt"), batch)

    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "ckpt"), tensor_parallel_output=False)
    criterion = LlamaPretrainingCriterion(model.config)
    stage = PipelineStage(model, 0, 1)
    engine = PipelineEngine(stage, group=SINGLE_RANK_GROUP)  # loss_fn given per call below
    with pytest.raises(ValueError, match="loss_fn"):
        engine.forward_backward(batch, MICRO)
    optimizer = paddle.optimizer.AdamW(learning_rate=LR, epsilon=ADAM_EPS, parameters=stage.parameters())
    for step in range(STEPS):
        loss = engine.forward_backward(batch, MICRO, loss_fn=lambda logits, mb: criterion(logits, mb["labels"]))
        optimizer.step()
        optimizer.clear_grad()
        np.testing.assert_allclose(float(loss), reference["losses"][step], rtol=1e-6)
        np.testing.assert_allclose(engine.micro_batch_losses.numpy(), reference["micro_losses"][step], rtol=1e-6)
    for name, value in stage.state_dict().items():
        np.testing.assert_allclose(value.numpy(), reference["weights"][name], rtol=1e-5, atol=1e-6, err_msg=name)
    logits = engine.eval_batch(batch, MICRO)
    np.testing.assert_allclose(logits.numpy(), reference["logits"], rtol=1e-5, atol=1e-5)
    eval_loss = engine.eval_batch(batch, MICRO, compute_loss=True, loss_fn=lambda lg, mb: criterion(lg, mb["labels"]))
    np.testing.assert_allclose(float(eval_loss), reference["eval_loss"], rtol=1e-6)


# ------------------------------------------------------------------------------- two processes
@pytest.mark.distributed
def test_two_stage_pipeline_training_matches_pp1(tmp_path):
    """PP=2, 2 micro-batches, 2 AdamW steps == PP=1 (stock model, gradient accumulation): losses per step and
    per micro-batch, eval logits broadcast to both stages, updated weights gathered (dst=None and dst=0)."""
    _tiny_model().save_pretrained(str(tmp_path / "ckpt"), safe_serialization=True)
    batch_np = common.make_lm_batch(0, 4, 8, common.TINY_LLAMA["vocab_size"])
    np.savez(tmp_path / "data.npz", **batch_np)
    out = tmp_path / "out"
    out.mkdir()
    launch_distributed(
        SCRIPTS / "parallel_pipeline.py",
        [tmp_path / "ckpt", tmp_path / "data.npz", out, STEPS, MICRO],
        nproc=2,
        log_dir=tmp_path / "logs",
        timeout=90,
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1"},
    )
    records = common.read_rank_results(str(out), 2)
    reference = _reference_training(str(tmp_path / "ckpt"), _batch())

    assert [r["stage_id"] for r in records] == [0, 1]
    assert [r["layer_range"] for r in records] == [[0, 1], [1, 3]]
    assert "llama.embed_tokens.weight" in records[0]["param_names"]
    assert "lm_head.weight" not in records[0]["param_names"]
    assert "lm_head.weight" in records[1]["param_names"]
    assert "llama.embed_tokens.weight" not in records[1]["param_names"]
    assert sorted(set(records[0]["param_names"]) | set(records[1]["param_names"])) == sorted(reference["weights"])
    assert reference["losses"][1] < reference["losses"][0]  # the step did train

    for record in records:  # the loss is broadcast to every stage
        np.testing.assert_allclose(record["losses"], reference["losses"], rtol=1e-5)
        np.testing.assert_allclose(record["micro_losses"], reference["micro_losses"], rtol=1e-5)
        np.testing.assert_allclose(record["eval_loss"], reference["eval_loss"], rtol=1e-5)
        assert record["gathered_names"] == sorted(reference["weights"])
    assert records[0]["gathered_on_rank_names"] == len(reference["weights"])
    assert records[1]["gathered_on_rank_names"] == 0
    for rank in range(2):
        logits = np.load(out / f"rank{rank}_arrays.npz")["logits"]
        np.testing.assert_allclose(logits, reference["logits"], rtol=1e-5, atol=1e-5)

    gathered = dict(np.load(out / "gathered_all.npz"))
    saved = LlamaForCausalLM.from_pretrained(str(out / "gathered")).state_dict()
    for name, value in reference["weights"].items():
        np.testing.assert_allclose(gathered[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(saved[name].numpy(), value, rtol=1e-5, atol=1e-6, err_msg=name)
