"""Each PPO argument reaches the code that uses it: experience, losses, optimizers, sampler, ptx, offload.

Every test builds a trainer from a JSON file (tiny session assets) with non-default values and checks
them against hand-written numpy references, or changes one argument and asserts the change.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import paddle
import pytest
from test_ppo_args import fixed_experience, record_gradients, relative_error, reset_training_state, snapshot
from test_ppo_trainer import make_trainer, ppo_config

from alignment.data.base import IGNORE_INDEX
from alignment.models.ppo_model_utils import gather_log_probabilities, ptx_loss_fn
from alignment.ppo import run_ppo
from alignment.ppo.ppo_trainer import response_logits
from alignment.ppo.run_ppo import DataArgument, ModelArgument, TrainingArguments, critic_training_arguments
from alignment.ppo.trainer_utils import GlobalBatchSampler
from alignment.utils.config import parse_arguments


# ------------------------------------------------------------------------------ numpy references
def numpy_rewards(score, log_probs, ref_log_probs, mask, kl_coeff, clip_range_score, clip_mode="score"):
    """``-kl_coeff * (logp - ref)`` per token plus the score on each row's last valid token; ``score``
    mode clips the score, ``total`` mode clips every per-token reward after the sum."""
    rewards = -kl_coeff * (log_probs - ref_log_probs)
    for row in range(len(score)):
        last = np.nonzero(mask[row])[0].max()
        rewards[row, last] += np.clip(score[row], -clip_range_score, clip_range_score) if clip_mode == "score" else score[row]
    return rewards if clip_mode == "score" else np.clip(rewards, -clip_range_score, clip_range_score)


def numpy_gae(values, rewards, mask, gamma, gae_lambda):
    """GAE by the textbook recursion on masked values and rewards (``V_T = A_T = 0``)."""
    values, rewards = values * mask, rewards * mask
    advantages = np.zeros_like(values)
    next_value = next_advantage = np.zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * gae_lambda * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def token_mean(per_token, mask):
    return float((per_token * mask).sum() / mask.sum())


def perturb(model, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for parameter in model.parameters():
        parameter.set_value(parameter.numpy() + scale * rng.standard_normal(parameter.shape).astype("float32"))


@pytest.fixture(scope="module")
def wired(tmp_path_factory, tiny_assets, tiny_score_model, repo_root):
    """A trainer whose PPO coefficients all differ from the defaults, its actor moved off the reference."""
    tmp_path = tmp_path_factory.mktemp("wired")
    path = ppo_config(
        tmp_path, tiny_assets, tiny_score_model, repo_root,
        kl_coeff=0.3, clip_range_score=0.01, gamma=0.9, gae_lambda=0.8, clip_range_ratio=0.15, clip_range_value=0.3,
        temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.3, dataloader_drop_last=True, per_device_prompt_batch_size=6,
    )  # fmt: skip
    trainer = make_trainer(path)
    perturb(trainer.actor_trainer.model, 0.02, seed=1)  # so that log_probs != ref_log_probs (KL term nonzero)
    return trainer


def experience_parts(trainer, experience):
    """``(score, log_probs, ref_log_probs, values, mask)`` recomputed independently of make_experience."""
    seq, mask, pos, start = experience["input_ids"], experience["attention_mask"], experience["position_ids"], experience["start"]
    with paddle.no_grad():
        ref = trainer.log_probs_of(trainer.reference_model, seq, mask, pos, start).numpy()
        score = trainer.reward_score(seq, mask).numpy()
    return score, experience["old_log_probs"].numpy(), ref, experience["old_values"].numpy(), experience["response_mask"].numpy()


def test_experience_uses_kl_coeff_clip_range_score_clip_mode_gamma_and_gae_lambda(wired):
    args = wired.args
    assert (args.kl_coeff, args.clip_range_score, args.gamma, args.gae_lambda) == (0.3, 0.01, 0.9, 0.8)  # from the JSON
    experience = fixed_experience(wired)
    score, log_probs, ref, values, mask = experience_parts(wired, experience)
    assert np.abs(log_probs - ref)[mask].max() > 1e-3  # the KL term is not trivially zero
    assert (np.abs(score) > args.clip_range_score).any()  # the score clip binds

    def expected(kl_coeff, clip_range_score, clip_mode, gamma, gae_lambda):
        rewards = numpy_rewards(score, log_probs, ref, mask, kl_coeff, clip_range_score, clip_mode)
        return numpy_gae(values, rewards, mask, gamma, gae_lambda)

    baseline = dict(kl_coeff=0.3, clip_range_score=0.01, clip_mode="score", gamma=0.9, gae_lambda=0.8)
    changes = dict(kl_coeff=0.0, clip_range_score=100.0, clip_mode="total", gamma=1.0, gae_lambda=0.3)
    previous = None
    try:
        for changed in [None, *changes]:
            values_now = dict(baseline)
            if changed is not None:
                values_now[changed] = changes[changed]
                setattr(args, changed, changes[changed])
            got = fixed_experience(wired)
            advantages, returns = expected(**values_now)
            np.testing.assert_allclose(got["advantages"].numpy() * mask, advantages * mask, atol=2e-5, err_msg=str(changed))
            np.testing.assert_allclose(got["returns"].numpy() * mask, returns * mask, atol=2e-5, err_msg=str(changed))
            np.testing.assert_allclose(got["old_values"].numpy(), values, atol=1e-6)
            if changed is None:
                previous = got["advantages"].numpy() * mask
            else:  # the one changed argument changed the advantages
                assert np.abs(got["advantages"].numpy() * mask - previous).max() > 1e-4, changed
                setattr(args, changed, baseline[changed])
    finally:
        for name, value in baseline.items():
            setattr(args, name, value)


def test_losses_use_clip_range_ratio_and_clip_range_value(wired):
    args = wired.args
    experience = fixed_experience(wired)
    batch = {k: v for k, v in experience.items() if k not in ("metrics", "finite_check")}
    start, mask = batch["start"], batch["response_mask"].numpy().astype("float64")
    actor, critic = wired.actor_trainer.model, wired.critic_trainer.model
    with paddle.no_grad():
        logits = response_logits(actor, batch["input_ids"], batch["attention_mask"], batch["position_ids"], start)
        new_log_probs = gather_log_probabilities(logits, batch["input_ids"][:, start + 1 :]).numpy()
        values = critic(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                        return_dict=True).scores[:, start:-1, 0]  # fmt: skip
    # Old log-probs / values moved so that the ratio leaves (1 - 0.15, 1 + 0.15) and values leave old +- 0.3.
    shift = np.where(np.arange(new_log_probs.shape[1]) % 2 == 0, 0.4, -0.4)[None, :]
    batch["old_log_probs"] = paddle.to_tensor((new_log_probs - shift).astype("float32"))
    batch["old_values"] = paddle.to_tensor((values.numpy() + 2 * shift).astype("float32"))
    advantages, returns, old_values = batch["advantages"].numpy(), batch["returns"].numpy(), batch["old_values"].numpy()

    def actor_expected(eps):
        ratio = np.exp(shift) * np.ones_like(new_log_probs)
        return token_mean(np.maximum(-advantages * ratio, -advantages * np.clip(ratio, 1 - eps, 1 + eps)), mask)

    def critic_expected(c):
        v = values.numpy()
        clipped = np.clip(v, old_values - c, old_values + c)
        return 0.5 * token_mean(np.maximum((v - returns) ** 2, (clipped - returns) ** 2), mask)

    try:
        for eps in (0.15, 0.6):
            args.clip_range_ratio = eps
            assert float(wired.actor_loss(logits, batch)) == pytest.approx(actor_expected(eps), rel=1e-4, abs=1e-6)
        assert actor_expected(0.15) != pytest.approx(actor_expected(0.6), rel=1e-3)
        for c in (0.3, 5.0):
            args.clip_range_value = c
            assert float(wired.critic_loss(values, batch)) == pytest.approx(critic_expected(c), rel=1e-4, abs=1e-6)
        assert critic_expected(0.3) != pytest.approx(critic_expected(5.0), rel=1e-3)
    finally:
        args.clip_range_ratio, args.clip_range_value = 0.15, 0.3


def test_sampling_arguments_reach_the_sampler_from_the_json(wired):
    seen = {}

    def recorder(model, input_ids, attention_mask, **kwargs):
        seen.update(kwargs)
        return paddle.concat([input_ids, input_ids[:, -1:]], axis=1)

    wired._generate_fn = recorder
    batch = wired.train_dataset.get_collator()([wired.train_dataset[0]])
    wired.generate(batch["input_ids"], batch["attention_mask"])
    assert (seen["temperature"], seen["top_p"], seen["top_k"], seen["repetition_penalty"]) == (0.7, 0.9, 5, 1.3)
    assert seen["do_sample"] is True and seen["max_new_tokens"] == 8


def test_dataloader_drop_last_reaches_the_prompt_sampler(wired):
    """The JSON's ``dataloader_drop_last: true`` reaches the sampler (the behaviour of both values is
    tested on the sampler itself, ``test_ppo_args_refusals.py``)."""
    assert wired.args.dataloader_drop_last is True and wired.prompt_sampler.drop_last is True
    size = len(wired.train_dataset)
    assert size % 6  # the tiny prompt set does not divide into batches of 6: the tail matters
    assert len(wired.prompt_sampler) == size // 6
    assert len(GlobalBatchSampler(size, 6, drop_last=False)) == size // 6 + 1  # what the default (false) does


def test_critic_arguments_configure_the_critic_optimizer_schedule_and_recompute(tmp_path, tiny_assets, tiny_score_model, repo_root):
    path = ppo_config(
        tmp_path, tiny_assets, tiny_score_model, repo_root, max_steps=4,
        learning_rate=1e-4, weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=3, recompute=False,
        critic_learning_rate=3e-5, critic_weight_decay=0.0, critic_lr_scheduler_type="cosine", critic_warmup_ratio=0.5,
        critic_recompute=True,
    )  # fmt: skip
    trainer = make_trainer(path)
    actor, critic = trainer.actor_trainer, trainer.critic_trainer
    assert trainer.total_steps == 4
    assert actor.optimizer._weight_decay == pytest.approx(0.1) and critic.optimizer._weight_decay == 0.0

    def schedule(step_trainer):
        lrs = []
        for _ in range(4):
            lrs.append(step_trainer.lr_scheduler.get_lr())
            step_trainer.lr_scheduler.step()
        return lrs

    # actor: linear, warmup_steps 3 of 4: 0, 1/3, 2/3, 1 x 1e-4 (linear decay starts after step 3)
    np.testing.assert_allclose(schedule(actor), [0.0, 1e-4 / 3, 2e-4 / 3, 1e-4], rtol=1e-6)
    # critic: cosine, critic_warmup_ratio 0.5 -> 2 warmup steps (the actor's warmup_steps 3 must not win):
    # 0, 1/2, then 0.5 * (1 + cos(pi * progress)) with progress (step - 2) / 2
    expected = [0.0, 3e-5 / 2, 3e-5, 3e-5 * 0.5 * (1 + math.cos(math.pi * 0.5))]
    np.testing.assert_allclose(schedule(critic), expected, rtol=1e-6, atol=1e-12)

    # recompute: only the critic's backbone recomputes its layers in a training forward
    assert critic.model.llama.enable_recompute is True and actor.model.llama.enable_recompute is False
    calls = []
    backbone = critic.model.llama
    original = backbone.recompute_training_full
    backbone.recompute_training_full = lambda *a, **k: calls.append(1) or original(*a, **k)
    ids = paddle.to_tensor([[1, 5, 6, 7]])
    critic.model.train()
    critic.model(ids, return_dict=True).scores.sum().backward()
    assert len(calls) == backbone.config.num_hidden_layers


def parsed(path):
    return parse_arguments((ModelArgument, DataArgument, TrainingArguments), [path])[2]


@pytest.mark.parametrize(
    "overrides, warmup_steps, warmup_ratio",
    [
        (dict(warmup_steps=3, warmup_ratio=0.2), 3, 0.2),  # no critic override: the actor's (PaddleNLP: steps win)
        (dict(warmup_steps=3, critic_warmup_ratio=0.5), 0, 0.5),  # critic_warmup_ratio wins over warmup_steps
        (dict(warmup_steps=3, critic_warmup_ratio=0.5, critic_warmup_steps=1), 1, 0.5),  # critic_warmup_steps wins
        (dict(warmup_ratio=0.2, critic_warmup_steps=2), 2, 0.2),
    ],
)
def test_critic_warmup_precedence(tmp_path, tiny_assets, tiny_score_model, repo_root, overrides, warmup_steps, warmup_ratio):
    args = parsed(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, **overrides))
    critic = critic_training_arguments(args)
    assert (critic.warmup_steps, critic.warmup_ratio) == (warmup_steps, warmup_ratio)
    assert (args.warmup_steps, args.warmup_ratio) == (overrides.get("warmup_steps", 0), overrides.get("warmup_ratio", 0.0))


def score_checkpoint(directory, source, tokenizer_dir, seed):
    """A copy of the score model ``source`` with perturbed weights and ``tokenizer_dir``'s tokenizer."""
    from alignment.models import AutoModelForScore

    model = AutoModelForScore.from_pretrained(source)
    perturb(model, 0.05, seed)
    model.save_pretrained(directory, safe_serialization=True)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), directory)
    return directory


