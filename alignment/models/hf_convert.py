"""Hugging Face (transformers) checkpoints in and out, without torch or transformers.

**In.** A directory in the hub layout (``config.json``, ``model.safetensors`` or sharded safetensors with
torch names ``model.layers.N...``, Linear weights ``[out, in]``, ``tokenizer.model`` /
``tokenizer_config.json``) is detected by its weight names (:func:`is_hf_checkpoint`) and converted once
into a cache directory keyed by a hash of its content (:func:`resolve_pretrained_dir`); every stage then
loads that directory as a PaddleNLP checkpoint. The user's directory is never written to. The cache is
``$PADDLE_RLHF_HF_CACHE`` (default ``~/.cache/paddle-rlhf/hf``).

**Out.** :func:`export_hf_checkpoint` writes one of our ``save_pretrained`` directories (policy, reward,
cost or critic) as a transformers-loadable directory: ``<Arch>ForCausalLM`` (``Llama``, ``Qwen2``,
``Mistral``) for a causal LM, ``<Arch>ForSequenceClassification`` (``num_labels = score_dim``) for a
score model, whose score-head bias,
if any, is kept in ``config.score_head_bias`` (transformers' classification head has none: add it to the
logits), tokenizer files including ``tokenizer.model``, and ``generation_config.json``.

Architectures (Llama, Qwen2, Mistral) plug in through :data:`HF_ARCHITECTURES` (one :class:`HFArchitecture` per ``model_type``:
backbone prefixes, the 2-D weights that keep their layout, class names). The weight rules are pure
functions (:func:`hf_to_paddle_name`, :func:`paddle_to_hf_name`), as are the config rules
(:func:`config_from_hf`, :func:`config_to_hf`).

Safetensors are read and written here directly (header + raw little-endian data), so ``BF16`` weights
keep their bytes (tagged ``U16``, as PaddleNLP stores bfloat16) and a 7B checkpoint streams one tensor
at a time through ``numpy.memmap``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import struct
from typing import Any, Iterator, Mapping, Optional

import numpy as np

__all__ = [
    "HFArchitecture",
    "HF_ARCHITECTURES",
    "register_hf_architecture",
    "HFCheckpointError",
    "hf_cache_dir",
    "is_hf_checkpoint",
    "checkpoint_content_key",
    "hf_to_paddle_name",
    "paddle_to_hf_name",
    "rope_settings_from_hf",
    "lm_head_is_transposed",
    "check_sliding_window",
    "config_from_hf",
    "config_to_hf",
    "import_hf_checkpoint",
    "resolve_pretrained_dir",
    "is_hf_tokenizer_dir",
    "resolve_tokenizer_dir",
    "resolve_model_arguments",
    "read_chat_template",
    "export_hf_checkpoint",
]

logger = logging.getLogger(__name__)

#: Bump when the conversion changes, so cached conversions are redone.
CONVERTER_VERSION = "1"
CACHE_ENV = "PADDLE_RLHF_HF_CACHE"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PADDLE_SENTENCEPIECE = "sentencepiece.bpe.model"
HF_SENTENCEPIECE = "tokenizer.model"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint that cannot be converted; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class HFArchitecture:
    """How one ``model_type`` maps between transformers' names and ours.

    ``backbone``: our backbone prefix (``llama``); ``hf_backbone``: transformers' (``model``).
    Every 2-D ``.weight`` is a Linear weight and is transposed, except names ending in one of
    ``untransposed`` (embeddings). ``supported_rope_types``: transformers ``rope_type`` -> ours.
    ``unsupported_flags``: config flags that must be false (features PaddleNLP's model lacks);
    ``extra_config_keys``: architecture-specific config keys copied as they are;
    ``exported_config``: transformers config values every export writes (what our model computes,
    e.g. no sliding window). Sliding windows are checked by :func:`check_sliding_window`.
    """

    model_type: str
    backbone: str
    causal_lm: str
    sequence_classification: str
    score_model: str
    hf_backbone: str = "model"
    untransposed: tuple[str, ...] = ("embed_tokens.weight",)
    supported_rope_types: Mapping[str, Optional[str]] = dataclasses.field(
        default_factory=lambda: {"default": None, "linear": "linear", "dynamic": "dynamic_ntk"}
    )
    unsupported_flags: tuple[str, ...] = ("attention_bias", "mlp_bias")
    extra_config_keys: tuple[str, ...] = ()
    exported_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


HF_ARCHITECTURES: dict[str, HFArchitecture] = {}
"""``model_type`` -> :class:`HFArchitecture`. One entry per supported architecture."""


def register_hf_architecture(architecture: HFArchitecture) -> HFArchitecture:
    HF_ARCHITECTURES[architecture.model_type] = architecture
    return architecture


register_hf_architecture(
    HFArchitecture(
        model_type="llama",
        backbone="llama",
        causal_lm="LlamaForCausalLM",
        sequence_classification="LlamaForSequenceClassification",
        score_model="LlamaModelForScore",
    )
)


#: PaddleNLP's Qwen2 and Mistral compute RoPE without scaling (no ``rope_scaling_type`` in their layers).
_DEFAULT_ROPE_ONLY = {"default": None}

register_hf_architecture(
    HFArchitecture(
        model_type="qwen2",
        backbone="qwen2",
        causal_lm="Qwen2ForCausalLM",
        sequence_classification="Qwen2ForSequenceClassification",
        score_model="Qwen2ModelForScore",
        supported_rope_types=_DEFAULT_ROPE_ONLY,
        # q/k/v always carry biases in both implementations (1-D ``*.bias``: copied, never transposed),
        # so there is no attention_bias flag to refuse; the MLP has none
        unsupported_flags=("mlp_bias",),
        extra_config_keys=("use_sliding_window", "sliding_window", "max_window_layers"),
        exported_config={"use_sliding_window": False},
    )
)
register_hf_architecture(
    HFArchitecture(
        model_type="mistral",
        backbone="mistral",
        causal_lm="MistralForCausalLM",
        sequence_classification="MistralForSequenceClassification",
        score_model="MistralModelForScore",
        supported_rope_types=_DEFAULT_ROPE_ONLY,
        extra_config_keys=("sliding_window",),
        exported_config={"sliding_window": None},
    )
)


def check_sliding_window(hf_config: Mapping[str, Any], where: str = "config.json") -> None:
    """Refuse a transformers config whose sliding window changes the attention of some layer.

    PaddleNLP's Qwen2 and Mistral attend causally over the whole sequence, which equals windowed
    attention exactly when the window covers every position (``sliding_window >=
    max_position_embeddings``) or is off: Mistral's when ``sliding_window`` is null, Qwen2's when
    ``use_sliding_window`` is false (transformers then drops ``sliding_window``). ``max_window_layers``
    does not make a Qwen2 window safe: transformers 4.x windows every layer under its eager/sdpa
    attention and only layers ``>= max_window_layers`` under flash-attention.
    """
    window = hf_config.get("sliding_window")
    if window is None:
        return
    model_type = hf_config.get("model_type")
    if model_type == "qwen2":
        if not hf_config.get("use_sliding_window", False):
            return
    elif model_type != "mistral":
        return
    positions = hf_config.get("max_position_embeddings")
    if positions is not None and int(window) < int(positions):
        raise HFCheckpointError(
            f"{where}: sliding_window {window} < max_position_embeddings {positions}; PaddleNLP's "
            f"{model_type} attends over the whole sequence, so longer inputs would differ from transformers. "
            f"Set max_position_embeddings to at most {window}"
            + (" or use_sliding_window=false" if model_type == "qwen2" else " or sliding_window=null")
            + " if you train on shorter sequences"
        )


def _architecture(model_type: Any, where: str) -> HFArchitecture:
    if model_type not in HF_ARCHITECTURES:
        raise HFCheckpointError(
            f"{where}: model_type {model_type!r} has no Hugging Face conversion; supported: {sorted(HF_ARCHITECTURES)}"
        )
    return HF_ARCHITECTURES[model_type]


# --------------------------------------------------------------------------------------------------
# Safetensors without torch
# --------------------------------------------------------------------------------------------------

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # BF16 kept as raw bits
    "U16": np.uint16, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip
#: PaddleNLP 2.8 stores bfloat16 weights as "U16" (it cannot read "BF16"); same bits, other tag.
_TO_PADDLE_DTYPE, _TO_HF_DTYPE = {"BF16": "U16"}, {"U16": "BF16"}


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as file:
        size_bytes = file.read(8)
        if len(size_bytes) != 8:
            raise HFCheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", size_bytes)
        try:
            header = json.loads(file.read(size))
        except (ValueError, UnicodeDecodeError) as error:
            raise HFCheckpointError(f"{path}: unreadable safetensors header ({error})") from None
    return header, 8 + size


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as file:
            weight_map = json.load(file)["weight_map"]
        return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(directory, SAFE_WEIGHTS)
    return [single] if os.path.isfile(single) else []


def _iter_tensors(directory: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """``(name, safetensors dtype, array)`` of every weight, memory-mapped (BF16 as uint16 bits)."""
    for path in _safetensors_files(directory):
        header, offset = _read_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = info["dtype"]
            if dtype not in _DTYPES:
                raise HFCheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            count = int(np.prod(shape)) if shape else 1
            if count == 0:
                array = np.zeros(shape, dtype=_DTYPES[dtype])
            else:
                array = np.memmap(path, dtype=_DTYPES[dtype], mode="r", offset=offset + begin, shape=(count,))
                array = array.reshape(shape)
            if array.nbytes != end - begin:
                raise HFCheckpointError(f"{path}: tensor {name!r} size does not match its shape {list(shape)}")
            yield name, dtype, array


def _weight_names(directory: str) -> list[str]:
    names: list[str] = []
    for path in _safetensors_files(directory):
        names += [name for name in _read_header(path)[0] if name != "__metadata__"]
    return names


def _write_safetensors(path: str, tensors: list[tuple[str, str, np.ndarray]], metadata: Mapping[str, str]) -> None:
    """Write ``(name, dtype, array)`` tensors; arrays may be lazy (memmap views) and are copied one by one."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, array in tensors:
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for _, dtype, array in tensors:
            file.write(np.ascontiguousarray(array, dtype=_DTYPES[dtype]).tobytes())


# --------------------------------------------------------------------------------------------------
# Detection and cache keys
# --------------------------------------------------------------------------------------------------


def hf_cache_dir() -> str:
    """Where converted checkpoints live: ``$PADDLE_RLHF_HF_CACHE`` or ``~/.cache/paddle-rlhf/hf``."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "paddle-rlhf", "hf"))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise HFCheckpointError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None


def is_hf_checkpoint(path: Optional[str]) -> bool:
    """True for a local directory in transformers' layout: weights named ``<hf_backbone>.*``.

    Our own checkpoints use the backbone's name (``llama.*``) and PaddleNLP writes ``paddlenlp_version``
    into their config; a directory with only ``pytorch_model.bin`` is transformers' too (and refused by
    :func:`import_hf_checkpoint`).
    """
    if not path or not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    if "paddlenlp_version" in _read_json(os.path.join(path, "config.json")):
        return False  # written by PaddleNLP's save_pretrained, whatever its weights are called
    names = _weight_names(path)
    if not names:
        return os.path.isfile(os.path.join(path, "pytorch_model.bin")) or os.path.isfile(
            os.path.join(path, "pytorch_model.bin.index.json")
        )
    prefixes = {architecture.hf_backbone + "." for architecture in HF_ARCHITECTURES.values()}
    return any(name.startswith(prefix) for name in names for prefix in prefixes)


def checkpoint_content_key(path: str, full_hash_limit: int = 64 << 20) -> str:
    """A hex key of the directory's content: small files hashed whole; large weight files by name,
    size, modification time and safetensors header (hashing 13 GB on every start would be slow)."""
    digest = hashlib.sha256(f"converter-{CONVERTER_VERSION}".encode())
    for name in sorted(os.listdir(path)):
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            continue
        stat = os.stat(file_path)
        digest.update(f"\0{name}\0{stat.st_size}\0".encode())
        if stat.st_size <= full_hash_limit:
            with open(file_path, "rb") as file:
                digest.update(file.read())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
            if name.endswith(".safetensors"):
                digest.update(json.dumps(_read_header(file_path)[0], sort_keys=True).encode())
    return digest.hexdigest()[:24]


# --------------------------------------------------------------------------------------------------
# Names and layouts (pure)
# --------------------------------------------------------------------------------------------------


def _is_linear_weight(name: str, ndim: int, architecture: HFArchitecture) -> bool:
    return ndim == 2 and name.endswith(".weight") and not name.endswith(architecture.untransposed)


def hf_to_paddle_name(name: str, ndim: int, architecture: HFArchitecture) -> tuple[str, bool]:
    """transformers name -> ``(our name, transpose?)``.

    ``model.layers.0.self_attn.q_proj.weight`` -> ``llama.layers.0.self_attn.q_proj.weight``, transposed;
    ``score.weight`` (``*ForSequenceClassification``) -> ``score_head.weight``; safe-rlhf's
    ``score_head.*`` and ``normalizer.*`` keep their names.
    """
    if name.startswith(architecture.hf_backbone + "."):
        name = architecture.backbone + name[len(architecture.hf_backbone) :]
    elif name.startswith("score."):
        name = "score_head." + name[len("score.") :]
    return name, _is_linear_weight(name, ndim, architecture)


def paddle_to_hf_name(name: str, ndim: int, architecture: HFArchitecture) -> tuple[str, bool]:
    """Our name -> ``(transformers name, transpose?)``; ``score_head.weight`` -> ``score.weight``."""
    transpose = _is_linear_weight(name, ndim, architecture)
    if name.startswith(architecture.backbone + "."):
        name = architecture.hf_backbone + name[len(architecture.backbone) :]
    elif name.startswith("score_head."):
        name = "score." + name[len("score_head.") :]
    return name, transpose


def lm_head_is_transposed(shape: tuple[int, ...], config: Mapping[str, Any]) -> bool:
    """Whether our ``lm_head.weight`` of ``shape`` is ``[hidden, vocab]`` (and so transposed for transformers).

    PaddleNLP's untied head is ``[hidden, vocab]``; a tied head (Qwen2, Llama on PaddleNLP 3) *is* the
    ``[vocab, hidden]`` embedding matrix, used with ``transpose_y``. The shape decides; a square head
    (vocab = hidden) is read as tied exactly when ``config.tie_word_embeddings``.
    """
    vocab, hidden = config.get("vocab_size"), config.get("hidden_size")
    if vocab != hidden and tuple(shape) == (vocab, hidden):
        return False
    if vocab != hidden and tuple(shape) == (hidden, vocab):
        return True
    return not config.get("tie_word_embeddings", False)


def rope_settings_from_hf(hf_config: Mapping[str, Any], architecture: HFArchitecture, where: str) -> dict[str, Any]:
    """``rope_theta``, ``rope_scaling_type``, ``rope_scaling_factor`` from either config format.

    transformers <= 4.x: top-level ``rope_theta`` and ``rope_scaling: {type|rope_type, factor}``;
    transformers 5: ``rope_parameters: {rope_theta, rope_type, factor, ...}``. A rope type PaddleNLP
    cannot compute (``llama3``, ``yarn``, ...) is an error, never silently ignored.
    """
    parameters = dict(hf_config.get("rope_parameters") or {})
    scaling = dict(hf_config.get("rope_scaling") or {})
    theta = parameters.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    source = parameters if parameters.get("rope_type", parameters.get("type")) else scaling
    rope_type = source.get("rope_type", source.get("type")) or "default"
    if rope_type not in architecture.supported_rope_types:
        raise HFCheckpointError(
            f"{where}: rope type {rope_type!r} is not supported for {architecture.model_type}; supported: "
            f"{sorted(architecture.supported_rope_types)}"
        )
    ours = architecture.supported_rope_types[rope_type]
    factor = float(source.get("factor", 1.0)) if ours else 1.0
    return {"rope_theta": float(theta), "rope_scaling_type": ours, "rope_scaling_factor": factor}


#: transformers config keys copied as they are into our config.
_COPIED_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip


def config_from_hf(hf_config: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
    """transformers ``config.json`` -> our ``config.json`` (a causal LM or, for
    ``*ForSequenceClassification`` / safe-rlhf ``*ForScore``, a score model).

    ``tie_word_embeddings`` becomes False: PaddleNLP's Llama has its own ``lm_head`` (initialised here
    from the embeddings, so the logits are unchanged).
    """
    architecture = _architecture(hf_config.get("model_type"), where)
    config: dict[str, Any] = {key: hf_config[key] for key in _COPIED_CONFIG_KEYS if key in hf_config}
    missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if key not in config]
    if missing:
        raise HFCheckpointError(f"{where}: missing {missing}")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise HFCheckpointError(
            f"{where}: head_dim {head_dim} x num_attention_heads {config['num_attention_heads']} != hidden_size "
            f"{config['hidden_size']}; PaddleNLP's {architecture.causal_lm} derives head_dim from hidden_size"
        )
    config.update({key: hf_config[key] for key in architecture.extra_config_keys if key in hf_config})
    for flag in architecture.unsupported_flags:
        if hf_config.get(flag):
            raise HFCheckpointError(f"{where}: {flag}=true is not supported by PaddleNLP's {architecture.causal_lm}")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"{where}: hidden_act {hf_config['hidden_act']!r}; only 'silu' is supported")
    check_sliding_window(hf_config, where)
    config.update(rope_settings_from_hf(hf_config, architecture, where))
    config["model_type"] = architecture.model_type
    config["tie_word_embeddings"] = False
    config["seq_length"] = config.get("max_position_embeddings", 2048)
    dtype = hf_config.get("torch_dtype") or hf_config.get("dtype")
    if dtype:
        config["dtype"] = str(dtype).replace("torch.", "")
    hf_architectures = hf_config.get("architectures") or [architecture.causal_lm]
    if any(name.endswith(("ForSequenceClassification", "ForScore")) for name in hf_architectures):
        config["architectures"] = [architecture.score_model]
        labels = hf_config.get("num_labels", len(hf_config.get("id2label") or {}) or 1)
        config["score_dim"] = int(hf_config.get("score_dim", labels))
        for key in ("score_type", "do_normalize", "normalizer_type", "normalizer_momentum", "mean", "var"):
            if key in hf_config:
                config[key] = hf_config[key]
    else:
        config["architectures"] = [architecture.causal_lm]
    return config


def config_to_hf(config: Mapping[str, Any], has_bias: bool = False) -> dict[str, Any]:
    """Our ``config.json`` -> transformers'. A score model becomes ``*ForSequenceClassification`` with
    ``num_labels = score_dim`` and its score options kept (``score_type``, normalizer ``mean``/``var``)."""
    architecture = _architecture(config.get("model_type"), "config.json")
    hf: dict[str, Any] = {key: config[key] for key in _COPIED_CONFIG_KEYS + architecture.extra_config_keys if key in config}
    hf.update(model_type=architecture.model_type, hidden_act="silu")
    hf.update({flag: False for flag in architecture.unsupported_flags})
    hf.update(architecture.exported_config)
    hf["rope_theta"] = float(config.get("rope_theta", 10000.0))
    scaling_type = config.get("rope_scaling_type")
    if scaling_type:
        hf_type = {ours: theirs for theirs, ours in architecture.supported_rope_types.items() if ours}.get(scaling_type)
        if hf_type is None:
            raise HFCheckpointError(f"config.json: rope_scaling_type {scaling_type!r} has no transformers equivalent")
        hf["rope_scaling"] = {"type": hf_type, "rope_type": hf_type, "factor": float(config.get("rope_scaling_factor", 1.0))}
    hf["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    hf["torch_dtype"] = str(config.get("dtype") or "float32")
    if config.get("score_dim") is not None or any(str(a).endswith("ForScore") for a in config.get("architectures") or []):
        score_dim = int(config.get("score_dim", 1))
        hf["architectures"] = [architecture.sequence_classification]
        hf["num_labels"] = score_dim
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(score_dim)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(score_dim)}
        hf["problem_type"] = "regression"
        for key in ("score_type", "do_normalize", "normalizer_type", "mean", "var"):
            if config.get(key) is not None:
                hf[key] = config[key]
        # transformers' classification head picks the token before the first pad: with pad = eos that is
        # the token before the EOS, not the EOS our scores are read at. Without a pad id it reads the last.
        if hf.get("pad_token_id") is not None and hf.get("pad_token_id") == hf.get("eos_token_id"):
            hf["pad_token_id"] = None
    else:
        hf["architectures"] = [architecture.causal_lm]
    return hf


# --------------------------------------------------------------------------------------------------
# Tokenizer files
# --------------------------------------------------------------------------------------------------


def _token_text(value: Any) -> Optional[str]:
    """transformers writes special tokens as strings or ``{"content": ...}`` dicts."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_of(directory: str, tokenizer_config: Mapping[str, Any]) -> Optional[Any]:
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):  # transformers 5 keeps it in its own file
        with open(jinja, encoding="utf-8") as file:
            return file.read()
    return tokenizer_config.get("chat_template")


