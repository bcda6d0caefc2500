"""DPO stage: data and response masks, log-probs (= safe-rlhf's DPO), DPOTrainer metrics, run_dpo.main
end to end (every loss, reference-free, precomputed reference, LoRA), bad input, 2 processes, resume,
and the quick start's ``--algorithm dpo``.

Runs of ``main`` use the session's tiny assets (random Llama) and small slices of data/safe_rlhf
("k/-1" = exactly k pairs) so that each takes a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

from alignment.data import DataArgument, format_prompt
from alignment.dpo.data import DPODataset
from alignment.dpo.dpo_trainer import METRIC_NAMES, MetricAccumulator, metric_sums, pair_log_probs
from alignment.dpo.run_dpo import DPOTrainingArguments, ModelArgument, build_datasets, main
from alignment.models.dpo_model_utils import get_preference_loss
from alignment.utils.config import ConfigError, parse_arguments
from alignment.utils.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
RUN_DPO = REPO / "alignment" / "dpo" / "run_dpo.py"
TRAIN = f"PKU-SafeRLHF/train:{{n}}/-1:{REPO / 'data/safe_rlhf/train.jsonl'}"
TEST = f"PKU-SafeRLHF/test:{{n}}/-1:{REPO / 'data/safe_rlhf/test.jsonl'}"


def write_args(path: Path, **fields) -> str:
    path.write_text(json.dumps(fields, indent=1))
    return str(path)


def base_args(model, output_dir, n_train=32, n_eval=16, **overrides) -> dict:
    """A short run on tiny assets; overrides win."""
    args = dict(
        model_name_or_path=model,
        train_datasets=TRAIN.format(n=n_train),
        eval_datasets=TEST.format(n=n_eval),
        max_length=64,
        output_dir=str(output_dir),
        overwrite_output_dir=True,
        do_train=True,
        do_eval=True,
        evaluation_strategy="epoch",
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        logging_steps=2,
        save_strategy="no",
        report_to=["none"],
        seed=7,
        disable_tqdm=True,
    )
    args.update(overrides)
    return args


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def perturbed_copy(model_dir: str, scale: float = 0.05, seed: int = 3):
    """The tiny Llama with noise added to every weight: a reference model that differs from the policy."""
    from paddlenlp.transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    with paddle.no_grad():
        for parameter in model.parameters():
            noise = rng.normal(0, scale, parameter.shape).astype("float32")
            parameter.set_value(parameter + paddle.to_tensor(noise))
    model.eval()
    return model


@pytest.fixture(scope="module")
def pairs(tokenizer):
    """The first 6 training pairs of the example data as a DPODataset."""
    return DPODataset(TRAIN.format(n=6), tokenizer, max_length=64, seed=0)


# ============================================================================ data


def test_response_masks_start_after_the_prompt_and_end_at_eos(pairs, tokenizer):
    batch = pairs.get_collator()([pairs[i] for i in range(len(pairs))])
    for index in range(len(pairs)):
        raw = pairs.raw_sample(index)
        prompt = list(pairs.encode_prompt(raw["input"]))  # the chat template's generation prompt (beaver)
        for side in ("better", "worse"):
            ids = pairs[index][f"{side}_input_ids"]
            mask = batch[f"{side}_response_mask"].numpy()[index]
            assert list(ids[: len(prompt)]) == prompt and ids[-1] == tokenizer.eos_token_id
            # response = everything after the prompt up to and including the EOS; nothing in the padding
            assert mask.nonzero()[0].tolist() == list(range(len(prompt), len(ids)))
    assert batch["better_response_mask"].dtype == paddle.bool


def test_response_masks_follow_the_chat_template(tokenizer, tmp_path):
    """With a jinja chat template (ChatML) the response starts right after the template's generation prompt."""
    from hf_helpers import CHATML_TEMPLATE

    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    pairs = DPODataset(TRAIN.format(n=4), tokenizer, max_length=128, seed=0, chat_template=str(template),
                       system_prompt="Be kind.")  # fmt: skip
    batch = pairs.get_collator()([pairs[i] for i in range(len(pairs))])
    for index in range(len(pairs)):
        prompt = pairs.encode_prompt(pairs.raw_sample(index)["input"]).tolist()
        assert tokenizer.decode(prompt).startswith("[system]Be kind.[end][user]")  # not the beaver prompt
        for side in ("better", "worse"):
            ids = pairs[index][f"{side}_input_ids"]
            assert ids[: len(prompt)].tolist() == prompt and ids[-1] == tokenizer.eos_token_id
            mask = batch[f"{side}_response_mask"].numpy()[index]
            assert mask.nonzero()[0].tolist() == list(range(len(prompt), len(ids)))


