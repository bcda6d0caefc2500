"""Every supported decoder architecture through every stage: registry, score model, fast rollout,
and SFT -> reward model -> PPO end to end for a tiny Qwen2 and a tiny Mistral.

The architectures are those of :mod:`alignment.models.architectures` that the installed PaddleNLP
provides (3.0: Llama, Qwen2, Mistral, Gemma, QWen; 2.8.1: Llama, QWen).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from alignment.models import AutoModelForScore, gather_log_probabilities
from alignment.models.architectures import ARCHITECTURES, available_architectures, get_architecture
from alignment.models.infer_model_utils import KVDecoder, kv_decoder_unsupported_reason
from alignment.models.ppo_model_utils import make_position_ids
from alignment.ppo.infer_utils import generate_rollout
from alignment.utils.metrics import read_metrics

AVAILABLE = available_architectures()
#: Llama-shaped families the fast decoder implements, as far as this paddlenlp has them.
DECODER_FAMILIES = [name for name in ("llama", "qwen2", "mistral") if name in AVAILABLE]
#: Plain decoders with a tiny checkpoint (QWen v1 needs tiktoken vocabularies: not built here).
TINY_FAMILIES = [name for name in ("llama", "qwen2", "mistral", "gemma") if name in AVAILABLE]

VOCAB = 200
PROMPT_MASK = [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]  # left-padded, lengths 4, 6, 2


def random_causal_lm(model_type: str, seed: int = 7, **overrides):
    """A random 2-layer model of ``model_type``: GQA (4 query heads, 2 KV heads) unless overridden."""
    architecture = get_architecture(model_type)
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.3)  # fmt: skip
    fields.update(overrides)
    config = architecture.config_class(**fields)
    paddle.seed(seed)
    model = architecture.causal_lm_class(config)
    model.eval()
    return model


def prompts(seed: int = 11):
    paddle.seed(seed)
    mask = paddle.to_tensor(PROMPT_MASK, dtype="int64")
    ids = paddle.randint(3, VOCAB, mask.shape)
    return paddle.where(mask > 0, ids, paddle.zeros_like(ids)), mask


# ============================================================================ registry


def test_registry_covers_the_pinned_paddlenlp_and_rejects_others_by_listing_them():
    assert {"llama", "qwen"} <= set(AVAILABLE)
    assert set(AVAILABLE) <= set(ARCHITECTURES)
    for name in AVAILABLE:
        architecture = get_architecture(name)
        assert architecture.pretrained_model_class.base_model_prefix == architecture.backbone_name
        assert architecture.config_class.model_type == name
    with pytest.raises(ValueError, match=r"model_type 'gpt' is not supported; supported architectures") as error:
        get_architecture("gpt")
    assert all(name in str(error.value) for name in AVAILABLE)


# ============================================================================ fast rollout


@pytest.mark.parametrize(
    "model_type, overrides",
    [(name, {}) for name in DECODER_FAMILIES] + [("llama", dict(tie_word_embeddings=True, num_key_value_heads=1))],
    ids=DECODER_FAMILIES + ["llama-tied-mqa"],
)
def test_fast_rollout_equals_paddlenlp_generate_and_training_logits(model_type, overrides):
    model = random_causal_lm(model_type, **overrides)
    assert kv_decoder_unsupported_reason(model) is None
    if model_type == "qwen2":  # the biases take part (random, not the zero init)
        assert model.qwen2.layers[0].self_attn.q_proj.bias is not None
        with paddle.no_grad():
            for layer in model.qwen2.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.set_value(paddle.randn(proj.bias.shape) * 0.5)
    ids, mask = prompts()

    # Greedy: token for token what paddlenlp's generate produces (no EOS: all 10 steps compared).
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=-1, pad_token_id=0)
    fast = generate_rollout(model, ids, mask, backend="fast", **kwargs).numpy()
    plain = generate_rollout(model, ids, mask, backend="plain", **kwargs).numpy()
    np.testing.assert_array_equal(fast, plain)
    assert len(set(fast[:, ids.shape[1] :].ravel().tolist())) > 3  # not a degenerate constant output

    # The decoder's per-step log-probs equal the training forward's on the same sequence.
    response = paddle.to_tensor(fast[:, ids.shape[1] :])
    with paddle.no_grad():
        decoder = KVDecoder(model, ids, mask, response.shape[1])
        logits = [decoder.prefill()] + [decoder.step(response[:, t]) for t in range(response.shape[1] - 1)]
        fast_logp = gather_log_probabilities(paddle.stack(logits, axis=1), response)
        sequence = paddle.concat([ids, response], axis=1)
        full_mask = paddle.concat([mask, paddle.ones_like(response)], axis=1)
        train_logits = model(sequence, attention_mask=full_mask.astype("bool"), position_ids=make_position_ids(full_mask))[0]
        train_logp = gather_log_probabilities(train_logits[:, :-1], sequence[:, 1:])[:, ids.shape[1] - 1 :]
    np.testing.assert_allclose(fast_logp.numpy(), train_logp.numpy(), atol=2e-5)


def test_tied_head_is_read_transposed_from_the_embeddings():
    if "qwen2" not in AVAILABLE:
        model = random_causal_lm("llama")
    else:
        model = random_causal_lm("qwen2", tie_word_embeddings=True)
        assert model.lm_head.weight is model.qwen2.embed_tokens.weight or np.array_equal(
            model.lm_head.weight.numpy(), model.qwen2.embed_tokens.weight.numpy()
        )
    ids, mask = prompts()
    decoder = KVDecoder(model, ids, mask, 2)
    assert decoder.lm_head_transposed == ("qwen2" in AVAILABLE)  # [V, H] embeddings as the head
    with paddle.no_grad():
        expected = model(ids, attention_mask=mask.astype("bool"), position_ids=make_position_ids(mask))[0][:, -1]
        np.testing.assert_allclose(decoder.prefill().numpy(), expected.numpy(), atol=2e-5)


def test_unsupported_decoder_architectures_fall_back_with_a_reason():
    model = random_causal_lm("llama")
    model.config.model_type = "gpt"  # what an unknown family looks like to the decoder
    reason = kv_decoder_unsupported_reason(model)
    assert "'gpt' is not one it implements" in reason and all(name in reason for name in ("llama", "qwen2", "mistral"))
    with pytest.raises(ValueError, match="KVDecoder cannot run this model"):
        KVDecoder(model, *prompts(), 2)
    if "gemma" in AVAILABLE:  # a plain decoder of another layer shape: plain generate serves it
        gemma = random_causal_lm("gemma", head_dim=16)
        assert "'gemma' is not one it implements" in kv_decoder_unsupported_reason(gemma)
        ids, mask = prompts()
        kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
        auto = generate_rollout(gemma, ids, mask, backend="auto", **kwargs).numpy()
        np.testing.assert_array_equal(auto, generate_rollout(gemma, ids, mask, backend="plain", **kwargs).numpy())


# ============================================================================ tiny checkpoints + score models


@pytest.fixture(scope="module")
def tiny_models(tiny_assets, tmp_path_factory) -> dict[str, str]:
    """A tiny random checkpoint of every plain decoder family (shared SentencePiece tokenizer)."""
    from alignment.utils.tiny_assets import build_model

    root = tmp_path_factory.mktemp("tiny_architectures")
    paths = {"llama": tiny_assets["llama"], "tokenizer": tiny_assets["tokenizer"]}
    for name in TINY_FAMILIES:
        if name != "llama":
            paths[name] = build_model(str(root / name), tiny_assets["tokenizer"], architecture=name)
    return paths


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_score_model_of_every_architecture(model_type, tiny_models, tmp_path):
    from paddlenlp.transformers import AutoModelForCausalLM

    causal = AutoModelForCausalLM.from_pretrained(tiny_models[model_type])
    score = AutoModelForScore.from_pretrained(tiny_models[model_type], score_type="reward")
    assert type(score).__name__ == f"{ARCHITECTURES[model_type].prefix}ModelForScore"
    backbone_name = ARCHITECTURES[model_type].backbone_name
    causal_backbone = getattr(causal, backbone_name).state_dict()
    for name, value in getattr(score, backbone_name).state_dict().items():  # the backbone loaded as it is
        np.testing.assert_array_equal(value.numpy(), causal_backbone[name].numpy(), err_msg=name)
    assert "lm_head.weight" not in score.state_dict()

    ids, mask = prompts()
    score.eval()
    with paddle.no_grad():
        out = score(ids, attention_mask=mask.astype("bool"), position_ids=make_position_ids(mask), return_dict=True)
        hidden = getattr(score, backbone_name)(
            ids, attention_mask=mask.astype("bool"), position_ids=make_position_ids(mask), return_dict=True
        ).last_hidden_state
        expected_end = score.score_head(hidden[:, -1])  # left padding: the last column is every row's end
    np.testing.assert_allclose(out.end_scores.numpy(), expected_end.numpy(), atol=1e-6)

    score.save_pretrained(str(tmp_path), safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [type(score).__name__]
    reloaded = AutoModelForScore.from_pretrained(str(tmp_path))
    reloaded.eval()
    assert type(reloaded) is type(score) and reloaded.config.score_type == "reward"
    with paddle.no_grad():
        again = reloaded(ids, attention_mask=mask.astype("bool"), position_ids=make_position_ids(mask), return_dict=True)
    np.testing.assert_allclose(again.end_scores.numpy(), out.end_scores.numpy(), atol=1e-6)


# ============================================================================ SFT -> RM -> PPO


def run_entry_point(script: str, config: dict, tmp_path, repo_root: str) -> None:
    path = tmp_path / f"{os.path.basename(script)}.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo_root)
    result = subprocess.run(
        [sys.executable, os.path.join(repo_root, script), str(path)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


COMMON = dict(overwrite_output_dir=True, do_train=True, logging_steps=1, save_strategy="no", report_to="none",
              disable_tqdm=True, seed=3)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [name for name in ("qwen2", "mistral") if name in AVAILABLE])
def test_sft_reward_model_ppo_end_to_end(model_type, tiny_models, tmp_path, repo_root):
    from paddlenlp.transformers import AutoModelForCausalLM

    data = os.path.join(repo_root, "data")
    family = ARCHITECTURES[model_type]
    sft, rm, ppo = (str(tmp_path / name) for name in ("sft", "rm", "ppo"))

    run_entry_point("alignment/sft/run_sft.py", dict(
        COMMON, model_name_or_path=tiny_models[model_type], train_datasets=f"alpaca:1:{data}/alpaca/train.jsonl",
        eval_datasets="", eval_split_ratio=0.05, do_eval=True, eval_before_training=True, max_length=96,
        max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=3e-3, output_dir=sft,
    ), tmp_path, repo_root)  # fmt: skip
    sft_evals = [r for r in read_metrics(sft) if "eval_loss" in r]
    assert sft_evals[-1]["eval_loss"] < sft_evals[0]["eval_loss"]  # it learned
    assert type(AutoModelForCausalLM.from_pretrained(sft)) is family.causal_lm_class

    run_entry_point("alignment/rm/run_reward.py", dict(
        COMMON, model_name_or_path=sft, train_datasets=f"PKU-SafeRLHF/train:1:{data}/safe_rlhf/train.jsonl",
        max_length=96, max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3, output_dir=rm,
    ), tmp_path, repo_root)  # fmt: skip
    reward = AutoModelForScore.from_pretrained(rm)
    assert type(reward).__name__ == f"{family.prefix}ModelForScore" and reward.config.score_type == "reward"
    assert [r["step"] for r in read_metrics(rm) if "loss" in r] == [1, 2, 3, 4]

    run_entry_point("alignment/ppo/run_ppo.py", dict(
        COMMON, train_datasets=f"PKU-SafeRLHF/train:1:{data}/safe_rlhf/train.jsonl", actor_model_name_or_path=sft,
        reward_model_name_or_path=rm, max_length=48, max_new_tokens=8, max_steps=2, per_device_prompt_batch_size=4,
        per_device_train_batch_size=4, learning_rate=5e-4, critic_learning_rate=5e-4, output_dir=ppo,
    ), tmp_path, repo_root)  # fmt: skip
    records = [r for r in read_metrics(ppo) if "train/actor_loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["train/actor_loss"]) and np.isfinite(r["train/reward_critic_loss"]) for r in records)
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(ppo, "policy"))
    value = AutoModelForScore.from_pretrained(os.path.join(ppo, "value"))
    assert type(policy) is family.causal_lm_class and type(value).__name__ == f"{family.prefix}ModelForScore"
    start = AutoModelForCausalLM.from_pretrained(sft).state_dict()
    changed = [name for name, tensor in policy.state_dict().items() if not np.array_equal(tensor.numpy(), start[name].numpy())]
    assert changed  # PPO updated the actor


# ============================================================================ tensor parallel


@pytest.mark.distributed
def test_tensor_parallel_equals_single_process_for_every_family(tmp_path, repo_root):
    """Causal LM (logits, loss, gradients) and score model (end scores) at TP=2 == TP=1, for the
    non-Llama families (Llama's own TP tests are in test_parallel_tensor.py)."""
    import importlib.util

    from alignment.parallel.launch import launch_distributed

    scripts = os.path.join(repo_root, "tests", "dist_scripts")
    spec = importlib.util.spec_from_file_location("parallel_common", os.path.join(scripts, "parallel_common.py"))
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    families = [name for name in DECODER_FAMILIES if name != "llama"]
    batch_np = common.make_lm_batch(seed=0, batch_size=3, seq_len=8, vocab_size=VOCAB)
    np.savez(tmp_path / "data.npz", **batch_np)
    for name in families:
        model = random_causal_lm(name)
        model.save_pretrained(str(tmp_path / name / "causal"), safe_serialization=True)
        paddle.seed(5)
        score = AutoModelForScore.from_pretrained(str(tmp_path / name / "causal"))
        score.save_pretrained(str(tmp_path / name / "score"), safe_serialization=True)
    out = tmp_path / "out"
    out.mkdir()
    launch_distributed(
        os.path.join(scripts, "architectures_tp.py"), [tmp_path, tmp_path / "data.npz", out, *families],
        nproc=2, log_dir=tmp_path / "logs", timeout=180, cwd=repo_root, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    records = common.read_rank_results(str(out), 2)
    batch = common.to_paddle(batch_np)
    batch["attention_mask"] = batch["attention_mask"].astype("bool")
    for name in families:
        assert all(r[name]["q_proj_class"] == "ColumnParallelLinear" for r in records)  # really split
        tp = dict(np.load(out / f"{name}.npz"))
        causal = get_architecture(name).causal_lm_class.from_pretrained(str(tmp_path / name / "causal"), tensor_parallel_output=False)
        loss, logits = causal(**batch, return_dict=False)[:2]
        loss.backward()
        # (tolerances: float32 round-off of split matmuls on logits of size ~5)
        np.testing.assert_allclose(tp["logits"], logits.numpy(), rtol=1e-5, atol=5e-5, err_msg=name)
        np.testing.assert_allclose(tp["loss"], loss.numpy(), rtol=1e-5, err_msg=name)
        grads = {key: p.grad.numpy() for key, p in causal.named_parameters() if p.grad is not None}
        assert sorted(k[len("grad/") :] for k in tp if k.startswith("grad/")) == sorted(grads)
        for key, grad in grads.items():
            np.testing.assert_allclose(tp[f"grad/{key}"], grad, rtol=1e-4, atol=1e-5, err_msg=f"{name} {key}")
        score = AutoModelForScore.from_pretrained(str(tmp_path / name / "score"))
        score.eval()
        with paddle.no_grad():
            end_scores = score(batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=True).end_scores
        np.testing.assert_allclose(tp["end_scores"], end_scores.numpy(), atol=1e-5, err_msg=name)


# ============================================================================ pipeline stages


@pytest.mark.parametrize("model_type", DECODER_FAMILIES)
def test_pipeline_stages_reproduce_the_full_model(model_type):
    """Chained stages (as the pipeline engine runs them, one per rank) give the full model's logits and
    score-model scores (Llama's pipeline training tests are in test_parallel_pipeline.py)."""
    from alignment.parallel.pipeline import PipelineStage

    model = random_causal_lm(model_type, num_hidden_layers=3)
    ids, mask = prompts()
    batch = {"input_ids": ids, "attention_mask": mask.astype("bool"), "position_ids": make_position_ids(mask)}
    with paddle.no_grad():
        expected = model(**batch, return_dict=False)[0]
        stages = [PipelineStage(model, s, 2) for s in range(2)]
        logits = stages[1](batch, stages[0](batch))
    assert stages[0].layer_range == (0, 1) and stages[1].layer_range == (1, 3)
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)

    score = AutoModelForScore.from_config(model.config, score_type="critic")
    score.eval()
    with paddle.no_grad():
        expected_scores = score(**batch, return_dict=True).scores
        stages = [PipelineStage(score, s, 2, head_name="score_head") for s in range(2)]
        scores = stages[1](batch, stages[0](batch))
    assert set(stages[0].state_dict()) | set(stages[1].state_dict()) == set(score.state_dict())
    np.testing.assert_allclose(scores.numpy(), expected_scores.numpy(), rtol=1e-5, atol=1e-5)
    if model_type == "qwen2":  # tied embeddings cannot be split across stages: a clear error
        tied = random_causal_lm(model_type, tie_word_embeddings=True)
        with pytest.raises(NotImplementedError, match="tie_word_embeddings"):
            PipelineStage(tied, 0, 2)


# ============================================================================ unsupported architectures


@pytest.mark.parametrize(
    "script, fields",
    [
        ("sft", {"model_name_or_path": "{gpt}"}),
        ("rm", {"model_name_or_path": "{gpt}"}),
        ("ppo", {"actor_model_name_or_path": "{gpt}", "reward_model_name_or_path": "{gpt}"}),
    ],
)
def test_entry_points_refuse_an_unsupported_architecture_before_loading_weights(script, fields, tiny_assets, tmp_path, repo_root):
    """A checkpoint directory with a GPT config and no weights at all: the error names the field, the
    model type and every supported family (nothing is loaded, or the missing weights would fail first)."""
    import shutil

    from alignment.ppo.run_ppo import main as run_ppo
    from alignment.rm.run_reward import main as run_reward
    from alignment.sft.run_sft import main as run_sft
    from alignment.utils.config import ConfigError

    gpt = tmp_path / "gpt"
    shutil.copytree(tiny_assets["tokenizer"], gpt)
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt", "architectures": ["GPTForCausalLM"], "vocab_size": 1000}))
    data = os.path.join(repo_root, "data")
    argv = {
        "sft": [os.path.join(repo_root, "config", "tiny", "sft_argument.json"), "--train_datasets", f"alpaca:1:{data}/alpaca/train.jsonl", "--eval_datasets", f"alpaca:1:{data}/alpaca/test.jsonl"],
        "rm": [os.path.join(repo_root, "config", "tiny", "rm_argument.json"), "--train_datasets", f"PKU-SafeRLHF/train:1:{data}/safe_rlhf/train.jsonl", "--eval_datasets", f"PKU-SafeRLHF/test:1:{data}/safe_rlhf/test.jsonl"],
        "ppo": [os.path.join(repo_root, "config", "tiny", "ppo_argument.json"), "--train_datasets", f"PKU-SafeRLHF/train:1:{data}/safe_rlhf/train.jsonl", "--eval_datasets", f"PKU-SafeRLHF/test:1:{data}/safe_rlhf/test.jsonl", "--ptx_datasets", f"alpaca:1:{data}/alpaca/train.jsonl"],
    }[script]  # fmt: skip
    for key, value in {**fields, "output_dir": str(tmp_path / "out"), "report_to": "none"}.items():
        argv += [f"--{key}", value.format(gpt=gpt)]
    main = {"sft": run_sft, "rm": run_reward, "ppo": run_ppo}[script]
    with pytest.raises(ConfigError) as error:
        main(argv)
    message = str(error.value)
    first_field = next(iter(fields))
    assert f"{first_field}: {gpt}: model_type 'gpt' is not supported" in message, message
    assert all(name in message for name in AVAILABLE)
