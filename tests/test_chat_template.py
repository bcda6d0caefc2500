"""Chat templates: one template drives SFT masking, preference pairs and prompt-only rollouts, and
renders exactly as transformers' ``apply_chat_template``."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hf_helpers import CHATML_TEMPLATE, ZEPHYR_TEMPLATE, save_hf_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.data import (
    IGNORE_INDEX,
    DatasetError,
    PreferenceDataset,
    PromptOnlyDataset,
    RawDataset,
    SafetyPreferenceDataset,
    SupervisedDataset,
    format_prompt,
    load_chat_template,
    load_tokenizer,
)
from alignment.data.chat_template import (
    BeaverTemplate,
    JinjaTemplate,
    check_chat_template_argument,
    conversation_labels,
    encode_conversation,
    encode_prompt,
)
from alignment.utils.config import ConfigError, Problems

SAMPLES = [
    {"input": "What is 12 + 7?", "answer": "19", "other_answer": "20", "better": True},
    {"input": "Name a fruit.", "answer": "An apple.", "other_answer": "A rock!", "better": False},
    {"input": ["Hi there", "Hello! How can I help?", "Add 3 and 4"], "answer": "7", "other_answer": "8", "better": True},
]


class ChatTemplateTestDataset(RawDataset):
    NAME = "chat-template-test"

    def __init__(self, path=None):
        self.data = [dict(s, safer=s["better"], is_safe=s["better"], is_other_safe=not s["better"]) for s in SAMPLES]

    def __getitem__(self, index):
        return self.data[index]

    def __len__(self):
        return len(self.data)


@pytest.fixture(scope="module")
def template_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    paths = {}
    for name, source in (("zephyr", ZEPHYR_TEMPLATE), ("chatml", CHATML_TEMPLATE)):
        paths[name] = str(root / f"{name}.jinja")
        with open(paths[name], "w") as file:
            file.write(source)
    return paths


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_assets, tmp_path_factory):
    """transformers' (slow, SentencePiece) tokenizer for the same tiny vocabulary."""
    from transformers import AutoTokenizer

    directory = str(tmp_path_factory.mktemp("hf_tokenizer"))
    save_hf_tokenizer(directory, tiny_assets["tokenizer"])
    return AutoTokenizer.from_pretrained(directory, use_fast=False)


def _templates(template_files):
    return [("beaver", None), (template_files["zephyr"], None), (template_files["zephyr"], "Be brief."), (template_files["chatml"], "sys")]


def test_beaver_keeps_the_seed_format_token_for_token(tokenizer):
    """The default is today's format: prompt ids = tokenize(format_prompt); answer = + EOS id."""
    template = load_chat_template("beaver", tokenizer)
    for sample in SAMPLES:
        prompt = format_prompt(sample["input"], eos_token=tokenizer.eos_token)
        if isinstance(sample["input"], str):
            assert encode_prompt(template, tokenizer, sample["input"]).tolist() == tokenizer(prompt)["input_ids"]
            ids, start = encode_conversation(template, tokenizer, sample["input"], sample["answer"])
            assert ids.tolist() == tokenizer(prompt + sample["answer"])["input_ids"] + [tokenizer.eos_token_id]
    # a dialogue context: the earlier assistant turn ends with the EOS token itself (as in safe-rlhf's
    # transformers tokenizers), not with the characters "</s>"
    ids = encode_prompt(template, tokenizer, SAMPLES[2]["input"]).tolist()
    head = tokenizer(format_prompt(SAMPLES[2]["input"][:1], eos_token="") + SAMPLES[2]["input"][1])["input_ids"]
    assert ids[: len(head)] == head and ids[len(head)] == tokenizer.eos_token_id
    assert ids.count(tokenizer.eos_token_id) == 1


@pytest.mark.parametrize("case", range(4))
def test_masked_prompt_equals_generation_prompt_in_every_dataset(case, tokenizer, template_files):
    """SFT labels, preference pairs, safety pairs and rollout prompts share the prompt token for token."""
    chat_template, system_prompt = _templates(template_files)[case]
    options = dict(max_length=256, chat_template=chat_template, system_prompt=system_prompt)
    supervised = SupervisedDataset("chat-template-test", tokenizer, **options)
    preference = PreferenceDataset("chat-template-test", tokenizer, **options)
    safety = SafetyPreferenceDataset("chat-template-test", tokenizer, **options)
    prompts = PromptOnlyDataset("chat-template-test", tokenizer, **options)
    assert len(supervised) == len(preference) == len(safety) == len(prompts) == len(SAMPLES)
    eos = tokenizer.eos_token_id
    for index in range(len(SAMPLES)):
        prompt = prompts[index]["input_ids"]
        example = supervised[index]
        k = len(prompt)
        assert example["input_ids"][:k].tolist() == prompt.tolist()
        assert (example["labels"][:k] == IGNORE_INDEX).all() and (example["labels"][k:] != IGNORE_INDEX).all()
        assert example["input_ids"][-1] == eos and (example["input_ids"][k:-1] != eos).all()  # exactly one EOS
        for pair, keys in ((preference[index], ("better", "worse")), (safety[index], ("safer", "unsafer"))):
            for key in keys:
                ids = pair[f"{key}_input_ids"]
                assert ids[:k].tolist() == prompt.tolist() and ids[-1] == eos
        sample = SAMPLES[index]
        better = sample["answer"] if sample["better"] else sample["other_answer"]
        answer_text = tokenizer.decode(preference[index]["better_input_ids"][k:-1].tolist())
        assert answer_text.strip().startswith(better.strip().split()[0])