def test_pairs_without_a_response_within_max_length_are_skipped(tokenizer):
    from alignment.data import DatasetError

    prompt_length = len(tokenizer(format_prompt("Tell me something about rice.", eos_token=tokenizer.eos_token))["input_ids"])
    with pytest.raises(DatasetError, match="skipped"):
        DPODataset(TRAIN.format(n=4), tokenizer, max_length=5, seed=0)[0]
    assert prompt_length > 5


# ============================================================================ log-probs and the loss


def test_log_probs_and_sigmoid_loss_equal_safe_rlhf_dpo(pairs, tiny_assets):
    """With label_smoothing 0, the batched pipeline (one padded forward of 2B rows, response-token sums,
    the registered ``sigmoid`` loss, mean over pairs) equals safe-rlhf's DPO loss re-derived here: per
    pair, unpadded forwards, log-probs summed from the first token where better and worse differ to the
    last token (EOS), L = mean_i -log sigma(beta [(pi_b - ref_b) - (pi_w - ref_w)]). The prompt tokens
    before the divergence have the same log-probs in both answers and cancel."""
    from paddlenlp.transformers import AutoModelForCausalLM

    beta = 0.7
    policy = AutoModelForCausalLM.from_pretrained(tiny_assets["llama"])
    policy.eval()
    reference = perturbed_copy(tiny_assets["llama"])
    batch = pairs.get_collator()([pairs[i] for i in range(len(pairs))])
    with paddle.no_grad():
        pol, ref = pair_log_probs(policy, batch), pair_log_probs(reference, batch)
        losses, chosen_rewards, rejected_rewards = get_preference_loss("sigmoid")(
            policy_chosen_logps=pol.chosen, policy_rejected_logps=pol.rejected,
            reference_chosen_logps=ref.chosen, reference_rejected_logps=ref.rejected,
            chosen_lengths=pol.chosen_lengths, rejected_lengths=pol.rejected_lengths,
            beta=beta, label_smoothing=0.0, simpo_gamma=0.0,
        )  # fmt: skip

    def token_log_probs(model, ids):  # [len - 1]: log p(ids[t + 1] | ids[:t + 1])
        with paddle.no_grad():
            logits = model(input_ids=paddle.to_tensor(ids[None]), return_dict=True).logits.numpy()[0]
        return log_softmax(logits.astype(np.float64))[np.arange(len(ids) - 1), ids[1:]]

    expected = []
    for index in range(len(pairs)):
        better, worse = pairs[index]["better_input_ids"], pairs[index]["worse_input_ids"]
        diverge = int(np.nonzero(better[: min(len(better), len(worse))] != worse[: min(len(better), len(worse))])[0][0])
        log_ratio = {}
        for name, ids in (("better", better), ("worse", worse)):
            # tokens diverge .. len-1, i.e. shifted columns diverge-1 .. len-2
            span = slice(diverge - 1, len(ids) - 1)
            log_ratio[name] = token_log_probs(policy, ids)[span].sum() - token_log_probs(reference, ids)[span].sum()
        margin = beta * (log_ratio["better"] - log_ratio["worse"])
        expected.append(math.log1p(math.exp(-margin)))
        # our implicit-reward margin is the same quantity
        assert float(chosen_rewards[index] - rejected_rewards[index]) == pytest.approx(margin, rel=1e-3, abs=1e-4)
    assert float(losses.mean()) == pytest.approx(float(np.mean(expected)), rel=1e-4)
    # and response lengths count answer + EOS tokens
    prompt = len(pairs[0]["better_input_ids"]) - int(pol.chosen_lengths[0])
    assert prompt > 0 and int(pol.rejected_lengths[0]) == len(pairs[0]["worse_input_ids"]) - prompt


