"""Hugging Face checkpoints in: transformers-built Llamas load with logits equal to transformers'."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from hf_helpers import SHAPE, build_hf_llama, directory_state, paddle_logits, save_hf_tokenizer, torch_logits
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.models.architectures import available_architectures
from alignment.models.hf_convert import (
    CACHE_ENV,
    HF_ARCHITECTURES,
    HFCheckpointError,
    _iter_tensors,
    _write_safetensors,
    check_sliding_window,
    config_from_hf,
    hf_to_paddle_name,
    import_hf_checkpoint,
    is_hf_checkpoint,
    lm_head_is_transposed,
    paddle_to_hf_name,
    resolve_model_arguments,
    resolve_pretrained_dir,
    rope_settings_from_hf,
)
from alignment.utils.config import ConfigError

LLAMA = HF_ARCHITECTURES["llama"]
IDS = np.array([[1, 5, 17, 99, 3, 400, 7, 8, 9, 10, 11, 12, 250, 999, 2, 31]], dtype=np.int64)

VARIANTS = {
    "gqa": {},
    "sharded": dict(max_shard_size="300KB"),  # model-0000N-of-0000M.safetensors + index
    "tied": dict(tie_word_embeddings=True),
    "rope_theta": dict(rope_theta=500.0),
    "rope_parameters": dict(rope_theta=500.0, rope_parameters={"rope_theta": 500.0, "rope_type": "default"}),
    "linear_scaling": dict(
        rope_theta=500.0,
        rope_scaling={"type": "linear", "factor": 2.0},
        rope_parameters={"rope_theta": 500.0, "rope_type": "linear", "factor": 2.0},
    ),
    # dynamic NTK scaling changes the rope base only past max_position_embeddings: IDS (16) is longer
    "dynamic_scaling": dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
}


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        directory = str(tmp_path_factory.mktemp("hf_cache"))
        patch.setenv(CACHE_ENV, directory)
        yield directory


@pytest.fixture(scope="module")
def hf_models(tiny_assets, tmp_path_factory):
    """``{variant: (directory, torch model)}``; transformers-5 variants have ``rope_parameters`` only."""
    root = tmp_path_factory.mktemp("hf_models")
    models = {}
    for seed, (name, options) in enumerate(VARIANTS.items()):
        options = dict(options)
        rope_parameters = options.pop("rope_parameters", None)
        directory = str(root / name)
        model = build_hf_llama(directory, tiny_assets["tokenizer"], seed=seed, rope_parameters=rope_parameters, **options)
        models[name] = (directory, model)
    return models


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers_and_the_source_is_untouched(variant, hf_models):
    from paddlenlp.transformers import AutoModelForCausalLM

    directory, torch_model = hf_models[variant]
    if variant == "sharded":
        assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
    before = directory_state(directory)
    assert is_hf_checkpoint(directory)
    converted = resolve_pretrained_dir(directory)
    assert converted != directory and not is_hf_checkpoint(converted)
    ours = paddle_logits(AutoModelForCausalLM.from_pretrained(converted), IDS)
    theirs = torch_logits(torch_model, IDS)
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)
    assert directory_state(directory) == before  # nothing written into the user's directory


# ---------------------------------------------------------------------------------------------------
# Qwen2 (GQA, q/k/v biases, tied head) and Mistral (GQA, sliding window field)
# ---------------------------------------------------------------------------------------------------

OTHER_ARCHITECTURES = {
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1e6, use_sliding_window=False, sliding_window=64, max_window_layers=1),
    "mistral": dict(rope_theta=500.0, sliding_window=None),
}
#: Loading needs the PaddleNLP model (3.x; 2.8.1 has neither): parametrised over what is installed, not skipped.
LOADABLE = [model_type for model_type in OTHER_ARCHITECTURES if model_type in available_architectures()]


def build_hf_model(directory: str, sentencepiece_dir: str, model_type: str, seed: int = 0, **overrides):
    """A random transformers ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` (GQA) in the hub layout.

    Qwen2's q/k/v biases start at zero in transformers: they are randomised so a dropped bias shows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    defaults = dict(vocab_size=1000, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)
    config = AutoConfig.for_model(model_type, **{**defaults, **SHAPE, **OTHER_ARCHITECTURES[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    save_hf_tokenizer(directory, sentencepiece_dir)
    return model


@pytest.fixture(scope="module")
def hf_other_models(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_other_models")
    return {
        model_type: (str(root / model_type), build_hf_model(str(root / model_type), tiny_assets["tokenizer"], model_type, seed=10 + i))
        for i, model_type in enumerate(OTHER_ARCHITECTURES)
    }


@pytest.mark.parametrize("model_type", LOADABLE)
def test_qwen2_and_mistral_logits_equal_transformers(model_type, hf_other_models):
    from paddlenlp.transformers import AutoModelForCausalLM

    directory, torch_model = hf_other_models[model_type]
    names = {name for name, _, _ in _iter_tensors(directory)}
    if model_type == "qwen2":
        assert "model.layers.1.self_attn.k_proj.bias" in names and "lm_head.weight" not in names  # biases, tied head
    before = directory_state(directory)
    converted = resolve_pretrained_dir(directory)
    config = json.load(open(os.path.join(converted, "config.json")))
    assert config["model_type"] == model_type and config["num_key_value_heads"] == 2
    tensors = {name: np.asarray(array) for name, _, array in _iter_tensors(converted)}
    if model_type == "qwen2":
        np.testing.assert_array_equal(
            tensors["qwen2.layers.1.self_attn.k_proj.bias"], torch_model.model.layers[1].self_attn.k_proj.bias.detach().numpy()
        )
        np.testing.assert_array_equal(tensors["lm_head.weight"], tensors["qwen2.embed_tokens.weight"].T)
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert type(model).__name__ == f"{HF_ARCHITECTURES[model_type].causal_lm}"
    np.testing.assert_allclose(paddle_logits(model, IDS), torch_logits(torch_model, IDS), atol=2e-5, rtol=0)
    assert directory_state(directory) == before


@pytest.mark.parametrize(
    "model_type, changes, message",
    [
        ("mistral", dict(sliding_window=32), "sliding_window 32 < max_position_embeddings 128"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=2), "sliding_window 32 <"),
        ("qwen2", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope type 'linear' is not supported for qwen2"),
        ("mistral", dict(mlp_bias=True), "mlp_bias=true is not supported"),
    ],
)
def test_qwen2_and_mistral_unsupported_configs_are_refused(hf_other_models, tmp_path, model_type, changes, message):
    source = _copy_with_config(hf_other_models[model_type][0], str(tmp_path / "bad"), **changes)
    with pytest.raises(HFCheckpointError, match="config.json") as error:
        resolve_pretrained_dir(source)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "config, refused",
    [
        (dict(model_type="mistral", sliding_window=4096, max_position_embeddings=32768), True),  # Mistral-7B-v0.1
        (dict(model_type="mistral", sliding_window=None, max_position_embeddings=32768), False),  # v0.2+
        (dict(model_type="mistral", sliding_window=4096, max_position_embeddings=4096), False),
        (dict(model_type="qwen2", use_sliding_window=False, sliding_window=4096, max_position_embeddings=32768), False),
        # transformers' sdpa/eager attention windows every layer whatever max_window_layers says
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4096, max_position_embeddings=32768,
              max_window_layers=28, num_hidden_layers=28), True),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=32768, max_position_embeddings=32768), False),
        (dict(model_type="llama", sliding_window=8, max_position_embeddings=32), False),
    ],
)  # fmt: skip
def test_sliding_window_rule(config, refused):
    if refused:
        with pytest.raises(HFCheckpointError, match="where.json: sliding_window"):
            check_sliding_window(config, "where.json")
    else:
        check_sliding_window(config, "where.json")


@pytest.mark.parametrize(
    "shape, tied, transposed",
    [((64, 1000), False, True), ((1000, 64), True, False), ((1000, 64), False, False), ((64, 64), True, False), ((64, 64), False, True)],
)
def test_lm_head_layout_rule(shape, tied, transposed):
    """PaddleNLP's untied head is [hidden, vocab], a tied one is the [vocab, hidden] embedding matrix."""
    vocab = shape[0] if shape[0] != 64 else shape[1]
    assert lm_head_is_transposed(shape, {"vocab_size": vocab, "hidden_size": 64, "tie_word_embeddings": tied}) is transposed


def test_rope_theta_and_tied_head_are_not_lost(hf_models):
    """The two faults PaddleNLP's own conversion has: rope_parameters ignored, tied head re-initialised."""
    config = json.load(open(os.path.join(resolve_pretrained_dir(hf_models["rope_parameters"][0]), "config.json")))
    assert config["rope_theta"] == 500.0
    linear = json.load(open(os.path.join(resolve_pretrained_dir(hf_models["linear_scaling"][0]), "config.json")))
    assert (linear["rope_scaling_type"], linear["rope_scaling_factor"]) == ("linear", 2.0)
    tied_dir = resolve_pretrained_dir(hf_models["tied"][0])
    tensors = {name: np.asarray(array) for name, _, array in _iter_tensors(tied_dir)}
    np.testing.assert_array_equal(tensors["lm_head.weight"], tensors["llama.embed_tokens.weight"].T)


def test_cache_is_reused_and_keyed_by_content(hf_models, tmp_path):
    source = str(tmp_path / "copy")
    shutil.copytree(hf_models["gqa"][0], source)
    first = resolve_pretrained_dir(source)
    stamp = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    assert resolve_pretrained_dir(source) == first
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == stamp  # not converted again
    config_path = os.path.join(source, "config.json")
    config = json.load(open(config_path))
    config["rope_theta"] = 20000.0
    json.dump(config, open(config_path, "w"))
    second = resolve_pretrained_dir(source)
    assert second != first and json.load(open(os.path.join(second, "config.json")))["rope_theta"] == 20000.0


def test_our_own_checkpoints_pass_through(tiny_assets, tiny_score_model):
    assert not is_hf_checkpoint(tiny_assets["llama"]) and not is_hf_checkpoint(tiny_score_model)
    assert resolve_pretrained_dir(tiny_assets["llama"]) == tiny_assets["llama"]
    assert resolve_pretrained_dir("facebook/llama-7b") == "facebook/llama-7b"  # a hub name is left alone


def test_tokenizer_ids_equal_transformers(hf_models):
    from transformers import AutoTokenizer

    from alignment.data import load_tokenizer
    from alignment.data.chat_template import _ids

    directory = hf_models["gqa"][0]
    ours, theirs = load_tokenizer(directory), AutoTokenizer.from_pretrained(directory, use_fast=False)
    assert len(ours) == len(theirs) == 1000
    for text in ["BEGINNING OF CONVERSATION: USER: What is 12 + 7? ASSISTANT: 19", "  spaces\tand 123 digits", "é ü ✓"]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    # special-token text (a template's EOS between turns) becomes the token, as in transformers
    for text in ["USER: hi ASSISTANT:yes</s>USER: more", "<s>a</s>\n<|user|>\n b </s> c"]:
        assert _ids(ours, text, add_special_tokens=False).tolist() == theirs(text, add_special_tokens=False)["input_ids"]
        assert _ids(ours, text, add_special_tokens=True).tolist() == theirs(text)["input_ids"]
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")


def test_score_model_backbone_equals_transformers(hf_models):
    """A reward/critic model built on an HF causal LM: same hidden states as transformers' LlamaModel."""
    import paddle
    import torch

    from alignment.models import AutoModelForScore

    directory, torch_model = hf_models["rope_theta"]
    score_model = AutoModelForScore.from_pretrained(resolve_pretrained_dir(directory), score_type="reward")
    score_model.eval()
    with paddle.no_grad():
        ours = score_model.llama(paddle.to_tensor(IDS), return_dict=True).last_hidden_state.numpy()
    with torch.no_grad():
        theirs = torch_model.model(torch.tensor(IDS)).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)


def test_resolve_model_arguments_rewrites_only_hf_paths(hf_models, tiny_assets):
    from alignment.ppo.run_ppo import ModelArgument

    args = ModelArgument(
        actor_model_name_or_path=hf_models["gqa"][0],
        reward_model_name_or_path=tiny_assets["llama"],
        reward_critic_model_name_or_path=None,
    )
    resolve_model_arguments(args)
    assert args.actor_model_name_or_path == resolve_pretrained_dir(hf_models["gqa"][0])
    assert args.reward_model_name_or_path == tiny_assets["llama"] and args.reward_critic_model_name_or_path is None


# ---------------------------------------------------------------------------------------------------
# Bad checkpoints: one clear message naming the file and field
# ---------------------------------------------------------------------------------------------------


def _copy_with_config(source: str, target: str, **changes) -> str:
    shutil.copytree(source, target)
    config = json.load(open(os.path.join(target, "config.json")))
    config.update(changes)
    json.dump(config, open(os.path.join(target, "config.json"), "w"))
    return target


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope type 'llama3' is not supported"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "rope type 'yarn'"),
        (dict(attention_bias=True), "attention_bias=true is not supported"),
        (dict(head_dim=32), "head_dim 32"),
        (dict(model_type="gpt2"), "model_type 'gpt2' has no Hugging Face conversion; supported: ['llama', 'mistral', 'qwen2']"),
    ],
)
def test_unsupported_configs_are_refused_clearly(hf_models, tmp_path, changes, message):
    source = _copy_with_config(hf_models["gqa"][0], str(tmp_path / "bad"), **changes)
    with pytest.raises(HFCheckpointError, match="config.json") as error:
        resolve_pretrained_dir(source)
    assert message in str(error.value)
    from alignment.ppo.run_ppo import ModelArgument

    with pytest.raises(ConfigError, match="actor_model_name_or_path: .*" + message.split(" ")[0]):
        resolve_model_arguments(ModelArgument(actor_model_name_or_path=source))


def test_torch_pickle_weights_are_refused_with_the_fix(hf_models, tmp_path):
    source = str(tmp_path / "bin")
    shutil.copytree(hf_models["gqa"][0], source)
    os.remove(os.path.join(source, "model.safetensors"))
    open(os.path.join(source, "pytorch_model.bin"), "wb").close()
    assert is_hf_checkpoint(source)
    with pytest.raises(HFCheckpointError, match="only safetensors weights are read.*safe_serialization=True"):
        import_hf_checkpoint(source, str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------------
# Pure rules: names, layouts, rope settings, safetensors bytes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hf_name, ndim, ours, transposed",
    [
        ("model.layers.3.self_attn.q_proj.weight", 2, "llama.layers.3.self_attn.q_proj.weight", True),
        ("model.layers.0.mlp.down_proj.weight", 2, "llama.layers.0.mlp.down_proj.weight", True),
        ("model.layers.0.input_layernorm.weight", 1, "llama.layers.0.input_layernorm.weight", False),
        ("model.embed_tokens.weight", 2, "llama.embed_tokens.weight", False),
        ("model.norm.weight", 1, "llama.norm.weight", False),
        ("lm_head.weight", 2, "lm_head.weight", True),
        ("score.weight", 2, "score_head.weight", True),
        ("score_head.weight", 2, "score_head.weight", True),
        ("score_head.bias", 1, "score_head.bias", False),
        ("normalizer.mean", 1, "normalizer.mean", False),
    ],
)
def test_name_rules(hf_name, ndim, ours, transposed):
    assert hf_to_paddle_name(hf_name, ndim, LLAMA) == (ours, transposed)
    if not hf_name.startswith("score_head."):  # safe-rlhf names come back in transformers' classification layout
        assert paddle_to_hf_name(ours, ndim, LLAMA) == (hf_name, transposed)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.sampled_from(["layers", "0", "7", "self_attn", "mlp", "k_proj", "up_proj", "norm"]), min_size=1, max_size=4),
    st.sampled_from(["weight", "bias"]),
    st.integers(1, 2),
)
def test_name_rules_round_trip(parts, kind, ndim):
    name = "llama." + ".".join(parts) + "." + kind
    hf_name, transposed = paddle_to_hf_name(name, ndim, LLAMA)
    assert hf_name.startswith("model.")
    assert hf_to_paddle_name(hf_name, ndim, LLAMA) == (name, transposed)
    assert transposed == (ndim == 2 and kind == "weight")


@pytest.mark.parametrize(
    "config, expected",
    [
        ({}, (10000.0, None, 1.0)),
        ({"rope_theta": 5e5}, (5e5, None, 1.0)),
        ({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}}, (5e5, "linear", 4.0)),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, (10000.0, "dynamic_ntk", 2.0)),
        ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}, (1e6, None, 1.0)),
        ({"rope_theta": 3.0, "rope_parameters": {"rope_theta": 7.0, "rope_type": "linear", "factor": 3.0}}, (7.0, "linear", 3.0)),
    ],
)
def test_rope_settings_from_either_config_format(config, expected):
    settings_ = rope_settings_from_hf(config, LLAMA, "config.json")
    assert (settings_["rope_theta"], settings_["rope_scaling_type"], settings_["rope_scaling_factor"]) == expected


def test_config_from_hf_marks_score_models_and_unties():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    causal = config_from_hf({**base, "tie_word_embeddings": True, "torch_dtype": "bfloat16"})
    assert causal["architectures"] == ["LlamaForCausalLM"] and causal["tie_word_embeddings"] is False
    assert causal["num_key_value_heads"] == 2 and causal["dtype"] == "bfloat16"
    score = config_from_hf({**base, "architectures": ["LlamaForSequenceClassification"], "num_labels": 3})
    assert score["architectures"] == ["LlamaModelForScore"] and score["score_dim"] == 3
    with pytest.raises(HFCheckpointError, match=r"config.json: missing \['num_attention_heads'\]"):
        config_from_hf({k: v for k, v in base.items() if k != "num_attention_heads"})


def test_safetensors_round_trip_keeps_bf16_bits_and_transposes(tmp_path):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**16, size=(3, 5), dtype=np.uint16)
    values = rng.standard_normal((4, 2)).astype(np.float32)
    path = str(tmp_path / "model.safetensors")
    _write_safetensors(path, [("a", "BF16", bits.T), ("b", "F32", values), ("c", "I64", np.arange(3))], {"format": "np"})
    read = {name: (dtype, np.asarray(array)) for name, dtype, array in _iter_tensors(str(tmp_path))}
    assert read["a"][0] == "BF16" and np.array_equal(read["a"][1], bits.T)
    assert read["b"][0] == "F32" and np.array_equal(read["b"][1], values)
    assert np.array_equal(read["c"][1], np.arange(3))
    from safetensors import safe_open  # the reference reader agrees (numpy has no bfloat16 to compare "a")

    with safe_open(path, framework="np") as file:
        assert sorted(file.keys()) == ["a", "b", "c"] and file.metadata() == {"format": "np"}
        assert np.array_equal(file.get_tensor("b"), values) and np.array_equal(file.get_tensor("c"), np.arange(3))


def test_tokenizer_only_hub_directory_loads(hf_models, tmp_path):
    from transformers import AutoTokenizer

    from alignment.data import load_tokenizer

    directory = str(tmp_path / "tokenizer_only")
    os.makedirs(directory)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(hf_models["gqa"][0], name), directory)
    before = directory_state(directory)
    ours, theirs = load_tokenizer(directory), AutoTokenizer.from_pretrained(directory, use_fast=False)
    text = "BEGINNING OF CONVERSATION: USER: Name a fruit. ASSISTANT: An apple."
    assert ours(text)["input_ids"] == theirs(text)["input_ids"] and len(ours) == 1000
    assert directory_state(directory) == before


def test_detection_trusts_paddlenlp_configs_over_weight_names(tiny_assets, tmp_path):
    """A PaddleNLP checkpoint whose backbone is called ``model`` (as some PaddleNLP 3 architectures name
    it) must not be taken for a transformers one: PaddleNLP writes ``paddlenlp_version`` in its config."""
    directory = str(tmp_path / "ours_named_model")
    shutil.copytree(tiny_assets["llama"], directory)
    tensors = [(name.replace("llama.", "model.", 1), dtype, np.array(array)) for name, dtype, array in _iter_tensors(directory)]
    _write_safetensors(os.path.join(directory, "model.safetensors"), tensors, {"format": "np"})
    assert not is_hf_checkpoint(directory)
    config = json.load(open(os.path.join(directory, "config.json")))
    del config["paddlenlp_version"]
    json.dump(config, open(os.path.join(directory, "config.json"), "w"))
    assert is_hf_checkpoint(directory)


def test_safe_rlhf_score_checkpoint_imports_with_its_head_and_normalizer(tiny_score_model, tmp_path):
    """safe-rlhf's score models (e.g. beaver-7b-v1.0-reward): ``model.*`` + ``score_head.*`` + ``normalizer.*``."""
    import paddle

    from alignment.models import AutoModelForScore
    from alignment.models.hf_convert import config_to_hf

    source = str(tmp_path / "beaver_like")
    os.makedirs(source)
    tensors = []
    for name, dtype, array in _iter_tensors(tiny_score_model):
        hf_name, transpose = paddle_to_hf_name(name, array.ndim, LLAMA)
        if name.startswith(("score_head.", "normalizer.")):
            hf_name = name  # safe-rlhf keeps these names ([score_dim, hidden] weight)
        tensors.append((hf_name, dtype, np.array(array.T if transpose else array)))
    tensors = [(n, d, a + 0.25 if n == "score_head.bias" else a) for n, d, a in tensors]  # a non-zero bias
    _write_safetensors(os.path.join(source, "model.safetensors"), tensors, {"format": "pt"})
    config = config_to_hf(json.load(open(os.path.join(tiny_score_model, "config.json"))))
    config.update(architectures=["LlamaForScore"], score_dim=1, score_type="reward")
    json.dump(config, open(os.path.join(source, "config.json"), "w"))
    for name in ("sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tiny_score_model, name), source)

    ours = AutoModelForScore.from_pretrained(tiny_score_model)
    imported = AutoModelForScore.from_pretrained(resolve_pretrained_dir(source))
    assert imported.config.score_bias and imported.config.score_dim == 1
    with paddle.no_grad():
        ours.eval(), imported.eval()
        expected = ours(paddle.to_tensor(IDS), return_dict=True).end_scores.numpy() + 0.25
        got = imported(paddle.to_tensor(IDS), return_dict=True).end_scores.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_bfloat16_checkpoints_keep_their_bits_in_and_out(tiny_assets, tmp_path):
    """Most hub checkpoints are BF16; PaddleNLP 2.8 reads bfloat16 only under its own "U16" tag."""
    import torch
    from paddlenlp.transformers import AutoModelForCausalLM
    from transformers import AutoModelForCausalLM as HFCausalLM

    from alignment.models.hf_convert import export_hf_checkpoint

    source = str(tmp_path / "bf16")
    model = build_hf_llama(source, tiny_assets["tokenizer"], seed=9).to(torch.bfloat16)
    model.save_pretrained(source, safe_serialization=True)
    converted = resolve_pretrained_dir(source)
    assert {dtype for _, dtype, _ in _iter_tensors(converted)} == {"U16"}
    ours = AutoModelForCausalLM.from_pretrained(converted, dtype="float32")  # the stages' training dtype
    np.testing.assert_allclose(paddle_logits(ours, IDS), torch_logits(model.float(), IDS), atol=2e-5, rtol=0)
    exported = export_hf_checkpoint(converted, str(tmp_path / "back"))
    assert {dtype for _, dtype, _ in _iter_tensors(exported)} == {"BF16"}
    back = HFCausalLM.from_pretrained(exported, torch_dtype=torch.bfloat16)
    for name, weight in model.to(torch.bfloat16).state_dict().items():
        assert torch.equal(back.state_dict()[name], weight), name
