"""Bad input, round two (issue 14): every problem reported together and before any weights load, data
errors that name file/line/field, plain causal LMs refused as reward models, a clean command line
(message alone, exit code 2), SIGINT like SIGTERM. Listed in docs/reliability.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from alignment.data import DatasetError, PreferenceDataset, PromptOnlyDataset
from alignment.utils.checkpoint import verify_checkpoint
from alignment.utils.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data")
SCRIPTS = {
    "sft": os.path.join(REPO, "alignment", "sft", "run_sft.py"),
    "rm": os.path.join(REPO, "alignment", "rm", "run_reward.py"),
    "ppo": os.path.join(REPO, "alignment", "ppo", "run_ppo.py"),
}


def stage_config(stage: str, tmp_path, tiny_assets, score_model: str | None = None, **overrides) -> str:
    """A small valid JSON config of ``stage`` (sft, rm, ppo) written under ``tmp_path``."""
    common = {"output_dir": str(tmp_path / f"{stage}_out"), "do_train": True, "report_to": "none",
              "disable_tqdm": True, "logging_steps": 1, "max_length": 64, "per_device_train_batch_size": 4}  # fmt: skip
    if stage == "sft":
        config = {"model_name_or_path": tiny_assets["llama"], "train_datasets": f"alpaca:1:{DATA}/alpaca/train.jsonl"}
    elif stage == "rm":
        config = {"model_name_or_path": tiny_assets["llama"],
                  "train_datasets": f"PKU-SafeRLHF/train:1:{DATA}/safe_rlhf/train.jsonl"}  # fmt: skip
    else:
        config = {"actor_model_name_or_path": tiny_assets["llama"], "reward_model_name_or_path": score_model,
                  "train_datasets": f"PKU-SafeRLHF/train:1:{DATA}/safe_rlhf/train.jsonl", "max_new_tokens": 8,
                  "per_device_prompt_batch_size": 4, "per_device_train_batch_size": 2}  # fmt: skip
    config = {**common, **config, **overrides}
    path = tmp_path / f"{stage}.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture()
def no_weights(monkeypatch):
    """Make every stage's weight loading fail loudly: a test using it proves a refusal came first."""
    from alignment.ppo import run_ppo
    from alignment.rm import run_reward
    from alignment.sft import run_sft

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was refused")

    monkeypatch.setattr(run_sft, "load_model", refuse)
    monkeypatch.setattr(run_reward, "load_model", refuse)
    monkeypatch.setattr(run_ppo, "load_models", refuse)


def stage_main(stage: str):
    from alignment.ppo import run_ppo
    from alignment.rm import run_reward
    from alignment.sft import run_sft

    return {"sft": run_sft.main, "rm": run_reward.main, "ppo": run_ppo.main}[stage]


# ------------------------------------------------------------------------ all problems together


def test_docs_three_problem_example_reports_all_three(tmp_path, tiny_assets, tiny_score_model, no_weights):
    """docs/ppo.md: an unknown key no longer hides the range and batch problems."""
    path = stage_config("ppo", tmp_path, tiny_assets, tiny_score_model, top_p=1.5, per_device_prompt_batch_size=16,
                        per_device_train_batch_size=3, max_step=10)  # fmt: skip
    with pytest.raises(ConfigError) as info:
        stage_main("ppo")([path])
    message = str(info.value)
    assert message.startswith(f"3 problem(s) in {path}:"), message
    assert "max_step: unknown argument; did you mean 'max_steps'?" in message
    assert "top_p: must be in (0, 1], got 1.5" in message
    assert "per_device_train_batch_size: must divide per_device_prompt_batch_size x num_return_sequences = 16" in message


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_unknown_key_bad_type_and_bad_values_are_reported_together(stage, tmp_path, tiny_assets, no_weights):
    path = stage_config(stage, tmp_path, tiny_assets, learnin_rate=0.1, max_steps="ten", learning_rate=-1,
                        per_device_train_batch_size=-1, train_datasets="")  # fmt: skip
    with pytest.raises(ConfigError) as info:
        stage_main(stage)([path])
    message = str(info.value)
    for expected in ["learnin_rate: unknown argument; did you mean 'learning_rate'?",
                     "max_steps: expected an integer, got 'ten'", "learning_rate: must be >= 0, got -1.0",
                     "per_device_train_batch_size: must be a positive integer, got -1",
                     "train_datasets: required with do_train"]:  # fmt: skip
        assert expected in message, message
    assert message.startswith("5 problem(s)"), message