def test_metric_sums_and_accumulator_means():
    chosen, rejected = paddle.to_tensor([1.0, -1.0, 0.5]), paddle.to_tensor([0.0, 0.0, 0.5])
    logps_c, logps_r = paddle.to_tensor([-3.0, -4.0, -5.0]), paddle.to_tensor([-6.0, -6.0, -6.0])
    sums = metric_sums(chosen, rejected, logps_c, logps_r).numpy()
    # chosen 0.5, rejected 0.5, accuracies 1 (ties are wrong), margins 0, logps -12, -18
    np.testing.assert_allclose(sums, [0.5, 0.5, 1.0, 0.0, -12.0, -18.0])
    accumulator = MetricAccumulator()
    accumulator.add(metric_sums(chosen, rejected, logps_c, logps_r), 3)
    accumulator.add(metric_sums(chosen[:1], rejected[:1], logps_c[:1], logps_r[:1]), 1)
    means = accumulator.take()
    assert list(means) == list(METRIC_NAMES)
    assert means["rewards/accuracies"] == pytest.approx(2 / 4) and means["logps/chosen"] == pytest.approx(-15 / 4)
    assert accumulator.take() is None  # started over


# ============================================================================ run_dpo.main


@pytest.mark.parametrize(
    "loss_type, expected_initial_loss",
    [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2)],
)
def test_initial_evaluation_has_the_loss_of_a_policy_equal_to_its_reference(tmp_path, tiny_assets, loss_type, expected_initial_loss):
    """Policy == reference: h = 0 for every pair, so the loss is -log sigma(0), relu(1) or (1/(2 beta))^2,
    every implicit reward 0, and no pair ranked correctly (ties are wrong)."""
    args = base_args(tiny_assets["llama"], tmp_path / "out", do_train=False, loss_type=loss_type, beta=0.1)
    metrics = main([write_args(tmp_path / "a.json", **args)])
    assert metrics["eval_loss"] == pytest.approx(expected_initial_loss, rel=1e-5)
    assert metrics["eval_rewards/chosen"] == metrics["eval_rewards/margins"] == metrics["eval_rewards/accuracies"] == 0.0
    assert metrics["eval_logps/chosen"] < 0 and metrics["eval_logps/rejected"] < 0


@pytest.mark.parametrize("loss_type", ["sigmoid-reference-free", "simpo", "orpo"])
def test_reference_free_losses_evaluate_from_the_policy_alone(tmp_path, tiny_assets, tokenizer, loss_type):
    """No reference model: the reported loss is the formula on the policy's own log-probs, recomputed here."""
    beta, gamma = 0.3, 0.2
    extra = {"loss_type": "sigmoid", "reference_free": True} if loss_type == "sigmoid-reference-free" else {"loss_type": loss_type}
    args = base_args(tiny_assets["llama"], tmp_path / "out", do_train=False, beta=beta, simpo_gamma=gamma, **extra)
    metrics = main([write_args(tmp_path / "a.json", **args)])

    from paddlenlp.transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["llama"])
    model.eval()
    data = DPODataset(TEST.format(n=16), tokenizer, max_length=64, seed=7)
    with paddle.no_grad():
        logps = pair_log_probs(model, data.get_collator()([data[i] for i in range(len(data))]))
    pc, pr = logps.chosen.numpy().astype(np.float64), logps.rejected.numpy().astype(np.float64)
    a, b = pc / logps.chosen_lengths.numpy(), pr / logps.rejected_lengths.numpy()
    softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731  -log sigma(x) = softplus(-x)
    if loss_type == "sigmoid-reference-free":
        expected, chosen = softplus(-beta * (pc - pr)), beta * pc
    elif loss_type == "simpo":
        expected, chosen = softplus(-(beta * (a - b) - gamma)), beta * a
    else:
        log_odds = (a - np.log1p(-np.exp(a))) - (b - np.log1p(-np.exp(b)))
        expected, chosen = -a + beta * softplus(-log_odds), beta * a
    assert metrics["eval_loss"] == pytest.approx(expected.mean(), rel=1e-4)
    assert metrics["eval_rewards/chosen"] == pytest.approx(chosen.mean(), rel=1e-4)
    assert metrics["eval_logps/chosen"] == pytest.approx(pc.mean(), rel=1e-5)


