"""Rollout generation: the fast CPU decoder against paddlenlp's generate and the training forward."""

from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest
from paddlenlp.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKProcess, TopPProcess
from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

from alignment.models.infer_model_utils import (
    KVDecoder,
    check_fused_weight_mapping,
    fused_weight_mapping,
    kv_decoder_unsupported_reason,
)
from alignment.models.ppo_model_utils import gather_log_probabilities, make_position_ids
from alignment.ppo import infer_utils
from alignment.ppo.infer_utils import (
    SamplingParams,
    apply_repetition_penalty,
    generate_rollout,
    next_token_probs,
    sample_categorical,
    select_next_tokens,
    token_presence,
    top_p_filter,
)
from alignment.utils import env

VOCAB = 200
# Left-padded prompts of lengths 4, 6 and 2 (pad id 0).
PROMPT_MASK = [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]


def tiny_llama(num_kv_heads=4, fused=False, seed=7, **overrides) -> LlamaForCausalLM:
    paddle.seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, max_position_embeddings=64, **overrides,
    )
    # Set after construction: paddlenlp 3.0's PretrainedConfig.__init__ resets both flags to False.
    config.fuse_attention_qkv = config.fuse_attention_ffn = fused
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def prompts(seed=11):
    paddle.seed(seed)
    mask = paddle.to_tensor(PROMPT_MASK, dtype="int64")
    ids = paddle.randint(3, VOCAB, mask.shape)
    return paddle.where(mask > 0, ids, paddle.zeros_like(ids)), mask


def greedy(model, ids, mask, backend, **kwargs):
    kwargs.setdefault("max_new_tokens", 12)
    kwargs.setdefault("pad_token_id", 0)
    return generate_rollout(model, ids, mask, do_sample=False, backend=backend, **kwargs)


def mid_way_eos(model, ids, mask) -> int:
    """A token that greedy decoding emits at step 3 of row 0 and not before it in that row, so that
    with it as EOS row 0 ends mid-way (derived from a run that never stops)."""
    free = greedy(model, ids, mask, "plain", eos_token_id=-1).numpy()[0, ids.shape[1] :]
    for step in range(3, free.shape[0] - 1):
        if free[step] not in free[:step]:
            return int(free[step])
    raise AssertionError("the seeded random model repeats itself: choose another seed for a mid-way EOS")


# --------------------------------------------------------------------------------------------------
# fast == plain, token for token
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads, fused", [(4, False), (2, False), (1, True)], ids=["mha", "gqa", "mqa-fused"])
@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad!=eos", "pad==eos"])
def test_greedy_fast_equals_plain(num_kv_heads, fused, pad_is_eos):
    model = tiny_llama(num_kv_heads, fused)
    ids, mask = prompts()
    eos = mid_way_eos(model, ids, mask)
    pad = eos if pad_is_eos else 0
    plain = greedy(model, ids, mask, "plain", eos_token_id=eos, pad_token_id=pad)
    fast = greedy(model, ids, mask, "fast", eos_token_id=eos, pad_token_id=pad)
    np.testing.assert_array_equal(fast.numpy(), plain.numpy())
    generated = fast.numpy()[:, ids.shape[1] :]
    # Row 0 ends at step 3 (by construction) and is padded after its EOS.
    assert generated[0, 3] == eos and (generated[0, 4:] == pad).all()
    np.testing.assert_array_equal(fast.numpy()[:, : ids.shape[1]], ids.numpy())


def test_greedy_with_repetition_penalty_and_forced_length():
    model = tiny_llama()
    ids, mask = prompts()
    eos = mid_way_eos(model, ids, mask)
    kwargs = dict(eos_token_id=eos, repetition_penalty=1.5, stop_at_eos=False)
    plain = greedy(model, ids, mask, "plain", **kwargs)
    fast = greedy(model, ids, mask, "fast", **kwargs)
    assert fast.shape == [3, 6 + 12]  # stop_at_eos=False: exactly max_new_tokens columns
    np.testing.assert_array_equal(fast.numpy(), plain.numpy())


def test_one_token_prompts():
    model = tiny_llama(num_kv_heads=2)
    ids, mask = paddle.to_tensor([[5], [9]], dtype="int64"), paddle.ones([2, 1], dtype="int64")
    np.testing.assert_array_equal(
        greedy(model, ids, mask, "fast", eos_token_id=-1).numpy(), greedy(model, ids, mask, "plain", eos_token_id=-1).numpy()
    )