def state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_reward_critic_model_name_or_path_initialises_the_critic(tmp_path, tiny_assets, tiny_score_model, repo_root):
    other = score_checkpoint(str(tmp_path / "critic_init"), tiny_score_model, tiny_assets["tokenizer"], seed=7)
    from alignment.models import AutoModelForScore

    want_critic, want_reward = state(AutoModelForScore.from_pretrained(other)), state(AutoModelForScore.from_pretrained(tiny_score_model))
    default = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, "default"))
    separate = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, "separate", reward_critic_model_name_or_path=other))
    for trainer, critic_source in ((default, want_reward), (separate, want_critic)):
        got_critic, got_reward = state(trainer.critic_trainer.model), state(trainer.reward_model)
        for key, value in critic_source.items():
            np.testing.assert_array_equal(got_critic[key], value, err_msg=key)
        for key, value in want_reward.items():
            np.testing.assert_array_equal(got_reward[key], value, err_msg=key)
    assert any(not np.array_equal(want_critic[k], want_reward[k]) for k in want_critic)


def test_critic_with_another_tokenizer_is_refused_before_any_model_loads(tmp_path, tiny_assets, tiny_score_model, repo_root, monkeypatch):
    from alignment.utils.tiny_assets import build_tokenizer, training_corpus

    other_tokenizer = build_tokenizer(str(tmp_path / "other_tokenizer"), training_corpus(), vocab_size=600)
    critic = str(tmp_path / "critic_other_tokenizer")
    shutil.copytree(tiny_score_model, critic)
    for name in os.listdir(other_tokenizer):
        shutil.copy(os.path.join(other_tokenizer, name), critic)
    monkeypatch.setattr(run_ppo, "load_models", lambda *a, **k: pytest.fail("models loaded before the tokenizer check"))
    with pytest.raises(ValueError, match=r"reward_critic_model_name_or_path: the critic's tokenizer \(.*critic_other_tokenizer\) must equal the actor's"):
        make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, reward_critic_model_name_or_path=critic))


