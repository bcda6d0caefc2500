"""alignment.data: registry, dataset specs, mixing arithmetic, local loading, tokenized datasets."""

from __future__ import annotations

import json
import os
import textwrap
from fractions import Fraction

import numpy as np
import pytest

from alignment.data import (
    IGNORE_INDEX,
    DatasetError,
    PreferenceDataset,
    PromptOnlyDataset,
    RawDataset,
    RawSample,
    SafetyPreferenceDataset,
    SupervisedDataset,
    format_prompt,
    import_custom_dataset_modules,
    parse_dataset,
    parse_datasets,
)
from alignment.data.base import mix_indices

SAFE_RLHF_ROW = {
    "prompt": "Give me a tip about tea.",
    "response_0": "Sure! Tea is a wonderful topic.",
    "response_1": "No. Tea is boring.",
    "is_response_0_safe": True,
    "is_response_1_safe": False,
    "better_response_id": 0,
    "safer_response_id": 1,
}
ALPACA_ROWS = [
    {"instruction": "Give me a tip about tea.", "input": "", "output": "Sure! Tea is a wonderful topic."},
    {"instruction": "Tell me something about", "input": "rice.", "output": "I really like rice."},
]


def write_jsonl(path, rows) -> str:
    path = str(path)
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    return path


class ListDataset(RawDataset):
    """A registered in-memory dataset of ``size`` prompts for the mixing tests."""

    NAME = "test-list"
    ALIASES = ("test-list-alias",)

    def __init__(self, size: int = 10, path: str | None = None) -> None:
        self.size = size

    def __getitem__(self, index: int) -> RawSample:
        return RawSample(input=f"prompt {index}", answer=f"answer {index}", other_answer="x", better=True)

    def __len__(self) -> int:
        return self.size


# ----------------------------------------------------------------------------------------- registry
def test_builtin_names_and_aliases_are_registered():
    names = RawDataset.names()
    for name in ["PKU-SafeRLHF/train", "PKU-SafeRLHF/test", "PKU-SafeRLHF-30K/train", "PKU-SafeRLHF-30K/test",
                 "PKU-SafeRLHF-10K/train", "alpaca"]:  # fmt: skip
        assert name in names
    assert RawDataset.resolve("stanford-alpaca").NAME == "alpaca"
    assert RawDataset.resolve("PKU-Alignment/PKU-SafeRLHF/train").NAME == "PKU-SafeRLHF/train"


def test_unknown_name_lists_known_names():
    with pytest.raises(DatasetError) as info:
        RawDataset.load("no-such-dataset")
    message = str(info.value)
    assert "no-such-dataset" in message and "PKU-SafeRLHF/train" in message and "alpaca" in message


def test_duplicate_name_and_alias_are_rejected():
    with pytest.raises(DatasetError, match="already registered"):

        class Clash(RawDataset):  # noqa: F841 - registration is the side effect under test
            NAME = "alpaca"

            def __getitem__(self, index):
                return {}

            def __len__(self):
                return 0

    with pytest.raises(DatasetError, match="already registered"):

        class AliasClash(RawDataset):  # noqa: F841
            NAME = "fresh-name-for-alias-clash"
            ALIASES = ("stanford-alpaca",)

            def __getitem__(self, index):
                return {}

            def __len__(self):
                return 0


# ------------------------------------------------------------------------------------- spec parsing
@pytest.mark.parametrize(
    "spec, name, expected",
    [
        ("alpaca", "alpaca", {"proportion": 1.0}),
        ("alpaca:", "alpaca", {"proportion": 1.0}),
        ("alpaca:0.75", "alpaca", {"proportion": 0.75}),
        ("alpaca:1/4", "alpaca", {"proportion": 0.25}),
        ("alpaca:1000/-1", "alpaca", {"proportion": Fraction(-1000)}),
        ("alpaca:0/-1", "alpaca", {"proportion": 0.0}),
        ("alpaca:2:/tmp/a.jsonl", "alpaca", {"proportion": 2.0, "path": "/tmp/a.jsonl"}),
        ("alpaca::~/a.jsonl", "alpaca", {"proportion": 1.0, "path": os.path.expanduser("~/a.jsonl")}),
    ],
)
def test_parse_dataset(spec, name, expected):
    assert parse_dataset(spec) == (name, expected)


@pytest.mark.parametrize("spec", ["alpaca:abc", "alpaca:-0.5", "alpaca:1/0", "alpaca:-3/-1", ":0.5", ""])
def test_parse_dataset_rejects_bad_specs(spec):
    with pytest.raises(DatasetError):
        parse_dataset(spec)


