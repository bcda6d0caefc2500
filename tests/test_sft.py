"""SFT stage: answer-only loss, run_sft.py end to end, learning, LoRA merge, 2-process launch, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import paddle
import pytest

from alignment.data import IGNORE_INDEX, DatasetError, SupervisedDataset, format_prompt
from alignment.sft.merge_lora import LORA_ADAPTER_DIR, merge_lora_state_dict
from alignment.sft.run_sft import SFTTrainingArguments, main
from alignment.sft.sft_trainer import SFTTrainer, causal_lm_loss, perplexity, token_nll
from alignment.utils.config import ConfigError
from alignment.utils.metrics import read_metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SFT = os.path.join(REPO_ROOT, "alignment", "sft", "run_sft.py")
TINY_CONFIG = os.path.join(REPO_ROOT, "config", "tiny", "sft_argument.json")
LLAMA_CONFIG = os.path.join(REPO_ROOT, "config", "llama", "sft_argument.json")

ROWS = [
    {"instruction": "Give me a tip about tea.", "input": "", "output": "Sure! Tea is a wonderful topic."},
    {"instruction": "How do I steal rice?", "input": "", "output": "Sorry, I can not help with that."},
    {"instruction": "Tell me something about", "input": "cats.", "output": "No idea."},
]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    return str(path)


def run_args(model_dir: str, output_dir: str, **overrides) -> list[str]:
    """argv for run_sft.main: the shipped tiny config, on the tiny model, quiet and short."""
    args = {
        "model_name_or_path": model_dir,
        "output_dir": output_dir,
        "report_to": "none",
        "logging_steps": 1,
        **overrides,
    }
    argv = [TINY_CONFIG]
    for key, value in args.items():
        argv += [f"--{key}", str(value)]
    return argv


@pytest.fixture()
def in_repo(monkeypatch):
    """The tiny config names data files relative to the repository root."""
    monkeypatch.chdir(REPO_ROOT)


# ============================================================================ loss math


def test_token_nll_golden_values():
    # vocab 2, one sequence of 3 positions; position 0 is prompt (ignored).
    # position 1: logits (ln 3, 0) -> p(token 0) = 3/4, target 0 -> nll = ln(4/3)
    # position 2: logits (0, 0)    -> p = 1/2,         target 1 -> nll = ln 2
    # sum = ln(4/3) + ln 2 = ln(8/3); 2 tokens; mean = ln(8/3) / 2
    logits = paddle.to_tensor([[[5.0, -7.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = paddle.to_tensor([[IGNORE_INDEX, 0, 1]], dtype="int64")
    nll_sum, num_tokens = token_nll(logits, labels)
    assert float(num_tokens) == 2.0
    np.testing.assert_allclose(float(nll_sum), math.log(8.0 / 3.0), rtol=1e-6)
    np.testing.assert_allclose(float(causal_lm_loss(logits, labels)), math.log(8.0 / 3.0) / 2, rtol=1e-6)


def test_loss_is_token_mean_over_the_batch_and_zero_without_labels():
    # Row 0 has one labelled token with nll ln 2, row 1 three with nll ln 2 each (uniform logits
    # over 2 tokens): the token mean is ln 2 whatever the split; a per-row mean would be too.
    # Make row 1's tokens cost ln(4/3) instead: token mean = (ln 2 + 3 ln(4/3)) / 4.
    logits = np.zeros([2, 3, 2], dtype="float32")
    logits[1, :, 0] = math.log(3.0)
    labels = np.array([[0, IGNORE_INDEX, IGNORE_INDEX], [0, 0, 0]], dtype="int64")
    loss = causal_lm_loss(paddle.to_tensor(logits), paddle.to_tensor(labels))
    np.testing.assert_allclose(float(loss), (math.log(2.0) + 3 * math.log(4.0 / 3.0)) / 4, rtol=1e-6)
    nothing = paddle.full([1, 3], IGNORE_INDEX, dtype="int64")
    assert float(causal_lm_loss(paddle.to_tensor(logits[:1]), nothing)) == 0.0


def test_perplexity():
    assert perplexity(0.0) == 1.0
    np.testing.assert_allclose(perplexity(math.log(7.0)), 7.0)
    assert perplexity(1e6) == math.inf


def test_trainer_loss_counts_answer_tokens_only(tiny_assets, tokenizer, tmp_path):
    """SFTTrainer.compute_loss on a padded batch == a hand computation from unpadded forwards."""
    from paddlenlp.transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    dataset = SupervisedDataset(f"alpaca:1:{data}", tokenizer, max_length=64, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["llama"])
    model.eval()
    args = SFTTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    trainer = SFTTrainer(model=model, args=args, tokenizer=tokenizer, data_collator=dataset.get_collator(shift=True))
    examples = [dataset[i] for i in range(len(dataset))]
    batch = dataset.get_collator(shift=True)(examples)
    with paddle.no_grad():
        loss = float(trainer.compute_loss(model, batch))
        reference = float(model(**batch, return_dict=True).loss)  # PaddleNLP's criterion expects pre-shifted labels

    # Hand computation: each example alone (no padding), tokens after the prompt only.
    # Token t of the answer is predicted by the logits at position t - 1.
    nll, count = 0.0, 0
    for index, example in enumerate(examples):
        raw = dataset.raw_sample(index)
        prompt_ids = tokenizer(format_prompt(raw["input"], eos_token=tokenizer.eos_token))["input_ids"]
        ids = example["input_ids"]
        assert list(ids[: len(prompt_ids)]) == prompt_ids and ids[-1] == tokenizer.eos_token_id
        with paddle.no_grad():
            logits = model(input_ids=paddle.to_tensor(ids[None]), return_dict=True).logits.numpy()[0]
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
            -1, keepdims=True
        )
        for t in range(len(prompt_ids), len(ids)):  # answer tokens and the final EOS
            nll -= log_probs[t - 1, ids[t]]
            count += 1
    assert count == int((batch["labels"].numpy() != IGNORE_INDEX).sum())
    np.testing.assert_allclose(loss, nll / count, rtol=1e-4)
    np.testing.assert_allclose(loss, reference, rtol=1e-4)


# ============================================================================ LoRA merge


def test_merge_lora_state_dict_golden():
    # W [in=2, out=3], A [2, 1], B [1, 3], scaling 2: W + 2 * A @ B.
    weight = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], dtype="float32")
    lora_a = np.array([[1.0], [-2.0]], dtype="float32")
    lora_b = np.array([[0.5, 0.0, 1.0]], dtype="float32")
    expected = weight + 2.0 * np.array([[0.5, 0.0, 1.0], [-1.0, 0.0, -2.0]], dtype="float32")
    bias = paddle.to_tensor([0.1, 0.2, 0.3])
    state = {
        "layer.q_proj.weight": paddle.to_tensor(weight),
        "layer.q_proj.lora_A": paddle.to_tensor(lora_a),
        "layer.q_proj.lora_B": paddle.to_tensor(lora_b),
        "layer.q_proj.bias": bias,
        "norm.weight": paddle.to_tensor([1.0, 1.0]),
    }
    merged = merge_lora_state_dict(state, scaling=2.0)
    assert sorted(merged) == ["layer.q_proj.bias", "layer.q_proj.weight", "norm.weight"]
    np.testing.assert_allclose(merged["layer.q_proj.weight"].numpy(), expected, rtol=1e-6)
    assert merged["layer.q_proj.bias"] is bias
    with pytest.raises(KeyError, match="lora_B"):
        merge_lora_state_dict({"x.lora_A": paddle.to_tensor(lora_a), "x.weight": paddle.to_tensor(weight)}, 1.0)


# ============================================================================ run_sft.py


def test_run_sft_end_to_end_writes_a_loadable_model_and_metrics(tiny_assets, tmp_path, in_repo):
    """A few steps with eval split off the training data; the saved model reproduces eval_loss."""
    from paddlenlp.transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = str(tmp_path / "sft")
    metrics = main(
        run_args(
            tiny_assets["llama"],
            output_dir,
            eval_datasets="",
            eval_split_ratio=0.05,
            max_steps=4,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=16,
            learning_rate=3e-3,
            save_strategy="steps",
            save_steps=2,
            save_total_limit=1,
        )
    )
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    np.testing.assert_allclose(metrics["eval_ppl"], math.exp(metrics["eval_loss"]), rtol=1e-9)

    records = read_metrics(output_dir)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4]  # before training, and once at the end
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)

    # Plain safetensors checkpoint + tokenizer in output_dir; older checkpoints rotated away.
    assert any(name.endswith(".safetensors") for name in os.listdir(output_dir))
    assert sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-")) == ["checkpoint-4"]
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.eos_token_id == tokenizer.eos_token_id

    # The saved weights are the final ones: re-evaluating them gives the reported eval_loss.
    from alignment.data import load_tokenizer

    tokenizer = load_tokenizer(output_dir)
    train = SupervisedDataset("alpaca:1:data/alpaca/train.jsonl", tokenizer, max_length=128, seed=42)
    _, held_out = train.split_train_test(split_ratio=0.05, seed=42)
    batch = held_out.get_collator(shift=True)([held_out[i] for i in range(len(held_out))])
    model.eval()
    with paddle.no_grad():
        nll_sum, num_tokens = token_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                              return_dict=True).logits, batch["labels"])  # fmt: skip
    np.testing.assert_allclose(float(nll_sum / num_tokens), metrics["eval_loss"], rtol=1e-4)


def test_sft_learns_the_example_task(tiny_assets, tmp_path, in_repo):
    """One epoch on data/alpaca/train.jsonl: held-out answer loss falls from ~ln(vocab) towards the data's entropy."""
    metrics = main(
        run_args(
            tiny_assets["llama"],
            str(tmp_path / "sft"),
            num_train_epochs=1,
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            save_strategy="no",
            logging_steps=10,
        )
    )
    # Random init: about ln(vocab) = ln(1000) = 6.9 nats per answer token. The answers' own entropy
    # (random style, opener, tip... given the prompt) is about 0.35 nats per token.
    assert metrics["initial_eval_loss"] > 6.0
    assert metrics["eval_loss"] < 1.0
    assert metrics["train_loss"] < 0.5 * metrics["initial_eval_loss"]