def test_ptx_term_adds_exactly_ptx_coeff_times_its_gradient_to_the_actor_update(tmp_path, tiny_assets, tiny_score_model, repo_root):
    data = os.path.join(repo_root, "data")
    path = ppo_config(
        tmp_path, tiny_assets, tiny_score_model, repo_root, ptx_datasets=f"alpaca:1:{data}/alpaca/train.jsonl",
        ptx_coeff=0.5, per_device_prompt_batch_size=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        lr_scheduler_type="constant",
    )  # fmt: skip
    trainer = make_trainer(path)
    experience = fixed_experience(trainer, rows=4)
    micro_batches = trainer.split_micro_batches(experience)
    ptx_batches = trainer.ptx_micro_batches(0)
    initial = snapshot(trainer)
    gradients = record_gradients(trainer)
    actor_size = sum(int(np.prod(p.shape)) for p in trainer.actor_trainer.model.parameters())

    def update(coeff, ptx):
        trainer.args.ptx_coeff = coeff
        reset_training_state(trainer, initial)
        gradients.clear()
        trainer.update(micro_batches, ptx)
        assert len(gradients) == 1  # 2 micro-batches, accumulation 2: one update
        return gradients[0][:actor_size], gradients[0][actor_size:]

    # The ptx gradient alone: mean over the window's micro-batches of the LM loss (nothing else).
    reset_training_state(trainer, initial)
    model = trainer.actor_trainer.model
    loss = sum(
        ptx_loss_fn(model(b["input_ids"], attention_mask=b["attention_mask"], return_dict=True).logits, b["labels"], IGNORE_INDEX)
        for b in ptx_batches
    ) / len(ptx_batches)
    loss.backward()
    ptx_gradient = np.concatenate([p.grad.numpy().ravel() for p in model.parameters() if p.grad is not None])
    trainer.actor_trainer.zero_grad()

    actor_rl, critic_rl = update(0.0, None)
    for coeff in (0.5, 2.0):
        actor, critic = update(coeff, ptx_batches)
        assert relative_error(actor - actor_rl, coeff * ptx_gradient) < 1e-4, coeff
        np.testing.assert_allclose(critic, critic_rl, rtol=1e-5, atol=1e-8)  # the critic never sees ptx


