"""Tensor parallel (TP=2) Llama on CPU vs the same weights at TP=1, plus TP checkpoint merge/split.

One 2-process launch of tests/dist_scripts/parallel_tensor.py (~12 s) is shared by all tests here; the TP=1
reference is computed in this process from the same checkpoint and batch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import LlamaForCausalLM

from alignment.parallel import tensor_parallel
from alignment.parallel.checkpoint import (
    load_tensor_parallel_pretrained,
    merge_tensor_parallel_checkpoint,
    split_state_dict,
)
from alignment.parallel.launch import launch_distributed

SCRIPTS = Path(__file__).parent / "dist_scripts"
REPO = Path(__file__).parent.parent
_spec = importlib.util.spec_from_file_location("parallel_common", SCRIPTS / "parallel_common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

LR, ADAM_EPS = 1e-2, 1e-4  # must match parallel_tensor.py


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Checkpoint + batch, the 2-rank TP run's outputs, and the TP=1 reference computed here."""
    root = tmp_path_factory.mktemp("tp")
    paddle.seed(3)
    LlamaForCausalLM(common.tiny_llama_config()).save_pretrained(str(root / "ckpt"), safe_serialization=True)
    batch_np = common.make_lm_batch(seed=0, batch_size=4, seq_len=8, vocab_size=common.TINY_LLAMA["vocab_size"])
    np.savez(root / "data.npz", **batch_np)
    out = root / "out"
    out.mkdir()
    launch_distributed(
        SCRIPTS / "parallel_tensor.py",
        [root / "ckpt", root / "data.npz", out],
        nproc=2,
        log_dir=root / "logs",
        timeout=90,
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1"},
    )
    records = common.read_rank_results(str(out), 2)
    arrays = [dict(np.load(out / f"rank{r}_arrays.npz")) for r in range(2)]

    # TP=1 reference: same checkpoint, same batch, same optimizer step.
    model = LlamaForCausalLM.from_pretrained(str(root / "ckpt"), tensor_parallel_output=False)
    batch = common.to_paddle(batch_np)
    batch["attention_mask"] = batch["attention_mask"].astype("bool")
    loss, logits = model(**batch, return_dict=False)[:2]
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    optimizer = paddle.optimizer.AdamW(learning_rate=LR, epsilon=ADAM_EPS, parameters=model.parameters())
    optimizer.step()
    with paddle.no_grad():
        logits_after = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=False)[0]
    reference = dict(
        loss=float(loss),
        logits=logits.numpy(),
        grads=grads,
        logits_after=logits_after.numpy(),
        weights_after={k: v.numpy() for k, v in model.state_dict().items()},
    )
    return dict(root=root, out=out, records=records, arrays=arrays, reference=reference)


def _split_for_rank(full: dict, rank: int) -> dict:
    """Reference TP=1 tensors cut into rank ``rank``'s TP=2 shards with paddlenlp's own split rules."""
    config = common.tiny_llama_config(tensor_parallel_degree=2, tensor_parallel_rank=rank)
    actions = LlamaForCausalLM.get_tensor_parallel_convert_actions(config, list(full.keys()), is_split=True)
    return {k: np.asarray(actions[k](v)) if k in actions else v for k, v in full.items()}


@pytest.mark.distributed
def test_two_ranks_ran_with_parallel_layers(tp_run):
    for record in tp_run["records"]:
        assert record["mp_group"] == [0, 1]
        assert record["model_class_check"] == "ColumnParallelLinear"
    assert [r["mp_rank"] for r in tp_run["records"]] == [0, 1]