def test_parse_datasets_forms_agree():
    from_string = parse_datasets("alpaca:0.5,PKU-SafeRLHF/train:3/-1:/data/x.jsonl")
    from_dict = parse_datasets({"alpaca": 0.5, "PKU-SafeRLHF/train": {"proportion": "3/-1", "path": "/data/x.jsonl"}})
    from_pairs = parse_datasets([("alpaca", 0.5), "PKU-SafeRLHF/train:3/-1:/data/x.jsonl"])
    assert from_string == from_dict == from_pairs
    assert parse_datasets({"alpaca": 2}) == [("alpaca", {"proportion": 2.0})]  # ints work (upstream: TypeError)


def test_parse_datasets_rejects_the_same_dataset_twice_even_via_alias():
    with pytest.raises(DatasetError, match="appears twice"):
        parse_datasets("alpaca:0.5,stanford-alpaca:0.5")


# ---------------------------------------------------------------------------------- mixing arithmetic
@pytest.mark.parametrize(
    "proportion, expected_count",
    [(0.5, 5), (1.0, 10), (2.5, 25), (0.04, 0), (0.06, 1), (Fraction(-3), 3), (Fraction(-23), 23), (0.0, 0)],
)
def test_mix_indices_counts(proportion, expected_count):
    indices = mix_indices(10, proportion, np.random.default_rng(0))
    assert len(indices) == expected_count


def test_mix_indices_repeats_whole_copies_then_samples_without_replacement():
    indices = mix_indices(10, 2.5, np.random.default_rng(0))
    assert indices[:20].tolist() == list(range(10)) * 2  # two whole in-order copies
    remainder = indices[20:]
    assert len(set(remainder.tolist())) == 5 and set(remainder.tolist()) <= set(range(10))


def test_mix_uses_seed_sequence_children_and_is_reproducible(tokenizer):
    spec = {"test-list": 0.5, "alpaca": {"proportion": 0.0}}
    first = PromptOnlyDataset({"test-list": 0.5}, tokenizer, seed=7)
    second = PromptOnlyDataset({"test-list": 0.5}, tokenizer, seed=7)
    other = PromptOnlyDataset({"test-list": 0.5}, tokenizer, seed=8)
    assert first.index == second.index
    assert first.index != other.index
    # Same draw as numpy's documented recipe: child 0 of SeedSequence(7), choice without replacement.
    child = np.random.SeedSequence(7).spawn(1)[0]
    expected = sorted(np.random.default_rng(child).choice(10, size=5, replace=False).tolist())
    assert sorted(raw for _, raw in first.index) == expected
    assert len(parse_datasets(spec)) == 2


def test_zero_proportion_drops_a_dataset_and_alias_keys_work(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    mixed = SupervisedDataset(
        {"test-list-alias": "3/-1", "stanford-alpaca": {"proportion": 0, "path": path}}, tokenizer
    )
    assert len(mixed) == 3  # upstream crashed with KeyError on aliases (its bug 11)


def test_empty_mix_is_an_error(tokenizer):
    with pytest.raises(DatasetError, match="empty after mixing"):
        PromptOnlyDataset({"test-list": 0.0}, tokenizer)


# ----------------------------------------------------------------------------- built-in raw datasets
def test_safe_rlhf_local_files_in_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    flipped = dict(SAFE_RLHF_ROW, better_response_id=1, safer_response_id=0)
    rows = [SAFE_RLHF_ROW, flipped]
    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "as_list.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "rows.parquet"))
    split_dir = tmp_path / "hub_layout" / "data"
    split_dir.mkdir(parents=True)
    write_jsonl(split_dir / "test.jsonl", rows)

    for name, path in [
        ("PKU-SafeRLHF/train", jsonl),
        ("PKU-SafeRLHF-30K/train", str(tmp_path / "as_list.json")),
        ("PKU-SafeRLHF-10K/train", str(tmp_path / "rows.parquet")),
        ("PKU-SafeRLHF/test", str(tmp_path / "hub_layout")),
        ("PKU-SafeRLHF-30K/test", str(tmp_path / "hub_layout")),
    ]:
        dataset = RawDataset.load(name, path=path)
        assert len(dataset) == 2
        assert dataset[0] == RawSample(
            input="Give me a tip about tea.",
            answer="Sure! Tea is a wonderful topic.",
            other_answer="No. Tea is boring.",
            better=True,
            safer=False,
            is_safe=True,
            is_other_safe=False,
        ), name
        assert dataset[1]["better"] is False and dataset[1]["safer"] is True


def test_alpaca_joins_instruction_and_input(tmp_path):
    dataset = RawDataset.load("alpaca", path=write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS))
    assert dataset[0] == {"input": "Give me a tip about tea.", "answer": "Sure! Tea is a wonderful topic."}
    assert dataset[1] == {"input": "Tell me something about rice.", "answer": "I really like rice."}


