"""Hugging Face checkpoints out: transformers loads our policy / score models with equal logits and
generations; and the round trip transformers -> SFT -> RM -> PPO -> export -> transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from hf_helpers import ZEPHYR_TEMPLATE, build_hf_llama, directory_state, paddle_logits, torch_logits

from alignment.models.architectures import available_architectures
from alignment.models.hf_convert import CACHE_ENV, HFCheckpointError, export_hf_checkpoint, resolve_pretrained_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT_SCRIPT = os.path.join(REPO_ROOT, "scripts", "export_hf.py")
IDS = np.array([[1, 294, 284, 295, 920, 289, 920, 438, 321, 905, 968, 969, 721]], dtype=np.int64)


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "hf_cache"))


def _greedy_ours(model_dir: str, ids: np.ndarray, max_new_tokens: int, backend: str) -> list[int]:
    import paddle
    from paddlenlp.transformers import AutoModelForCausalLM

    from alignment.ppo.infer_utils import generate_rollout

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    with paddle.no_grad():
        out = generate_rollout(
            model, paddle.to_tensor(ids), paddle.ones(ids.shape, dtype="bool"), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=2, pad_token_id=2, backend=backend,
        )  # fmt: skip
    return out[0, ids.shape[1] :].numpy().tolist()


def _greedy_transformers(model, ids: np.ndarray, max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=2, pad_token_id=2,
        )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def _until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(2) + 1] if 2 in tokens else tokens


def test_policy_export_loads_in_transformers_with_equal_logits_generations_and_tokenizer(tiny_assets, tmp_path):
    from paddlenlp.transformers import AutoModelForCausalLM
    from transformers import AutoModelForCausalLM as HFCausalLM
    from transformers import AutoTokenizer

    from alignment.data import load_tokenizer

    out = str(tmp_path / "hf_policy")
    before = directory_state(tiny_assets["llama"])
    export_hf_checkpoint(tiny_assets["llama"], out)
    assert directory_state(tiny_assets["llama"]) == before
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(out))
    theirs = HFCausalLM.from_pretrained(out).eval()  # raises on missing keys below via the logits check
    ours = AutoModelForCausalLM.from_pretrained(tiny_assets["llama"])
    np.testing.assert_allclose(torch_logits(theirs, IDS), paddle_logits(ours, IDS), atol=2e-5, rtol=0)
    expected = _until_eos(_greedy_ours(tiny_assets["llama"], IDS, 16, backend="fast"))
    assert _until_eos(_greedy_transformers(theirs, IDS, 16)) == expected
    assert _until_eos(_greedy_ours(tiny_assets["llama"], IDS, 16, backend="plain")) == expected

    hf_tokenizer = AutoTokenizer.from_pretrained(out, use_fast=False)
    paddle_tokenizer = load_tokenizer(tiny_assets["llama"])
    assert len(hf_tokenizer) == len(paddle_tokenizer) == 1000  # not the 3-token vocabulary of the issue
    text = "BEGINNING OF CONVERSATION: USER: What is 12 + 7? ASSISTANT: 19"
    assert hf_tokenizer(text)["input_ids"] == paddle_tokenizer(text)["input_ids"]
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_score_model_export_is_sequence_classification_plus_bias_and_imports_back(tiny_assets, tmp_path):
    import paddle
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignment.models import AutoModelForScore

    source = str(tmp_path / "score")
    model = AutoModelForScore.from_pretrained(tiny_assets["llama"], score_dim=2, score_type="cost")
    with paddle.no_grad():
        model.score_head.bias.set_value(paddle.to_tensor([0.5, -0.25]))
    model.save_pretrained(source, safe_serialization=True)
    for name in os.listdir(tiny_assets["tokenizer"]):
        shutil.copy(os.path.join(tiny_assets["tokenizer"], name), source)
    model.eval()
    with paddle.no_grad():
        expected = model(paddle.to_tensor(IDS), return_dict=True).end_scores.numpy()

    out = str(tmp_path / "hf_score")
    export_hf_checkpoint(source, out)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 2
    assert config["score_head_bias"] == [0.5, -0.25] and config["score_type"] == "cost"
    theirs = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        logits = theirs(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(logits + np.asarray(config["score_head_bias"]), expected, atol=2e-5, rtol=0)

    back = AutoModelForScore.from_pretrained(resolve_pretrained_dir(out))  # transformers layout -> ours again
    back.eval()
    assert back.config.score_dim == 2 and back.config.score_bias
    with paddle.no_grad():
        again = back(paddle.to_tensor(IDS), return_dict=True).end_scores.numpy()
    np.testing.assert_allclose(again, expected, atol=2e-5, rtol=0)


#: ``(name, model_type, overrides)``: a random tied model greedily repeats its last input token (the
#: residual stream stays close to that token's embedding), so the untied Qwen2 exercises generation.
#: Only the families the installed PaddleNLP provides (2.8.1 has neither; parametrised, not skipped).
OTHER_MODELS = [
    (name, model_type, options)
    for name, model_type, options in [
        ("qwen2", "qwen2", {}), ("qwen2_untied", "qwen2", dict(tie_word_embeddings=False)), ("mistral", "mistral", {})
    ]
    if model_type in available_architectures()
]  # fmt: skip
OTHER_FAMILIES = sorted({model_type for _, model_type, _ in OTHER_MODELS})


@pytest.fixture(scope="module")
def tiny_other_models(tiny_assets, tmp_path_factory):
    """``{name: directory}`` of :data:`OTHER_MODELS`: tiny Qwen2s (GQA, random q/k/v biases) and a Mistral (GQA), saved by PaddleNLP."""
    import paddle

    from alignment.utils.tiny_assets import build_model

    root = tmp_path_factory.mktemp("tiny_other_models")
    models = {}
    for seed, (name, model_type, options) in enumerate(OTHER_MODELS):
        directory = build_model(str(root / name), tiny_assets["tokenizer"], seed=20 + seed, architecture=model_type,
                                max_position_embeddings=128, **options)  # fmt: skip
        if model_type == "qwen2":  # PaddleNLP initialises the biases to zero: make them matter
            from paddlenlp.transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(directory)
            with paddle.no_grad():
                for parameter_name, parameter in model.named_parameters():
                    if parameter_name.endswith(".bias"):
                        parameter.set_value(paddle.randn(parameter.shape) * 0.1)
            model.save_pretrained(directory, safe_serialization=True)
        models[name] = directory
    return models


@pytest.mark.parametrize("name, model_type, tied", [(n, t, o.get("tie_word_embeddings", t == "qwen2")) for n, t, o in OTHER_MODELS])
def test_qwen2_and_mistral_export_loads_in_transformers_with_equal_logits_and_generations(name, model_type, tied, tiny_other_models, tmp_path):
    from paddlenlp.transformers import AutoModelForCausalLM
    from transformers import AutoModelForCausalLM as HFCausalLM

    source = tiny_other_models[name]
    out = export_hf_checkpoint(source, str(tmp_path / "hf"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == model_type and config["num_key_value_heads"] == 2
    if model_type == "qwen2":
        assert config["architectures"] == ["Qwen2ForCausalLM"] and config["use_sliding_window"] is False
        assert config["tie_word_embeddings"] is tied  # a tied head stays tied, an untied one untied
    else:
        assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] is None
    theirs = HFCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == config["architectures"][0]
    ours = AutoModelForCausalLM.from_pretrained(source)
    np.testing.assert_allclose(torch_logits(theirs, IDS), paddle_logits(ours, IDS), atol=2e-5, rtol=0)
    expected = _until_eos(_greedy_ours(source, IDS, 12, backend="fast"))
    assert _until_eos(_greedy_transformers(theirs, IDS, 12)) == expected
    assert tied or len(set(expected)) > 3  # a real continuation, not one repeated token
    # and back in: the exported directory converts to a checkpoint with the same logits
    back = AutoModelForCausalLM.from_pretrained(resolve_pretrained_dir(out))
    np.testing.assert_allclose(paddle_logits(back, IDS), paddle_logits(ours, IDS), atol=2e-5, rtol=0)


@pytest.mark.parametrize("model_type", OTHER_FAMILIES)
def test_qwen2_and_mistral_score_export_is_sequence_classification(model_type, tiny_other_models, tmp_path):
    import paddle
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignment.models import AutoModelForScore

    source = str(tmp_path / "score")
    model = AutoModelForScore.from_pretrained(tiny_other_models[model_type], score_type="reward")
    with paddle.no_grad():
        model.score_head.bias.set_value(paddle.to_tensor([0.75]))
    model.save_pretrained(source, safe_serialization=True)
    for name in ("sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(tiny_other_models[model_type], name)):
            shutil.copy(os.path.join(tiny_other_models[model_type], name), source)
    model.eval()
    with paddle.no_grad():
        expected = model(paddle.to_tensor(IDS), return_dict=True).end_scores.numpy()
    out = export_hf_checkpoint(source, str(tmp_path / "hf_score"))
    config = json.load(open(os.path.join(out, "config.json")))
    prefix = {"qwen2": "Qwen2", "mistral": "Mistral"}[model_type]
    assert config["architectures"] == [f"{prefix}ForSequenceClassification"] and config["score_head_bias"] == [0.75]
    theirs = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(theirs).__name__ == f"{prefix}ForSequenceClassification"
    with torch.no_grad():
        logits = theirs(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(logits + 0.75, expected, atol=2e-5, rtol=0)
    back = AutoModelForScore.from_pretrained(resolve_pretrained_dir(out))
    back.eval()
    assert type(back).__name__ == f"{prefix}ModelForScore"
    with paddle.no_grad():
        np.testing.assert_allclose(back(paddle.to_tensor(IDS), return_dict=True).end_scores.numpy(), expected, atol=2e-5, rtol=0)


IM_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _save_byte_level_bpe_tokenizer(directory: str) -> None:
    """A tiny Qwen2-style tokenizer (byte-level BPE, ``<|im_start|>``/``<|im_end|>``, a chat template),
    saved by PaddleNLP 3 as a Qwen2 checkpoint ships it (``vocab.json``, ``merges.txt`` ...)."""
    from paddlenlp.transformers import AutoTokenizer
    from transformers import Qwen2Tokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    hub = directory + "_hub"
    os.makedirs(hub)
    vocab = {character: i for i, character in enumerate(bytes_to_unicode().values())}
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    json.dump(vocab, open(os.path.join(hub, "vocab.json"), "w"))
    with open(os.path.join(hub, "merges.txt"), "w") as file:
        file.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = Qwen2Tokenizer(os.path.join(hub, "vocab.json"), os.path.join(hub, "merges.txt"), eos_token="<|endoftext|>",
                               pad_token="<|endoftext|>", unk_token=None, bos_token=None)  # fmt: skip
    tokenizer.chat_template = IM_TEMPLATE
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(hub)
    AutoTokenizer.from_pretrained(hub).save_pretrained(directory)


@pytest.mark.parametrize("model_type", [name for name in OTHER_FAMILIES if name == "qwen2"])
def test_qwen2_byte_level_bpe_tokenizer_exports_and_imports_back(model_type, tiny_other_models, tmp_path):
    from paddlenlp.transformers import AutoTokenizer
    from transformers import AutoTokenizer as HFTokenizer

    source = str(tmp_path / "qwen2_bpe")
    shutil.copytree(tiny_other_models[model_type], source)
    for name in os.listdir(source):
        if name.startswith(("sentencepiece", "tokenizer", "special_tokens", "added_tokens")):
            os.remove(os.path.join(source, name))
    _save_byte_level_bpe_tokenizer(source)
    out = export_hf_checkpoint(source, str(tmp_path / "hf"))
    hf_config = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert hf_config["tokenizer_class"] == "Qwen2Tokenizer" and "added_tokens_file" not in hf_config
    ours, theirs = AutoTokenizer.from_pretrained(source), HFTokenizer.from_pretrained(out, use_fast=False)
    text = "<|im_start|>user\nthe answer in 12 é<|im_end|>\n"
    assert theirs(text)["input_ids"] == ours(text)["input_ids"] and 265 in theirs(text)["input_ids"]
    assert theirs.chat_template == IM_TEMPLATE and theirs.eos_token == "<|endoftext|>"
    back = AutoTokenizer.from_pretrained(resolve_pretrained_dir(out))  # and in again
    assert back(text)["input_ids"] == ours(text)["input_ids"]


def test_export_script_is_thin_and_refuses_bad_input(tiny_assets, tmp_path, python):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    out = str(tmp_path / "exported")
    result = subprocess.run([python, EXPORT_SCRIPT, "--input", tiny_assets["llama"], "--output", out], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == out and os.path.isfile(os.path.join(out, "tokenizer.model"))
    again = subprocess.run([python, EXPORT_SCRIPT, "--input", tiny_assets["llama"], "--output", out], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 2 and "output: " in again.stderr and "is not empty" in again.stderr
    with pytest.raises(HFCheckpointError, match="already a Hugging Face checkpoint"):
        export_hf_checkpoint(out, str(tmp_path / "twice"))


@pytest.mark.slow
def test_round_trip_transformers_to_sft_rm_ppo_and_back(tiny_assets, tmp_path, monkeypatch):
    """A transformers Llama (GQA, rope_theta 500, tied head, zephyr chat template) goes through SFT, RM and
    PPO as the user's hub directory; the exported results load in transformers with our logits."""
    import torch
    from paddlenlp.transformers import AutoModelForCausalLM
    from transformers import AutoModelForCausalLM as HFCausalLM
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignment.models import AutoModelForScore
    from alignment.ppo.run_ppo import main as run_ppo
    from alignment.rm.run_reward import main as run_reward
    from alignment.sft.run_sft import main as run_sft

    monkeypatch.chdir(REPO_ROOT)
    hub = str(tmp_path / "hub_llama")
    hf_model = build_hf_llama(hub, tiny_assets["tokenizer"], seed=3, chat_template=ZEPHYR_TEMPLATE, rope_theta=500.0, tie_word_embeddings=True)
    before = directory_state(hub)
    # start of the trip: transformers' logits = ours on the converted copy
    np.testing.assert_allclose(
        paddle_logits(AutoModelForCausalLM.from_pretrained(resolve_pretrained_dir(hub)), IDS), torch_logits(hf_model, IDS), atol=2e-5, rtol=0
    )
    common = ["--report_to", "none", "--save_strategy", "no", "--evaluation_strategy", "no", "--do_eval", "false",
              "--eval_before_training", "false", "--overwrite_output_dir", "true", "--disable_tqdm", "true",
              "--chat_template", "tokenizer", "--system_prompt", "Answer briefly."]  # fmt: skip
    sft_dir, rm_dir, ppo_dir = str(tmp_path / "sft"), str(tmp_path / "rm"), str(tmp_path / "ppo")
    metrics = run_sft([os.path.join(REPO_ROOT, "config", "tiny", "sft_argument.json"), "--model_name_or_path", hub,
                       "--output_dir", sft_dir, "--train_datasets", "alpaca:64/-1:data/alpaca/train.jsonl",
                       "--max_steps", "4", "--per_device_train_batch_size", "16", "--learning_rate", "0.003", *common])  # fmt: skip
    assert metrics["train_loss"] > 0
    run_reward([os.path.join(REPO_ROOT, "config", "tiny", "rm_argument.json"), "--model_name_or_path", hub,
                "--output_dir", rm_dir, "--train_datasets", "PKU-SafeRLHF/train:32/-1:data/safe_rlhf/train.jsonl",
                "--max_steps", "2", *common])  # fmt: skip
    hub_reward = export_hf_checkpoint(rm_dir, str(tmp_path / "hub_reward"))  # the reward model as a hub directory too
    run_ppo([os.path.join(REPO_ROOT, "config", "tiny", "ppo_argument.json"), "--actor_model_name_or_path", sft_dir,
             "--reward_model_name_or_path", hub_reward, "--output_dir", ppo_dir,
             "--train_datasets", "PKU-SafeRLHF/train:8/-1:data/safe_rlhf/train.jsonl", "--eval_datasets", "",
             "--ptx_datasets", "", "--ptx_coeff", "0", "--do_eval", "false", "--evaluation_strategy", "no",
             "--max_steps", "1", "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "4",
             "--num_return_sequences", "1", "--max_new_tokens", "8", "--max_length", "64", "--report_to", "none",
             "--save_strategy", "no", "--disable_tqdm", "true", "--chat_template", "tokenizer",
             "--system_prompt", "Answer briefly."])  # fmt: skip
    # the evaluation script takes hub directories and the template too
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_policy", os.path.join(REPO_ROOT, "scripts", "evaluate_policy.py"))
    evaluate_policy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_policy)
    report = evaluate_policy.main(["--policy", hub, "--reward-model", hub_reward, "--prompts",
                                   "PKU-SafeRLHF/test:3/-1:data/safe_rlhf/test.jsonl", "--output", str(tmp_path / "eval.json"),
                                   "--samples", "1", "--temperature", "0", "--max-new-tokens", "4", "--chat-template", "tokenizer"])  # fmt: skip
    assert report["num_generations"] == 3 and all(row["prompt"].startswith("<|user|>") for row in report["generations"])
    assert directory_state(hub) == before  # no stage wrote into the user's directory

    # end of the trip: the PPO policy and critic, exported, load in transformers with our logits
    policy_hf = export_hf_checkpoint(os.path.join(ppo_dir, "policy"), str(tmp_path / "policy_hf"))
    ours = paddle_logits(AutoModelForCausalLM.from_pretrained(os.path.join(ppo_dir, "policy")), IDS)
    np.testing.assert_allclose(torch_logits(HFCausalLM.from_pretrained(policy_hf).eval(), IDS), ours, atol=2e-5, rtol=0)
    assert np.abs(ours - torch_logits(hf_model, IDS)).max() > 1e-3  # training changed the model
    assert AutoTokenizer.from_pretrained(policy_hf, use_fast=False).chat_template == ZEPHYR_TEMPLATE
    critic_hf = export_hf_checkpoint(os.path.join(ppo_dir, "value"), str(tmp_path / "critic_hf"))
    critic = AutoModelForScore.from_pretrained(os.path.join(ppo_dir, "value"))
    critic.eval()
    import paddle

    with paddle.no_grad():
        expected = critic(paddle.to_tensor(IDS), return_dict=True).end_scores.numpy()
    config = json.load(open(os.path.join(critic_hf, "config.json")))
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(critic_hf).eval()(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(logits + np.asarray(config.get("score_head_bias", 0.0)), expected, atol=2e-5, rtol=0)