def test_lora_run_saves_adapters_and_an_equivalent_merged_model(tiny_assets, tmp_path, in_repo):
    from paddlenlp.peft import LoRAModel
    from paddlenlp.transformers import AutoModelForCausalLM

    from alignment.sft import merge_lora

    output_dir = str(tmp_path / "lora")
    main(
        run_args(
            tiny_assets["llama"],
            output_dir,
            lora="true",
            lora_rank=4,
            lora_dropout=0.0,
            max_steps=3,
            learning_rate=1e-2,
            eval_before_training="false",
            evaluation_strategy="no",
            do_eval="false",
            save_strategy="steps",
            save_steps=2,
        )
    )
    adapter_dir = os.path.join(output_dir, LORA_ADAPTER_DIR)
    merged = AutoModelForCausalLM.from_pretrained(output_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["llama"])
    adapted = LoRAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["llama"]), adapter_dir)
    input_ids = paddle.to_tensor([[1, 50, 60, 70, 80, 90]])
    logits = {}
    for name, model in (("merged", merged), ("adapted", adapted), ("base", base)):
        model.eval()
        with paddle.no_grad():
            logits[name] = model(input_ids=input_ids, return_dict=True).logits.numpy()
    np.testing.assert_allclose(logits["merged"], logits["adapted"], rtol=1e-4, atol=1e-5)
    assert np.abs(logits["merged"] - logits["base"]).max() > 1e-3  # the adapters did train

    # The stand-alone merge of the saved adapters gives the same weights.
    again = merge_lora.main(["--lora_path", adapter_dir, "--output_dir", str(tmp_path / "merged")])
    reloaded = AutoModelForCausalLM.from_pretrained(again)
    for key, value in merged.state_dict().items():
        np.testing.assert_allclose(reloaded.state_dict()[key].numpy(), value.numpy(), rtol=1e-6, err_msg=key)
    # Intermediate checkpoints hold adapters only; they merge the same way (base from lora_config.json).
    checkpoint = os.path.join(output_dir, "checkpoint-2")
    step2 = merge_lora.main(["--lora_path", checkpoint, "--output_dir", str(tmp_path / "m2")])
    assert set(AutoModelForCausalLM.from_pretrained(step2).state_dict()) == set(merged.state_dict())


