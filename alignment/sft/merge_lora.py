"""Fold LoRA adapters into their base weights and save a plain checkpoint (PPO needs whole weights).

``run_sft.py`` with ``lora: true`` does this at the end of training by itself. For an intermediate
checkpoint (adapters only, as the Trainer saves them)::

    python alignment/sft/merge_lora.py --lora_path output/sft/checkpoint-100 --output_dir output/sft-merged \
        [--base_model_name_or_path assets/tiny/llama]

The base model defaults to the ``base_model_name_or_path`` recorded in the adapter's lora_config.json.
The result loads with ``AutoModelForCausalLM.from_pretrained(output_dir)`` (safetensors).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import paddle

__all__ = ["LORA_ADAPTER_DIR", "merge_lora_state_dict", "merge_lora_model", "MergeArgument", "main"]

logger = logging.getLogger(__name__)

#: Where run_sft.py keeps the adapters of a LoRA run, under output_dir.
LORA_ADAPTER_DIR = "lora_adapter"

_A, _B = ".lora_A", ".lora_B"


def merge_lora_state_dict(state_dict: Mapping[str, paddle.Tensor], scaling: float) -> dict[str, paddle.Tensor]:
    """A state dict without LoRA tensors, each adapted ``<layer>.weight`` replaced by ``W + s·A·B``.

    Paddle ``Linear`` weights are ``[in, out]``; ``<layer>.lora_A`` is ``[in, r]`` and
    ``<layer>.lora_B`` is ``[r, out]``, so ``A @ B`` is ``[in, out]`` and ``y = x (W + s·A·B) + b``
    equals the adapted layer's ``x W + b + s·(x A) B``. The sum is formed in float32 and cast back to
    ``W``'s dtype; merged tensors are returned on the CPU. Other entries are passed through.
    """
    merged: dict[str, paddle.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(_B):
            continue
        if not key.endswith(_A):
            merged.setdefault(key, value)
            continue
        layer = key[: -len(_A)]
        weight_key, b_key = layer + ".weight", layer + _B
        if weight_key not in state_dict or b_key not in state_dict:
            raise KeyError(f"LoRA tensor {key!r} has no matching {weight_key!r} and {b_key!r}")
        weight, lora_a, lora_b = state_dict[weight_key], value, state_dict[b_key]
        delta = paddle.matmul(lora_a.astype("float32"), lora_b.astype("float32")) * scaling
        if list(delta.shape) != list(weight.shape):
            raise ValueError(f"{layer}: A·B has shape {delta.shape} but the weight has {weight.shape}")
        merged[weight_key] = (weight.astype("float32") + delta).astype(weight.dtype).cpu()
    return merged


def merge_lora_model(lora_model: Any, output_dir: str, tokenizer: Optional[Any] = None) -> str:
    """Save ``lora_model`` (a ``paddlenlp.peft.LoRAModel``) merged, as a plain safetensors checkpoint.

    The wrapped model is left untouched (adapters stay separate), so training may continue.
    """
    base = lora_model.model
    if getattr(base.config, "tensor_parallel_degree", 1) > 1:
        raise NotImplementedError("merging LoRA of a tensor-parallel model is not supported; merge from one process")
    state_dict = merge_lora_state_dict(base.state_dict(), lora_model.lora_config.scaling)
    base.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    logger.info("Merged LoRA model saved to %s", output_dir)
    return output_dir


@dataclass
class MergeArgument:
    """Arguments of ``merge_lora.py``."""

    lora_path: Optional[str] = field(default=None, metadata={"help": "Directory with lora_config.json and adapters."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Where to write the merged model."})
    base_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Base model; defaults to the one recorded in lora_config.json."}
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer to save with the model; defaults to lora_path, else the base model."}
    )


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Merge ``--lora_path`` into its base model and save to ``--output_dir``; returns ``output_dir``."""
    from paddlenlp.peft import LoRAConfig, LoRAModel
    from paddlenlp.transformers import AutoModelForCausalLM

    from alignment.data import load_tokenizer
    from alignment.utils.config import Problems, parse_arguments

    (args,) = parse_arguments((MergeArgument,), argv)
    problems = Problems()
    problems.check(bool(args.output_dir), "output_dir", "required")
    if problems.check(bool(args.lora_path), "lora_path", "required"):
        problems.check(
            os.path.isfile(os.path.join(args.lora_path, "lora_config.json")),
            "lora_path",
            f"{args.lora_path!r} holds no lora_config.json (is it a LoRA checkpoint?)",
        )
    problems.raise_if_any()

    lora_config = LoRAConfig.from_pretrained(args.lora_path)
    base_path = args.base_model_name_or_path or lora_config.base_model_name_or_path
    if not base_path:
        problems.add("base_model_name_or_path", "required: lora_config.json does not record the base model")
        problems.raise_if_any()
    from alignment.models.hf_convert import resolve_pretrained_dir

    base_path = resolve_pretrained_dir(base_path)  # a Hugging Face directory is converted (cached)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=lora_config.dtype or "float32")
    lora_model = LoRAModel.from_pretrained(base, args.lora_path, lora_config=lora_config)
    has_tokenizer = any(
        os.path.isfile(os.path.join(args.lora_path, name)) for name in ("tokenizer_config.json", "tokenizer.model")
    )
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or (args.lora_path if has_tokenizer else base_path))
    return merge_lora_model(lora_model, args.output_dir, tokenizer=tokenizer)


if __name__ == "__main__":
    from alignment.utils.config import run_entry_point

    run_entry_point(main)
