"""Normalizers, end-token selection, ScoreModelMixin.get_score and the score models' checkpoints."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import paddle
import pytest
from paddle import nn
from paddlenlp.transformers import (
    GPTConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    QWenConfig,
    QWenForCausalLM,
)
from safetensors import safe_open

from alignment.models import (
    AutoModelForScore,
    ExponentialMovingAverage,
    IdentityNormalizer,
    LlamaModelForScore,
    QWenModelForScore,
    RunningMeanStd,
    ScoreModelMixin,
    ScoreModelOutput,
    get_normalizer,
)
from alignment.models import score_model_utils
from alignment.models.score_model_utils import end_index_from_attention_mask, end_index_from_position_ids

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tensor(values, dtype="float32"):
    return paddle.to_tensor(values, dtype=dtype)


# ============================================================================ normalizers


def test_running_mean_std_matches_closed_form_over_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 2)).astype("float32") for n in (4, 1, 7, 1, 3)]
    normalizer = RunningMeanStd([2])
    seen = []
    for batch in batches:  # includes 1-row batches (NaN upstream: unbiased variance of one row)
        normalizer.update(paddle.to_tensor(batch))
        seen.append(batch)
        data = np.concatenate(seen).astype("float64")
        np.testing.assert_allclose(normalizer.mean.numpy(), data.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(normalizer.var.numpy(), data.var(axis=0), rtol=1e-5)  # population var
        assert int(normalizer.count) == len(data)


def test_running_mean_std_first_batch_of_one_row():
    normalizer = RunningMeanStd(1)
    normalizer.update(tensor([[4.0]]))
    # one row: mean 4, population variance 0 (the initial var = 1 carries weight count = 0)
    assert normalizer.mean.numpy().tolist() == [4.0]
    assert normalizer.var.numpy().tolist() == [0.0]
    normalizer.update(paddle.zeros([0, 1]))  # empty batch: no change
    assert int(normalizer.count) == 1


def test_exponential_moving_average_by_hand():
    ema = ExponentialMovingAverage([1], momentum=0.5)
    ema.update(tensor([[1.0], [3.0]]))
    # batch mean 2, population var 1: mean = 0.5*0 + 0.5*2 = 1, var = 0.5*1 + 0.5*1 = 1
    np.testing.assert_allclose(ema.mean.numpy(), [1.0])
    np.testing.assert_allclose(ema.var.numpy(), [1.0])
    ema.update(tensor([[4.0]]))
    # batch mean 4, var 0: mean = 0.5*1 + 0.5*4 = 2.5, var = 0.5*1 + 0.5*0 = 0.5
    np.testing.assert_allclose(ema.mean.numpy(), [2.5])
    np.testing.assert_allclose(ema.var.numpy(), [0.5])
    assert int(ema.count) == 3


def test_ema_momentum_none_defaults_to_0_9_and_validates():
    ema = get_normalizer("ExponentialMovingAverage", [1], momentum=None)
    assert ema.momentum == 0.9
    ema.update(tensor([[10.0]]))  # mean = 0.9*0 + 0.1*10 = 1, var = 0.9*1 + 0.1*0 = 0.9
    np.testing.assert_allclose(ema.mean.numpy(), [1.0], rtol=1e-6)
    np.testing.assert_allclose(ema.var.numpy(), [0.9], rtol=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        ExponentialMovingAverage([1], momentum=1.5)


def test_identity_normalizer_only_counts():
    normalizer = get_normalizer(None, [2])
    assert isinstance(normalizer, IdentityNormalizer)
    normalizer.update(tensor([[5.0, 6.0], [7.0, 8.0]]))
    assert normalizer.mean.numpy().tolist() == [0.0, 0.0]
    assert normalizer.var.numpy().tolist() == [1.0, 1.0]
    assert int(normalizer.count) == 2


def test_normalize_functions_by_hand():
    normalizer = RunningMeanStd([1])
    normalizer.set_mean_var([1.0], [4.0])  # std 2
    x = tensor([[5.0]])
    assert float(normalizer.normalize(x, "affine")) == pytest.approx((5 - 1) / 2)
    assert float(normalizer.normalize(x, "scale")) == pytest.approx(5 / 2)
    assert float(normalizer.normalize(x, "translate")) == pytest.approx(5 - 1)
    assert float(normalizer.normalize(x, "identity")) == 5.0
    with pytest.raises(ValueError, match="normalize function"):
        normalizer.normalize(x, "zscore")


def test_normalizer_buffers_are_in_state_dict():
    normalizer = RunningMeanStd([3])
    normalizer.update(paddle.ones([2, 3]))
    state = normalizer.state_dict()
    assert sorted(state) == ["count", "mean", "var"]
    assert state["count"].dtype == paddle.int64
    restored = RunningMeanStd([3])
    restored.set_state_dict(state)
    assert int(restored.count) == 2 and restored.mean.numpy().tolist() == [1.0, 1.0, 1.0]


def test_normalizer_input_errors():
    with pytest.raises(ValueError, match="Unknown normalizer_type 'Batch'"):
        get_normalizer("Batch", [1])
    with pytest.raises(ValueError, match=r"data must have shape \[N, 2\]"):
        RunningMeanStd([2]).update(paddle.ones([3, 1]))
    with pytest.raises(ValueError, match="mean must have shape"):
        RunningMeanStd([2]).set_mean_var(mean=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        RunningMeanStd([1]).set_mean_var(var=[-1.0])


# ============================================================================ end index


def test_end_index_from_attention_mask_left_and_right_padding():
    mask = tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], "int64")
    np.testing.assert_array_equal(end_index_from_attention_mask(mask).numpy(), [2, 4, 4, 1])
    np.testing.assert_array_equal(end_index_from_attention_mask(mask.astype("bool")).numpy(), [2, 4, 4, 1])
    with pytest.raises(ValueError, match=r"rows \[1\] have no non-padding token"):
        end_index_from_attention_mask(tensor([[1, 0], [0, 0]], "int64"))


@pytest.mark.parametrize(
    "positions, expected_end",
    [
        ([0, 1, 2, 3, 4], 4),  # no padding
        ([0, 0, 0, 1, 2], 4),  # left pads carry 0; first real token is the last zero (index 2)
        ([0, 1, 2, 2, 2], 2),  # right pads repeat the last position (cumsum(mask) - 1)
        ([0, 0, 1, 2, 2], 3),  # left and right padding
        ([0, 1, 2, 0, 0], 2),  # right pads restart at 0
        ([0, 1, 1, 1, 1], 1),  # right pads filled with 1 (PaddleNLP's pipeline padding)
        ([0, 1, 0, 1, 2], 1),  # right pads restart counting and climb above the real max
        ([3, 4, 5, 6, 7], 4),  # positions offset (continuation after a KV cache)
        ([0, 0, 0, 0, 0], 4),  # one real token after four left pads
    ],
)
def test_end_index_from_position_ids(positions, expected_end):
    assert end_index_from_position_ids(tensor([positions], "int64")).numpy().tolist() == [expected_end]


def test_end_index_from_position_ids_is_batched():
    positions = tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]], "int64")
    np.testing.assert_array_equal(end_index_from_position_ids(positions).numpy(), [4, 2, 4])


# ============================================================================ get_score on a bare head


class HeadOnly(ScoreModelMixin, nn.Layer):
    """Score head without a backbone: get_score is fed hidden states directly."""

    def __init__(self, hidden_size=2, **kwargs):
        super().__init__()
        self.config = PretrainedConfig()
        self.init_score_head(self.config, hidden_size, **kwargs)
        # score = hidden[..., 0] exactly
        self.score_head.weight.set_value(paddle.to_tensor([[1.0]] + [[0.0]] * (hidden_size - 1)))


def hidden_with_first_feature(values):
    """[B, L] -> [B, L, 2] hidden states whose score (first feature) is the given value."""
    values = np.asarray(values, dtype="float32")
    return paddle.to_tensor(np.stack([values, np.full_like(values, 7.0)], axis=-1))


def test_get_score_gathers_end_scores_vectorised():
    head = HeadOnly()
    hidden = hidden_with_first_feature([[1, 2, 3, 0], [4, 5, 6, 7], [0, 8, 9, 10]])
    mask = tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]], "int64")  # right, none, left padding
    out = head.get_score(hidden, attention_mask=mask, return_dict=True)
    assert isinstance(out, ScoreModelOutput)
    assert out.scores.shape == [3, 4, 1] and out.scores.dtype == paddle.float32
    np.testing.assert_array_equal(out.end_index.numpy(), [2, 3, 3])
    np.testing.assert_array_equal(out.end_scores.numpy(), [[3.0], [7.0], [10.0]])
    scores, end_scores = head.get_score(hidden, attention_mask=mask, return_dict=False)
    np.testing.assert_array_equal(end_scores.numpy(), [[3.0], [7.0], [10.0]])


def test_get_score_end_index_sources():
    head = HeadOnly()
    hidden = hidden_with_first_feature([[1, 2, 3, 0, 0], [0, 0, 4, 5, 6]])
    positions = tensor([[0, 1, 2, 2, 2], [0, 0, 0, 1, 2]], "int64")
    out = head.get_score(hidden, position_ids=positions, return_dict=True)
    np.testing.assert_array_equal(out.end_scores.numpy(), [[3.0], [6.0]])
    # a 4-D mask cannot locate the end token: position_ids are used instead
    out = head.get_score(hidden, attention_mask=paddle.ones([2, 1, 5, 5]), position_ids=positions, return_dict=True)
    np.testing.assert_array_equal(out.end_index.numpy(), [2, 4])
    single = head.get_score(hidden[:1], return_dict=True)  # one row, no mask: the last column
    np.testing.assert_array_equal(single.end_index.numpy(), [4])
    with pytest.raises(ValueError, match="batch size > 1"):
        head.get_score(hidden)
    with pytest.raises(ValueError, match=r"attention_mask has shape \[2, 6\]"):
        head.get_score(hidden, attention_mask=paddle.ones([2, 6], dtype="int64"))


def test_get_score_updates_and_applies_normalizer_only_in_training():
    head = HeadOnly(do_normalize=True, normalizer_type="RunningMeanStd")
    mask = tensor([[1, 1], [1, 1]], "int64")
    head.train()
    out = head.get_score(hidden_with_first_feature([[0, 1], [0, 3]]), attention_mask=mask, return_dict=True)
    # end scores [1, 3] -> mean 2, population var 1; normalized (x - 2) / 1
    assert head.config.mean == pytest.approx([2.0]) and head.config.var == pytest.approx([1.0])
    np.testing.assert_allclose(out.end_scores.numpy(), [[-1.0], [1.0]], rtol=1e-6)
    np.testing.assert_allclose(out.scores.numpy()[:, :, 0], [[-2.0, -1.0], [-2.0, 1.0]], rtol=1e-6)
    head.eval()
    out = head.get_score(hidden_with_first_feature([[0, 10], [0, 10]]), attention_mask=mask, return_dict=True)
    assert int(head.normalizer.count) == 2  # no update in eval mode
    np.testing.assert_allclose(out.end_scores.numpy(), [[8.0], [8.0]], rtol=1e-6)


def test_get_score_without_do_normalize_leaves_stats_alone():
    head = HeadOnly(do_normalize=False, normalizer_type="RunningMeanStd")
    head.train()
    out = head.get_score(hidden_with_first_feature([[5.0]]), return_dict=True)
    assert int(head.normalizer.count) == 0
    assert float(out.end_scores) == 5.0
    head.set_normalize(True)
    assert head.config.do_normalize is True
    head.get_score(hidden_with_first_feature([[5.0]]), return_dict=True)
    assert int(head.normalizer.count) == 1


@pytest.mark.parametrize(
    "score_type, expected", [("reward", (5 - 1) / 2), ("cost", 5 / 2), ("critic", 5.0)]
)
def test_score_type_selects_normalize_function(score_type, expected):
    head = HeadOnly(score_type=score_type, do_normalize=True)
    head.normalizer.set_mean_var([1.0], [4.0])
    head.eval()
    out = head.get_score(hidden_with_first_feature([[5.0]]), return_dict=True)
    assert float(out.end_scores) == pytest.approx(expected)


def test_init_score_head_options_and_errors():
    config = PretrainedConfig()
    config.momentum = 0.5  # legacy name, read when normalizer_momentum is absent
    head = HeadOnly.__new__(HeadOnly)
    nn.Layer.__init__(head)
    head.config = config
    head.init_score_head(config, 4, score_dim=3, score_bias=False, normalizer_type="ExponentialMovingAverage")
    assert head.score_head.weight.shape == [4, 3] and head.score_head.bias is None
    assert head.normalizer.momentum == 0.5 and config.normalizer_momentum == 0.5
    assert (config.score_dim, config.score_bias, config.score_type, config.do_normalize) == (3, False, "reward", False)
    with pytest.raises(ValueError, match="Unknown score_type 'value'"):
        HeadOnly(score_type="value")
    with pytest.raises(ValueError, match="score_dim"):
        HeadOnly(score_dim=0)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        HeadOnly(normaliser_type="RunningMeanStd")


def test_restores_mean_var_from_config():
    config = PretrainedConfig()
    config.mean, config.var = [3.0], [9.0]
    head = HeadOnly.__new__(HeadOnly)
    nn.Layer.__init__(head)
    head.config = config
    head.init_score_head(config, 2, normalizer_type="RunningMeanStd")
    assert head.normalizer.mean.numpy().tolist() == [3.0] and head.normalizer.var.numpy().tolist() == [9.0]


# ============================================================================ real models


def tiny_llama_config(**kwargs):
    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **kwargs,
    )


@pytest.fixture(scope="module")
def causal_lm_dir(tmp_path_factory):
    paddle.seed(1234)
    path = str(tmp_path_factory.mktemp("llama_lm"))
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(path, safe_serialization=True)
    return path, model


IDS = [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
MASK = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def batch():
    return tensor(IDS, "int64"), tensor(MASK, "int64")


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])  # True: lazy init, paddlenlp skips _init_weights
def test_causal_lm_checkpoint_loads_with_fresh_head(causal_lm_dir, monkeypatch, low_cpu_mem_usage):
    path, lm = causal_lm_dir
    messages = []
    monkeypatch.setattr(score_model_utils.logger, "info", lambda msg, *a, **k: messages.append(str(msg)))
    model = AutoModelForScore.from_pretrained(path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert type(model) is LlamaModelForScore
    for name, value in lm.llama.state_dict().items():
        np.testing.assert_array_equal(model.llama.state_dict()[name].numpy(), value.numpy())
    assert "lm_head.weight" not in model.state_dict()
    assert model.score_head.bias.numpy().tolist() == [0.0]
    assert 0 < float(model.score_head.weight.std()) < 0.1  # N(0, initializer_range = 0.02)
    summary = [m for m in messages if m.startswith("LlamaModelForScore from")]
    assert len(summary) == 1
    assert "fresh" in summary[0] and "lm_head.weight" in summary[0]
    model.eval()
    assert np.isfinite(model(*batch())[1].numpy()).all()


def test_score_checkpoint_round_trip(causal_lm_dir, tmp_path):
    path, _ = causal_lm_dir
    model = AutoModelForScore.from_pretrained(path, do_normalize=True, normalizer_type="RunningMeanStd")
    ids, mask = batch()
    model.train()
    model(ids, attention_mask=mask)  # one training forward: normalizer sees the two end scores
    assert int(model.normalizer.count) == 2
    model.eval()
    expected = model(ids, attention_mask=mask, return_dict=True)

    save_dir = str(tmp_path / "rm")
    model.save_pretrained(save_dir, safe_serialization=True)
    with safe_open(os.path.join(save_dir, "model.safetensors"), framework="np") as f:
        keys = set(f.keys())
    assert {"score_head.weight", "score_head.bias", "normalizer.mean", "normalizer.var", "normalizer.count"} <= keys
    assert not any(k.startswith("lm_head") for k in keys)
    with open(os.path.join(save_dir, "config.json")) as f:
        saved = json.load(f)
    assert saved["architectures"] == ["LlamaModelForScore"]
    assert (saved["score_type"], saved["do_normalize"], saved["normalizer_type"]) == ("reward", True, "RunningMeanStd")
    assert saved["normalizer_momentum"] is None
    np.testing.assert_allclose(saved["mean"], model.normalizer.mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(saved["var"], model.normalizer.var.numpy(), rtol=1e-6)

    reloaded = AutoModelForScore.from_pretrained(save_dir)
    reloaded.eval()
    assert reloaded.do_normalize and int(reloaded.normalizer.count) == 2
    got = reloaded(ids, attention_mask=mask, return_dict=True)
    np.testing.assert_allclose(got.scores.numpy(), expected.scores.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.end_scores.numpy(), expected.end_scores.numpy(), rtol=1e-6, atol=1e-7)
    # after training two samples with affine normalization the end scores are exactly -1 and +1
    np.testing.assert_allclose(np.sort(got.end_scores.numpy().ravel()), [-1.0, 1.0], rtol=1e-4)

    # the same checkpoint as a critic: identity normalize function, raw scores
    critic = AutoModelForScore.from_pretrained(save_dir, score_type="critic")
    raw = AutoModelForScore.from_pretrained(save_dir, do_normalize=False)
    critic.eval(), raw.eval()
    assert critic.do_normalize and critic.normalize_function == "identity"
    np.testing.assert_allclose(
        critic(ids, attention_mask=mask)[1].numpy(), raw(ids, attention_mask=mask)[1].numpy(), rtol=1e-6
    )


def test_checkpoint_without_head_bias_loads_weight_and_zero_bias(causal_lm_dir, tmp_path, monkeypatch):
    # PaddleNLP's own RM checkpoints have a bias-free head; loading one with score_bias=True keeps the
    # trained weight and starts the bias at 0 (same function), also on the lazy low_cpu_mem_usage path.
    path, _ = causal_lm_dir
    no_bias = AutoModelForScore.from_pretrained(path, score_bias=False)
    no_bias.save_pretrained(str(tmp_path), safe_serialization=True)
    messages = []
    monkeypatch.setattr(score_model_utils.logger, "info", lambda msg, *a, **k: messages.append(str(msg)))
    model = AutoModelForScore.from_pretrained(str(tmp_path), score_bias=True, low_cpu_mem_usage=True)
    np.testing.assert_array_equal(model.score_head.weight.numpy(), no_bias.score_head.weight.numpy())
    assert model.score_head.bias.numpy().tolist() == [0.0]
    model.eval(), no_bias.eval()
    ids, mask = batch()
    np.testing.assert_allclose(model(ids, mask)[1].numpy(), no_bias(ids, mask)[1].numpy(), rtol=1e-6)
    summary = [m for m in messages if m.startswith("LlamaModelForScore from")][0]
    assert "loaded the score head (score_head.weight)" in summary and "score_head.bias not in the checkpoint" in summary


def test_position_ids_only_matches_mask_for_right_padding(causal_lm_dir):
    path, _ = causal_lm_dir
    model = AutoModelForScore.from_pretrained(path)
    model.eval()
    ids, mask = batch()
    positions = paddle.clip(paddle.cumsum(mask, axis=1) - 1, min=0)  # [[0,1,2,2,2],[0,1,2,3,4]]
    with_mask = model(ids, attention_mask=mask, return_dict=True)
    # causal attention: real tokens never see right pads, so the end scores agree without a mask
    without_mask = model(ids, position_ids=positions, return_dict=True)
    np.testing.assert_array_equal(without_mask.end_index.numpy(), [2, 4])
    np.testing.assert_allclose(without_mask.end_scores.numpy(), with_mask.end_scores.numpy(), rtol=1e-5)


def test_left_padding_end_index_on_model(causal_lm_dir):
    path, _ = causal_lm_dir
    model = AutoModelForScore.from_pretrained(path)
    model.eval()
    ids = tensor([[0, 0, 5, 6, 7]], "int64")
    mask = tensor([[0, 0, 1, 1, 1]], "int64")
    out = model(ids, attention_mask=mask, return_dict=True)
    assert out.end_index.numpy().tolist() == [4]
    np.testing.assert_allclose(out.end_scores.numpy(), out.scores.numpy()[:, 4], rtol=1e-6)


def test_from_config_and_ema_without_momentum():
    config = tiny_llama_config()
    model = AutoModelForScore.from_config(config, normalizer_type="ExponentialMovingAverage", do_normalize=True)
    assert type(model) is LlamaModelForScore
    assert model.normalizer.momentum == 0.9  # momentum None must not crash (upstream bug 10)
    model.train()
    ids, mask = batch()
    model(ids, attention_mask=mask)
    assert int(model.normalizer.count) == 2


def test_auto_model_rejects_unknown_architecture():
    from alignment.models.architectures import available_architectures

    with pytest.raises(ValueError, match=r"No score model for model_type 'gpt'.*supported") as error:
        AutoModelForScore.from_config(GPTConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1))
    assert {"llama", "qwen"} <= set(available_architectures())
    for model_type in available_architectures():  # every supported one is named
        assert model_type in str(error.value)
    with pytest.raises(EnvironmentError):
        AutoModelForScore()


def test_tensor_parallel_mappings_leave_out_lm_head(causal_lm_dir, tmp_path, monkeypatch):
    from paddlenlp.transformers import conversion_utils

    tp_config = tiny_llama_config(tensor_parallel_degree=2, tensor_parallel_rank=0)
    lm_actions = LlamaForCausalLM._get_tensor_parallel_mappings(tp_config)
    score_actions = LlamaModelForScore._get_tensor_parallel_mappings(tp_config)
    assert "lm_head.weight" in lm_actions
    assert set(score_actions) == set(lm_actions) - {"lm_head.weight"}
    # Converting a score checkpoint for TP finds every key it wants to split (no error logged).
    path, _ = causal_lm_dir
    save_dir = str(tmp_path / "rm")
    AutoModelForScore.from_pretrained(path).save_pretrained(save_dir, safe_serialization=True)
    with safe_open(os.path.join(save_dir, "model.safetensors"), framework="np") as f:
        keys = list(f.keys())
    errors = []
    monkeypatch.setattr(conversion_utils.logger, "error", lambda msg, *a, **k: errors.append(msg))
    actions = LlamaModelForScore.get_tensor_parallel_convert_actions(tp_config, keys)
    assert errors == []
    assert "llama.embed_tokens.weight" in actions and not any("score_head" in k for k in actions)


def test_converts_hugging_face_score_checkpoint(causal_lm_dir, tmp_path):
    # A safe-rlhf style torch checkpoint: backbone under `model.`, torch Linear weights [out, in].
    path, _ = causal_lm_dir
    model = AutoModelForScore.from_pretrained(path)
    model.score_head.bias.set_value(paddle.to_tensor([0.25]))
    model.eval()
    model.save_pretrained(str(tmp_path), safe_serialization=True)  # for config.json
    hf_state = {}
    for name, value in model.state_dict().items():
        array = value.numpy()
        if array.ndim == 2 and name.endswith(("proj.weight", "score_head.weight")):
            array = array.T
        hf_state[name.replace("llama.", "model.", 1)] = np.ascontiguousarray(array)
    from safetensors.numpy import save_file

    save_file(hf_state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    converted = AutoModelForScore.from_pretrained(str(tmp_path), convert_from_torch=True)
    converted.eval()
    ids, mask = batch()
    np.testing.assert_allclose(
        converted(ids, attention_mask=mask)[1].numpy(), model(ids, attention_mask=mask)[1].numpy(), rtol=1e-6
    )


def test_qwen_causal_lm_loads_into_score_model(tmp_path):
    paddle.seed(0)
    config = QWenConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        kv_channels=8,
        seq_length=32,
        max_position_embeddings=32,
    )
    lm = QWenForCausalLM(config)
    lm.save_pretrained(str(tmp_path), safe_serialization=True)
    model = AutoModelForScore.from_pretrained(str(tmp_path), score_type="critic")
    assert type(model) is QWenModelForScore and model.config.score_type == "critic"
    np.testing.assert_array_equal(model.qwen.wte.weight.numpy(), lm.qwen.wte.weight.numpy())
    model.eval()
    ids, mask = batch()
    out = model(ids, attention_mask=mask, return_dict=True)
    assert out.scores.shape == [2, 5, 1]
    np.testing.assert_array_equal(out.end_index.numpy(), [2, 4])


# ============================================================================ data-parallel gather

DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import paddle
    import paddle.distributed as dist
    from paddle import nn
    from paddle.distributed import fleet
    from paddlenlp.transformers import PretrainedConfig
    from alignment.models import ScoreModelMixin

    class HeadOnly(ScoreModelMixin, nn.Layer):
        def __init__(self):
            super().__init__()
            self.config = PretrainedConfig()
            self.init_score_head(self.config, 1, do_normalize=True, normalizer_type="RunningMeanStd")
            self.score_head.weight.set_value(paddle.ones([1, 1]))

    def train_forward():
        end_values = [[1.0, 2.0], [3.0, 4.0, 10.0]][dist.get_rank()]  # different batch sizes per rank
        head = HeadOnly()
        head.train()
        hidden = paddle.to_tensor(end_values, dtype="float32").reshape([-1, 1, 1])
        head.get_score(hidden, attention_mask=paddle.ones([len(end_values), 1], dtype="int64"))
        return {"mean": head.config.mean, "var": head.config.var, "count": int(head.normalizer.count)}

    dist.init_parallel_env()
    stats = {"global": train_forward()}  # no hybrid group: gather over all ranks
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 2, "pp_degree": 1, "sharding_degree": 1}
    fleet.init(is_collective=True, strategy=strategy)
    stats["tensor_parallel"] = train_forward()  # both ranks are TP peers: nothing to gather
    with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(stats, f)
    """
)


@pytest.mark.distributed
def test_normalizer_update_gathers_data_parallel_ranks_only(tmp_path):
    script = tmp_path / "gather_end_scores.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
         "--log_dir", str(tmp_path / "log"), str(script), str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    logs = "".join(p.read_text() for p in (tmp_path / "log").glob("*") if p.is_file())
    assert result.returncode == 0, result.stderr[-3000:] + logs[-3000:]
    union = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    per_rank = [np.array([1.0, 2.0]), np.array([3.0, 4.0, 10.0])]
    for rank in (0, 1):
        stats = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert stats["global"]["count"] == 5
        assert stats["global"]["mean"] == pytest.approx([union.mean()])
        assert stats["global"]["var"] == pytest.approx([union.var()], rel=1e-5)
        own = per_rank[rank]
        assert stats["tensor_parallel"]["count"] == len(own)
        assert stats["tensor_parallel"]["mean"] == pytest.approx([own.mean()], rel=1e-6)
        assert stats["tensor_parallel"]["var"] == pytest.approx([own.var()], rel=1e-5)