def test_num_return_sequences_is_row_major():
    model = tiny_llama()
    ids, mask = prompts()
    out = greedy(model, ids, mask, "fast", eos_token_id=-1, num_return_sequences=2, max_new_tokens=4).numpy()
    single = greedy(model, ids, mask, "fast", eos_token_id=-1, max_new_tokens=4).numpy()
    np.testing.assert_array_equal(out, np.repeat(single, 2, axis=0))  # rows p0, p0, p1, p1, p2, p2


# --------------------------------------------------------------------------------------------------
# The decoder's logits are the training forward's logits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_decoder_log_probs_match_training_forward(num_kv_heads):
    model = tiny_llama(num_kv_heads)
    ids, mask = prompts()
    steps = 5
    paddle.seed(3)
    response = paddle.randint(3, VOCAB, [3, steps])
    with paddle.no_grad():
        decoder = KVDecoder(model, ids, mask, steps)
        logits = [decoder.prefill()]
        for t in range(steps - 1):
            logits.append(decoder.step(response[:, t]))
        fast = gather_log_probabilities(paddle.stack(logits, axis=1), response)  # [B, N]
        sequence = paddle.concat([ids, response], axis=1)
        full_mask = paddle.concat([mask, paddle.ones_like(response)], axis=1)
        train_logits = model(sequence, attention_mask=full_mask.astype("bool"), position_ids=make_position_ids(full_mask))[0]
        # log-prob of token t+1 at column t; the response starts at column S.
        train = gather_log_probabilities(train_logits[:, :-1], sequence[:, 1:])[:, ids.shape[1] - 1 :]
    np.testing.assert_allclose(fast.numpy(), train.numpy(), atol=2e-5)


def test_weight_updates_are_visible_in_the_next_rollout():
    for fused in (False, True):  # concatenated-per-rollout and shared fused QKV weights
        model = tiny_llama(fused=fused)
        ids, mask = prompts()

        def rollout(backend):
            return greedy(model, ids, mask, backend, eos_token_id=-1, max_new_tokens=6).numpy()

        before = rollout("fast")
        with paddle.no_grad():  # an in-place "training step" on the attention weights
            attn = model.llama.layers[0].self_attn
            weight = attn.qkv_proj.weight if fused else attn.v_proj.weight
            weight.set_value(weight * 30.0)
        after = rollout("fast")
        assert (after != before).any()
        np.testing.assert_array_equal(after, rollout("plain"))
        with paddle.no_grad():  # zero lm_head: every logit is 0, greedy argmax picks token 0
            model.lm_head.weight.set_value(paddle.zeros_like(model.lm_head.weight))
        assert (rollout("fast")[:, ids.shape[1] :] == 0).all()


# --------------------------------------------------------------------------------------------------
# Sampling semantics
# --------------------------------------------------------------------------------------------------


def test_filters_golden_values():
    # probs (0.5, 0.3, 0.2): cumulative (0.5, 0.8, 1.0); the mass *before* each token is (0, 0.5, 0.8),
    # so top_p = 0.6 drops only token 2 and top_p = 0.5 also keeps token 1 (0.5 is not > 0.5).
    probs = np.array([[0.5, 0.3, 0.2]], dtype=np.float32)
    np.testing.assert_allclose(top_p_filter(probs, 0.6), [[0.5, 0.3, 0.0]])
    np.testing.assert_allclose(top_p_filter(probs, 0.5), [[0.5, 0.3, 0.0]])
    np.testing.assert_allclose(top_p_filter(probs, 0.4), [[0.5, 0.0, 0.0]])
    # penalty 2 on seen tokens 0 and 1: 2.0 -> 2.0 / 2 = 1.0, -1.0 -> -1.0 * 2 = -2.0; token 2 unseen.
    logits = np.array([[2.0, -1.0, 0.5]], dtype=np.float32)
    seen = token_presence(np.array([[1, 0, 0]]), 3)
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -2.0, 0.5]])