@pytest.mark.distributed
def test_forward_logits_and_loss_match_tp1(tp_run):
    ref = tp_run["reference"]
    for record, arrays in zip(tp_run["records"], tp_run["arrays"]):
        np.testing.assert_allclose(record["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
        # tensor_parallel_output=False: every rank holds the full [B, L, V] logits
        assert arrays["logits"].shape == (4, 8, common.TINY_LLAMA["vocab_size"])
        np.testing.assert_allclose(arrays["logits"], ref["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("prefix", ["grad", "grad_tpout"])
def test_gradient_shards_match_tp1(tp_run, prefix):
    """Each rank's gradient equals its slice of the TP=1 gradient (replicated params: the full gradient).

    ``grad_tpout`` is the model with tensor_parallel_output=True (loss via ParallelCrossEntropy on
    vocab-sharded logits): same loss, same gradients.
    """
    ref_grads = tp_run["reference"]["grads"]
    for rank, arrays in enumerate(tp_run["arrays"]):
        expected = _split_for_rank(ref_grads, rank)
        got = {k[len(prefix) + 1 :]: v for k, v in arrays.items() if k.startswith(prefix + "/")}
        assert set(got) == set(expected)
        for name, grad in got.items():
            assert grad.shape == expected[name].shape, name
            np.testing.assert_allclose(grad, expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
    split_k = _split_for_rank(ref_grads, 0)["llama.layers.0.self_attn.k_proj.weight"]
    assert split_k.shape == (32, 8)  # GQA: 2 kv heads x head_dim 8 -> one kv head per rank


@pytest.mark.distributed
def test_loss_with_tensor_parallel_output_matches(tp_run):
    for record in tp_run["records"]:
        np.testing.assert_allclose(record["loss_tp_output"], tp_run["reference"]["loss"], rtol=1e-6)


@pytest.mark.distributed
def test_vocab_parallel_cross_entropy_against_numpy(tp_run):
    """loss = logsumexp(x) - x[label] (0 where label == -100); d(sum loss)/dx = softmax - onehot."""
    logits = np.random.default_rng(7).normal(size=(2, 3, 8)).astype("float64")
    labels = np.array([[0, 5, 7], [3, -100, 4]])
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    valid = labels != -100
    picked = np.take_along_axis(logits, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    lse = np.log(np.exp(logits).sum(-1))
    loss = np.where(valid, lse - picked, 0.0)[..., None]
    grad = softmax - np.eye(8)[np.where(valid, labels, 0)]
    grad = np.where(valid[..., None], grad, 0.0)
    for rank, arrays in enumerate(tp_run["arrays"]):
        np.testing.assert_allclose(arrays["ce_loss"], loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arrays["ce_softmax"], np.split(softmax, 2, -1)[rank], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(arrays["ce_grad"], np.split(grad, 2, -1)[rank], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_optimizer_step_gathered_in_memory_matches_tp1(tp_run):
    gathered = dict(np.load(tp_run["out"] / "gathered.npz"))
    ref = tp_run["reference"]["weights_after"]
    assert set(gathered) == set(ref)
    for name, value in ref.items():
        np.testing.assert_allclose(gathered[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    for arrays in tp_run["arrays"]:
        np.testing.assert_allclose(arrays["logits_after"], tp_run["reference"]["logits_after"], rtol=1e-5, atol=1e-5)


def _assert_checkpoint_equals_reference(checkpoint_dir, tp_run):
    model = LlamaForCausalLM.from_pretrained(str(checkpoint_dir), tensor_parallel_output=False)
    assert model.config.tensor_parallel_degree == 1
    ref = tp_run["reference"]
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(value.numpy(), ref["weights_after"][name], rtol=1e-5, atol=1e-6, err_msg=name)
    batch = common.make_lm_batch(seed=0, batch_size=4, seq_len=8, vocab_size=common.TINY_LLAMA["vocab_size"])
    with paddle.no_grad():
        logits = model(
            paddle.to_tensor(batch["input_ids"]),
            attention_mask=paddle.to_tensor(batch["attention_mask"]).astype("bool"),
            return_dict=False,
        )[0]
    # the TP=2 model's own logits after the step (rank 0) == TP=1 inference from the merged checkpoint
    np.testing.assert_allclose(logits.numpy(), tp_run["arrays"][0]["logits_after"], rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
def test_merge_on_save_checkpoint_loads_for_tp1_inference(tp_run):
    _assert_checkpoint_equals_reference(tp_run["out"] / "merged", tp_run)


@pytest.mark.distributed
def test_offline_merge_of_per_rank_files_loads_for_tp1(tp_run, tmp_path):
    sharded = tp_run["out"] / "sharded"
    assert sorted(p.name for p in sharded.glob("model.tp*.safetensors")) == [
        "model.tp00.safetensors",
        "model.tp01.safetensors",
    ]
    merge_tensor_parallel_checkpoint(LlamaForCausalLM, sharded, tmp_path / "merged")
    _assert_checkpoint_equals_reference(tmp_path / "merged", tp_run)


# ------------------------------------------------------------------------------- in-process checks
@pytest.fixture
def restore_patches():
    """Leave paddle's mp ops patched/unpatched exactly as the test found them."""
    was_enabled = tensor_parallel.cpu_model_parallel_enabled()
    yield
    if was_enabled:
        tensor_parallel.enable_cpu_model_parallel()
    else:
        tensor_parallel.disable_cpu_model_parallel()


def test_enable_installs_into_mp_ops_and_collective_and_disable_restores(restore_patches):
    import paddle.distributed.collective as collective
    from paddle.distributed.fleet.layers.mpu import mp_ops

    tensor_parallel.disable_cpu_model_parallel()
    stock = {name: getattr(mp_ops, name) for name in tensor_parallel._REPLACEMENTS}
    stock_collective_identity = collective._c_identity
    assert tensor_parallel.enable_cpu_model_parallel() is True
    assert tensor_parallel.enable_cpu_model_parallel() is True  # idempotent
    for name, replacement in tensor_parallel._REPLACEMENTS.items():
        assert getattr(mp_ops, name) is replacement
    assert collective._c_identity is tensor_parallel._c_identity  # what paddlenlp's parallel_matmul calls
    tensor_parallel.disable_cpu_model_parallel()
    assert {name: getattr(mp_ops, name) for name in stock} == stock
    assert collective._c_identity is stock_collective_identity
    assert not tensor_parallel.cpu_model_parallel_enabled()


def test_enable_is_a_no_op_off_cpu(monkeypatch, restore_patches):
    from paddle.distributed.fleet.layers.mpu import mp_ops

    tensor_parallel.disable_cpu_model_parallel()
    stock_identity = mp_ops._c_identity
    monkeypatch.setattr(paddle, "get_device", lambda: "gpu:0")
    assert tensor_parallel.enable_cpu_model_parallel() is False
    assert mp_ops._c_identity is stock_identity
    assert tensor_parallel.enable_cpu_model_parallel(force=True) is True


def test_split_state_dict_shards_concatenate_back_to_the_full_weights():
    paddle.seed(4)
    full = {k: v.numpy() for k, v in LlamaForCausalLM(common.tiny_llama_config()).state_dict().items()}
    configs = [common.tiny_llama_config(tensor_parallel_degree=2, tensor_parallel_rank=r) for r in range(2)]
    shards = [split_state_dict(LlamaForCausalLM, config, full) for config in configs]
    for name, value in full.items():
        a, b = shards[0][name].numpy(), shards[1][name].numpy()
        if a.shape == value.shape:  # replicated (norms)
            assert "norm" in name
            np.testing.assert_array_equal(a, value)
            np.testing.assert_array_equal(b, value)
        else:
            row_split = any(part in name for part in ("embed_tokens", "o_proj", "down_proj"))  # else column
            axis = 0 if row_split else 1
            np.testing.assert_array_equal(np.concatenate([a, b], axis=axis), value, err_msg=name)
    assert shards[0]["lm_head.weight"].shape == [32, 32]  # column split of [hidden, vocab]


def test_load_tensor_parallel_pretrained_checks_arguments(tmp_path):
    paddle.seed(4)
    model = LlamaForCausalLM(common.tiny_llama_config())
    model.save_pretrained(str(tmp_path / "ckpt"), safe_serialization=True)
    loaded = load_tensor_parallel_pretrained(LlamaForCausalLM, tmp_path / "ckpt", 1, 0)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), value.numpy())
    with pytest.raises(ValueError, match="tensor_parallel_rank"):
        load_tensor_parallel_pretrained(LlamaForCausalLM, tmp_path / "ckpt", 2, 2)
    with pytest.raises(FileNotFoundError, match="checkpoint_dir"):
        load_tensor_parallel_pretrained(LlamaForCausalLM, tmp_path, 1, 0)
    with pytest.raises(ValueError, match="src_dir"):
        merge_tensor_parallel_checkpoint(LlamaForCausalLM, tmp_path / "ckpt", tmp_path / "merged")
