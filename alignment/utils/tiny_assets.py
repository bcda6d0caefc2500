"""Offline tiny assets: a SentencePiece Llama tokenizer and random tiny decoder checkpoints.

Nothing here downloads anything. The tokenizer is trained on the repository's example data
(``data/``) and the models are random causal LMs (``LlamaForCausalLM`` by default; any architecture
of :mod:`alignment.models.architectures` that the installed paddlenlp provides, e.g. ``qwen2``,
``mistral``) saved with ``save_pretrained(safe_serialization=True)``; both are deterministic for a
given seed, so tests and the CPU quick start can rebuild them anywhere::

    python scripts/make_tiny_assets.py --output-dir assets/tiny
    # -> assets/tiny/tokenizer/  (AutoTokenizer.from_pretrained)
    #    assets/tiny/llama/      (AutoModelForCausalLM.from_pretrained; tokenizer files included)

The tiny SentencePiece tokenizer serves every architecture (the model only needs its vocabulary size
and special ids).
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import string
import tempfile
from typing import Any, Iterable

__all__ = ["MODEL_PRESETS", "ARCHITECTURE_DEFAULTS", "training_corpus", "build_tokenizer", "build_model", "build_tiny_assets"]

#: Shapes of the random models. "tiny" keeps unit tests fast; "small" is the quick start's model.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
}

#: What each architecture's tiny model adds to the preset shape, so that the tests exercise the
#: features the family is known for: Qwen2 has grouped-query attention, q/k/v biases (always, in its
#: layer) and tied input/output embeddings like the small Qwen2 models; Mistral has grouped-query
#: attention. Llama stays multi-head (overrides add GQA or tied embeddings where wanted).
ARCHITECTURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(num_key_value_heads=2),
    "gemma": dict(num_key_value_heads=1),
}

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data")


def training_corpus(data_dir: str = DEFAULT_DATA_DIR) -> list[str]:
    """Lines to train the tokenizer on: formatted prompts and answers of every example file."""
    from alignment.data.base import format_prompt

    lines: list[str] = []
    files = sorted(glob.glob(os.path.join(data_dir, "**", "*.jsonl"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no .jsonl example data under {data_dir!r}; run scripts/make_example_data.py")
    for path in files:
        with open(path, encoding="utf-8") as file:
            for line in file:
                row = json.loads(line)
                prompt = format_prompt(row.get("prompt") or row.get("instruction"), eos_token="</s>")
                lines.extend(prompt + str(row[key]) for key in ("response_0", "response_1", "output") if key in row)
    # Every printable ASCII character gets its own piece (user data may hold digits, symbols...).
    lines.append(" ".join(string.printable.strip()))
    return lines


def build_tokenizer(output_dir: str, corpus: Iterable[str] | None = None, vocab_size: int = 1000) -> str:
    """Train a BPE SentencePiece model (byte fallback, like LLaMA) and save it as a LlamaTokenizer.

    Special ids follow LLaMA: ``<unk>``=0, ``<s>``=1, ``</s>``=2 and no pad token (loaders set
    pad = eos, the case upstream got wrong). Returns ``output_dir``.
    """
    import sentencepiece as spm
    from paddlenlp.transformers import LlamaTokenizer

    lines = list(corpus if corpus is not None else training_corpus())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        split_digits=True,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as scratch:
        model_path = os.path.join(scratch, "tokenizer.model")
        with open(model_path, "wb") as file:
            file.write(model.getvalue())
        LlamaTokenizer(vocab_file=model_path).save_pretrained(output_dir)
    return output_dir


def build_model(
    output_dir: str,
    tokenizer_dir: str,
    preset: str = "tiny",
    seed: int = 0,
    max_position_embeddings: int = 512,
    architecture: str = "llama",
    **overrides: Any,
) -> str:
    """Save a random causal LM of ``architecture`` and ``preset`` shape (plus the tokenizer) to ``output_dir``.

    ``overrides`` are config fields on top of the preset and :data:`ARCHITECTURE_DEFAULTS`.
    """
    import paddle
    from paddlenlp.transformers import AutoTokenizer

    from alignment.models.architectures import get_architecture

    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    family = get_architecture(architecture)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {**MODEL_PRESETS[preset], **ARCHITECTURE_DEFAULTS.get(architecture, {}), **overrides}
    if architecture == "gemma":  # Gemma's head size is a field of its own
        shape.setdefault("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    config = family.config_class(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        seq_length=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        rms_norm_eps=1e-6,
        **shape,
    )
    paddle.seed(seed)
    with paddle.utils.unique_name.guard():
        model = family.causal_lm_class(config)
    model.save_pretrained(output_dir, safe_serialization=True)
    for name in os.listdir(tokenizer_dir):  # ship the tokenizer with the checkpoint, as hub models do
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(output_dir, name))
    return output_dir


def build_tiny_assets(
    output_dir: str,
    preset: str = "tiny",
    seed: int = 0,
    data_dir: str = DEFAULT_DATA_DIR,
    architectures: Iterable[str] = ("llama",),
) -> dict[str, str]:
    """Tokenizer and one random model per architecture under ``output_dir``; returns their paths
    (``{"tokenizer": ..., "llama": ..., "qwen2": ...}``)."""
    tokenizer_dir = build_tokenizer(os.path.join(output_dir, "tokenizer"), training_corpus(data_dir))
    paths = {"tokenizer": tokenizer_dir}
    for architecture in architectures:
        paths[architecture] = build_model(
            os.path.join(output_dir, architecture), tokenizer_dir, preset=preset, seed=seed, architecture=architecture
        )
    return paths