@pytest.mark.parametrize(
    "temperature, top_k, top_p, penalty",
    [(1.0, 0, 1.0, 1.0), (0.7, 0, 0.9, 1.0), (1.3, 5, 1.0, 1.0), (0.8, 7, 0.6, 1.2), (1.0, 0, 0.3, 0.8)],
)
def test_next_token_probs_match_paddlenlp_processors(temperature, top_k, top_p, penalty):
    paddle.seed(5)
    logits = paddle.randn([4, 50]) * 3
    context = paddle.randint(0, 50, [4, 9])
    # paddlenlp GenerationMixin.sample: processors, then temperature, softmax, TopKProcess, TopPProcess.
    expected = RepetitionPenaltyLogitsProcessor(penalty)(context, logits) if penalty != 1.0 else logits
    expected = paddle.nn.functional.softmax(expected / temperature)
    if top_k:
        expected = TopKProcess(expected, top_k, 1)
    if top_p < 1.0:
        expected = TopPProcess(expected, top_p, 1)
    params = SamplingParams.create(True, temperature, top_p, top_k, penalty)
    ours = next_token_probs(logits.numpy(), token_presence(context.numpy(), 50), params)
    np.testing.assert_array_equal(ours > 0, expected.numpy() > 0)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5, atol=1e-7)


def test_sampled_frequencies_match_target_distribution():
    # Target: softmax(log(0.4, 0.3, 0.2, 0.06, 0.04)) = those probs; top_p 0.85 keeps tokens 0..2
    # (mass before token 3 is 0.9 > 0.85), renormalised to (0.4, 0.3, 0.2) / 0.9.
    probs = np.array([0.4, 0.3, 0.2, 0.06, 0.04], dtype=np.float32)
    draws = 30000
    logits = np.tile(np.log(probs), (draws, 1))
    tokens = select_next_tokens(logits, None, SamplingParams.create(True, 1.0, 0.85, 0, 1.0), np.random.default_rng(0))
    frequencies = np.bincount(tokens, minlength=5) / draws
    # binomial std <= sqrt(0.25 / 30000) = 0.0029; 0.012 is four of them.
    np.testing.assert_allclose(frequencies, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0.0, 0.0], atol=0.012)


def test_blockwise_categorical_draws_match_weights():
    # block=4 splits the 10 tokens into blocks [0..3], [4..7], [8..9] (last one partial); weights sum to 1.
    weights = np.array([0.1, 0.0, 0.2, 0.05, 0.0, 0.0, 0.3, 0.1, 0.15, 0.1], dtype=np.float32)
    draws = 50000
    tokens = sample_categorical(np.tile(weights, (draws, 1)), np.random.default_rng(1), block=4)
    frequencies = np.bincount(tokens, minlength=10) / draws
    assert frequencies[[1, 4, 5]].sum() == 0.0  # zero-weight tokens are never drawn
    np.testing.assert_allclose(frequencies, weights, atol=0.01)  # binomial std <= 0.0021


def test_rollout_samples_follow_the_model_distribution():
    """End to end through the decoder: 3000 copies of one prompt, one sampled token each."""
    paddle.seed(1)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    model.eval()
    ids = paddle.to_tensor([[3, 4, 5]], dtype="int64")
    mask = paddle.ones_like(ids)
    with paddle.no_grad():
        target = paddle.nn.functional.softmax(model(ids)[0][0, -1] / 0.8).numpy()
    paddle.seed(2)
    out = generate_rollout(
        model, ids, mask, max_new_tokens=1, temperature=0.8, num_return_sequences=3000,
        eos_token_id=-1, pad_token_id=0, backend="fast",
    )
    frequencies = np.bincount(out.numpy()[:, -1], minlength=6) / 3000
    np.testing.assert_allclose(frequencies, target, atol=0.03)  # 0.03 > 3 binomial std (0.0091)


def test_sampling_is_reproducible_under_paddle_seed():
    model = tiny_llama()
    ids, mask = prompts()
    runs = []
    for _ in range(2):
        paddle.seed(123)
        runs.append(generate_rollout(model, ids, mask, max_new_tokens=6, top_p=0.9, eos_token_id=-1, pad_token_id=0, backend="fast").numpy())
    np.testing.assert_array_equal(runs[0], runs[1])


# --------------------------------------------------------------------------------------------------
# Backend selection and fallbacks
# --------------------------------------------------------------------------------------------------