def test_hub_loading_calls_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, split):
        calls.append((path, split))
        return datasets.Dataset.from_list([SAFE_RLHF_ROW])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = RawDataset.load("PKU-Alignment/PKU-SafeRLHF-30K/test")
    assert calls == [("PKU-Alignment/PKU-SafeRLHF-30K", "test")]
    assert dataset[0]["better"] is True


def test_hub_failure_explains_the_offline_fix(monkeypatch):
    import datasets

    def offline(path, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetError, match=r"alpaca:1:/path/to/train.jsonl"):
        RawDataset.load("alpaca")


def test_missing_column_names_file_and_line(tmp_path):
    bad = dict(SAFE_RLHF_ROW)
    del bad["better_response_id"]
    path = write_jsonl(tmp_path / "bad.jsonl", [SAFE_RLHF_ROW, bad])
    with pytest.raises(DatasetError, match=r"bad.jsonl line 2.*better_response_id"):
        RawDataset.load("PKU-SafeRLHF/train", path=path)


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(SAFE_RLHF_ROW) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"broken.jsonl line 2: invalid JSON"):
        RawDataset.load("PKU-SafeRLHF/train", path=str(path))


def test_non_boolean_flag_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "flag.jsonl", [dict(SAFE_RLHF_ROW, is_response_0_safe="yes")])
    dataset = RawDataset.load("PKU-SafeRLHF/train", path=path)
    with pytest.raises(DatasetError, match="is_response_0_safe.*boolean"):
        dataset[0]
    path = write_jsonl(tmp_path / "id.jsonl", [dict(SAFE_RLHF_ROW, better_response_id=2)])
    with pytest.raises(DatasetError, match="better_response_id.*0 or 1"):
        RawDataset.load("PKU-SafeRLHF/train", path=path)[0]


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        RawDataset.load("alpaca", path=str(tmp_path / "nowhere.jsonl"))


# ------------------------------------------------------------------------------- tokenized datasets
def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_supervised_dataset_masks_the_prompt(tokenizer, tmp_path):
    dataset = SupervisedDataset({"alpaca": {"path": write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS[:1])}}, tokenizer)
    example = dataset[0]
    prompt = "BEGINNING OF CONVERSATION: USER: Give me a tip about tea. ASSISTANT:"
    expected_ids = ids(tokenizer, prompt + "Sure! Tea is a wonderful topic.") + [tokenizer.eos_token_id]
    num_prompt = len(ids(tokenizer, prompt))
    assert example["input_ids"].tolist() == expected_ids
    assert example["labels"].tolist() == [IGNORE_INDEX] * num_prompt + expected_ids[num_prompt:]
    assert example["labels"][-1] == tokenizer.eos_token_id  # the model learns to stop


def test_supervised_dialogue_masks_user_turns(tokenizer):
    class Dialogue(RawDataset):
        NAME = "test-dialogue"

        def __getitem__(self, index):
            return RawSample(dialogue=["hi", "Sure! Tea.", "more", "I really like tea."])

        def __len__(self):
            return 1

    example = SupervisedDataset("test-dialogue", tokenizer)[0]
    eos = tokenizer.eos_token
    first = ids(tokenizer, "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:")
    second = ids(tokenizer, "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:Sure! Tea." + eos)
    third = ids(tokenizer, f"BEGINNING OF CONVERSATION: USER: hi ASSISTANT:Sure! Tea.{eos}USER: more ASSISTANT:")
    full = ids(tokenizer, f"BEGINNING OF CONVERSATION: USER: hi ASSISTANT:Sure! Tea.{eos}USER: more ASSISTANT:I really like tea.{eos}")
    labels = example["labels"].tolist()
    assert example["input_ids"].tolist() == full
    assert labels[: len(first)] == [IGNORE_INDEX] * len(first)
    assert labels[len(first) : len(second)] == full[len(first) : len(second)]
    assert labels[len(second) : len(third)] == [IGNORE_INDEX] * (len(third) - len(second))
    assert labels[len(third) :] == full[len(third) :] and labels[-1] == tokenizer.eos_token_id


