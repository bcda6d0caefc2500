"""Property-based tests of the data layer: specs, mixing, padding and collators on random inputs."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.data import (
    IGNORE_INDEX,
    PreferenceCollator,
    PromptOnlyCollator,
    SupervisedCollator,
    format_prompt,
    left_padding,
    parse_dataset,
    right_padding,
)
from alignment.data.base import length_mask, mix_indices

SETTINGS = settings(max_examples=60, deadline=None)

token_rows = st.lists(st.lists(st.integers(3, 999), min_size=1, max_size=12), min_size=1, max_size=6)


@SETTINGS
@given(size=st.integers(1, 50), proportion=st.floats(0, 4.5, allow_nan=False), seed=st.integers(0, 2**32 - 1))
def test_mix_indices_float_proportion(size, proportion, seed):
    indices = mix_indices(size, proportion, np.random.default_rng(seed))
    expected = int(round(size * proportion))
    assert len(indices) == expected
    whole, remainder = divmod(expected, size)
    # Whole copies come first, in order; the remainder has no duplicates.
    assert indices[: whole * size].tolist() == list(range(size)) * whole
    tail = indices[whole * size :].tolist()
    assert len(set(tail)) == len(tail) == remainder
    assert all(0 <= i < size for i in tail)


@SETTINGS
@given(size=st.integers(1, 40), count=st.integers(0, 130), seed=st.integers(0, 1000))
def test_mix_indices_exact_count(size, count, seed):
    proportion = parse_dataset(f"x:{count}/-1")[1]["proportion"]
    indices = mix_indices(size, proportion, np.random.default_rng(seed))
    assert len(indices) == count
    assert np.bincount(indices, minlength=size).max(initial=0) <= -(-count // size)  # balanced copies


@SETTINGS
@given(
    proportion=st.one_of(st.floats(0, 100, allow_nan=False).map(lambda x: round(x, 4)), st.integers(0, 100)),
    path=st.one_of(st.none(), st.from_regex(r"/[a-z0-9_./]{1,20}", fullmatch=True)),
)
def test_parse_dataset_roundtrip(proportion, path):
    spec = f"name:{proportion}" + (f":{path}" if path else "")
    name, parsed = parse_dataset(spec)
    assert name == "name"
    assert parsed["proportion"] == float(proportion)
    assert parsed.get("path") == path
    if isinstance(parsed["proportion"], Fraction):  # only "k/-1" produces fractions
        raise AssertionError("a plain number must not parse as an exact count")


@SETTINGS
@given(rows=token_rows, pad=st.integers(0, 2))
def test_padding_is_lossless_and_on_the_right_side(rows, pad):
    arrays = [np.asarray(r) for r in rows]
    width = max(map(len, rows))
    right, left = right_padding(arrays, pad), left_padding(arrays, pad)
    right_mask, left_mask = length_mask(arrays, left=False), length_mask(arrays, left=True)
    assert right.shape == left.shape == right_mask.shape == (len(rows), width)
    for index, row in enumerate(rows):
        assert right[index][right_mask[index]].tolist() == row
        assert left[index][left_mask[index]].tolist() == row
        assert right_mask[index].tolist() == [True] * len(row) + [False] * (width - len(row))
        assert left_mask[index].tolist() == [False] * (width - len(row)) + [True] * len(row)
        assert (right[index][~right_mask[index]] == pad).all() and (left[index][~left_mask[index]] == pad).all()


@SETTINGS
@given(rows=token_rows, pad=st.integers(0, 2), prompt_share=st.floats(0, 1))
def test_supervised_collator_keeps_labels_aligned(rows, pad, prompt_share):
    samples = []
    for row in rows:
        labels = list(row)
        cut = int(len(row) * prompt_share)
        labels[:cut] = [IGNORE_INDEX] * cut
        samples.append({"input_ids": np.asarray(row), "labels": np.asarray(labels)})
    batch = SupervisedCollator(pad)(samples)
    ids, labels, mask = (batch[k].numpy() for k in ("input_ids", "labels", "attention_mask"))
    for index, sample in enumerate(samples):
        length = len(sample["input_ids"])
        assert mask[index].sum() == length  # from lengths: a pad id equal to a real token is still attended
        assert ids[index, :length].tolist() == sample["input_ids"].tolist()
        assert labels[index, :length].tolist() == sample["labels"].tolist()
        assert (labels[index, length:] == IGNORE_INDEX).all()
    shifted = SupervisedCollator(pad, shift=True)(samples)
    assert (shifted["labels"].numpy() == labels[:, 1:]).all()
    assert (shifted["input_ids"].numpy() == ids[:, :-1]).all()


@SETTINGS
@given(better=token_rows, worse=token_rows, pad=st.integers(0, 2))
def test_preference_collator_pads_pairs_to_one_width(better, worse, pad):
    size = min(len(better), len(worse))
    samples = [{"better_input_ids": np.asarray(b), "worse_input_ids": np.asarray(w)} for b, w in zip(better[:size], worse[:size])]
    batch = PreferenceCollator(pad)(samples)
    width = max(len(r) for r in better[:size] + worse[:size])
    for side, rows in (("better", better[:size]), ("worse", worse[:size])):
        ids, mask = batch[f"{side}_input_ids"].numpy(), batch[f"{side}_attention_mask"].numpy()
        assert ids.shape == (size, width)
        for index, row in enumerate(rows):
            assert ids[index][mask[index]].tolist() == row


@SETTINGS
@given(rows=token_rows, pad=st.integers(0, 2))
def test_prompt_collator_ends_every_prompt_at_the_last_column(rows, pad):
    batch = PromptOnlyCollator(pad)([{"input_ids": np.asarray(r)} for r in rows])
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    assert mask[:, -1].all()
    for index, row in enumerate(rows):
        assert ids[index, ids.shape[1] - len(row) :].tolist() == row


@SETTINGS
@given(turns=st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=10), min_size=1, max_size=7))
def test_format_prompt_structure(turns):
    if len(turns) % 2 == 0:
        turns = turns[:-1]
    text = format_prompt(turns if len(turns) > 1 else turns[0], eos_token="</s>")
    assert text.startswith("BEGINNING OF CONVERSATION: USER: ")
    assert text.endswith(" ASSISTANT:")
    assert text.count("</s>") >= len(turns) // 2