def test_fused_without_paddlenlp_ops_falls_back_with_one_log_line(caplog, monkeypatch):
    monkeypatch.setattr(infer_utils, "_warned", set())
    model = tiny_llama()
    ids, mask = prompts()
    with caplog.at_level(logging.WARNING, logger="alignment.ppo.infer_utils"):
        fused = greedy(model, ids, mask, "fused", eos_token_id=-1)
        greedy(model, ids, mask, "fused", eos_token_id=-1)
    lines = [r.getMessage() for r in caplog.records if "Fused rollout unavailable" in r.getMessage()]
    assert len(lines) == 1 and "falling back to the fast backend" in lines[0]
    np.testing.assert_array_equal(fused.numpy(), greedy(model, ids, mask, "fast", eos_token_id=-1).numpy())
    assert infer_utils.resolve_backend(model, "auto", SamplingParams.create(False, 1.0, 1.0, 0, 1.0)) == "fast"


def test_fused_weight_mapping_refuses_gqa_and_unfuses_qkv():
    with pytest.raises(ValueError, match="GQA"):
        check_fused_weight_mapping(tiny_llama(num_kv_heads=2))
    fused, plain = tiny_llama(fused=True), tiny_llama()
    check_fused_weight_mapping(fused)
    state = fused_weight_mapping(fused)
    assert "llama.layers.0.self_attn.qkv_proj.weight" not in state
    # Per head the fused columns are [q | k | v] (16 each): head 1's block starts at 48, its key is 64..80.
    qkv = fused.llama.layers[0].self_attn.qkv_proj.weight.numpy()
    np.testing.assert_array_equal(state["llama.layers.0.self_attn.k_proj.weight"].numpy()[:, 16:32], qkv[:, 64:80])
    assert set(state) == set(plain.state_dict())


def test_unsupported_model_falls_back_to_plain(caplog, monkeypatch):
    monkeypatch.setattr(infer_utils, "_warned", set())
    model = tiny_llama(rope_scaling_type="dynamic_ntk", rope_scaling_factor=2.0)
    assert "dynamic_ntk" in kv_decoder_unsupported_reason(model)
    ids, mask = prompts()
    with caplog.at_level(logging.WARNING, logger="alignment.ppo.infer_utils"):
        out = greedy(model, ids, mask, "fast", eos_token_id=-1, max_new_tokens=3)
    assert any("falling back to the plain backend" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(out.numpy(), greedy(model, ids, mask, "plain", eos_token_id=-1, max_new_tokens=3).numpy())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backend": "vllm"}, "backend"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"num_return_sequences": 0}, "num_return_sequences"),
        ({"eos_token_id": None}, "eos_token_id"),
        ({"attention_mask": paddle.ones([3, 5], dtype="int64")}, "attention_mask"),
    ],
)
def test_bad_arguments_raise_early(kwargs, match):
    model = tiny_llama()
    ids, mask = prompts()
    call = dict(attention_mask=mask, max_new_tokens=2, eos_token_id=2, pad_token_id=0)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_rollout(model, ids, call.pop("attention_mask"), **call)


# --------------------------------------------------------------------------------------------------
# CPU runtime configuration
# --------------------------------------------------------------------------------------------------


def test_thread_count_follows_argument_then_launch_environment(monkeypatch):
    from paddle.base import core

    monkeypatch.setattr(env, "available_cores", lambda: 8)
    monkeypatch.setattr(env, "user_thread_setting", lambda: None)
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "3")
    assert env.local_process_count() == 3
    assert env.default_num_threads() == 2  # 8 cores // 3 local processes
    calls = []
    monkeypatch.setattr(core, "set_num_threads", calls.append)
    assert env.configure_cpu_threads() == 2
    assert env.configure_cpu_threads(5) == 5
    assert calls == [2, 5]
    monkeypatch.delenv("PADDLE_LOCAL_SIZE")
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "16")
    assert env.default_num_threads() == 1  # never below one thread
    with pytest.raises(ValueError, match="num_threads"):
        env.configure_cpu_threads(0)


def test_mkl_avx2_switch_only_on_amd_and_never_over_the_user(monkeypatch):
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    monkeypatch.setattr(env, "cpu_vendor", lambda: "GenuineIntel")
    assert not env.enable_fast_mkl_on_amd()
    monkeypatch.setattr(env, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(env, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    assert env.enable_fast_mkl_on_amd()
    assert env.os.environ["MKL_DEBUG_CPU_TYPE"] == "5"
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "4")
    assert not env.enable_fast_mkl_on_amd()