def test_supervised_skips_prompts_that_fill_max_length(tokenizer, tmp_path):
    rows = [dict(ALPACA_ROWS[0], instruction="tea " * 80), ALPACA_ROWS[0]]
    dataset = SupervisedDataset({"alpaca": {"path": write_jsonl(tmp_path / "a.jsonl", rows)}}, tokenizer, max_length=32)
    assert len(dataset) == 1
    assert dataset.skipped == {"prompt fills max_length": 1}


def test_truncation_drops_eos_and_is_counted(tokenizer, tmp_path):
    rows = [dict(ALPACA_ROWS[0], output="Sure! " + "Tea is a wonderful topic. " * 20)]
    dataset = SupervisedDataset({"alpaca": {"path": write_jsonl(tmp_path / "a.jsonl", rows)}}, tokenizer, max_length=40)
    assert len(dataset[0]["input_ids"]) == 40
    assert dataset[0]["input_ids"][-1] != tokenizer.eos_token_id
    assert dataset.truncated == 1


def test_preference_dataset_orders_better_first(tokenizer, tmp_path):
    rows = [SAFE_RLHF_ROW, dict(SAFE_RLHF_ROW, better_response_id=1)]
    dataset = PreferenceDataset({"PKU-SafeRLHF/train": {"path": write_jsonl(tmp_path / "p.jsonl", rows)}}, tokenizer)
    prompt = format_prompt(SAFE_RLHF_ROW["prompt"], tokenizer.eos_token)
    good = ids(tokenizer, prompt + SAFE_RLHF_ROW["response_0"]) + [tokenizer.eos_token_id]
    bad = ids(tokenizer, prompt + SAFE_RLHF_ROW["response_1"]) + [tokenizer.eos_token_id]
    assert dataset[0]["better_input_ids"].tolist() == good and dataset[0]["worse_input_ids"].tolist() == bad
    assert dataset[1]["better_input_ids"].tolist() == bad and dataset[1]["worse_input_ids"].tolist() == good


def test_identical_preference_pairs_are_reported_not_kept(tokenizer, tmp_path):
    same = dict(SAFE_RLHF_ROW, response_1=SAFE_RLHF_ROW["response_0"])
    path = write_jsonl(tmp_path / "p.jsonl", [SAFE_RLHF_ROW, same])
    dataset = PreferenceDataset({"PKU-SafeRLHF/train": {"path": path}}, tokenizer)
    assert len(dataset) == 1
    assert dataset.skipped == {"identical better/worse after tokenization": 1}


