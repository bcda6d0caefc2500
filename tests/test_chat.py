"""The chat CLI (python -m alignment.chat): batch mode with JSONL out, interactive mode through stdin."""

from __future__ import annotations

import io
import json
import os
import subprocess

import numpy as np
import pytest
from hf_helpers import ZEPHYR_TEMPLATE, build_hf_llama

from alignment.chat import main
from alignment.models.hf_convert import CACHE_ENV, resolve_pretrained_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "hf_cache"))


def expected_answers(model_dir, conversations, chat_template="beaver", system_prompt=None, max_new_tokens=6, scorers=()):
    """Greedy answers computed independently: paddlenlp ``generate`` (the plain backend) on the template's
    prompt ids, one conversation at a time, and each scorer's end score of prompt + answer."""
    import paddle
    from paddlenlp.transformers import AutoModelForCausalLM

    from alignment.data import load_chat_template, load_tokenizer
    from alignment.data.chat_template import encode_prompt
    from alignment.models import AutoModelForScore
    from alignment.ppo.infer_utils import generate_rollout

    tokenizer = load_tokenizer(model_dir, padding_side="left")
    template = load_chat_template(chat_template, tokenizer, system_prompt)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    results = []
    for turns in conversations:
        ids = encode_prompt(template, tokenizer, turns)[None, :]
        with paddle.no_grad():
            out = generate_rollout(
                model, paddle.to_tensor(ids), paddle.ones(ids.shape, dtype="bool"), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, backend="plain",
            )[0].numpy()  # fmt: skip
        response = out[ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in response:
            response = response[: response.index(tokenizer.eos_token_id) + 1]
        row = {"response": tokenizer.decode(response, skip_special_tokens=True).strip(), "num_tokens": len(response)}
        full = np.concatenate([ids[0], np.asarray(response, dtype=np.int64)])[None, :]
        for kind, path in scorers:
            scorer = AutoModelForScore.from_pretrained(path, score_type=kind)
            scorer.eval()
            with paddle.no_grad():
                row[kind] = float(scorer(paddle.to_tensor(full), return_dict=True).end_scores.numpy()[0, 0])
        results.append(row)
    return results


def test_batch_mode_on_a_hub_model_with_its_template_scores_and_jsonl(tiny_assets, tiny_score_model, tmp_path):
    hub = str(tmp_path / "hub")
    build_hf_llama(hub, tiny_assets["tokenizer"], seed=5, chat_template=ZEPHYR_TEMPLATE)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "Name a fruit."}) + "\n\n" + json.dumps({"input": "Add 3 and 4"}) + "\n")
    output = str(tmp_path / "answers.jsonl")
    stdout = io.StringIO()
    rows = main(
        ["--model_name_or_path", hub, "--chat_template", "tokenizer", "--system_prompt", "Be brief.",
         "--prompt", "What is 12 + 7?", "--file", str(prompts_file), "--output", output, "--max_new_tokens", "6",
         "--batch_size", "2", "--reward_model", tiny_score_model, "--cost_model", tiny_score_model],
        stdout=stdout,
    )  # fmt: skip
    prompts = ["What is 12 + 7?", "Name a fruit.", "Add 3 and 4"]
    written = [json.loads(line) for line in open(output)]
    assert written == rows and [row["prompt"] for row in rows] == prompts
    expected = expected_answers(
        resolve_pretrained_dir(hub), [[p] for p in prompts], chat_template="tokenizer", system_prompt="Be brief.",
        scorers=[("reward", tiny_score_model), ("cost", tiny_score_model)],
    )  # fmt: skip
    for row, want in zip(rows, expected):
        assert row["response"] == want["response"] and row["num_tokens"] == want["num_tokens"]
        assert row["reward"] == pytest.approx(want["reward"], abs=1e-4) and row["cost"] == pytest.approx(want["cost"], abs=1e-4)
    shown = stdout.getvalue().splitlines()
    assert shown[0] == "USER> What is 12 + 7?" and shown[1].startswith("ASSISTANT> ")
    assert f"reward={rows[0]['reward']:+.4f} cost={rows[0]['cost']:+.4f}" in shown[1]