@pytest.mark.parametrize("template_name", ["zephyr", "chatml"])
@pytest.mark.parametrize("system_prompt", [None, "You are terse."])
def test_rendering_equals_transformers_apply_chat_template(template_name, system_prompt, tokenizer, hf_tokenizer, template_files):
    from alignment.data.chat_template import turns_to_messages

    source = open(template_files[template_name]).read()
    template = load_chat_template(template_files[template_name], tokenizer, system_prompt)
    for turns in (["hi"], ["hi", "hello", "what is 2 + 3?"]):
        messages = turns_to_messages(turns, system_prompt)
        expected = hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False, add_generation_prompt=True)
        assert template.prompt(turns) == expected
        expected_ids = hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=True, add_generation_prompt=True)
        assert encode_prompt(template, tokenizer, turns).tolist() == list(expected_ids)
        full = turns_to_messages(turns + ["5"], system_prompt)
        assert template.conversation(turns + ["5"]) == hf_tokenizer.apply_chat_template(full, chat_template=source, tokenize=False)


def test_answer_ends_with_exactly_one_eos(tokenizer, template_files):
    eos = tokenizer.eos_token_id
    zephyr = load_chat_template(template_files["zephyr"], tokenizer)
    ids, start = encode_conversation(zephyr, tokenizer, "hi", "yes")
    # the template writes "yes</s>\n": the answer is cut after its EOS (the newline would teach nothing)
    assert ids[-1] == eos and tokenizer.decode(ids[start:-1].tolist()).strip() == "yes"
    assert ids.tolist() == encode_prompt(zephyr, tokenizer, "hi").tolist() + tokenizer("yes", add_special_tokens=False)["input_ids"] + [eos]
    chatml = load_chat_template(template_files["chatml"], tokenizer)
    ids, start = encode_conversation(chatml, tokenizer, "hi", "yes")
    # its turns end with "[end]", not EOS: the EOS is appended after it
    assert ids[-1] == eos and tokenizer.decode(ids[start:-1].tolist()) == "yes[end]"


def test_dialogue_labels_cover_assistant_turns_only(tokenizer, template_files):
    dialogue = ["q one", "a one", "q two", "a two", "q three"]  # a trailing user turn is dropped
    for chat_template in ("beaver", template_files["zephyr"]):
        template = load_chat_template(chat_template, tokenizer)
        ids, spans = conversation_labels(template, tokenizer, dialogue)
        assert len(spans) == 2
        texts = [tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False) for start, end in spans]
        assert [t.replace(tokenizer.eos_token, "").strip() for t in texts] == ["a one", "a two"]
        assert all(ids[end - 1] == tokenizer.eos_token_id for _, end in spans)
        assert spans[0][0] == len(encode_prompt(template, tokenizer, dialogue[:1]))
        assert spans[1][0] == len(encode_prompt(template, tokenizer, dialogue[:3]))
        dataset_labels = SupervisedDataset._preprocess_dialogue.__get__(
            type("D", (), {"chat_template": template, "tokenizer": tokenizer, "max_length": 512, "truncated": 0})()
        )(dialogue)["labels"]
        learned = np.nonzero(dataset_labels != IGNORE_INDEX)[0].tolist()
        assert learned == [i for start, end in spans for i in range(start, end)]


def test_tokenizer_template_and_chat_template_jinja_file(tiny_assets, tmp_path):
    import shutil

    directory = str(tmp_path / "tok")
    shutil.copytree(tiny_assets["tokenizer"], directory)
    plain = load_tokenizer(directory)
    with pytest.raises(DatasetError, match="'tokenizer' but the tokenizer has no chat_template"):
        load_chat_template("tokenizer", plain)
    with open(os.path.join(directory, "chat_template.jinja"), "w") as file:  # transformers 5's way
        file.write(CHATML_TEMPLATE)
    tokenizer = load_tokenizer(directory)
    template = load_chat_template("tokenizer", tokenizer, system_prompt="S")
    assert isinstance(template, JinjaTemplate) and template.prompt("hi") == "[system]S[end][user]hi[end][assistant]"
    tokenizer.save_pretrained(str(tmp_path / "saved"))  # the template travels with the tokenizer
    assert load_chat_template("tokenizer", load_tokenizer(str(tmp_path / "saved"))).prompt("x") == "[user]x[end][assistant]"