# ------------------------------------------------------------------------ refused before loading


@pytest.mark.parametrize(
    "stage, overrides, expected",
    [
        ("sft", {"per_device_train_batch_size": 0}, "per_device_train_batch_size: must be a positive integer, got 0"),
        ("rm", {"per_device_train_batch_size": -1}, "per_device_train_batch_size: must be a positive integer, got -1"),
        ("sft", {"learning_rate": -0.001}, "learning_rate: must be >= 0, got -0.001"),
        ("rm", {"learning_rate": -0.001}, "learning_rate: must be >= 0, got -0.001"),
        ("ppo", {"learning_rate": -0.001}, "learning_rate: must be >= 0, got -0.001"),
        ("ppo", {"critic_learning_rate": -1}, "critic_learning_rate: must be >= 0, got -1.0"),
    ],
)
def test_bad_batch_size_and_learning_rate_are_refused_before_any_weights_load(
    stage, overrides, expected, tmp_path, tiny_assets, tiny_score_model, no_weights
):
    path = stage_config(stage, tmp_path, tiny_assets, tiny_score_model, **overrides)
    with pytest.raises(ConfigError, match="1 problem") as info:
        stage_main(stage)([path])
    assert expected in str(info.value)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_output_dir_with_checkpoints_is_refused_before_any_weights_load(stage, tmp_path, tiny_assets, no_weights):
    path = stage_config(stage, tmp_path, tiny_assets)
    os.makedirs(tmp_path / f"{stage}_out" / "checkpoint-3")
    with pytest.raises(ConfigError, match=r"output_dir: .* already holds checkpoint-3; pass --resume_from_checkpoint auto"):
        stage_main(stage)([path])