def test_interactive_mode_through_stdin_keeps_the_conversation(tiny_assets, tmp_path, python):
    log = str(tmp_path / "chat.jsonl")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    result = subprocess.run(
        [python, "-m", "alignment.chat", "--model_name_or_path", tiny_assets["llama"], "--max_new_tokens", "6", "--output", log],
        input="What is 12 + 7?\nAnd 3 + 4?\n/reset\n\nName a fruit.\n/exit\nnot read\n",
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [line for line in result.stdout.split("USER> ") if line.startswith("ASSISTANT> ")]
    assert len(answers) == 3 and "(conversation cleared)" in result.stdout
    rows = [json.loads(line) for line in open(log)]
    first = rows[0]["response"]
    assert [row["context"] for row in rows] == [["What is 12 + 7?"], ["What is 12 + 7?", first, "And 3 + 4?"], ["Name a fruit."]]
    expected = expected_answers(tiny_assets["llama"], [row["context"] for row in rows])
    assert [row["response"] for row in rows] == [row["response"] for row in expected]
    assert [a.split("ASSISTANT> ", 1)[1].rstrip("\n") for a in answers] == [row["response"] for row in rows]


def test_bad_arguments_are_one_message_before_any_weights_load(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", str(tmp_path / "missing"), "--top_p", "1.5", "--temperature", "-1",
              "--file", str(tmp_path / "none.jsonl"), "--chat_template", "beaver", "--system_prompt", "x"])  # fmt: skip
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    for part in ("model_name_or_path: no such directory", "file: no such file", "temperature: must be >= 0",
                 "top_p: must be in (0, 1], got 1.5", "system_prompt: the beaver template has no system turn"):  # fmt: skip
        assert part in message
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 3}\n')
    with pytest.raises(SystemExit):
        main(["--model_name_or_path", str(tmp_path), "--file", str(bad)])
    assert f"{bad}:2: expected an object with a string 'prompt' or 'input'" in capsys.readouterr().err


def test_sampling_flags_reach_the_rollout_and_seed_reproduces(tiny_assets, tmp_path, monkeypatch):
    import alignment.ppo.infer_utils as infer_utils

    calls = []
    real = infer_utils.generate_rollout

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(infer_utils, "generate_rollout", recording)
    argv = ["--model_name_or_path", tiny_assets["llama"], "--prompt", "Name a fruit.", "--max_new_tokens", "5",
            "--temperature", "0.7", "--top_p", "0.9", "--top_k", "20", "--repetition_penalty", "1.3", "--backend", "plain",
            "--seed", "7"]  # fmt: skip
    first = main(argv, stdout=io.StringIO())
    assert calls[0] == dict(
        max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.3, backend="plain",
        eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    assert main(argv, stdout=io.StringIO()) == first  # the seed makes sampling reproducible


def test_long_conversations_drop_the_oldest_exchanges(tiny_assets):
    from alignment.chat import _parser, load_session, run_interactive
    from alignment.data.chat_template import encode_prompt

    args = _parser().parse_args(["--model_name_or_path", tiny_assets["llama"], "--max_new_tokens", "4"])
    session = load_session(args)
    first_prompt = len(encode_prompt(session.template, session.tokenizer, ["What is 12 + 7?"]))
    session.max_positions = first_prompt + 4 + 6  # room for one short turn, not for two
    rows = run_interactive(session, io.StringIO("What is 12 + 7?\nAnd 3 + 4?\n"), io.StringIO())
    assert rows[0]["context"] == ["What is 12 + 7?"] and rows[1]["context"] == ["And 3 + 4?"]
    session.max_positions = None  # no limit: the second turn keeps the first exchange
    rows = run_interactive(session, io.StringIO("What is 12 + 7?\nAnd 3 + 4?\n"), io.StringIO())
    assert rows[1]["context"] == ["What is 12 + 7?", rows[0]["response"], "And 3 + 4?"]