def test_offloaded_frozen_models_come_back_with_identical_weights(tmp_path, tiny_assets, tiny_score_model, repo_root):
    """On CPU ``offload_level`` can only keep its bookkeeping; the frozen models must stay bit-identical."""
    path = ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, offload_level="freeze_model optimizer", max_steps=1)
    trainer = make_trainer(path)
    frozen = {"reference": state(trainer.reference_model), "reward": state(trainer.reward_model)}
    assert trainer.offload.transitions["offload", "freeze_model"] == 1  # offloaded right after loading
    trainer.train()
    # one rollout: reference reloaded for its log-probs, reward model for its score; each offloaded after
    assert trainer.offload.transitions["reload", "freeze_model"] == 2
    assert trainer.offload.transitions["offload", "freeze_model"] == 3
    assert trainer.offload.transitions["reload", "optimizer"] == trainer.offload.transitions["offload", "optimizer"] == 1
    for name, model in (("reference", trainer.reference_model), ("reward", trainer.reward_model)):
        for key, value in state(model).items():
            np.testing.assert_array_equal(value, frozen[name][key], err_msg=f"{name}.{key}")


def test_experience_batch_size_chunks_the_forward_passes_without_changing_the_experience(wired):
    rows = []
    handle = wired.reference_model.llama.register_forward_pre_hook(lambda layer, inputs: rows.append(inputs[0].shape[0]))
    try:
        whole = fixed_experience(wired)
        assert rows == [6]
        rows.clear()
        wired.args.per_device_experience_batch_size = 4
        chunked = fixed_experience(wired)
        assert rows == [4, 2]
    finally:
        handle.remove()
        wired.args.per_device_experience_batch_size = None
    for key in ("old_log_probs", "old_values", "advantages", "returns"):
        np.testing.assert_allclose(chunked[key].numpy(), whole[key].numpy(), atol=1e-5, err_msg=key)