def test_fewer_prompts_than_one_global_batch_is_refused_before_any_model_loads(
    tmp_path, tiny_assets, tiny_score_model, no_weights
):
    rows = [{"prompt": f"Tell me about topic {i}.", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
             "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 0} for i in range(3)]  # fmt: skip
    (tmp_path / "three.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = stage_config("ppo", tmp_path, tiny_assets, tiny_score_model,
                        train_datasets=f"PKU-SafeRLHF/train:1:{tmp_path / 'three.jsonl'}")  # fmt: skip
    with pytest.raises(ConfigError, match=r"train_datasets: 3 prompt\(s\) after filtering, fewer than one global prompt "
                                          r"batch of 4 \(per_device_prompt_batch_size 4 x 1 data-parallel"):  # fmt: skip
        stage_main("ppo")([path])


def test_plain_causal_lm_is_refused_as_reward_model_or_critic(tmp_path, tiny_assets, tiny_score_model, no_weights):
    from alignment.ppo.run_ppo import ModelArgument, score_head_problems

    lm, score = tiny_assets["llama"], tiny_score_model
    path = stage_config("ppo", tmp_path, tiny_assets, lm)
    with pytest.raises(ConfigError) as info:
        stage_main("ppo")([path])
    assert "reward_model_name_or_path: " in str(info.value)
    assert "is a plain causal LM without a trained score head (no score_head.* weights)" in str(info.value)

    assert score_head_problems(ModelArgument(actor_model_name_or_path=lm, reward_model_name_or_path=score)) == []
    critic_lm = ModelArgument(actor_model_name_or_path=lm, reward_model_name_or_path=score, reward_critic_model_name_or_path=lm)
    (problem,) = score_head_problems(critic_lm)
    assert problem.startswith("reward_critic_model_name_or_path: ") and "critic_fresh_score_head: true" in problem
    critic_lm.critic_fresh_score_head = True  # a fresh critic head, on purpose
    assert score_head_problems(critic_lm) == []


def test_malformed_json_argument_file_names_line_and_column(tmp_path):
    from alignment.data import DataArgument
    from alignment.sft.run_sft import ModelArgument, SFTTrainingArguments
    from alignment.utils.config import parse_arguments

    path = tmp_path / "broken.json"
    path.write_text('{\n  "max_steps": 3,\n  learning_rate: 0.1\n}\n')
    with pytest.raises(ConfigError) as info:
        parse_arguments((ModelArgument, DataArgument, SFTTrainingArguments), [str(path)])
    assert str(info.value) == (
        f"1 problem(s) in {path}:\n  - malformed JSON at line 3, column 3: Expecting property name enclosed in "
        "double quotes\n      learning_rate: 0.1"
    )


def test_model_too_small_for_tokenizer_or_lengths_is_refused_from_its_config(tmp_path, tiny_assets, tiny_score_model):
    from alignment.data import load_tokenizer
    from alignment.ppo.run_ppo import DataArgument, ModelArgument, TrainingArguments, check_model_compatibility
    from alignment.ppo.trainer_utils import derive_args
    from alignment.utils.config import parse_arguments

    path = stage_config("ppo", tmp_path, tiny_assets, tiny_score_model, max_length=500, max_new_tokens=100)
    model_args, data_args, args = parse_arguments((ModelArgument, DataArgument, TrainingArguments), [path])
    tokenizer = load_tokenizer(tiny_assets["tokenizer"])

    class Larger:  # a tokenizer with more tokens than the model's 1000-token vocabulary
        def __len__(self):
            return 1001

    with pytest.raises(ConfigError) as info:
        check_model_compatibility(model_args, data_args, args, Larger(), path)
    assert "actor_model_name_or_path: tokenizer has 1001 tokens but the model's vocab_size is 1000" in str(info.value)
    assert ("max_new_tokens: max_length (500) + max_new_tokens (100) = 600 exceeds the actor's "
            "max_position_embeddings 512") in str(info.value)  # fmt: skip
    check_model_compatibility(model_args, data_args, derive_args(args, max_new_tokens=12), tokenizer, path)


def test_critic_with_another_tokenizer_is_refused_before_any_model_loads(tmp_path, tiny_assets, tiny_score_model, no_weights):
    import shutil

    from alignment.utils.tiny_assets import build_tokenizer, training_corpus

    critic = tmp_path / "critic"
    shutil.copytree(tiny_score_model, critic)
    for name in os.listdir(tiny_assets["tokenizer"]):
        os.remove(critic / name)
    other = build_tokenizer(str(tmp_path / "other"), training_corpus(), vocab_size=600)
    for name in os.listdir(other):
        shutil.copy(os.path.join(other, name), critic)
    path = stage_config("ppo", tmp_path, tiny_assets, tiny_score_model, reward_critic_model_name_or_path=str(critic))
    with pytest.raises(ConfigError, match=r"reward_critic_model_name_or_path: the critic's tokenizer \(.*critic\) must "
                                          r"equal the actor's"):  # fmt: skip
        stage_main("ppo")([path])


# ------------------------------------------------------------------------ data errors


def test_non_utf8_byte_names_file_line_and_column(tmp_path, tokenizer):
    good = json.dumps({"prompt": "hi", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
                       "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 0})  # fmt: skip
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good.encode() + b"\n" + good.replace('"hi"', '"caf\xe9"').encode("latin-1") + b"\n")
    with pytest.raises(DatasetError) as info:
        PreferenceDataset(f"PKU-SafeRLHF/train:1:{path}", tokenizer, max_length=32)
    message = str(info.value)
    assert f"{path} line 2, column 16: byte 0xe9 is not UTF-8 text" in message, message
    assert "dataset 'PKU-SafeRLHF/train'" in message


def test_non_string_prompt_names_file_record_and_field(tmp_path, tokenizer):
    rows = [{"prompt": "Tell me about tea.", "response_0": "a", "response_1": "b"},
            {"prompt": 42, "response_0": "a", "response_1": "b"}]  # fmt: skip
    for row in rows:
        row.update(is_response_0_safe=True, is_response_1_safe=True, better_response_id=0, safer_response_id=0)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n" + "".join(json.dumps(row) + "\n" for row in rows))  # a blank first line: line != record
    with pytest.raises(DatasetError) as info:
        PromptOnlyDataset(f"PKU-SafeRLHF/train:1:{path}", tokenizer, max_length=32)
    assert str(info.value) == (
        f"dataset 'PKU-SafeRLHF/train' record 1 ({path} line 3): field 'input' must be a string or a list of "
        "strings, got int 42"
    )


# ------------------------------------------------------------------------ the command line


def run_script(stage: str, args: list[str], **env) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "ALIGNMENT_DEBUG"}
    environment.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, **env)
    return subprocess.run([sys.executable, SCRIPTS[stage], *args], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_user_error_prints_the_message_alone_with_exit_code_2(stage, tmp_path, tiny_assets, tiny_score_model):
    path = stage_config(stage, tmp_path, tiny_assets, tiny_score_model, learning_rate=-1, max_stepz=3)
    result = run_script(stage, [path])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"{os.path.basename(SCRIPTS[stage])}: error: 2 problem(s) in {path}:" in result.stderr
    assert "learning_rate: must be >= 0" in result.stderr and "max_stepz: unknown argument" in result.stderr
    assert "ALIGNMENT_DEBUG=1" in result.stderr


def test_debug_flag_or_variable_shows_the_traceback(tmp_path, tiny_assets, monkeypatch, capsys):
    from alignment.sft import run_sft
    from alignment.utils.config import run_entry_point

    monkeypatch.delenv("ALIGNMENT_DEBUG", raising=False)
    path = stage_config("sft", tmp_path, tiny_assets, learning_rate=-1)
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(run_sft.main, [path])
    assert exit_info.value.code == 2 and "run_sft" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="learning_rate: must be >= 0"):  # re-raised: the traceback is shown
        run_entry_point(run_sft.main, [path, "--debug"])
    monkeypatch.setenv("ALIGNMENT_DEBUG", "1")
    with pytest.raises(ConfigError, match="learning_rate: must be >= 0"):
        run_entry_point(run_sft.main, [path])


def test_data_errors_exit_2_reported_failures_exit_1_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from alignment.ppo.rl_trainer import NonFiniteError
    from alignment.utils.checkpoint import CheckpointError
    from alignment.utils.config import run_entry_point
    from alignment.utils.trainer import NonFiniteParameterError

    monkeypatch.delenv("ALIGNMENT_DEBUG", raising=False)
    for error, code in [(DatasetError("bad.jsonl line 2: invalid JSON"), 2),
                        (CheckpointError("checkpoint 'x' is missing y"), 1),
                        (NonFiniteParameterError("non-finite gradients"), 1), (NonFiniteError("non-finite rollout"), 1)]:  # fmt: skip
        def fail(argv, error=error):
            raise error

        with pytest.raises(SystemExit) as exit_info:
            run_entry_point(fail, [])
        assert exit_info.value.code == code
        stderr = capsys.readouterr().err
        assert f"error: {error}\n" in stderr and "Traceback" not in stderr

    def crash(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # a bug is not a user error: its traceback stays
        run_entry_point(crash, [])


@pytest.mark.slow
def test_sigint_stops_like_sigterm_with_checkpoints_intact(tmp_path, tiny_assets):
    output = tmp_path / "rm_out"
    path = stage_config("rm", tmp_path, tiny_assets, max_steps=400, save_strategy="steps", save_steps=2)
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    process = subprocess.Popen([sys.executable, SCRIPTS["rm"], path], cwd=REPO, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (output / "checkpoint-2" / "manifest.json").exists():
            assert process.poll() is None and time.time() < deadline, "training did not reach checkpoint-2"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "[reward model] rank 0: received SIGINT (Ctrl-C): stopped by the user. Exiting." in stderr
    assert f"Complete checkpoints in {output} are intact" in stderr
    assert "KeyboardInterrupt" not in stderr and "Traceback" not in stderr
    for name in os.listdir(output):
        if name.startswith("checkpoint-"):
            verify_checkpoint(str(output / name))