def read_chat_template(directory: Optional[str]) -> Optional[Any]:
    """The jinja chat template stored in a (tokenizer) directory, or None: ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or transformers' list of named templates)."""
    if not directory or not os.path.isdir(os.path.expanduser(directory)):
        return None
    directory = os.path.expanduser(directory)
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    return _chat_template_of(directory, config)


def _import_tokenizer(source: str, dest: str, hf_config: Mapping[str, Any]) -> None:
    """Our tokenizer files from transformers': ``tokenizer.model`` -> ``sentencepiece.bpe.model`` and a
    ``tokenizer_config.json`` PaddleNLP's ``LlamaTokenizer`` reads (chat template included)."""
    tokenizer_config_path = os.path.join(source, "tokenizer_config.json")
    tokenizer_config = _read_json(tokenizer_config_path) if os.path.isfile(tokenizer_config_path) else {}
    special_map_path = os.path.join(source, "special_tokens_map.json")
    special_map = _read_json(special_map_path) if os.path.isfile(special_map_path) else {}
    for name in os.listdir(source):  # tokenizer.json etc. travel along (PaddleNLP 3 reads tokenizer.json)
        tokenizer_file = name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab", "merges", "sentencepiece"))
        if tokenizer_file or name.endswith(".jinja"):
            shutil.copy(os.path.join(source, name), os.path.join(dest, name))
    if not os.path.isfile(os.path.join(source, HF_SENTENCEPIECE)):
        if os.path.isfile(os.path.join(source, "tokenizer.json")):
            logger.warning(
                "%s has tokenizer.json but no tokenizer.model: PaddleNLP 2.8's LlamaTokenizer needs the "
                "SentencePiece model; pass tokenizer_name_or_path if loading the tokenizer fails",
                source,
            )
        return
    shutil.copy(os.path.join(source, HF_SENTENCEPIECE), os.path.join(dest, PADDLE_SENTENCEPIECE))
    ours: dict[str, Any] = {"tokenizer_class": "LlamaTokenizer"}
    for key in SPECIAL_TOKENS:
        text = _token_text(tokenizer_config.get(key)) or _token_text(special_map.get(key))
        if text is not None:
            ours[key] = text
    ours["add_bos_token"] = bool(tokenizer_config.get("add_bos_token", True))
    ours["add_eos_token"] = bool(tokenizer_config.get("add_eos_token", False))
    max_length = tokenizer_config.get("model_max_length")
    if isinstance(max_length, (int, float)) and 0 < max_length <= 10**8:
        ours["model_max_length"] = int(max_length)
    chat_template = _chat_template_of(source, tokenizer_config)
    if chat_template is not None:
        ours["chat_template"] = chat_template
    with open(os.path.join(dest, "tokenizer_config.json"), "w", encoding="utf-8") as file:
        json.dump(ours, file, indent=2, ensure_ascii=False)
    with open(os.path.join(dest, "special_tokens_map.json"), "w", encoding="utf-8") as file:
        json.dump({key: ours[key] for key in SPECIAL_TOKENS if key in ours}, file, indent=2, ensure_ascii=False)