def test_eval_do_sample_and_per_device_eval_batch_size_reach_the_evaluation(wired):
    seen = []

    def recorder(model, input_ids, attention_mask, **kwargs):
        seen.append((kwargs["do_sample"], input_ids.shape[0]))
        return paddle.concat([input_ids, paddle.full([input_ids.shape[0], 1], wired.tokenizer.eos_token_id, "int64")], axis=1)

    wired._generate_fn = recorder
    prompts = len(wired.eval_dataset)
    try:
        for flag, batch_size in ((False, 8), (True, 10)):
            wired.args.eval_do_sample, wired.args.per_device_eval_batch_size = flag, batch_size
            seen.clear()
            wired.evaluate()
            assert {sample for sample, _ in seen} == {flag}
            sizes = [rows for _, rows in seen]
            assert sizes == [batch_size] * (prompts // batch_size) + ([prompts % batch_size] if prompts % batch_size else [])
    finally:
        wired.args.eval_do_sample, wired.args.per_device_eval_batch_size = True, 8


def test_eval_split_ratio_holds_out_part_of_the_train_prompts(tmp_path, tiny_assets, tiny_score_model, repo_root, wired):
    trainer = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, eval_datasets=None, eval_split_ratio=0.25))
    total = len(wired.train_dataset)  # the same prompts, no split
    assert len(trainer.train_dataset) + len(trainer.eval_dataset) == total
    assert len(trainer.eval_dataset) == pytest.approx(0.25 * total, abs=1)