CUSTOM_LOSS_MODULE = """
from alignment.models.dpo_model_utils import register_preference_loss

@register_preference_loss("test-squared-margin", uses_reference=True)
def squared_margin(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                   chosen_lengths, rejected_lengths, beta, label_smoothing, simpo_gamma):
    h = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    return (1.0 - beta * h) ** 2 + 3.0, beta * policy_chosen_logps, beta * policy_rejected_logps
"""


def test_a_loss_registered_in_a_custom_module_can_be_named(tmp_path, tiny_assets):
    """``custom_dataset_modules`` is imported before the arguments are checked, so a loss it registers
    is a valid ``loss_type``; with policy == reference its loss is (1 - 0)^2 + 3 for every pair."""
    module = tmp_path / "my_losses.py"
    module.write_text(CUSTOM_LOSS_MODULE)
    args = base_args(tiny_assets["llama"], tmp_path / "out", do_train=False, loss_type="test-squared-margin",
                     custom_dataset_modules=str(module))  # fmt: skip
    metrics = main([write_args(tmp_path / "a.json", **args)])
    assert metrics["eval_loss"] == pytest.approx(4.0, rel=1e-6)
    metrics = main([write_args(tmp_path / "a.json", **args)])  # imported again: the same loss, no clash
    assert metrics["eval_loss"] == pytest.approx(4.0, rel=1e-6)


def test_main_trains_logs_every_metric_and_writes_a_loadable_policy(tmp_path, tiny_assets, tokenizer):
    """A few steps: every interval log carries the metrics; the saved policy reproduces the reported
    held-out metrics against the untouched reference; eval_before_training is the policy == reference
    baseline."""
    from paddlenlp.transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    args = base_args(tiny_assets["llama"], out, eval_before_training=True, beta=0.5, report_to=["visualdl"])
    metrics = main([write_args(tmp_path / "a.json", **args)])

    records = read_metrics(str(out))
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [2, 4]
    for record in train_logs:
        assert set(METRIC_NAMES) <= set(record)
        assert (record["rewards/accuracies"] * 8) % 1 == pytest.approx(0, abs=1e-6)  # a share of 2 x 4 pairs
        assert record["rewards/margins"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"], abs=1e-5)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert {f"train_{name}" for name in METRIC_NAMES} <= set(metrics)
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]  # learning, on held-out pairs
    assert list(out.glob("runs/*/vdlrecords.*.log"))

    # The saved policy against the untouched reference gives the reported evaluation.
    policy = AutoModelForCausalLM.from_pretrained(str(out))
    reference = AutoModelForCausalLM.from_pretrained(tiny_assets["llama"])
    data = DPODataset(TEST.format(n=16), tokenizer, max_length=64, seed=7)
    batch = data.get_collator()([data[i] for i in range(len(data))])
    for model in (policy, reference):
        model.eval()
    with paddle.no_grad():
        pol, ref = pair_log_probs(policy, batch), pair_log_probs(reference, batch)
    chosen, rejected = 0.5 * (pol.chosen - ref.chosen).numpy(), 0.5 * (pol.rejected - ref.rejected).numpy()
    assert metrics["eval_rewards/accuracies"] == pytest.approx(float(np.mean(chosen > rejected)))
    assert metrics["eval_rewards/margins"] == pytest.approx(float(np.mean(chosen - rejected)), rel=1e-4, abs=1e-6)
    assert metrics["eval_loss"] == pytest.approx(float(np.mean(np.log1p(np.exp(-(chosen - rejected))))), rel=1e-4)