#: A byte-level BPE tokenizer's files (Qwen2's ``Qwen2Tokenizer``), the same in PaddleNLP 3 and transformers.
BPE_FILES = ("vocab.json", "merges.txt")
#: Keys PaddleNLP's ``save_pretrained`` writes into ``tokenizer_config.json`` that are paths or load-time state.
_LOCAL_TOKENIZER_KEYS = ("name_or_path", "_from_auto", "added_tokens_file", "special_tokens_map_file", "tokenizer_file")


def _export_bpe_tokenizer(source: str, dest: str, ours: Mapping[str, Any]) -> None:
    """Byte-level BPE files copied as they are; ``tokenizer_config.json`` without PaddleNLP's local paths."""
    for name in BPE_FILES + ("added_tokens.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(dest, name))
    hf = {key: value for key, value in ours.items() if key not in _LOCAL_TOKENIZER_KEYS}
    with open(os.path.join(dest, "tokenizer_config.json"), "w", encoding="utf-8") as file:
        json.dump(hf, file, indent=2, ensure_ascii=False)


def _export_tokenizer(source: str, dest: str, config: Mapping[str, Any]) -> None:
    """transformers tokenizer files from ours: ``tokenizer.model``, ``tokenizer_config.json``
    (``LlamaTokenizer``, legacy SentencePiece behaviour as PaddleNLP's), ``special_tokens_map.json``."""
    tokenizer_config_path = os.path.join(source, "tokenizer_config.json")
    ours = _read_json(tokenizer_config_path) if os.path.isfile(tokenizer_config_path) else {}
    sentencepiece = next(
        (os.path.join(source, n) for n in (PADDLE_SENTENCEPIECE, HF_SENTENCEPIECE) if os.path.isfile(os.path.join(source, n))),
        None,
    )
    for name in ("tokenizer.json", "chat_template.jinja"):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(dest, name))
    if sentencepiece is None:
        byte_level_bpe = all(os.path.isfile(os.path.join(source, name)) for name in BPE_FILES)
        if byte_level_bpe:
            _export_bpe_tokenizer(source, dest, ours)
        elif not os.path.isfile(os.path.join(source, "tokenizer.json")):
            raise HFCheckpointError(
                f"{source}: no {PADDLE_SENTENCEPIECE}, {HF_SENTENCEPIECE}, {' + '.join(BPE_FILES)} or tokenizer.json to export"
            )
        return
    shutil.copy(sentencepiece, os.path.join(dest, HF_SENTENCEPIECE))
    hf: dict[str, Any] = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "clean_up_tokenization_spaces": False}
    for key in SPECIAL_TOKENS:
        if _token_text(ours.get(key)) is not None:
            hf[key] = _token_text(ours[key])
    hf["add_bos_token"] = bool(ours.get("add_bos_token", True))
    hf["add_eos_token"] = bool(ours.get("add_eos_token", False))
    if ours.get("model_max_length"):
        hf["model_max_length"] = int(ours["model_max_length"])
    elif config.get("max_position_embeddings"):
        hf["model_max_length"] = int(config["max_position_embeddings"])
    if ours.get("chat_template") is not None:
        hf["chat_template"] = ours["chat_template"]
    with open(os.path.join(dest, "tokenizer_config.json"), "w", encoding="utf-8") as file:
        json.dump(hf, file, indent=2, ensure_ascii=False)
    with open(os.path.join(dest, "special_tokens_map.json"), "w", encoding="utf-8") as file:
        json.dump({key: hf[key] for key in SPECIAL_TOKENS if key in hf}, file, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def import_hf_checkpoint(source: str, dest: str) -> str:
    """Convert the transformers directory ``source`` into our layout in ``dest`` (created); returns ``dest``.

    Weights: names via :func:`hf_to_paddle_name`, Linear weights transposed to ``[in, out]``; a tied or
    missing ``lm_head`` is copied from the embeddings (transposed). Config via :func:`config_from_hf`.
    """
    config_path = os.path.join(source, "config.json")
    if not os.path.isfile(config_path):
        raise HFCheckpointError(f"{source}: no config.json")
    hf_config = _read_json(config_path)
    config = config_from_hf(hf_config, where=config_path)
    architecture = HF_ARCHITECTURES[config["model_type"]]
    if not _safetensors_files(source):
        raise HFCheckpointError(
            f"{source}: only safetensors weights are read (no torch here); found no {SAFE_WEIGHTS} or {SAFE_INDEX}. "
            "Convert once with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    is_score = config["architectures"] == [architecture.score_model]
    tensors: list[tuple[str, str, np.ndarray]] = []
    embeddings = None
    for name, dtype, array in _iter_tensors(source):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers saved; recomputed from rope_theta
        new_name, transpose = hf_to_paddle_name(name, array.ndim, architecture)
        if is_score and new_name == "lm_head.weight":
            continue
        dtype = _TO_PADDLE_DTYPE.get(dtype, dtype)
        tensors.append((new_name, dtype, array.T if transpose else array))
        if new_name == f"{architecture.backbone}.embed_tokens.weight":
            embeddings = (dtype, array)
    names = {name for name, _, _ in tensors}
    if not is_score and "lm_head.weight" not in names:
        if embeddings is None:
            raise HFCheckpointError(f"{source}: no lm_head.weight and no embed_tokens.weight to tie it to")
        tensors.append(("lm_head.weight", embeddings[0], embeddings[1].T))  # the tied head, made explicit
    if is_score:
        bias = hf_config.get("score_head_bias")
        if bias is not None and "score_head.bias" not in names:
            tensors.append(("score_head.bias", "F32", np.asarray(bias, dtype=np.float32)))
        config["score_bias"] = "score_head.bias" in {name for name, _, _ in tensors}
    tensors.sort(key=lambda item: item[0])
    os.makedirs(dest, exist_ok=True)
    _write_safetensors(os.path.join(dest, SAFE_WEIGHTS), tensors, {"format": "np"})
    with open(os.path.join(dest, "config.json"), "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2)
    generation = os.path.join(source, "generation_config.json")
    if os.path.isfile(generation):
        shutil.copy(generation, os.path.join(dest, "generation_config.json"))
    _import_tokenizer(source, dest, hf_config)
    with open(os.path.join(dest, "converted_from.json"), "w", encoding="utf-8") as file:
        json.dump({"source": os.path.abspath(source), "converter_version": CONVERTER_VERSION}, file, indent=2)
    return dest


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_pretrained_dir(name_or_path: Optional[str], cache_dir: Optional[str] = None) -> Optional[str]:
    """``name_or_path`` itself, unless it is a transformers checkpoint: then its converted copy.

    The copy lives in ``cache_dir`` (default :func:`hf_cache_dir`) under a key of the source's content
    (:func:`checkpoint_content_key`), is made once (under a file lock, so parallel ranks share it, and
    renamed into place only when complete) and reused while the source is unchanged.
    """
    if not name_or_path:
        return name_or_path
    path = os.path.expanduser(name_or_path)
    if not is_hf_checkpoint(path):
        return name_or_path
    cache_dir = cache_dir or hf_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    key = checkpoint_content_key(path)
    target = os.path.join(cache_dir, f"{os.path.basename(os.path.normpath(path))}-{key}")
    if os.path.isdir(target):
        return target
    with _file_lock(target + ".lock"):
        if not os.path.isdir(target):
            scratch = f"{target}.tmp-{os.getpid()}"
            shutil.rmtree(scratch, ignore_errors=True)
            logger.info("converting the Hugging Face checkpoint %s into %s", path, target)
            import_hf_checkpoint(path, scratch)
            os.rename(scratch, target)
    return target


def is_hf_tokenizer_dir(path: Optional[str]) -> bool:
    """True for a directory with transformers' ``tokenizer.model`` but not PaddleNLP's
    ``sentencepiece.bpe.model`` (e.g. a tokenizer-only hub directory)."""
    return bool(path) and os.path.isfile(os.path.join(path, HF_SENTENCEPIECE)) and not os.path.isfile(
        os.path.join(path, PADDLE_SENTENCEPIECE)
    )


def resolve_tokenizer_dir(name_or_path: Optional[str], cache_dir: Optional[str] = None) -> Optional[str]:
    """Like :func:`resolve_pretrained_dir` for a tokenizer: a transformers checkpoint is converted whole;
    a tokenizer-only transformers directory gets its tokenizer files converted (same cache, same keys)."""
    resolved = resolve_pretrained_dir(name_or_path, cache_dir)
    path = os.path.expanduser(resolved) if resolved else resolved
    if resolved != name_or_path or not is_hf_tokenizer_dir(path):
        return resolved
    cache_dir = cache_dir or hf_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, f"{os.path.basename(os.path.normpath(path))}-tokenizer-{checkpoint_content_key(path)}")
    if os.path.isdir(target):
        return target
    with _file_lock(target + ".lock"):
        if not os.path.isdir(target):
            scratch = f"{target}.tmp-{os.getpid()}"
            shutil.rmtree(scratch, ignore_errors=True)
            os.makedirs(scratch)
            _import_tokenizer(path, scratch, {})
            os.rename(scratch, target)
    return target


def resolve_model_arguments(arguments: Any, cache_dir: Optional[str] = None) -> Any:
    """Replace every ``*_name_or_path`` field of a dataclass that names a transformers checkpoint by
    its converted directory (see :func:`resolve_pretrained_dir`); returns ``arguments``."""
    for field in dataclasses.fields(arguments):
        if field.name.endswith("_name_or_path"):
            value = getattr(arguments, field.name)
            if isinstance(value, str):
                resolve = resolve_tokenizer_dir if field.name.startswith("tokenizer") else resolve_pretrained_dir
                try:
                    resolved = resolve(value, cache_dir)
                except HFCheckpointError as error:
                    from alignment.utils.config import ConfigError

                    raise ConfigError([f"{field.name}: {error}"]) from error
                if resolved != value:
                    logger.info("%s: Hugging Face checkpoint %s -> %s", field.name, value, resolved)
                    setattr(arguments, field.name, resolved)
    return arguments


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def export_hf_checkpoint(source: str, dest: str) -> str:
    """Write our ``save_pretrained`` directory ``source`` as a transformers directory ``dest``.

    A causal LM becomes ``<Arch>ForCausalLM`` (tied only if its head equals its embeddings); a score
    model ``<Arch>ForSequenceClassification`` with ``score.weight`` ``[score_dim, hidden]`` and, when
    the head has a bias, ``config.score_head_bias`` (score = transformers' logits + that bias). The
    normalizer statistics stay in the config (``mean``, ``var``). Returns ``dest``.
    """
    config_path = os.path.join(source, "config.json")
    if not os.path.isfile(config_path):
        raise HFCheckpointError(f"{source}: no config.json (expected a save_pretrained directory)")
    if is_hf_checkpoint(source):
        raise HFCheckpointError(f"{source}: already a Hugging Face checkpoint")
    if os.path.realpath(source) == os.path.realpath(dest):
        raise HFCheckpointError(f"{dest}: the output directory must differ from the input")
    config = _read_json(config_path)
    architecture = _architecture(config.get("model_type"), config_path)
    if not _safetensors_files(source):
        raise HFCheckpointError(f"{source}: no {SAFE_WEIGHTS}; save with save_pretrained(safe_serialization=True)")
    if int(config.get("tensor_parallel_degree", 1) or 1) > 1:
        raise HFCheckpointError(f"{source}: tensor-parallel shards; merge them first (merge_tensor_parallel_checkpoint)")
    tensors: list[tuple[str, str, np.ndarray]] = []
    bias = None
    by_name: dict[str, np.ndarray] = {}
    for name, dtype, array in _iter_tensors(source):
        if name.startswith("normalizer."):
            continue  # kept in the config (mean, var)
        if name == "score_head.bias":
            bias = np.asarray(array, dtype=np.float32)
            continue
        hf_name, transpose = paddle_to_hf_name(name, array.ndim, architecture)
        if name == "lm_head.weight":
            transpose = lm_head_is_transposed(array.shape, config)
        tensors.append((hf_name, _TO_HF_DTYPE.get(dtype, dtype), array.T if transpose else array))
        by_name[hf_name] = array.T if transpose else array
    hf_config = config_to_hf(config)
    embed_name = f"{architecture.hf_backbone}.embed_tokens.weight"
    if "lm_head.weight" in by_name and embed_name in by_name:
        tied = by_name["lm_head.weight"].shape == by_name[embed_name].shape and np.array_equal(
            by_name["lm_head.weight"], by_name[embed_name]
        )
        hf_config["tie_word_embeddings"] = bool(tied and config.get("tie_word_embeddings"))
        if hf_config["tie_word_embeddings"]:
            tensors = [item for item in tensors if item[0] != "lm_head.weight"]
    if bias is not None:
        hf_config["score_head_bias"] = bias.reshape(-1).tolist()
    tensors.sort(key=lambda item: item[0])
    os.makedirs(dest, exist_ok=True)
    _write_safetensors(os.path.join(dest, SAFE_WEIGHTS), tensors, {"format": "pt"})
    with open(os.path.join(dest, "config.json"), "w", encoding="utf-8") as file:
        json.dump(hf_config, file, indent=2)
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(key) is not None}
    generation_path = os.path.join(source, "generation_config.json")
    if os.path.isfile(generation_path):
        stored = _read_json(generation_path)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "max_new_tokens", "temperature", "top_p", "top_k"):
            if stored.get(key) is not None:
                generation.setdefault(key, stored[key])
    if "ForCausalLM" in hf_config["architectures"][0]:
        with open(os.path.join(dest, "generation_config.json"), "w", encoding="utf-8") as file:
            json.dump(generation, file, indent=2)
    _export_tokenizer(source, dest, config)
    return dest