def test_resume_is_opt_in_and_continues_from_the_last_checkpoint(tiny_assets, tmp_path, in_repo):
    output_dir = str(tmp_path / "sft")
    common = dict(save_strategy="steps", save_steps=2, eval_before_training="false", overwrite_output_dir="false")
    main(run_args(tiny_assets["llama"], output_dir, max_steps=2, **common))
    assert os.path.isfile(os.path.join(output_dir, "checkpoint-2", "manifest.json"))  # complete, verifiable
    first = read_metrics(output_dir)
    with pytest.raises(ConfigError, match="already holds checkpoint-2; pass --resume_from_checkpoint auto"):
        main(run_args(tiny_assets["llama"], output_dir, max_steps=4, **common))
    main(run_args(tiny_assets["llama"], output_dir, max_steps=4, resume_from_checkpoint="auto", **common))
    records = read_metrics(output_dir)
    assert records[: len(first)] == first  # the first run's log is kept (a fresh start would rewrite it)...
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # ...and continued from step 3


# ============================================================================ bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_datasets": ""}, "train_datasets: required with do_train"),
        ({"train_datasets": "no-such-dataset"}, "Unknown dataset name 'no-such-dataset'"),
        ({"eval_datasets": ""}, "eval_datasets: do_eval"),
        ({"eval_split_ratio": 0.1}, "eval_split_ratio: give eval_datasets or eval_split_ratio, not both"),
        ({"eval_datasets": "", "eval_split_ratio": 1.5}, "eval_split_ratio: must be in (0, 1)"),
        ({"model_name_or_path": ""}, "model_name_or_path: required"),
        ({"lora": "true", "lora_rank": 0}, "lora_rank: must be >= 1"),
        ({"max_steps": "ten"}, "max_steps: expected an integer"),
        ({"max_step": 3}, "did you mean 'max_steps'"),
        ({"do_eval": "false", "evaluation_strategy": "no"}, "eval_before_training: needs do_eval"),
        pytest.param(
            {"use_flash_attention": "true"},
            "use_flash_attention: needs a GPU build",
            marks=pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="valid on a GPU build"),
        ),
    ],
)
def test_bad_arguments_are_reported_before_loading_anything(overrides, message, tmp_path, in_repo):
    argv = run_args("/does/not/exist", str(tmp_path / "out"), **overrides)
    with pytest.raises(ConfigError) as info:
        main(argv)
    assert message in str(info.value)
    assert not os.path.exists(tmp_path / "out")