@pytest.mark.parametrize("overrides, backend", [
    (dict(rollout_backend="fast"), "fast"),
    (dict(rollout_backend="auto"), "auto"),
    (dict(rollout_backend="auto", use_fusemt=False), "fast"),  # upstream meaning: never the fused GPU path
])  # fmt: skip
def test_rollout_backend_and_use_fusemt_choose_the_generation_backend(tmp_path, tiny_assets, tiny_score_model, repo_root, overrides, backend):
    trainer = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, **overrides))
    seen = {}
    trainer._generate_fn = lambda model, input_ids, attention_mask, **kwargs: seen.update(kwargs) or input_ids
    batch = trainer.train_dataset.get_collator()([trainer.train_dataset[0]])
    trainer.generate(batch["input_ids"], batch["attention_mask"])
    assert seen["backend"] == backend


def test_normalize_reward_uses_the_statistics_saved_with_the_reward_model(tmp_path, tiny_assets, tiny_score_model, repo_root):
    from alignment.models import AutoModelForScore

    reward_dir = str(tmp_path / "rm_with_stats")
    model = AutoModelForScore.from_pretrained(tiny_score_model, normalizer_type="RunningMeanStd")
    model.normalizer.set_mean_var(mean=[0.5], var=[4.0])
    model.save_pretrained(reward_dir, safe_serialization=True)
    for name in os.listdir(tiny_assets["tokenizer"]):
        shutil.copy(os.path.join(tiny_assets["tokenizer"], name), reward_dir)
    scores = {}
    for flag in (False, True):
        trainer = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, f"norm{flag}",
                                          reward_model_name_or_path=reward_dir, normalize_reward=flag))  # fmt: skip
        experience = fixed_experience(trainer, rows=4)
        scores[flag] = trainer.reward_score(experience["input_ids"], experience["attention_mask"]).numpy()
    np.testing.assert_allclose(scores[True], (scores[False] - 0.5) / 2.0, rtol=1e-5, atol=1e-6)


def test_nonfinite_ptx_loss_drops_the_window(tmp_path, tiny_assets, tiny_score_model, repo_root, monkeypatch):
    """docs/reliability.md: a NaN ptx loss drops its window like a NaN actor/critic loss (``skip``)."""
    from alignment.ppo import rl_trainer

    data = os.path.join(repo_root, "data")
    trainer = make_trainer(ppo_config(
        tmp_path, tiny_assets, tiny_score_model, repo_root, ptx_datasets=f"alpaca:1:{data}/alpaca/train.jsonl",
        ptx_coeff=0.5, per_device_prompt_batch_size=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        on_nonfinite="skip",
    ))  # fmt: skip
    experience = fixed_experience(trainer, rows=4)
    initial = snapshot(trainer)
    original = rl_trainer.ptx_loss_fn
    monkeypatch.setattr(rl_trainer, "ptx_loss_fn", lambda *a, **k: original(*a, **k) * float("nan"))
    trainer.update(trainer.split_micro_batches(experience), trainer.ptx_micro_batches(0))
    assert trainer.state.skipped_updates == 1 and trainer.state.global_step == 1
    for name, weights in snapshot(trainer).items():
        for key, value in weights.items():
            np.testing.assert_array_equal(value, initial[name][key], err_msg=f"{name}.{key}")