def test_logged_metrics_are_means_over_every_micro_batch_of_the_interval(tmp_path, tiny_assets, tokenizer):
    """Learning rate 0 (the policy never changes), reference-free sigmoid (rewards beta * log-prob, so
    not all 0), gradient accumulation 2, logging every 2 steps: each log covers 4 micro-batches of the
    seeded sampler, and its loss and metrics are the means over their 16 pairs, recomputed here."""
    from paddlenlp.transformers import AutoModelForCausalLM

    from alignment.utils.trainer import SeededDistributedBatchSampler

    out = tmp_path / "out"
    args = base_args(tiny_assets["llama"], out, learning_rate=0.0, lr_scheduler_type="constant", max_steps=4,
                     logging_steps=2, gradient_accumulation_steps=2, do_eval=False, evaluation_strategy="no",
                     reference_free=True, beta=0.3)  # fmt: skip
    main([write_args(tmp_path / "a.json", **args)])
    logs = [r for r in read_metrics(str(out)) if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4]

    train = DPODataset(TRAIN.format(n=32), tokenizer, max_length=64, seed=7)
    sampler = SeededDistributedBatchSampler(train, batch_size=4, shuffle=True, num_replicas=1, rank=0, seed=7)
    sampler.set_epoch(0)
    batches = list(sampler)[:8]
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["llama"])
    model.eval()
    for k, record in enumerate(logs):
        chosen, rejected, losses = [], [], []
        for indices in batches[4 * k : 4 * (k + 1)]:
            with paddle.no_grad():
                logps = pair_log_probs(model, train.get_collator()([train[i] for i in indices]))
            c, r = 0.3 * logps.chosen.numpy().astype(np.float64), 0.3 * logps.rejected.numpy().astype(np.float64)
            chosen += list(c)
            rejected += list(r)
            losses.append(np.mean(np.log1p(np.exp(-(c - r)))))
        chosen, rejected = np.asarray(chosen), np.asarray(rejected)
        assert record["rewards/chosen"] == pytest.approx(chosen.mean(), rel=1e-5)
        assert record["rewards/accuracies"] == pytest.approx(np.mean(chosen > rejected), abs=1e-6)
        assert record["logps/rejected"] == pytest.approx(rejected.mean() / 0.3, rel=1e-5)
        assert record["loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_precomputed_reference_log_probs_train_exactly_as_on_the_fly(tmp_path, tiny_assets):
    def run(name, **extra):
        out = tmp_path / name
        main([write_args(tmp_path / f"{name}.json", **base_args(tiny_assets["llama"], out, logging_steps=1, **extra))])
        return [(r["step"], r.get("loss"), r.get("rewards/margins"), r.get("eval_loss")) for r in read_metrics(str(out))]

    on_the_fly = run("fly")
    precomputed = run("pre", precompute_reference_log_probs=True)
    assert len(on_the_fly) == len(precomputed) == 6  # 4 steps, the evaluation, the summary
    for a, b in zip(on_the_fly, precomputed):
        assert a[0] == b[0]
        for x, y in zip(a[1:], b[1:]):
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-5, abs=1e-7)), (a, b)


def test_lora_trains_adapters_and_saves_a_merged_policy(tmp_path, tiny_assets):
    from paddlenlp.transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    args = base_args(tiny_assets["llama"], out, lora=True, lora_rank=4, lora_dropout=0.0, learning_rate=1e-2,
                     do_eval=False, evaluation_strategy="no", logging_steps=1)  # fmt: skip
    main([write_args(tmp_path / "a.json", **args)])
    assert (out / "lora_adapter").is_dir()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["llama"]).state_dict()
    assert set(merged) == set(base)
    changed = [k for k in base if not np.allclose(merged[k].numpy(), base[k].numpy())]
    assert changed and all("proj" in k for k in changed)  # only the adapted projections moved
    losses = [r["loss"] for r in read_metrics(str(out)) if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), rel=1e-5) and losses[-1] < losses[0]


# ============================================================================ bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_type": "dpo"}, "loss_type: unknown preference loss 'dpo'; registered: ["),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing: the hinge loss has no label smoothing"),
        ({"label_smoothing": 0.5}, "label_smoothing: must be in [0, 0.5)"),
        ({"beta": 0.0}, "beta: must be > 0"),
        ({"loss_type": "simpo", "reference_free": True}, "reference_free: the simpo loss never uses a reference model"),
        ({"loss_type": "orpo", "precompute_reference_log_probs": True}, "precompute_reference_log_probs: unused"),
        ({"reference_model_name_or_path": "/no/such/ref"}, "reference_model_name_or_path: no such directory"),
        ({"model_name_or_path": "/no/such/model"}, "model_name_or_path: no such directory"),
        ({"train_datasets": "no-such-dataset"}, "Unknown dataset name 'no-such-dataset'"),
        ({"lora": True, "lora_rank": 0}, "lora_rank: must be >= 1"),
        ({"max_step": 3}, "did you mean 'max_steps'"),
        ({"metric_for_best_model": "accuracy", "load_best_model_at_end": True, "save_strategy": "epoch"},
         "metric_for_best_model: 'accuracy' is not an evaluation metric"),
    ],
)
def test_bad_arguments_are_reported_before_loading_anything(tmp_path, tiny_assets, overrides, message):
    args = base_args(tiny_assets["llama"], tmp_path / "out", **overrides)
    with pytest.raises(ConfigError) as info:
        main([write_args(tmp_path / "a.json", **args)])
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["tiny", "llama"])
def test_shipped_argument_files_parse(name):
    path = REPO / "config" / name / "dpo_argument.json"
    model_args, data_args, training_args = parse_arguments(
        (ModelArgument, DataArgument, DPOTrainingArguments), [str(path), "--output_dir", "unused"]
    )
    assert training_args.loss_type == "sigmoid" and training_args.uses_reference_model
    assert data_args.train_datasets and data_args.eval_datasets and training_args.do_train