def test_max_length_too_small_for_every_example(tiny_assets, tmp_path, in_repo):
    with pytest.raises(DatasetError, match=r"every example .* was skipped .*max_length=8"):
        main(run_args(tiny_assets["llama"], str(tmp_path / "out"), max_length=8))


def test_tokenizer_without_eos_is_rejected(tiny_assets, tmp_path, in_repo):
    tokenizer_dir = tmp_path / "no_eos"
    shutil.copytree(tiny_assets["tokenizer"], tokenizer_dir)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((tokenizer_dir / name).read_text())
        config["eos_token"] = None
        (tokenizer_dir / name).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="tokenizer_name_or_path: .*has no eos_token"):
        main(run_args(tiny_assets["llama"], str(tmp_path / "out"), tokenizer_name_or_path=str(tokenizer_dir)))


def test_shipped_configs_parse():
    from alignment.data import DataArgument
    from alignment.sft.run_sft import ModelArgument
    from alignment.utils.config import parse_arguments

    for path in (TINY_CONFIG, LLAMA_CONFIG):
        model_args, data_args, training_args = parse_arguments((ModelArgument, DataArgument, SFTTrainingArguments),
                                                               [path, "--output_dir", "unused"])  # fmt: skip
        assert data_args.train_datasets and training_args.do_train
    _, data_args, training_args = parse_arguments(
        (ModelArgument, DataArgument, SFTTrainingArguments), [LLAMA_CONFIG]
    )
    assert data_args.max_length == 512 and training_args.learning_rate == 2e-5 and training_args.num_train_epochs == 3


# ============================================================================ 2 processes


@pytest.mark.distributed
def test_two_process_data_parallel_matches_one_process(tiny_assets, tmp_path, in_repo):
    """Same global batch (1 x 8 vs 2 x 4), same steps: same losses up to the per-rank token weighting."""
    from paddlenlp.transformers import AutoModelForCausalLM

    from alignment.parallel.launch import launch_distributed

    # Global batch = the whole 8-example training set, so both runs see the same examples at every
    # step whatever the shuffle: they differ only in how a token mean is split over ranks.
    common = dict(train_datasets="alpaca:8/-1:data/alpaca/train.jsonl", max_steps=12, learning_rate=5e-3,
                  save_strategy="no", logging_steps=1, per_device_eval_batch_size=16)  # fmt: skip
    single = str(tmp_path / "single")
    one = main(run_args(tiny_assets["llama"], single, per_device_train_batch_size=8, **common))
    double = str(tmp_path / "double")
    launch_distributed(
        RUN_SFT,
        run_args(tiny_assets["llama"], double, per_device_train_batch_size=4, **common),
        nproc=2,
        log_dir=tmp_path / "logs",
        timeout=300,
        cwd=REPO_ROOT,
    )
    two = json.load(open(os.path.join(double, "all_results.json")))
    # Same initial weights, same held-out set (sharded over 2 ranks and summed back): same start.
    np.testing.assert_allclose(two["initial_eval_loss"], one["initial_eval_loss"], rtol=1e-5)
    # Per-step losses track each other (measured: within 0.3%); so does the final model (0.2%).
    losses = {
        run: [record["loss"] for record in read_metrics(path) if "loss" in record]
        for run, path in (("one", single), ("two", double))
    }
    assert len(losses["one"]) == len(losses["two"]) == 12
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=0.01)
    np.testing.assert_allclose(two["eval_loss"], one["eval_loss"], rtol=0.005)
    assert two["eval_loss"] < two["initial_eval_loss"] - 1.0
    assert any(name.endswith(".safetensors") for name in os.listdir(double))
    AutoModelForCausalLM.from_pretrained(double)
