"""PPO orchestration on tiny models: experience tensors, EOS handling, step counting, logging."""

from __future__ import annotations

import json
import os

import numpy as np
import paddle
import pytest

from alignment.models.ppo_model_utils import gather_log_probabilities, make_rollout_attention_mask
from alignment.ppo.run_ppo import DataArgument, ModelArgument, TrainingArguments, build_trainer, validate_arguments
from alignment.utils.config import ConfigError, parse_arguments
from alignment.utils.metrics import read_metrics


def ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, name: str = "ppo", **overrides) -> str:
    data = os.path.join(repo_root, "data")
    config = {
        "train_datasets": f"PKU-SafeRLHF/train:1:{data}/safe_rlhf/train.jsonl",
        "eval_datasets": f"PKU-SafeRLHF/test:24/-1:{data}/safe_rlhf/test.jsonl",
        "actor_model_name_or_path": tiny_assets["llama"],
        "reward_model_name_or_path": tiny_score_model,
        "output_dir": str(tmp_path / name),
        "max_length": 48,
        "max_new_tokens": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "per_device_prompt_batch_size": 4,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 8,
        "num_return_sequences": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "save_strategy": "no",
        "evaluation_strategy": "no",
        "do_train": True,
        "report_to": "none",
        "rollout_backend": "plain",
        "disable_tqdm": True,
        "seed": 3,
    }
    config.update(overrides)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def make_trainer(path: str):
    model_args, data_args, args = parse_arguments((ModelArgument, DataArgument, TrainingArguments), [path])
    validate_arguments(model_args, data_args, args, path)
    return build_trainer(model_args, data_args, args, path)


class FixedResponses:
    """A ``generate_fn`` returning given response ids after each (left-padded) prompt."""

    def __init__(self, responses: list[list[int]]):
        self.responses = responses

    def __call__(self, model, input_ids, attention_mask, *, num_return_sequences, pad_token_id, **kwargs):
        prompts = paddle.repeat_interleave(input_ids, num_return_sequences, axis=0)
        width = max(len(r) for r in self.responses)
        rows = [r + [pad_token_id] * (width - len(r)) for r in self.responses[: prompts.shape[0]]]
        return paddle.concat([prompts, paddle.to_tensor(rows, dtype="int64")], axis=1)


def test_experience_aligns_tokens_and_puts_the_reward_on_the_final_eos(tmp_path, tiny_assets, tiny_score_model, repo_root):
    trainer = make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, kl_coeff=0.1, clip_range_score=0.05))
    tokenizer = trainer.tokenizer
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # the LLaMA case: pad == eos
    # Row 0 stops early with EOS (then pads, which are also EOS ids); row 1 never stops.
    responses = [[10, 11, eos, eos, eos], [12, 13, 14, 15, 16]]
    trainer._generate_fn = FixedResponses(responses)
    batch = trainer.train_dataset.get_collator()([trainer.train_dataset[0], trainer.train_dataset[5]])
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    with paddle.no_grad():
        sequences = trainer.generate(prompt_ids, prompt_mask)
        mask = make_rollout_attention_mask(prompt_mask, sequences, eos)
        experience = trainer.make_experience(prompt_ids, sequences, mask)

    width = prompt_ids.shape[1]
    start = width - 1
    assert experience["start"] == start
    response_mask = experience["response_mask"].numpy()
    assert response_mask.tolist() == [[True, True, True, False, False], [True] * 5]  # EOS counted once

    actor = trainer.actor_trainer.model
    reward_model = trainer.reward_model
    for row in range(2):
        # Independent reference: the unpadded sequence, plain positions, no attention mask.
        prompt = prompt_ids[row].numpy()[prompt_mask[row].numpy()].tolist()
        kept = responses[row][: int(response_mask[row].sum())]
        ids = paddle.to_tensor([prompt + kept])
        with paddle.no_grad():
            logits = actor(ids, return_dict=True).logits
            expected = gather_log_probabilities(logits[:, :-1], ids[:, 1:]).numpy()[0, len(prompt) - 1 :]
            score = reward_model(ids, return_dict=True).end_scores.numpy()[0, 0]
        got = experience["old_log_probs"].numpy()[row][: len(kept)]
        np.testing.assert_allclose(got, expected, atol=2e-5)
        # The reward model scores the last valid token: the EOS for row 0, the last token for row 1.
        assert trainer.reward_score(sequences, mask).numpy()[row] == pytest.approx(score, abs=2e-5)
    # Rebuild the per-token rewards from their parts to check the end placement and the clip.
    from alignment.models.ppo_model_utils import add_kl_divergence_regularization, make_sequence_mask

    with paddle.no_grad():
        log_probs = trainer.log_probs_of(actor, sequences, mask, experience["position_ids"])
        ref = trainer.log_probs_of(trainer.reference_model, sequences, mask, experience["position_ids"])
        score = trainer.reward_score(sequences, mask)
    rewards = add_kl_divergence_regularization(score, log_probs, ref, make_sequence_mask(mask, start), 0.1, 0.05).numpy()
    kl = -0.1 * (log_probs.numpy() - ref.numpy())
    end = [start + 2, start + 4]  # EOS of row 0 (3rd response token), last token of row 1
    for row in range(2):
        clipped = float(np.clip(score.numpy()[row], -0.05, 0.05))
        assert rewards[row, end[row]] == pytest.approx(kl[row, end[row]] + clipped, abs=1e-6)
        others = [t for t in range(rewards.shape[1]) if t != end[row]]
        np.testing.assert_allclose(rewards[row, others], kl[row, others], atol=1e-6)


def test_steps_count_optimizer_updates_with_gradient_accumulation(tmp_path, tiny_assets, tiny_score_model, repo_root):
    # 4 prompts x 2 samples = 8 rows = 4 micro-batches of 2; accumulation 2 -> 2 updates per rollout.
    path = ppo_config(
        tmp_path, tiny_assets, tiny_score_model, repo_root,
        num_return_sequences=2, gradient_accumulation_steps=2, max_steps=5, logging_steps=2,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        make_trainer(ppo_config(tmp_path, tiny_assets, tiny_score_model, repo_root, "bad", gradient_accumulation_steps=3))
    trainer = make_trainer(path)
    assert trainer.updates_per_rollout == 2
    state = trainer.train()
    assert state.global_step == 5  # max_steps is exact even when it ends mid-rollout
    assert trainer.actor_trainer.num_optimizer_steps == state.global_step
    assert trainer.critic_trainer.num_optimizer_steps == state.global_step
    records = read_metrics(os.path.join(tmp_path, "ppo"))
    assert [r["step"] for r in records] == [2, 4, 5]
    for record in records:
        for key in ["train/actor_loss", "train/reward_critic_loss", "train/reward", "train/kl_divergence",
                    "train/mean_generated_length", "train/max_generated_length", "train/actor_lr",
                    "train/reward_critic_lr", "train/generation_seconds", "train/experience_seconds",
                    "train/update_seconds"]:  # fmt: skip
            assert key in record, key
            assert np.isfinite(record[key])