def test_build_datasets_splits_eval_off_the_train_mix_with_the_chat_template(tokenizer, tmp_path):
    from hf_helpers import ZEPHYR_TEMPLATE

    from alignment.data.chat_template import encode_prompt, load_chat_template

    template = tmp_path / "zephyr.jinja"
    template.write_text(ZEPHYR_TEMPLATE)
    data_args = DataArgument(train_datasets=TRAIN.format(n=20), eval_split_ratio=0.25, max_length=128,
                             chat_template=str(template), system_prompt="S")  # fmt: skip
    train, held_out = build_datasets(data_args, tokenizer, seed=1, need_train=True, need_eval=True)
    assert (len(train), len(held_out)) == (15, 5)
    for dataset in (train, held_out):  # both built with the template (the split keeps it)
        example, raw = dataset[0], dataset.raw_sample(0)
        prompt = dataset.encode_prompt(raw["input"]).tolist()
        assert prompt != encode_prompt(load_chat_template("beaver", tokenizer), tokenizer, raw["input"]).tolist()
        assert example["better_input_ids"][: len(prompt)].tolist() == prompt
        assert example["better_prompt_length"] == len(prompt)


# ============================================================================ 2 processes, resume


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        {"precompute_reference_log_probs": True},
        {"sharding": "stage1", "sharding_parallel_degree": 2},
    ],
    ids=["data-parallel-precomputed-reference", "sharding-stage1"],
)
def test_two_process_data_parallel_matches_one_process(tmp_path, tiny_assets, layout):
    """2 ranks x 4 pairs vs 1 process x 8 pairs: same global batches (seeded sampler), per-pair mean loss,
    gradients averaged over ranks. In the data-parallel case the 2-rank run also precomputes the reference
    log-probs split over the ranks (gathered back) while the 1-process run computes them per batch; with
    sharding stage 1 each rank also holds half of the optimizer state. 15 evaluation pairs: the 2-rank
    sampler repeats one to fill 16 slots; the gathered values are cut back to 15."""
    from alignment.parallel.launch import launch_distributed

    common = dict(n_train=64, n_eval=15, max_steps=6, logging_steps=1, eval_before_training=True, beta=0.5)
    one = base_args(tiny_assets["llama"], tmp_path / "one", per_device_train_batch_size=8, **common)
    two = base_args(tiny_assets["llama"], tmp_path / "two", per_device_train_batch_size=4, **layout, **common)
    launch_distributed(RUN_DPO, [write_args(tmp_path / "two.json", **two)], nproc=2, log_dir=tmp_path / "logs",
                       timeout=300, cwd=REPO, env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    main([write_args(tmp_path / "one.json", **one)])

    def curves(out):
        records = read_metrics(str(out))
        evals = [r for r in records if "eval_loss" in r]
        assert [r["step"] for r in evals] == [0, 6]  # logged once, by rank 0
        return [r for r in records if "loss" in r], evals

    logs_1, evals_1 = curves(tmp_path / "one")
    logs_2, evals_2 = curves(tmp_path / "two")
    assert len(logs_1) == len(logs_2) == 6 and logs_1[-1]["loss"] < logs_1[0]["loss"]
    for a, b in zip(logs_1, logs_2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["rewards/accuracies"] == a["rewards/accuracies"]
        for name in ("rewards/margins", "logps/chosen", "logps/rejected"):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), name
    for key in ["eval_loss"] + [f"eval_{name}" for name in METRIC_NAMES]:
        assert evals_2[-1][key] == pytest.approx(evals_1[-1][key], rel=1e-4, abs=1e-5), key
    assert evals_2[0]["eval_loss"] == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.slow
def test_resumes_after_sigkill_with_the_same_metrics(tmp_path, tiny_assets):
    """SIGKILL after the first checkpoint, resume with --resume_from_checkpoint auto: the metrics file holds
    every step once, with the losses and metrics of an uninterrupted run."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = dict(max_steps=12, logging_steps=1, save_strategy="steps", save_steps=4, evaluation_strategy="no",
                  do_eval=False, overwrite_output_dir=False, n_train=64)  # fmt: skip
    reference = write_args(tmp_path / "ref.json", **base_args(tiny_assets["llama"], tmp_path / "ref", **common))
    subprocess.run([sys.executable, str(RUN_DPO), reference], check=True, cwd=REPO, env=env, capture_output=True, timeout=300)

    output = tmp_path / "killed"
    killed = write_args(tmp_path / "killed.json", **base_args(tiny_assets["llama"], output, **common))
    process = subprocess.Popen([sys.executable, str(RUN_DPO), killed], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while not (output / "checkpoint-4" / "manifest.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    refused = subprocess.run([sys.executable, str(RUN_DPO), killed], cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "--resume_from_checkpoint auto" in refused.stderr  # resuming is opt-in
    resumed = subprocess.run([sys.executable, str(RUN_DPO), killed, "--resume_from_checkpoint", "auto"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def logs(directory):
        return [r for r in read_metrics(str(directory)) if "loss" in r]

    expected, got = {r["step"]: r for r in logs(tmp_path / "ref")}, logs(output)
    # Every step once: what the killed run logged after its checkpoint was dropped on resume.
    assert [r["step"] for r in got] == sorted(expected) == list(range(1, 13))
    for record in got:
        for key in ("loss",) + METRIC_NAMES:
            assert record[key] == pytest.approx(expected[record["step"]][key], rel=1e-5, abs=1e-7), (record["step"], key)


# ============================================================================ quick start, benchmark


@pytest.mark.slow
def test_quickstart_dpo_improves_the_sft_policy(quickstart_run, run_quickstart, tmp_path):
    """``quickstart.sh --algorithm dpo --sft-from <README run's SFT>``: held-out implicit-reward accuracy and
    the ground-truth task score of sampled generations (docs/dpo.md records the numbers)."""
    output, _ = quickstart_run
    report = run_quickstart(tmp_path / "dpo", "--algorithm", "dpo", "--sft-from", str(output / "sft"))
    assert report["algorithm"] == "dpo"
    assert report["dpo_eval_accuracy"] > 0.75, report["dpo_eval_accuracy"]
    assert report["ppo_task_score"] > report["sft_task_score"] + 0.05, (report["sft_task_score"], report["ppo_task_score"])
    assert set(report["stage_seconds"]) == {"reward_model", "eval_sft", "dpo", "eval_dpo"}  # no second SFT
    assert report["checkpoints"]["policy"] == str(tmp_path / "dpo" / "dpo") and "value" not in report["checkpoints"]
    assert set(report["plots"]) == {"rm", "dpo"}

    from paddlenlp.transformers import AutoModelForCausalLM
    from visualdl import LogReader

    AutoModelForCausalLM.from_pretrained(report["checkpoints"]["policy"])
    logs = list((tmp_path / "dpo" / "dpo").glob("runs/*/vdlrecords.*.log"))
    assert logs, "no VisualDL log for DPO"
    tags = LogReader(file_path=str(logs[0])).get_tags()["scalar"]
    assert {"train/rewards/accuracies", "eval/rewards/accuracies", "train/logps/chosen"} <= set(tags), tags


def test_benchmark_dpo_reports_a_step(repo_root):
    shape = ["--vocab-size", "300", "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2",
             "--num-heads", "4", "--batch-size", "2", "--prompt-len", "6", "--new-tokens", "5", "--json"]  # fmt: skip
    result = subprocess.run([sys.executable, "scripts/benchmark_dpo.py", *shape, "--steps", "1", "--precompute"],
                            cwd=repo_root, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["median_step_s"] == pytest.approx(report["forward_backward_s"] + report["optimizer_s"])
    assert report["peak_rss_mb"] > 0 and report["config"]["precompute"] is True