def test_bad_templates_fail_clearly(tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="system_prompt: the beaver template has no system turn"):
        load_chat_template("beaver", tokenizer, system_prompt="hi")
    broken = tmp_path / "broken.jinja"
    broken.write_text("line one\n{% for m in messages %}{{ m['content'] }\n")
    with pytest.raises(DatasetError, match=r"broken.jinja: jinja syntax error at line 2"):
        load_chat_template(str(broken), tokenizer)
    unknown_role = tmp_path / "roles.jinja"
    unknown_role.write_text("{% for m in messages %}{{ raise_exception('no ' + m['role']) }}{% endfor %}")
    with pytest.raises(DatasetError, match="rendering failed: no user"):
        load_chat_template(str(unknown_role), tokenizer).prompt("x")
    # a template that renders the last user turn differently once an answer follows
    unstable = tmp_path / "unstable.jinja"
    unstable.write_text("{% for m in messages %}{{ m['role'] }}{% if loop.last %}!{% endif %}:{{ m['content'] }};{% endfor %}")
    with pytest.raises(DatasetError, match="does not start with the generation prompt"):
        encode_conversation(load_chat_template(str(unstable), tokenizer), tokenizer, "x", "y")
    with pytest.raises(DatasetError, match="neither a template name"):
        load_chat_template("chatml", tokenizer)
    assert isinstance(load_chat_template(None, tokenizer), BeaverTemplate)


def test_arguments_are_checked_before_anything_loads(tmp_path):
    problems = Problems()
    check_chat_template_argument(problems, "no-such-template", None)
    check_chat_template_argument(problems, "beaver", "a system prompt")
    assert problems.items == [
        "chat_template: 'no-such-template' is neither one of ['beaver', 'tokenizer'] nor an existing jinja file",
        "system_prompt: the beaver template has no system turn; use chat_template 'tokenizer' or a jinja file",
    ]
    from alignment.sft.run_sft import main

    with pytest.raises(ConfigError, match="chat_template: 'nope.jinja' is neither"):
        main(["--model_name_or_path", str(tmp_path), "--train_datasets", "chat-template-test", "--do_train", "true",
              "--output_dir", str(tmp_path / "out"), "--chat_template", "nope.jinja"])  # fmt: skip


TURN = st.text(alphabet="abcXYZ 019+?!.:\n", min_size=1, max_size=12).filter(lambda t: t.strip())


def test_answer_start_is_the_prompt_for_any_text(tokenizer, template_files):
    """Property: for any turns and answer, the conversation's ids start with the generation prompt's
    (up to a token merged across the boundary) and carry exactly one EOS, at the end of the answer."""
    templates = [load_chat_template(name, tokenizer) for name in ("beaver", template_files["zephyr"], template_files["chatml"])]

    @settings(max_examples=40, deadline=None)
    @given(st.lists(TURN, min_size=1, max_size=3).filter(lambda t: len(t) % 2 == 1), TURN, st.integers(0, 2))
    def check(context, answer, which):
        template = templates[which]
        prompt = encode_prompt(template, tokenizer, context)
        ids, start = encode_conversation(template, tokenizer, context, answer)
        assert ids[:start].tolist() == prompt[:start].tolist()
        assert len(prompt) - 1 <= start <= len(prompt)
        if which:  # jinja templates: the answer follows a newline or a marker, nothing merges
            assert start == len(prompt)
        assert ids[-1] == tokenizer.eos_token_id and (ids[start:-1] != tokenizer.eos_token_id).all()

    check()


def test_every_stage_hands_its_template_to_its_datasets(tokenizer, template_files):
    """SFT, RM and PPO (rollout prompts, evaluation prompts, ptx data) all build with chat_template/system_prompt."""
    from types import SimpleNamespace

    from alignment.ppo.run_ppo import DataArgument as PPODataArgument
    from alignment.ppo.run_ppo import load_datasets
    from alignment.rm.run_reward import build_datasets as build_rm_datasets
    from alignment.sft.run_sft import build_datasets as build_sft_datasets

    zephyr = template_files["zephyr"]
    expected = encode_prompt(load_chat_template(zephyr, tokenizer, "S"), tokenizer, SAMPLES[0]["input"]).tolist()
    common = dict(train_datasets="chat-template-test", max_length=256, chat_template=zephyr, system_prompt="S")
    ppo = load_datasets(
        PPODataArgument(eval_datasets="chat-template-test", ptx_datasets="chat-template-test", **common),
        SimpleNamespace(seed=1, max_new_tokens=8),
        tokenizer,
    )
    assert ppo["train"][0]["input_ids"].tolist() == expected and ppo["eval"][0]["input_ids"].tolist() == expected
    assert ppo["ptx"][0]["input_ids"][: len(expected)].tolist() == expected
    sft_train, _ = build_sft_datasets(PPODataArgument(**common), tokenizer, seed=1, need_train=True, need_eval=False)
    rm_train, _ = build_rm_datasets(PPODataArgument(**common), tokenizer, seed=1, need_train=True, need_eval=False)
    assert sft_train[0]["input_ids"][: len(expected)].tolist() == expected
    assert rm_train[0]["better_input_ids"][: len(expected)].tolist() == expected
    assert expected != encode_prompt(load_chat_template("beaver", tokenizer), tokenizer, SAMPLES[0]["input"]).tolist()