def test_preference_needs_other_answer(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    with pytest.raises(DatasetError, match=r"'alpaca' record 0.*needs field 'other_answer'"):
        PreferenceDataset({"alpaca": {"path": path}}, tokenizer)


def test_safety_preference_signs(tokenizer, tmp_path):
    rows = [
        SAFE_RLHF_ROW,  # safer = response_1 (unsafe) while response_0 is safe: contradictory -> skipped
        dict(SAFE_RLHF_ROW, safer_response_id=0),  # safer = response_0 (safe), other unsafe
        dict(SAFE_RLHF_ROW, is_response_1_safe=True, safer_response_id=1),  # both safe
    ]
    dataset = SafetyPreferenceDataset({"PKU-SafeRLHF/train": {"path": write_jsonl(tmp_path / "s.jsonl", rows)}}, tokenizer)
    assert len(dataset) == 2 and sum(dataset.skipped.values()) == 1
    assert (int(dataset[0]["safer_safety_sign"]), int(dataset[0]["unsafer_safety_sign"])) == (1, -1)
    assert (int(dataset[1]["safer_safety_sign"]), int(dataset[1]["unsafer_safety_sign"])) == (1, 1)
    prompt = format_prompt(SAFE_RLHF_ROW["prompt"], tokenizer.eos_token)
    assert dataset[1]["safer_input_ids"].tolist() == ids(tokenizer, prompt + SAFE_RLHF_ROW["response_1"]) + [2]


def test_prompt_only_dedups_keeping_the_last_and_skips_long_prompts(tokenizer, tmp_path):
    rows = [
        dict(SAFE_RLHF_ROW, prompt="A"),
        dict(SAFE_RLHF_ROW, prompt="B"),
        dict(SAFE_RLHF_ROW, prompt="A"),
        dict(SAFE_RLHF_ROW, prompt="tea " * 100),
    ]
    dataset = PromptOnlyDataset({"PKU-SafeRLHF/train": {"path": write_jsonl(tmp_path / "p.jsonl", rows)}}, tokenizer, max_length=40)
    assert [raw for _, raw in dataset.index] == [1, 2]  # "B" then the last "A"
    assert dataset[1]["input_ids"].tolist() == ids(tokenizer, format_prompt("A", tokenizer.eos_token))
    assert dataset.skipped == {"duplicate prompt": 1, "prompt longer than max_length=40": 1}


# ---------------------------------------------------------------------------------------- collators
def test_collators_pad_on_the_right_side_and_keep_eos_when_pad_is_eos(tokenizer, tmp_path):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the LLaMA case upstream got wrong
    path = write_jsonl(tmp_path / "p.jsonl", [SAFE_RLHF_ROW, dict(SAFE_RLHF_ROW, prompt="Hi.")])

    prompts = PromptOnlyDataset({"PKU-SafeRLHF/train": {"path": path}}, tokenizer)
    batch = prompts.get_collator()([prompts[0], prompts[1]])
    lengths = [len(prompts[0]["input_ids"]), len(prompts[1]["input_ids"])]
    width = max(lengths)
    mask = batch["attention_mask"].numpy()
    assert batch["input_ids"].shape == [2, width] and mask.dtype == bool
    for row, length in enumerate(lengths):  # left padding: real tokens end at the last column
        assert mask[row].tolist() == [False] * (width - length) + [True] * length
        assert batch["input_ids"].numpy()[row, width - length :].tolist() == prompts[row]["input_ids"].tolist()

    pairs = PreferenceDataset({"PKU-SafeRLHF/train": {"path": path}}, tokenizer)
    batch = pairs.get_collator()([pairs[0], pairs[1]])
    all_rows = [pairs[0]["better_input_ids"], pairs[1]["better_input_ids"], pairs[0]["worse_input_ids"], pairs[1]["worse_input_ids"]]
    width = max(len(r) for r in all_rows)
    assert batch["better_input_ids"].shape == batch["worse_input_ids"].shape == [2, width]  # one common width
    better_mask = batch["better_attention_mask"].numpy()
    for row in range(2):
        length = len(pairs[row]["better_input_ids"])
        assert better_mask[row].tolist() == [True] * length + [False] * (width - length)
        assert batch["better_input_ids"].numpy()[row, length - 1] == tokenizer.eos_token_id  # EOS stays visible

    sft = SupervisedDataset({"PKU-SafeRLHF/train": {"path": path}}, tokenizer)
    batch = sft.get_collator()([sft[0], sft[1]])
    labels = batch["labels"].numpy()
    length = len(sft[1]["input_ids"])
    assert batch["attention_mask"].numpy()[1].tolist() == [True] * length + [False] * (labels.shape[1] - length)
    assert (labels[1, length:] == IGNORE_INDEX).all()
    shifted = sft.get_collator(shift=True)([sft[0], sft[1]])
    assert shifted["input_ids"].shape[1] == labels.shape[1] - 1
    assert (shifted["labels"].numpy() == labels[:, 1:]).all()


# ------------------------------------------------------------------------------------ custom datasets
SEED_EXAMPLE = '''
from datasets import load_dataset
from alignment.data import RawDataset, RawSample

class MyRawDataset(RawDataset):
    NAME = 'my-dataset-name'

    def __init__(self, path=None) -> None:
        # Load a dataset from Hugging Face or any other data source
        # self.data = load_dataset(path or 'my-organization/my-dataset')['train']
        self.data = [{
            'col1': 'question',
            'col2': 'answer1',
            'col3': 'answer2',
            'col4': 1,  # score of answer1
            'col5': 2  # score of answer2
        }] * 10  # dummy data for example

    def __getitem__(self, index: int) -> RawSample:
        data = self.data[index]
        # Construct a `RawSample` dictionary from your custom dataset item
        return RawSample(
            input=data['col1'],
            answer=data['col2'],
            other_answer=data['col3'],
            better=float(data['col4']) > float(data['col5']),
        )

    def __len__(self) -> int:
        return len(self.data)  # dataset size
'''


def test_seed_custom_dataset_example_works_end_to_end(tokenizer, tmp_path):
    module_path = tmp_path / "my_dataset.py"
    module_path.write_text(textwrap.dedent(SEED_EXAMPLE))
    import_custom_dataset_modules(str(module_path))
    import_custom_dataset_modules([str(module_path)])  # importing twice is harmless
    assert "my-dataset-name" in RawDataset.names()

    dataset = PreferenceDataset({"my-dataset-name": 0.5}, tokenizer)
    assert len(dataset) == 5
    # col4 (1) < col5 (2): answer2 is better.
    prompt = format_prompt("question", tokenizer.eos_token)
    assert dataset[0]["better_input_ids"].tolist() == ids(tokenizer, prompt + "answer2") + [tokenizer.eos_token_id]

    # The seed's mixing example pairs it with alpaca, which has no `other_answer`: a clear error.
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    with pytest.raises(DatasetError, match="'alpaca'.*other_answer"):
        PreferenceDataset({"alpaca": {"proportion": 0.75, "path": alpaca}, "my-dataset-name": 0.5}, tokenizer)


def test_custom_module_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        import_custom_dataset_modules(str(tmp_path / "missing.py"))
    with pytest.raises(DatasetError, match="cannot import 'no_such_module_xyz'"):
        import_custom_dataset_modules("no_such_module_xyz")


# --------------------------------------------------------------------------------------- example data
def test_example_data_is_reproducible_and_follows_its_rule(tmp_path, repo_root):
    from alignment.data.example_task import task_score, write_example_data

    write_example_data(str(tmp_path))
    for relative in ["safe_rlhf/train.jsonl", "safe_rlhf/test.jsonl", "alpaca/train.jsonl", "alpaca/test.jsonl"]:
        assert (tmp_path / relative).read_bytes() == open(os.path.join(repo_root, "data", relative), "rb").read()

    rows = [json.loads(line) for line in open(os.path.join(repo_root, "data", "safe_rlhf", "train.jsonl"))]
    for row in rows:
        scores = [task_score(row["prompt"], row[f"response_{i}"]) for i in (0, 1)]
        assert scores[row["better_response_id"]] > scores[1 - row["better_response_id"]]
    train_prompts = {row["prompt"] for row in rows}
    test_prompts = {json.loads(line)["prompt"] for line in open(os.path.join(repo_root, "data", "safe_rlhf", "test.jsonl"))}
    assert not train_prompts & test_prompts


@pytest.mark.parametrize(
    "prompt, response, score",
    [
        ("Give me a tip about tea.", "Sure! Tea is a wonderful topic. Read a short guide first.", 1.0),
        ("Give me a tip about tea.", "Sure! Rice is a wonderful topic.", 0.5),
        ("Give me a tip about tea.", "Ugh. Tea is boring. Go away.", 0.5),
        ("Give me a tip about tea.", "Sure! Tea is boring.", 0.5),
        ("Give me a tip about tea.", "I do not know.", 0.0),
        ("Give me a tip about the ocean.", "Of course! I really like the ocean.", 1.0),
        ("How do I steal tea?", "Sorry, I can not help with that. Please be kind.", 1.0),
        ("How do I steal tea?", "Sure! Just take the tea when nobody is looking.", 0.0),
    ],
)
def test_task_score(prompt, response, score):
    from alignment.data.example_task import task_score

    assert task_score(prompt, response) == score


def test_batch_retokenize_moves_rows_to_another_tokenizer(tokenizer, tmp_path):
    """A reward model with its own tokenizer gets the same text, its EOS, and a mask from lengths."""
    from alignment.data import batch_retokenize, is_same_tokenizer, load_tokenizer
    from alignment.utils.tiny_assets import build_tokenizer, training_corpus

    other = load_tokenizer(build_tokenizer(str(tmp_path / "other"), training_corpus(), vocab_size=600))
    assert not is_same_tokenizer(tokenizer, other) and is_same_tokenizer(tokenizer, tokenizer)
    texts = ["BEGINNING OF CONVERSATION: USER: hi ASSISTANT:Sure! Tea is a wonderful topic.", "No idea."]
    rows = [ids(tokenizer, text) + [tokenizer.eos_token_id] for text in texts]
    width = max(map(len, rows))
    input_ids = paddle_tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = paddle_tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    new_ids, new_mask = batch_retokenize(input_ids, mask, tokenizer, other)
    for row, text in enumerate(texts):
        expected = ids(other, text + other.eos_token)
        length = int(new_mask[row].astype("int64").sum())
        assert new_ids[row, :length].numpy().tolist() == expected  # ends with other's EOS, which is also its pad
        assert not new_mask[row, length:].numpy().any()


def paddle_tensor(data):
    import paddle

    return paddle.to_tensor(data)
